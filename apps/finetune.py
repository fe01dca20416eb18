r"""Fine-tunes a pretrained backbone on a small target data set.

Methods (--method):
  baseline  plain fine-tuning of every layer (the "ERM" row of the
            Transfer-Learning-Library benchmarks), BatchNorm statistics frozen
  l2sp      fine-tuning with the L2-SP penalty toward the pretrained weights
            (Li, Grandvalet and Davoine, ICML 2018)
  sjft      selective joint fine-tuning (Ge and Yu, CVPR 2017): every batch is
            half target images and half source images, each a random neighbour
            (by low-level filter-bank statistics) of one of the batch's target
            images; a source head learns the source labels beside the target
            head; the neighbour lists of hard target images grow as training
            goes. The neighbours come from --index_dir (apps.build_index),
            built there when missing.
  sjft_nogrowth, sjft_all, sjft_random
            the paper's ablations: no neighbour growth; all source images
            drawn uniformly; as many random source images as sjft selects.
            With --from_scratch: selective joint training from scratch.

Writes the fine-tuned classifier (model.keras), a test report (report.json,
report.md: accuracy, balanced accuracy, per-class accuracy, confusion matrix),
a SavedModel serving raw images (saved_model/), TensorBoard logs and resumable
checkpoints into --output_dir. Rerunning an interrupted command resumes it.

Example (after `python -m apps.pretrain`):

  python -m apps.finetune --target=elpv --fraction=0.15 --seed=1
  python -m apps.finetune --method=sjft --source=fashion_mnist --target=elpv --fraction=0.15
"""

from absl import app
from absl import flags

from apps import common
from keras_seltransfer import training

_D = common.defaults(training.FinetuneConfig)

