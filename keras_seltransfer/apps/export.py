r"""Exports a saved classifier as a SavedModel that serves raw images.

The `serve` signature takes uint8 images [batch, height, width, channels] of
any size and returns class probabilities and class ids. Class names are read
from the run's report.json beside the model when present. The model is loaded
in Keras safe mode (no code from the file runs), and the SavedModel is written
atomically: a failed export leaves an existing one at --output intact.

Example:

  python -m apps.export --model=runs/finetune/baseline-elpv-1-seed0/model.keras \
      --output=exported/elpv_classifier
"""

import os

from absl import flags

from keras_seltransfer.apps import common
from keras_seltransfer.export import export_saved_model
from keras_seltransfer.models.backbones import load_keras_file

flags.DEFINE_string("model", None, "Path to a .keras classifier.")
flags.DEFINE_string("output", None, "SavedModel directory to write.")
flags.DEFINE_boolean("overwrite", False, "Replace an existing export at --output.")
flags.mark_flags_as_required(["model", "output"])

FLAGS = flags.FLAGS


def main(argv):
    common.reject_extra_args(argv)
    try:
        if not os.path.isfile(FLAGS.model):
            raise FileNotFoundError(f"--model file not found: {FLAGS.model!r}")

        model = load_keras_file(FLAGS.model, what="model")
        class_names = common.run_class_names(FLAGS.model)
        path = export_saved_model(
            model, FLAGS.output, class_names=class_names, overwrite=FLAGS.overwrite
        )
    except common.USER_ERRORS as e:
        common.fail("export", e)
    print(f"SavedModel written to {path}")


def run():
    """Runs the app with the command line's flags."""
    common.run_app(main)


if __name__ == "__main__":
    run()
