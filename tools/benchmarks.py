"""The benchmark set of tools/bench_all.py: what each runs with, and the summary table.

Every `tools/bench_<name>.py` takes `--backbone`, `--image_size`,
`--precision` and `--output`, and writes JSON (`common.benchmark_results`)
whose `"headline"` list holds its headline figures, each with its goal when
it has one (`common.goal`). This module plans the arguments of each run
(`planned_arguments`), decides whether a stored result can be kept
(`stored_result`) and renders the table (`summary_table`); it also reads
the figures tools/bench_antialias.py prints (`antialias_figures`). It
imports nothing heavy, so it is tested without running a benchmark.
"""

import dataclasses
import json
import os
import re

from tools import common


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One benchmark of the set.

    Attributes:
        name: `tools/bench_<name>.py`, and the name of its JSON and log.
        args: arguments it always gets from bench_all.
        quick: the tiny settings of `--quick` (a smoke run, not a result).
        applications_only: its `--backbone` must be a `keras.applications`
            name (it builds the raw application), so a built-in or saved
            backbone is not passed to it.
    """

    name: str
    args: tuple = ()
    quick: tuple = ()
    applications_only: bool = False

    @property
    def script(self):
        return f"bench_{self.name}.py"


_TINY = ("--rounds=1", "--steps=1", "--batch_size=4", "--image_size=32")
_TINY_APPLICATION = ("--backbone=MobileNet", "--image_size=32", "--num_images=2", "--batch_size=2")

BENCHMARKS = (
    Benchmark("adafilter", quick=_TINY),
    # The shift-robustness part needs fine-tuned runs (tools/reproduce.py).
    Benchmark("antialias", args=("--skip_shift",), quick=_TINY),
    Benchmark(
        "joint", quick=("--rounds=1", "--batch_size=8", "--max_targets=64", "--image_size=32")
    ),
    Benchmark(
        "pipeline", quick=("--rounds=1", "--steps=2", "--batch_size=8", "--image_size=32")
    ),
    Benchmark("relevance", quick=_TINY_APPLICATION, applications_only=True),
    Benchmark(
        "retrieval",
        quick=(
            "--sources=256,512", "--targets=16", "--targets_large=0", "--k=10",
            "--recall_k=5,10", "--real_sources=64", "--real_targets=16", "--nomemory",
            "--repeats=1", "--block_size=256", "--image_size=32",
        ),
    ),
    Benchmark("transforms", quick=_TINY_APPLICATION, applications_only=True),
)
BENCHMARKS_BY_NAME = {b.name: b for b in BENCHMARKS}


def _flag_name(argument):
    name = argument.split("=")[0]
    # A boolean's `--noflag` form sets the same flag as `--flag`.
    return "--" + name[4:] if name.startswith("--no") and "=" not in argument else name


def planned_arguments(benchmark, quick=False, backbone=None, image_size=None, precision=None):
    """The arguments one benchmark runs with (without `--output`).

    Its fixed arguments, then the `--quick` settings, then the passed-through
    values, a later value of a flag replacing an earlier one.

    Args:
        benchmark: a `Benchmark`.
        quick: use its tiny settings.
        backbone: `--backbone` for every benchmark, or None for each one's
            default. For an `applications_only` benchmark it is passed only
            when it is a `keras.applications` name: pass that name as
            `application_name(backbone)` returns it, None otherwise.
        image_size: `--image_size`, or None.
        precision: `--precision`, or None.

    Returns:
        A list of `--flag=value` strings.

    Example:

    >>> planned_arguments(BENCHMARKS_BY_NAME["antialias"], image_size=96)
    ['--skip_shift', '--image_size=96']
    """
    arguments = {}
    passed = [("backbone", backbone), ("image_size", image_size), ("precision", precision)]
    for argument in (
        *benchmark.args,
        *(benchmark.quick if quick else ()),
        *(f"--{name}={value}" for name, value in passed if value is not None),
    ):
        arguments.pop(_flag_name(argument), None)  # the later value goes last
        arguments[_flag_name(argument)] = argument
    return list(arguments.values())


def stored_result(path, arguments):
    """The JSON at `path` when it was measured with `arguments`, else None.

    Args:
        path: a benchmark's `--output` file.
        arguments: the arguments it would run with (`planned_arguments`).

    Returns:
        The parsed JSON, or None when the file is missing, unreadable or
        records other arguments (its `"argv"`).
    """
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return None
    return results if results.get("argv") == list(arguments) else None


def _goal_text(goal):
    if not goal:
        return "—"
    parts = []
    if "at_most" in goal:
        parts.append(f"<= {goal['at_most']:g}")
    if "at_least" in goal:
        parts.append(f">= {goal['at_least']:g}")
    return ", ".join(parts)


def goal_met(value, goal):
    """Whether a figure meets its goal: "yes", "no", or "—" (no goal or no figure).

    Example:

    >>> goal_met(1.55, {"at_most": 2.2}), goal_met(0.5, {"at_least": 0.9}), goal_met(3.0, None)
    ('yes', 'no', '—')
    """
    if not goal or value is None:
        return "—"
    met = goal.get("at_most", value) >= value and goal.get("at_least", value) <= value
    return "yes" if met else "no"


def format_figure(value):
    """A figure as the table shows it: four significant digits, whole
    numbers from 100 on.

    Example:

    >>> format_figure(0.99951), format_figure(15021.4), format_figure(None)
    ('0.9995', '15,021', 'not measured')
    """
    if value is None:
        return "not measured"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4g}"


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def summary_table(names, records, failures=None, title="Benchmark summary"):
    """The Markdown summary of a benchmark run.

    Args:
        names: the benchmarks of the run, in order.
        records: `{name: parsed JSON}` of those with a result.
        failures: `{name: reason}` of those that failed this time (shown
            instead of any stored result).
        title: the first line.

    Returns:
        Markdown: the title, the devices measured on, and the table
        `benchmark | measure | goal | figure | met?` with one row per
        headline figure, or one row saying why a benchmark has none.
    """
    failures = failures or {}
    devices = sorted({records[n]["device"] for n in names if n in records and n not in failures})
    lines = [f"{title}", ""]
    lines += [f"- {device}" for device in devices] + ([""] if devices else [])
    lines += ["| benchmark | measure | goal | figure | met? |", "|---|---|---|---|---|"]
    for name in names:
        if name in failures:
            lines.append(f"| {name} | — | — | failed: {_cell(failures[name])} | — |")
            continue
        if name not in records:
            lines.append(f"| {name} | — | — | missing (not run) | — |")
            continue
        record = records[name]
        label = (
            f"{name} ({record.get('backbone')}, {record.get('image_size')} px, "
            f"{record.get('precision')})"
        )
        headline = record.get("headline") or []
        if not headline:
            lines.append(f"| {_cell(label)} | — | — | no headline figures | — |")
        for figure in headline:
            lines.append(
                f"| {_cell(label)} | {_cell(figure['measure'])} | {_goal_text(figure['goal'])} | "
                f"{format_figure(figure['value'])} | {goal_met(figure['value'], figure['goal'])} |"
            )
    return "\n".join(lines) + "\n"


def failure_reason(log_path, returncode):
    """A one-line reason from a failed benchmark's log: its last error line.

    Returns:
        `"exit <code>: <line>"`, the line being the last one holding
        `error` (a tool's `fail`, a traceback's exception), else the last
        non-empty line.
    """
    try:
        with open(log_path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        lines = []
    errors = [line for line in lines if "error" in line.lower()]
    last = (errors or lines or ["no output"])[-1]
    return f"exit {returncode}: {last[:300]} (log: {os.path.basename(log_path)})"


_FLOAT = r"(\d+(?:\.\d*)?)"
_STEP_HEADER = re.compile(r"Step time: (\S+) \+ head")
_STEP = re.compile(rf"\s*(\w+): median\s+{_FLOAT} ms/step, {_FLOAT}x the original")
_STEP_RATIO = re.compile(
    rf"(\w+) / original step time, medians: {_FLOAT}, fastest rounds: {_FLOAT}"
    rf"\s+\(goal <= {_FLOAT}\); forward FLOPs: {_FLOAT}x"
)
_SHIFT_ROW = re.compile(rf"\s*(\w+) \|\s+{_FLOAT} \|\s+{_FLOAT} \| {_FLOAT} / {_FLOAT} \| (.*)$")


def antialias_figures(timing_lines=None, shift_lines=None):
    """The figures of tools/bench_antialias.py, read from the lines it printed.

    Its step-time and shift-robustness parts print their figures rather
    than return them; this reads them back for its `--output`.

    Args:
        timing_lines: the lines the step-time part printed, or None when
            it did not run.
        shift_lines: the lines the shift-robustness part printed, or None.

    Returns:
        `(figures, headline)`: a dict of the figures (the timed `backbone`,
        `step_ms`, `ratio_medians` and `ratio_fastest` per variant,
        `forward_flops_ratio`, `shift_robustness` per model) and the list
        of headline `common.goal`s (the step-time ratios with their goal,
        KTFT's and the shift consistencies without).

    Raises:
        ValueError: when lines were given but hold none of the figures (the
            printed format changed).
    """
    figures, headline = {}, []
    if timing_lines is not None:
        header = [m for m in map(_STEP_HEADER.match, timing_lines) if m]
        steps = [m for m in map(_STEP.match, timing_lines) if m]
        ratios = [m for m in map(_STEP_RATIO.match, timing_lines) if m]
        if not header or not steps or not ratios:
            raise ValueError("could not read the step-time figures from the lines printed above.")
        figures["backbone"] = header[0].group(1)
        figures["step_ms"] = {m.group(1): float(m.group(2)) for m in steps}
        figures["ratio_medians"] = {m.group(1): float(m.group(3)) for m in steps}
        figures["ratio_fastest"] = {m.group(1): float(m.group(3)) for m in ratios}
        figures["forward_flops_ratio"] = {m.group(1): float(m.group(5)) for m in ratios}
        headline += [
            common.goal(
                f"step time {m.group(1)} / original (medians)", float(m.group(2)),
                at_most=float(m.group(4)),
            )
            for m in ratios
        ]
        headline.append(common.goal(
            "step time ktft / original (medians)", figures["ratio_medians"].get("ktft")
        ))
    if shift_lines is not None:
        rows = [m for m in map(_SHIFT_ROW.match, shift_lines) if m]
        if not rows:
            raise ValueError(
                "could not read the shift-robustness figures from the lines printed above."
            )
        figures["shift_robustness"] = {
            m.group(1): {
                "accuracy": float(m.group(2)), "consistency": float(m.group(3)),
                "sweep_accuracy_min": float(m.group(4)),
                "sweep_accuracy_mean": float(m.group(5)), "run_dir": m.group(6),
            }
            for m in rows
        }
        headline += [
            common.goal(f"shift consistency, {row}", row_figures["consistency"])
            for row, row_figures in figures["shift_robustness"].items()
        ]
    return figures, headline
