r"""Pretrains a backbone on a source data set and saves it as a .keras file.

Pretrained backbones for offline work come from here: by default the built-in
small_cnn is trained on Fashion-MNIST at 64x64 for 3 epochs (a few minutes on
two CPU cores) and saved to runs/pretrain/fashion_mnist-small_cnn-64/model.keras,
which is the default --backbone of apps.finetune. A second command on the same
--output_dir is refused while the first runs (its lock file, run.lock, names
it; see --force).

Example:

  python -m apps.pretrain --source=fashion_mnist --epochs=3
"""

from absl import flags

from keras_seltransfer import training
from keras_seltransfer.apps import common

common.define_config_flags(
    training.PretrainConfig,
    help_overrides={
        "source": "Source data: fashion_mnist, elpv, textures, folder:/path, tfds:name, "
        "numpy:/path/file.npz.",
        "fraction": "Fraction of each source class to train on (0, 1].",
    },
)

FLAGS = flags.FLAGS


def main(argv):
    common.reject_extra_args(argv)
    try:
        config = common.config_from_flags(training.PretrainConfig)
        outputs = training.pretrain(config)
    except common.USER_ERRORS as e:
        common.fail("pretrain", e)
    report = outputs["report"]
    print(
        f"\npretrained {config.backbone} on {config.source}: test accuracy "
        f"{report['accuracy']:.4f} ({report['num_examples']} test images)"
    )
    common.print_paths(outputs, (("model", "backbone"), ("report_md", "report")))


def run():
    """Runs the app with the command line's flags."""
    common.run_app(main)


if __name__ == "__main__":
    run()
