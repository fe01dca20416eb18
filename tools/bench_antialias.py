r"""Anti-aliasing: training step time, and shift consistency of fine-tuned models.

Part 1, step time. The backbone (--backbone, by default the pretrain app's
Fashion-MNIST small_cnn) with a target head, BatchNorm frozen as in
fine-tuning, is trained side by side with its anti-aliased rebuild
(`antialias`, --filt_size, --pad_type; "antialiased"), the rebuild that
keeps the stem convolution strided (`keep_stem=True`, as Zhang's released
models; "stem_kept"), both rebuilt with plain subsampling instead of blurs
(`filt_size=1`: every strided layer evaluated densely, then subsampled;
"dense_floor", "stem_kept_dense_floor": what the dense evaluation costs,
the floor of any blur implementation) and the knowledge-transfer model of the full rebuild
(student plus frozen teacher, as `--method=ktft` trains), and, unless
--pad_type is already zero, both rebuilds with zero-padded blurs (what the
padding mode costs), on the same batch, alternating the variants over
--rounds timed rounds of --steps calls of each model's compiled Keras
training step after a warm-up (--jit_compile: compiled with XLA). It prints the median time
per step of each and the ratios to the original, of the medians and of the
fastest rounds (goal for the anti-aliased model: <= 1.2x). On a machine
shared with other work the fastest rounds are the steadier figure.

Part 2, shift robustness (Zhang, ICML 2019), on the fixed held-out test
split of --target: accuracy, consistency (how often two random shifts of up
to --max_shift pixels, --num_pairs pairs per image, give the same class;
see `keras_seltransfer.evaluation.shift_consistency`) and accuracy along a
diagonal sweep of shifts, for the fine-tuned baseline, antialias_ft and ktft
models that tools/reproduce.py trained (found through its --results file,
at --fraction and --seed), with a PNG plot of
accuracy versus shift (--plot). --train_quick first fine-tunes the three
models itself for --quick_epochs epochs into --quick_dir (a smoke run, not a
result).

  python tools/bench_antialias.py --fraction=0.15 --seed=0
  python tools/bench_antialias.py --train_quick --quick_epochs=3

--precision builds and times the timing part's models in a Keras dtype
policy (a named backbone only: a saved one keeps its own); --output writes
the figures of both parts as JSON.
"""

import contextlib
import io
import os
import statistics
import sys
import time

import common  # tools/common.py: environment, repository root on sys.path

from absl import app
from absl import flags

from tools import benchmarks

ROWS = ("baseline", "antialias_ft", "ktft")

flags.DEFINE_string(
    "backbone",
    None,
    "Backbone of the timing part (default: the pretrain app's model, else small_cnn).",
)
flags.DEFINE_integer("image_size", 64, "Input size.", lower_bound=8)
flags.DEFINE_integer("batch_size", 32, "Batch size of the timing part.", lower_bound=1)
flags.DEFINE_integer("rounds", 7, "Timed rounds per variant (alternating).", lower_bound=1)
flags.DEFINE_integer("steps", 20, "Training steps per timed round.", lower_bound=1)
flags.DEFINE_integer("filt_size", 4, "BlurPool filter size.", lower_bound=1, upper_bound=7)
flags.DEFINE_enum("pad_type", "reflect", ["reflect", "replicate", "zero"], "BlurPool padding.")
flags.DEFINE_boolean("skip_timing", False, "Skip the step-time part.")
flags.DEFINE_boolean(
    "jit_compile", False, "Compile every timed training step with XLA (jit_compile=True)."
)
flags.DEFINE_boolean("skip_shift", False, "Skip the shift-robustness part.")
flags.DEFINE_string("target", "elpv", "Target data set (its held-out test split is used).")
flags.DEFINE_string(
    "results",
    os.path.join("docs", "results", "results.json"),
    "results.json of tools/reproduce.py, which lists the run directory of every cell.",
)
flags.DEFINE_float("fraction", 0.15, "Training fraction of the runs compared.")
flags.DEFINE_integer("seed", 0, "Seed of the runs compared, and of the drawn shifts.")
for _row in ROWS:
    flags.DEFINE_string(
        f"{_row}_run", None, f"Run directory of the {_row} model (overrides --results)."
    )