flags.DEFINE_string(
    "target",
    _D["target"],
    "Target data: elpv, textures, fashion_mnist, folder:/path (one sub-folder per class, "
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
    "BatchNorm during fine-tuning: frozen (pretrained statistics) or train. "
    "Unset: frozen for baseline/l2sp, train (mixed batches) for the sjft methods "
    "(served with --joint_bn_stats).",
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
flags.DEFINE_string(
    "source", _D["source"], "sjft: source data set spec (its training split is the pool)."
)
flags.DEFINE_string(
    "index_dir", None,
    "sjft: retrieval run directory holding neighbours.npz (apps.build_index); built there "
    "when missing. Default: runs/index/<source>-<target>-<index_bank>.",
)
flags.DEFINE_enum(
    "index_bank", _D["index_bank"], list(training.INDEX_BANKS),
    "sjft: filter bank when building the index (conv needs a .keras --backbone).",
)
flags.DEFINE_integer("k0", _D["k0"], "sjft: initial neighbours per target image.", lower_bound=1)
flags.DEFINE_integer(
    "k_max", _D["k_max"], "sjft: neighbours kept per target in a new index; lists grow to at most "
    "min(k_max, max_level*k0).",
    lower_bound=1,
)
flags.DEFINE_integer(
    "max_level", _D["max_level"],
    "sjft: highest sampling level (the authors' highest_sample_level): lists grow to at most "
    "max_level*k0 neighbours and no target image is drawn more than max_level times per "
    "epoch. 0: no cap (lists grow to k_max; the behaviour before this flag).",
    lower_bound=0,
)
flags.DEFINE_integer(
    "growth_period", _D["growth_period"], "sjft: epochs per neighbour-growth round.", lower_bound=1
)
flags.DEFINE_enum(
    "growth_mode", _D["growth_mode"], list(training.GROWTH_MODES),
    "sjft: epochs: grow every growth_period epochs under one learning-rate schedule; "
    "rounds: every growth_period epochs is a round with its own (restarted) cosine "
    "schedule, lists grow between rounds (as the authors' separate training rounds).",
)
flags.DEFINE_enum(
    "joint_bn_stats", _D["joint_bn_stats"], list(training.JOINT_BN_STATS),
    "sjft with BatchNorm trained: statistics used for validation and serving (default "
    "mixture_exact, chosen on validation). target: "
    "re-estimated on the target training images before every validation and after "
    "training; mixture_exact: re-estimated then on the epoch's mixed training batches; "
    "mixture: moving averages of the mixed batches (the behaviour before this flag; "
    "collapses on targets unlike the source).",
)
flags.DEFINE_float(
    "sigma0", _D["sigma0"], "sjft: growth of misclassified images, in units of k0.", lower_bound=0.0
)
flags.DEFINE_float(
    "sigma1", _D["sigma1"], "sjft: growth of correct but uncertain images, in units of k0.",
    lower_bound=0.0,
)
flags.DEFINE_float(
    "delta", None,
    "sjft: entropy (nats) from which a correct prediction counts as uncertain. "
    "Unset: half the maximum entropy, ln(classes)/2.",
    lower_bound=0.0,
)
flags.DEFINE_float(
    "target_weight", _D["target_weight"], "sjft: weight of the target loss.", lower_bound=0.0
)
flags.DEFINE_float(
    "source_weight", _D["source_weight"], "sjft: weight of the source loss.", lower_bound=0.0
)
# AdaFilter (--method=adafilter).
flags.DEFINE_string(
    "gated_layers", None,
    "adafilter: regular expression of the conv layer names to gate. Unset: every Conv2D "
    "and DepthwiseConv2D.",
)
flags.DEFINE_enum(
    "gate_estimator", _D["gate_estimator"], list(training.GATE_ESTIMATORS),
    "adafilter: gradient estimator of the discrete gates (straight-through threshold "
    "or straight-through Gumbel-softmax).",
)
flags.DEFINE_float(
    "gate_temperature", _D["gate_temperature"], "adafilter: Gumbel-softmax temperature.",
    lower_bound=1e-6,
)
flags.DEFINE_integer(
    "gate_units", _D["gate_units"], "adafilter: hidden units of the shared recurrent gate.",
    lower_bound=1,
)
flags.DEFINE_float(
    "gate_usage_target", None,
    "adafilter: target fraction of fine-tuned filters chosen (adds a sparsity loss). "
    "Unset: no sparsity loss.",
    lower_bound=0.0, upper_bound=1.0,
)
flags.DEFINE_float(
    "gate_usage_weight", _D["gate_usage_weight"], "adafilter: weight of the sparsity loss.",
    lower_bound=0.0,
)
flags.DEFINE_enum(
    "gated_batchnorm", _D["gated_batchnorm"], list(training.GATED_BATCHNORM_MODES),
    "adafilter: the fine-tuned path's batch norm: train (its own batch statistics and affine "
    "parameters, as in the paper) or frozen (a frozen copy of the pretrained one). "
    "Independent of --batchnorm, which governs the other batch norms.",
)
flags.DEFINE_float(
    "gate_lr_multiplier", _D["gate_lr_multiplier"],
    "adafilter: learning rate of the gate network as a multiple of --learning_rate "
    "(same schedule, Adam or SGD).",
    lower_bound=1e-6,
)
flags.DEFINE_enum(
    "first_gate_input", _D["first_gate_input"], list(training.FIRST_GATE_INPUTS),
    "adafilter: what the first gate reads: features (the pooled output of the first gated "
    "layer's frozen pretrained filters) or input (its pooled input: one brightness value "
    "per grayscale image).",
)
flags.DEFINE_boolean(
    "gate_input_norm", _D["gate_input_norm"],
    "adafilter: standardise each gate's pooled input over the batch (moving averages at "
    "inference) before the gate network reads it (not in the paper).",
)
# Selective filter transfer (--method=filter_transfer).
flags.DEFINE_enum(
    "relevance_statistic", _D["relevance_statistic"], list(training.RELEVANCE_STATISTICS),
    "filter_transfer: filter relevance: mean post-activation response, activation "
    "frequency, or symmetric KL between source and target response distributions.",
)
flags.DEFINE_float(
    "transfer_ratio", _D["transfer_ratio"],
    "filter_transfer: fraction of each layer's filters transferred; the rest are re-initialised.",
    lower_bound=0.0, upper_bound=1.0,
)
flags.DEFINE_boolean(
    "reinit_next", _D["reinit_next"],
    "filter_transfer: also re-initialise the next layer's input slices of re-initialised filters.",
)
flags.DEFINE_enum(
    "reinit_batchnorm", _D["reinit_batchnorm"], list(training.REINIT_BATCHNORM),
    "filter_transfer with frozen BatchNorm: channels trains the re-initialised filters' BatchNorm "
    "channels (batch statistics, learnt scale/offset) while transferred channels stay frozen; "
    "layer trains each BatchNorm layer holding a re-initialised channel; frozen keeps them at "
    "scale 1, offset 0 and statistics estimated once at initialisation.",
)
flags.DEFINE_integer(
    "prune_period", _D["prune_period"],
    "filter_transfer: epochs between relevance-pruning rounds during fine-tuning (0: none).",
    lower_bound=0,
)
flags.DEFINE_float(
    "prune_fraction", _D["prune_fraction"],
    "filter_transfer: fraction of each layer's filters pruned by the end of training.",
    lower_bound=0.0, upper_bound=1.0,
)
flags.DEFINE_enum(
    "prune_action", _D["prune_action"], list(training.PRUNE_ACTIONS),
    "filter_transfer: mask or re-initialise pruned filters.",
)
# Anti-aliasing (--method=antialias_ft, ktft).
flags.DEFINE_integer(
    "blur_filt_size", _D["blur_filt_size"], "antialias_ft/ktft: BlurPool filter size.",
    lower_bound=1, upper_bound=7,
)
flags.DEFINE_enum(
    "blur_pad_type", _D["blur_pad_type"], list(training.BLUR_PAD_TYPES),
    "antialias_ft/ktft: BlurPool padding.",
)
flags.DEFINE_boolean(
    "blur_keep_stem", _D["blur_keep_stem"],
    "antialias_ft/ktft: keep the input's strided convolution strided (as Zhang's released "
    "models) instead of running it at full resolution before a blur.",
)
flags.DEFINE_enum(
    "recalibrate_batchnorm", _D["recalibrate_batchnorm"], ["target", "source", "none"],
    "antialias_ft/ktft/--compose=antialias: re-estimate the anti-aliased network's BatchNorm "
    "statistics on the target training images, on the --source training images (when they "
    "are the backbone's pretraining data), or keep the copied statistics (none).",
)
flags.DEFINE_integer(
    "recalibration_images", _D["recalibration_images"],
    "Images used to re-estimate BatchNorm statistics (at most).", lower_bound=1,
)
flags.DEFINE_float(
    "ktft_pixel_weight", _D["ktft_pixel_weight"],
    "ktft: weight of the pixel-level loss (feature-map MSE to the original network).",
    lower_bound=0.0,
)
flags.DEFINE_float(
    "ktft_global_weight", _D["ktft_global_weight"],
    "ktft: weight of the global-level loss (pooled stage features).", lower_bound=0.0,
)
flags.DEFINE_float(
    "ktft_logit_weight", _D["ktft_logit_weight"],
    "ktft: weight of the teacher-to-student KL on class probabilities.", lower_bound=0.0,
)
flags.DEFINE_string(
    "ktft_layers", None,
    "ktft: comma-separated stage-output layer names the losses compare. Unset: every "
    "downsampling stage's output.",
)
flags.DEFINE_string(
    "compose", None,
    "Model transforms applied before the method's own, in order: antialias, adafilter "
    "(comma-separated). E.g. --method=sjft --compose=adafilter: selective joint fine-tuning "
    "of a gated backbone.",
)
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
    keys = (
        ("report_md", "report"),
        ("model", "model"),
        ("multitask_model", "two-head model"),
        ("saved_model", "SavedModel"),
    )
    for key, label in keys:
        if key in outputs:
            print(f"  {label}: {outputs[key]}")


def run():
    app.run(main)


if __name__ == "__main__":
    run()
