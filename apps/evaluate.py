r"""Evaluates a saved classifier on a data set's held-out test split.

The test split is chosen exactly as apps.finetune chooses it (the data set's
own test split, or the held-out share given by --test_fraction and
--split_seed), so a model can be re-scored on the images its run never saw.
Writes <stem>.json and <stem>.md beside the model unless --output_dir is set.

Example:

  python -m apps.evaluate --model=runs/finetune/baseline-elpv-1-seed0/model.keras --data=elpv
"""

import os

from absl import app
from absl import flags

from apps import common

flags.DEFINE_string("model", None, "Path to a .keras classifier (for example a run's model.keras).")
flags.DEFINE_string("data", "elpv", "Data set spec (see apps.finetune --target).")
flags.DEFINE_float(
    "test_fraction", 0.25, "Held-out share for data sets without a test split.",
    lower_bound=0.0, upper_bound=1.0,
)
flags.DEFINE_integer("split_seed", 0, "Seed of the held-out split (as used for training).")
flags.DEFINE_integer("batch_size", 64, "Evaluation batch size.", lower_bound=1)
flags.DEFINE_string("output_dir", None, "Where to write the report (default: beside the model).")
flags.DEFINE_string("stem", "evaluation", "File name stem of the report.")
flags.mark_flag_as_required("model")

FLAGS = flags.FLAGS


def main(argv):
    common.reject_extra_args(argv)
    try:
        if not os.path.isfile(FLAGS.model):
            raise FileNotFoundError(f"--model file not found: {FLAGS.model!r}")
        import keras

        import keras_seltransfer  # noqa: F401  (registers custom layers)
        from keras_seltransfer import data as data_lib
        from keras_seltransfer import evaluation
        from keras_seltransfer import training

        model = keras.saving.load_model(FLAGS.model, compile=False, safe_mode=True)
        _, test = training.load_train_test(FLAGS.data, FLAGS.test_fraction, FLAGS.split_seed)
        height, width, channels = (int(d) for d in model.inputs[0].shape[1:])
        dataset = data_lib.make_dataset(
            test, (height, width), FLAGS.batch_size, channels=channels
        )
        probabilities, labels = evaluation.predict_dataset(model, dataset)
        report = evaluation.classification_report(labels, probabilities, test.class_names)
        report.update({"model": os.path.abspath(FLAGS.model), "data": FLAGS.data})
        out_dir = FLAGS.output_dir or os.path.dirname(os.path.abspath(FLAGS.model))
        json_path, md_path = evaluation.write_report(
            report, out_dir, stem=FLAGS.stem, title=f"Evaluation on {FLAGS.data}"
        )
    except common.USER_ERRORS as e:
        common.fail("evaluate", e)
    print(
        f"accuracy {report['accuracy']:.4f}, balanced accuracy "
        f"{report['balanced_accuracy']:.4f} on {report['num_examples']} images\n"
        f"  report: {md_path}\n  json: {json_path}"
    )


def run():
    app.run(main)


if __name__ == "__main__":
    run()