flags.DEFINE_integer("max_shift", 8, "Largest shift in pixels along each axis.", lower_bound=0)
flags.DEFINE_integer(
    "num_pairs", 5, "Random shift pairs per test image (consistency).", lower_bound=1
)
flags.DEFINE_enum(
    "pad_mode",
    "reflect",
    ["reflect", "edge", "constant", "wrap", "none"],
    "How shifted crops get pixels beyond the border: np.pad mode, or 'none' (images "
    "resized to image_size + 2 * max_shift and cropped, as Zhang's ImageNet protocol).",
)
flags.DEFINE_string(
    "plot", os.path.join("runs", "bench_antialias", "accuracy_vs_shift.png"), "PNG path."
)
flags.DEFINE_boolean("train_quick", False, "Fine-tune the three models briefly first (smoke run).")
flags.DEFINE_integer("quick_epochs", 3, "Epochs of --train_quick.", lower_bound=1)
flags.DEFINE_string(
    "quick_dir", os.path.join("runs", "bench_antialias", "quick"), "Runs of --train_quick."
)
common.define_benchmark_flags()  # --precision: of the timing part
flags.adopt_module_key_flags(common)  # --help lists them
FLAGS = flags.FLAGS


def _run_dirs():
    if FLAGS.train_quick:
        return {
            row: getattr(FLAGS, f"{row}_run")
            or os.path.join(FLAGS.quick_dir, f"{row}-{FLAGS.fraction:g}-seed{FLAGS.seed}")
            for row in ROWS
        }
    import json

    cells = {}
    if os.path.isfile(FLAGS.results):
        with open(FLAGS.results) as f:
            for run in json.load(f).get("runs", []):
                if run["fraction"] == FLAGS.fraction and run["seed"] == FLAGS.seed:
                    cells[run["row"]] = run["run_dir"]
    return {
        row: getattr(FLAGS, f"{row}_run")
        or cells.get(row, f"<{row} at fraction {FLAGS.fraction:g}, seed {FLAGS.seed}: not in {FLAGS.results}>")
        for row in ROWS
    }


def _forward_flops(model, shape):
    """Floating-point operations of one forward pass (TensorFlow's profiler on
    the frozen inference graph)."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    function = tf.function(lambda x: model(x, training=False))
    frozen = convert_variables_to_constants_v2(
        function.get_concrete_function(tf.TensorSpec(shape, tf.float32))
    )
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return tf.compat.v1.profiler.profile(graph=frozen.graph, options=options).total_float_ops


def _time_steps():
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_seltransfer import training
    from keras_seltransfer.models import build_classifier
    from keras_seltransfer.models import is_builtin_backbone
    from keras_seltransfer.models import load_backbone
    from keras_seltransfer.models import set_batchnorm_mode
    from keras_seltransfer.models.antialiasing import antialias
    from keras_seltransfer.models.antialiasing import blur_layers
    from keras_seltransfer.models.knowledge_transfer import KnowledgeTransferModel

    spec = FLAGS.backbone or (
        training.DEFAULT_BACKBONE if os.path.isfile(training.DEFAULT_BACKBONE) else "small_cnn"
    )
    size = FLAGS.image_size
    backbone = load_backbone(spec, (size, size, 1 if is_builtin_backbone(spec) else None))
    original = build_classifier(backbone, 2)
    set_batchnorm_mode(original, "frozen")
    student = antialias(original, filt_size=FLAGS.filt_size, pad_type=FLAGS.pad_type)
    set_batchnorm_mode(student, "frozen")
    stem_kept = antialias(
        original, filt_size=FLAGS.filt_size, pad_type=FLAGS.pad_type, keep_stem=True
    )
    set_batchnorm_mode(stem_kept, "frozen")
    # The teacher is frozen by the knowledge-transfer model: give it a copy.
    teacher = keras.models.clone_model(original)
    teacher.set_weights(original.get_weights())
    ktft = KnowledgeTransferModel(antialias(original, FLAGS.filt_size, FLAGS.pad_type), teacher)
    models = {
        "original": original,
        "antialiased": student,
        "stem_kept": stem_kept,
    }
    if FLAGS.pad_type != "zero":
        # The same rebuilds with zero padding in the blurs: what the padding
        # mode costs.
        for name, keep_stem in (("antialiased_zero_pad", False), ("stem_kept_zero_pad", True)):
            models[name] = antialias(
                original, filt_size=FLAGS.filt_size, pad_type="zero", keep_stem=keep_stem
            )
            set_batchnorm_mode(models[name], "frozen")
    # The same rebuilds with plain subsampling (filt_size=1): every strided
    # layer evaluated densely and subsampled, with no blur. What Zhang's
    # swaps cost before any filtering, the floor of any blur implementation.
    for name, keep_stem in (("dense_floor", False), ("stem_kept_dense_floor", True)):
        models[name] = antialias(original, filt_size=1, keep_stem=keep_stem)
        set_batchnorm_mode(models[name], "frozen")
    models["ktft"] = ktft
    channels = int(original.inputs[0].shape[-1])
    rng = np.random.default_rng(0)
    images = tf.constant(
        rng.integers(0, 256, (FLAGS.batch_size, size, size, channels)).astype("float32")
    )
    labels = tf.constant(rng.integers(0, 2, FLAGS.batch_size))
    steps = {}
    for name, model in models.items():
        model.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy")
        # Keras's own training step, compiled once per model and called in
        # a loop: the time of the steps alone, without `fit`'s per-call
        # set-up (which dominates short timed rounds).
        steps[name] = tf.function(
            lambda x, y, model=model: model.train_step((x, y)),
            jit_compile=FLAGS.jit_compile,
        )
        for _ in range(3):  # warm-up: traces and compiles the step
            _sync(steps[name](images, labels))
    seconds = {name: [] for name in models}
    names = list(models)
    for r in range(FLAGS.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            for _ in range(FLAGS.steps):
                logs = steps[name](images, labels)
            _sync(logs)
            seconds[name].append((time.perf_counter() - start) / FLAGS.steps)
    print(
        f"Step time: {spec} + head at {size}x{size}x{channels}, batch {FLAGS.batch_size}, "
        f"BlurPool filt_size={FLAGS.filt_size} pad_type={FLAGS.pad_type} "
        f"({len(blur_layers(student))} blurs), {FLAGS.rounds} alternating rounds of "
        f"{FLAGS.steps} steps, {os.cpu_count()} CPUs, TensorFlow {tf.__version__}"
        + (", XLA" if FLAGS.jit_compile else "")
    )
    base = statistics.median(seconds["original"])
    for name, values in seconds.items():
        shown = ", ".join(f"{1000 * v:.1f}" for v in values)
        print(
            f"{name:>12}: median {1000 * statistics.median(values):7.1f} ms/step, "
            f"{statistics.median(values) / base:.3f}x the original (rounds: {shown})"
        )
    shape = (1, size, size, channels)
    original_flops = _forward_flops(original, shape)
    for name in [n for n in models if n not in ("original", "ktft")]:
        fastest = min(seconds[name]) / min(seconds["original"])
        ratio = statistics.median(seconds[name]) / base
        flops = _forward_flops(models[name], shape) / original_flops
        if name.endswith("dense_floor"):
            print(
                f"{name} / original step time, medians: {ratio:.3f}, fastest rounds: "
                f"{fastest:.3f}  (no blur: the dense evaluation alone); forward FLOPs: "
                f"{flops:.3f}x"
            )
            continue
        print(
            f"{name} / original step time, medians: {ratio:.3f}, fastest rounds: "
            f"{fastest:.3f}  (goal <= 1.2); forward FLOPs: {flops:.3f}x"
        )
    for name, floor in (("antialiased", "dense_floor"), ("stem_kept", "stem_kept_dense_floor")):
        print(
            f"{name} / {floor} step time (what the blurs add), medians: "
            f"{statistics.median(seconds[name]) / statistics.median(seconds[floor]):.3f}"
        )


def _sync(logs):
    """Waits for a step's results (TensorFlow runs ops asynchronously)."""
    for value in logs.values():
        value.numpy()


