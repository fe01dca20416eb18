"""Fine-tunes a pretrained backbone on a small target data set.

Methods (--method):
{methods}
  auto          choose among --auto_candidates by k-fold cross-validation on the
                training images, then train the choice as its own run would

Writes the fine-tuned classifier (model.keras), a test report (report.json,
report.md: accuracy, balanced accuracy, per-class accuracy, confusion matrix),
a SavedModel serving raw images (saved_model/), TensorBoard logs and resumable
checkpoints into --output_dir. Rerunning an interrupted command resumes it;
a second command on the same --output_dir is refused while the first runs
(its lock file, run.lock, names it; see --force).
Every option below is an option of keras_seltransfer.training.FinetuneConfig,
declared by the method that reads it (keras_seltransfer/methods/).

Example (after `python -m apps.pretrain`):

  python -m apps.finetune --target=elpv --fraction=0.15 --seed=1
  python -m apps.finetune --method=sjft --source=fashion_mnist --target=elpv --fraction=0.15
  python -m apps.finetune --method=auto --target=elpv --fraction=0.15 --auto_time_budget=30
"""

import textwrap

from absl import flags

from keras_seltransfer import methods
from keras_seltransfer import training
from keras_seltransfer.apps import common
from keras_seltransfer.training import auto


def _method_list():
    lines = []
    for name in methods.names():
        lines.extend(textwrap.wrap(
            f"{name:<13} {methods.get(name).summary}",
            width=78, initial_indent="  ", subsequent_indent=" " * 16,
        ))
    return "\n".join(lines)


__doc__ = __doc__.format(methods=_method_list())

common.define_config_flags(
    training.FinetuneConfig, choices={"method": methods.names() + (methods.AUTO,)}
)

FLAGS = flags.FLAGS


def main(argv):
    common.reject_extra_args(argv)
    try:
        config = common.config_from_flags(training.FinetuneConfig)
        outputs = training.finetune(config)
    except common.USER_ERRORS as e:
        common.fail("finetune", e)
    report = outputs["report"]
    if "auto" in report:
        print("\n" + auto.summary_markdown(report["auto"]), end="")
    method = report.get("auto_choice", config.method)
    if "auto" in report:
        method = f"auto ({method})"
    print(
        f"\n{method} on {config.target}: test accuracy {report['accuracy']:.4f}, "
        f"balanced accuracy {report['balanced_accuracy']:.4f} "
        f"({report['num_examples']} test images, {report['train_examples']} training images)"
    )
    common.print_paths(
        outputs,
        (
            ("report_md", "report"),
            ("auto_json", "method selection"),
            ("model", "model"),
            ("multitask_model", "two-head model"),
            ("saved_model", "SavedModel"),
        ),
    )


def run():
    """Runs the app with the command line's flags."""
    common.run_app(main)


if __name__ == "__main__":
    run()
