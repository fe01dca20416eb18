r"""Evaluates a saved classifier on a data set's held-out test split.

The test split is chosen exactly as apps.finetune chooses it (the data set's
own test split, or the held-out share given by --test_fraction and
--split_seed), so a model can be re-scored on the images its run never saw.
The model is loaded in Keras safe mode (no code from the file runs). When
the run's report.json lies beside the model, the data must have the classes
the model was trained on, in the same order. Writes <stem>.json and
<stem>.md beside the model unless --output_dir is set.

With --strategy=multi_worker (and TF_CONFIG, as for apps.finetune) every
worker runs the same command, predicts its share of each batch and gets
every prediction; only the chief writes the report.

Example:

  python -m apps.evaluate --model=runs/finetune/baseline-elpv-1-seed0/model.keras --data=elpv
"""

import os

from absl import flags

from keras_seltransfer import data as data_lib
from keras_seltransfer import distribute
from keras_seltransfer import evaluation
from keras_seltransfer import training
from keras_seltransfer.apps import common
from keras_seltransfer.models.backbones import load_keras_file

flags.DEFINE_string("model", None, "Path to a .keras classifier (for example a run's model.keras).")
flags.DEFINE_string("data", "elpv", "Data set spec (see apps.finetune --target).")
flags.DEFINE_float(
    "test_fraction", 0.25, "Held-out share for data sets without a test split.",
    lower_bound=0.0, upper_bound=1.0,
)
flags.DEFINE_integer(
    "split_seed", 0, "Seed of the held-out split (as used for training).",
    lower_bound=0, upper_bound=common.MAX_SEED,
)
flags.DEFINE_integer("batch_size", 64, "Evaluation batch size.", lower_bound=1)
flags.DEFINE_string("output_dir", None, "Where to write the report (default: beside the model).")
flags.DEFINE_string("stem", "evaluation", "File name stem of the report.")
flags.DEFINE_enum(
    "strategy", "auto", distribute.STRATEGY_NAMES,
    "Distribution strategy (see distribute.get_strategy); the test images are split "
    "over its replicas and workers.",
)
flags.mark_flag_as_required("model")

FLAGS = flags.FLAGS


def _check_classes(model, model_path, test, data_spec):
    """Refuses data whose classes are not the ones the model predicts.

    The model's output count must match the data's classes, and the class
    names recorded in the run's report.json beside the model (when there is
    one) must equal the data's, in order: otherwise every label would be
    scored against another class.
    """
    if len(model.outputs) != 1:
        raise ValueError(
            f"--model={model_path} has {len(model.outputs)} outputs; apps.evaluate scores "
            "a single-output classifier (a run's model.keras, not its multitask.keras)."
        )
    num_outputs = int(model.outputs[0].shape[-1])
    if num_outputs != test.num_classes:
        raise ValueError(
            f"--model={model_path} predicts {num_outputs} classes but --data={data_spec} "
            f"has {test.num_classes} ({', '.join(test.class_names)}). Expected the data set "
            "the model was trained on."
        )
    trained = common.run_class_names(model_path)
    if trained is not None and tuple(trained) != tuple(test.class_names):
        raise ValueError(
            f"--model={model_path} was trained on the classes {list(trained)} (its "
            f"report.json) but --data={data_spec} has {list(test.class_names)}. Expected "
            "the same classes in the same order."
        )


def main(argv):
    common.reject_extra_args(argv)
    try:
        if not os.path.isfile(FLAGS.model):
            raise FileNotFoundError(f"--model file not found: {FLAGS.model!r}")
        # First: a multi-worker strategy configures TensorFlow's collective
        # ops before anything starts the runtime.
        strategy = distribute.get_strategy(FLAGS.strategy)
        with strategy.scope():
            model = load_keras_file(FLAGS.model, what="model")
        channels = int(model.inputs[0].shape[-1])
        # Image folders mixing channel counts load converted to the model's.
        _, test = data_lib.load_train_test(
            FLAGS.data, FLAGS.test_fraction, FLAGS.split_seed,
            channels=channels if channels in (1, 3) else None,
        )
        _check_classes(model, FLAGS.model, test, FLAGS.data)
        report = training.evaluate_model(
            model, test, FLAGS.batch_size,
            {
                "model": os.path.abspath(FLAGS.model),
                "data": FLAGS.data,
                "strategy": distribute.describe_strategy(strategy),
            },
            strategy=strategy,
        )
        out_dir = FLAGS.output_dir or os.path.dirname(os.path.abspath(FLAGS.model))
        written = None
        if distribute.is_chief():
            written = evaluation.write_report(
                report, out_dir, stem=FLAGS.stem, title=f"Evaluation on {FLAGS.data}"
            )
    except common.USER_ERRORS as e:
        common.fail("evaluate", e)
    print(
        f"accuracy {report['accuracy']:.4f}, balanced accuracy "
        f"{report['balanced_accuracy']:.4f} on {report['num_examples']} images"
    )
    if written is None:
        print("  report: written by the chief worker")
    else:
        print(f"  report: {written[1]}\n  json: {written[0]}")


def run():
    """Runs the app with the command line's flags."""
    common.run_app(main)


if __name__ == "__main__":
    run()