def _train_quick(run_dirs):
    from keras_seltransfer import training

    for row, run_dir in run_dirs.items():
        if os.path.isfile(os.path.join(run_dir, "model.keras")):
            continue
        print(f"Training {row} for {FLAGS.quick_epochs} epochs into {run_dir} ...")
        training.finetune(
            training.FinetuneConfig(
                target=FLAGS.target,
                method=row,
                fraction=FLAGS.fraction,
                seed=FLAGS.seed,
                epochs=FLAGS.quick_epochs,
                patience=FLAGS.quick_epochs,
                image_size=FLAGS.image_size,
                blur_filt_size=FLAGS.filt_size,
                blur_pad_type=FLAGS.pad_type,
                output_dir=run_dir,
                export=False,
                tensorboard=False,
                verbose=0,
            )
        )


def _shift_robustness(run_dirs):
    import numpy as np

    from keras_seltransfer import data as data_lib
    from keras_seltransfer import evaluation
    from keras_seltransfer import models as models_lib
    from keras_seltransfer import training

    models = {
        row: models_lib.load_keras_file(os.path.join(d, "model.keras"))
        for row, d in run_dirs.items()
    }
    size = int(models["baseline"].inputs[0].shape[1])
    channels = int(models["baseline"].inputs[0].shape[-1])
    _, test = training.load_train_test(FLAGS.target)
    pad_mode = None if FLAGS.pad_mode == "none" else FLAGS.pad_mode
    shift = FLAGS.max_shift
    images = data_lib.prepared_images(
        test, size + (2 * shift if pad_mode is None else 0), channels=channels
    )
    centre = images[:, shift : shift + size, shift : shift + size] if pad_mode is None else images
    labels = test.labels
    print(
        f"\nShift robustness on the {FLAGS.target} test split ({len(labels)} images at "
        f"{size}x{size}), shifts up to {shift} px ({FLAGS.pad_mode} beyond the border), "
        f"{FLAGS.num_pairs} random pairs per image, seed {FLAGS.seed}:"
    )
    print(f"{'model':>13} | accuracy | consistency | diagonal-sweep accuracy min / mean | run")
    curves = {}
    for row, model in models.items():
        probabilities = model.predict(centre, batch_size=64, verbose=0)
        accuracy = float(np.mean(probabilities.argmax(-1) == labels))
        consistency = evaluation.shift_consistency(
            model,
            images,
            max_shift=shift,
            num_pairs=FLAGS.num_pairs,
            seed=FLAGS.seed,
            pad_mode=pad_mode,
        )
        curve = evaluation.accuracy_vs_shift(
            model, images, labels, max_shift=shift, pad_mode=pad_mode
        )
        curves[row] = curve
        print(
            f"{row:>13} | {accuracy:8.4f} | {consistency:11.4f} | "
            f"{min(curve['accuracy']):.4f} / {np.mean(curve['accuracy']):.4f} | {run_dirs[row]}"
        )
    _plot(curves)


