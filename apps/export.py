r"""Exports a saved classifier as a SavedModel that serves raw images.

The `serve` signature takes uint8 images [batch, height, width, channels] of
any size and returns class probabilities and class ids. Class names are read
from the run's report.json beside the model when present.

Example:

  python -m apps.export --model=runs/finetune/baseline-elpv-1-seed0/model.keras \
      --output=exported/elpv_classifier
"""

import json
import os

from absl import app
from absl import flags

from apps import common

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
        import keras

        import keras_seltransfer  # noqa: F401  (registers custom layers)
        from keras_seltransfer.export import export_saved_model

        model = keras.saving.load_model(FLAGS.model, compile=False, safe_mode=True)
        class_names = None
        report = os.path.join(os.path.dirname(os.path.abspath(FLAGS.model)), "report.json")
        if os.path.isfile(report):
            with open(report) as f:
                class_names = json.load(f).get("class_names")
        path = export_saved_model(
            model, FLAGS.output, class_names=class_names, overwrite=FLAGS.overwrite
        )
    except common.USER_ERRORS as e:
        common.fail("export", e)
    print(f"SavedModel written to {path}")


def run():
    app.run(main)


if __name__ == "__main__":
    run()
