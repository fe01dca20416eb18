r"""Fine-tunes a pretrained backbone on a small target data set.

Methods (--method):
  baseline  plain fine-tuning of every layer (the "ERM" row of the
            Transfer-Learning-Library benchmarks), BatchNorm statistics frozen
  l2sp      fine-tuning with the L2-SP penalty toward the pretrained weights
            (Li, Grandvalet and Davoine, ICML 2018)

Writes the fine-tuned classifier (model.keras), a test report (report.json,
report.md: accuracy, balanced accuracy, per-class accuracy, confusion matrix),
a SavedModel serving raw images (saved_model/), TensorBoard logs and resumable
checkpoints into --output_dir. Rerunning an interrupted command resumes it.

Example (after `python -m apps.pretrain`):

  python -m apps.finetune --target=elpv --fraction=0.15 --seed=1
"""

from absl import app
from absl import flags

from apps import common
from keras_seltransfer import training

_D = common.defaults(training.FinetuneConfig)

flags.DEFINE_string(
    "target",
    _D["target"],
    "Target data: elpv, fashion_mnist, folder:/path (one sub-folder per class, "
    "or train/ and test/ inside), tfds:name, numpy:/path/file.npz.",
)
flags.DEFINE_enum("method", _D["method"], list(training.METHODS), "Fine-tuning method.")
flags.DEFINE_float(
    "fraction", _D["fraction"], "Fraction of each training class to keep (0, 1].",
    lower_bound=0.0, upper_bound=1.0,
)
flags.DEFINE_integer(
    "per_class", None, "Keep exactly this many training images per class (overrides --fraction).",
    lower_bound=1,
)
flags.DEFINE_float("dropout", _D["dropout"], "Dropout before the head.", lower_bound=0.0, upper_bound=0.99)
flags.DEFINE_enum(
    "batchnorm", _D["batchnorm"], ["frozen", "train"],
    "BatchNorm during fine-tuning: frozen (pretrained statistics) or train.",
)
flags.DEFINE_enum(
    "class_weight", _D["class_weight"], ["none", "balanced"], "Loss weighting of classes."
)
flags.DEFINE_float("l2sp_alpha", _D["l2sp_alpha"], "L2-SP: pull toward pretrained weights.", lower_bound=0.0)
flags.DEFINE_float("l2sp_beta", _D["l2sp_beta"], "L2-SP: weight decay of the new head.", lower_bound=0.0)
flags.DEFINE_boolean(
    "from_scratch", _D["from_scratch"], "Re-initialise the backbone (target-only training from scratch)."
)
flags.DEFINE_string("cut_layer", _D["cut_layer"], "Layer at which to cut a saved or application backbone.")
flags.DEFINE_boolean("export", _D["export"], "Write a SavedModel of the fine-tuned classifier.")
common.define_training_flags(training.FinetuneConfig)

# List the shared flags in --help, not only in --helpfull.
flags.adopt_module_key_flags(common)

FLAGS = flags.FLAGS


def main(argv):
    common.reject_extra_args(argv)
    try:
        config = common.config_from_flags(training.FinetuneConfig)
        outputs = training.finetune(config)
    except common.USER_ERRORS as e:
        common.fail("finetune", e)
    report = outputs["report"]
    print(
        f"\n{config.method} on {config.target}: test accuracy {report['accuracy']:.4f}, "
        f"balanced accuracy {report['balanced_accuracy']:.4f} "
        f"({report['num_examples']} test images, {report['train_examples']} training images)"
    )
    for key, label in (("report_md", "report"), ("model", "model"), ("saved_model", "SavedModel")):
        if key in outputs:
            print(f"  {label}: {outputs[key]}")


def run():
    app.run(main)


if __name__ == "__main__":
    run()