def _plot(curves):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for row, curve in curves.items():
        axes[0].plot(curve["shifts"], curve["accuracy"], marker="o", label=row)
        axes[1].plot(curve["shifts"], curve["agreement"], marker="o", label=row)
    axes[0].set_ylabel("test accuracy")
    axes[1].set_ylabel("same prediction as unshifted")
    for axis in axes:
        axis.set_xlabel("diagonal shift (pixels)")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"{FLAGS.target}: accuracy versus shift")
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.plot)), exist_ok=True)
    figure.savefig(FLAGS.plot, dpi=120)
    print(f"plot: {FLAGS.plot}")


class _Tee(io.TextIOBase):
    """A text stream that writes through to `stream` and keeps the text."""

    def __init__(self, stream):
        self.stream, self.parts = stream, []

    def write(self, text):
        self.parts.append(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()


@contextlib.contextmanager
def _printed_lines():
    """Yields a list that holds, after the block, the lines printed in it."""
    lines = []
    tee = _Tee(sys.stdout)
    try:
        with contextlib.redirect_stdout(tee):
            yield lines
    finally:
        lines.extend("".join(tee.parts).splitlines())


def _figures(device, timing_lines, shift_lines):
    """The JSON of --output, read from the lines the two parts printed
    (`benchmarks.antialias_figures`): the parts print their figures rather
    than return them. A line format it no longer reads is an error, not a
    silently empty report."""
    results = common.benchmark_results(
        FLAGS.backbone, FLAGS.image_size, FLAGS.precision, device
    )
    results.update(batch_size=FLAGS.batch_size, filt_size=FLAGS.filt_size, pad_type=FLAGS.pad_type)
    with common.errors_reported(ValueError):
        figures, headline = benchmarks.antialias_figures(timing_lines, shift_lines)
    results.update(figures)
    results["headline"] += headline
    return results


def _check_precision_reaches_backbone():
    from keras_seltransfer import models
    from keras_seltransfer import training

    # The backbone _time_steps times, resolved as it resolves it.
    spec = FLAGS.backbone or (
        training.DEFAULT_BACKBONE if os.path.isfile(training.DEFAULT_BACKBONE) else "small_cnn"
    )
    if FLAGS.precision != "float32" and models.is_backbone_path(spec):
        common.fail(
            f"--precision={FLAGS.precision} does not reach the saved backbone {spec} (a .keras "
            "file keeps its own dtype policy): time a named backbone, e.g. --backbone=small_cnn "
            "(the default file's architecture; step time does not depend on the weights)."
        )


def main(argv):
    common.reject_arguments(argv)
    common.check_precision(FLAGS.precision)
    run_dirs = _run_dirs()
    if not FLAGS.skip_shift and not FLAGS.train_quick:
        missing = [
            d for d in run_dirs.values() if not os.path.isfile(os.path.join(d, "model.keras"))
        ]
        if missing:
            common.fail(
                "no fine-tuned model.keras in "
                + ", ".join(missing)
                + ".\nRun the fine-tuning first (tools/reproduce.py --rows=baseline,antialias_ft,ktft "
                f"--fractions={FLAGS.fraction:g} --seeds={FLAGS.seed}), "
                "pass --baseline_run/--antialias_ft_run/--ktft_run, use --train_quick for a "
                "smoke run, or --skip_shift."
            )
    device = common.describe_device()
    print(device)
    timing_lines = shift_lines = None
    if not FLAGS.skip_timing:
        _check_precision_reaches_backbone()
        with _printed_lines() as timing_lines, common.precision_scope(FLAGS.precision):
            _time_steps()
    if not FLAGS.skip_shift:
        if FLAGS.train_quick:
            _train_quick(run_dirs)
        with _printed_lines() as shift_lines:
            _shift_robustness(run_dirs)
    if FLAGS.output:
        common.write_results(FLAGS.output, _figures(device, timing_lines, shift_lines))


if __name__ == "__main__":
    app.run(main)
