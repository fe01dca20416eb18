r"""Runs the benchmark set and writes one table of their headline figures.

Runs every `tools/bench_<name>.py` of the set (`tools/benchmarks.py`:
adafilter, antialias, joint, pipeline, relevance, retrieval, transforms),
or those of --only, one after the other, each in its own process with
`--output=<output_dir>/<name>.json` and its printed lines in
`<output_dir>/<name>.log`. Then it writes a Markdown table, benchmark |
measure | goal | figure | met?, to --table (default
`<output_dir>/summary.md`) and prints it. A benchmark that fails is a row
saying why (the others still run, and the exit status is 1).

Resumable: a benchmark whose JSON exists and was measured with the same
arguments is kept, not rerun (--force reruns it). --quick runs tiny
settings (a smoke run of the whole set; the figures mean nothing), into
runs/bench_all/quick unless --output_dir is given. --backbone, --image_size
and --precision are passed to every benchmark (a --backbone that is not a
keras.applications name only to those that accept it); unset, each keeps
its own default. The anti-aliasing benchmark runs with --skip_shift: its
shift-robustness part needs fine-tuned runs (run tools/bench_antialias.py
itself after tools/reproduce.py).

  python tools/bench_all.py                          # the README's figures
  python tools/bench_all.py --quick                  # a smoke run
  python tools/bench_all.py --only=adafilter,joint --precision=mixed_float16
"""

import os
import subprocess
import sys
import time

import common  # tools/common.py: environment, repository root on sys.path

from absl import app
from absl import flags

from tools import benchmarks

flags.DEFINE_string(
    "output_dir", None,
    "Directory of the JSON, logs and table (default runs/bench_all, runs/bench_all/quick "
    "with --quick).",
)
flags.DEFINE_string("table", None, "Markdown table file (default <output_dir>/summary.md).")
flags.DEFINE_list(
    "only", [], f"Benchmarks to run, among {[b.name for b in benchmarks.BENCHMARKS]} (default all)."
)
flags.DEFINE_boolean("quick", False, "Tiny settings: a smoke run of the set, not a result.")
flags.DEFINE_boolean("force", False, "Rerun benchmarks whose JSON exists.")
flags.DEFINE_string("backbone", None, "--backbone of every benchmark (default: each one's own).")
flags.DEFINE_integer(
    "image_size", None, "--image_size of every benchmark (default: each one's own).", lower_bound=8
)
flags.DEFINE_string("precision", None, "--precision of every benchmark (default float32).")
FLAGS = flags.FLAGS


def _selection():
    unknown = sorted(set(FLAGS.only) - set(benchmarks.BENCHMARKS_BY_NAME))
    if unknown:
        common.fail(
            f"--only must be among {[b.name for b in benchmarks.BENCHMARKS]}. Received: {unknown}"
        )
    return [b for b in benchmarks.BENCHMARKS if not FLAGS.only or b.name in FLAGS.only]


def _arguments(benchmark):
    from keras_seltransfer.models.named_backbones import application_name

    backbone = FLAGS.backbone
    if backbone is not None and benchmark.applications_only:
        backbone = application_name(backbone)
        if backbone is None:
            print(f"bench_{benchmark.name}: keeps its keras.applications default "
                  f"(--backbone={FLAGS.backbone} is not a keras.applications name)")
    return benchmarks.planned_arguments(
        benchmark, FLAGS.quick, backbone, FLAGS.image_size, FLAGS.precision
    )


def main(argv):
    common.reject_arguments(argv)
    from keras_seltransfer.utils.io import atomic_write_text

    selection = _selection()
    if FLAGS.precision is not None:
        common.check_precision(FLAGS.precision)
    output_dir = FLAGS.output_dir or os.path.join(
        "runs", "bench_all", *(["quick"] if FLAGS.quick else [])
    )
    os.makedirs(output_dir, exist_ok=True)
    print(common.describe_device())
    records, failures = {}, {}
    for i, benchmark in enumerate(selection, 1):
        arguments = _arguments(benchmark)
        path = os.path.join(output_dir, f"{benchmark.name}.json")
        log = os.path.join(output_dir, f"{benchmark.name}.log")
        stored = None if FLAGS.force else benchmarks.stored_result(path, arguments)
        step = f"[{i}/{len(selection)}] {benchmark.script} {' '.join(arguments)}"
        if stored is not None:
            print(f"{step}: kept {path} (same arguments; --force reruns)", flush=True)
            records[benchmark.name] = stored
            continue
        print(f"{step}: running (log: {log})", flush=True)
        start = time.perf_counter()
        with open(log, "w") as f:
            done = subprocess.run(
                [
                    sys.executable,
                    os.path.join(common.ROOT, "tools", benchmark.script),
                    *arguments,
                    f"--output={os.path.abspath(path)}",
                ],
                stdout=f,
                stderr=subprocess.STDOUT,
                check=False,
            )
        stored = benchmarks.stored_result(path, arguments)
        if done.returncode or stored is None:
            failures[benchmark.name] = benchmarks.failure_reason(log, done.returncode)
            print(f"    failed: {failures[benchmark.name]}", flush=True)
        else:
            records[benchmark.name] = stored
            print(f"    done in {time.perf_counter() - start:.0f} s", flush=True)
    title = "Benchmark summary (tools/bench_all.py" + (
        " --quick: a smoke run, not a result)" if FLAGS.quick else ")"
    )
    table = benchmarks.summary_table(
        [b.name for b in selection], records, failures, title=title
    )
    table_path = FLAGS.table or os.path.join(output_dir, "summary.md")
    atomic_write_text(table_path, table)
    print("\n" + table + f"\nwrote {table_path}; each benchmark's figures: {output_dir}/<name>.json")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
