"""tools/bench_all.py and its benchmark set (tools/benchmarks.py)."""

import json
import os
import re

import pytest

from tests import helpers
from tools import benchmarks

BENCH = benchmarks.BENCHMARKS_BY_NAME


def _record(name, headline, argv=(), device="device: CPU (2 cores), TensorFlow 2.21.0"):
    return {
        "benchmark": f"bench_{name}", "argv": list(argv), "device": device,
        "backbone": "small_cnn", "image_size": 64, "precision": "float32",
        "headline": headline,
    }


def _rows(table):
    return [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]


def test_every_bench_script_is_in_the_set():
    tools = os.path.join(helpers.REPO_ROOT, "tools")
    scripts = {f for f in os.listdir(tools) if re.fullmatch(r"bench_\w+\.py", f)}
    assert scripts - {"bench_all.py"} == {b.script for b in benchmarks.BENCHMARKS}


def test_planned_arguments_later_values_replace_earlier_ones():
    quick = benchmarks.planned_arguments(
        BENCH["antialias"], quick=True, image_size=96, precision="mixed_float16"
    )
    assert quick == [
        "--skip_shift", "--rounds=1", "--steps=1", "--batch_size=4",
        "--image_size=96", "--precision=mixed_float16",
    ]
    assert benchmarks.planned_arguments(BENCH["pipeline"]) == []
    assert benchmarks.planned_arguments(BENCH["relevance"], quick=True, backbone="ResNet50")[-1] == (
        "--backbone=ResNet50"
    )
    retrieval = benchmarks.planned_arguments(BENCH["retrieval"], quick=True)
    assert "--nomemory" in retrieval
    memory = benchmarks.planned_arguments(
        benchmarks.Benchmark("x", args=("--memory=true",), quick=("--nomemory",)), quick=True
    )
    assert memory == ["--nomemory"]


def test_stored_result_is_kept_only_for_the_same_arguments(tmp_path):
    path = tmp_path / "adafilter.json"
    assert benchmarks.stored_result(path, []) is None
    path.write_text(json.dumps(_record("adafilter", [], argv=["--rounds=1"])))
    assert benchmarks.stored_result(path, ["--rounds=1"])["benchmark"] == "bench_adafilter"
    assert benchmarks.stored_result(path, ["--rounds=2"]) is None
    assert benchmarks.stored_result(path, []) is None
    path.write_text("{truncated")
    assert benchmarks.stored_result(path, ["--rounds=1"]) is None


def test_summary_table_from_hand_written_json(tmp_path):
    """Goal met, goal not met, no goal, not measured, a failure and a missing benchmark."""
    written = {
        "adafilter": _record("adafilter", [
            {"measure": "train step time adafilter / plain", "value": 1.55, "goal": {"at_most": 2.2}},
            {"measure": "infer step time adafilter / plain", "value": 1.79, "goal": None},
        ]),
        "antialias": _record("antialias", [
            {"measure": "step time antialiased / original", "value": 2.7, "goal": {"at_most": 1.2}},
        ]),
        "pipeline": _record("pipeline", [
            {"measure": "pipeline / in-memory", "value": 0.95, "goal": {"at_least": 0.9}},
        ]),
        "relevance": _record("relevance", [
            {"measure": "per_layer / one_pass", "value": None, "goal": None},
        ]),
        "joint": _record("joint", [
            {"measure": "joint / target-only", "value": 0.89, "goal": {"at_most": 1.1}},
        ]),
    }
    for name, record in written.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(record))
    names = ["adafilter", "antialias", "pipeline", "relevance", "joint", "retrieval"]
    records = {
        name: benchmarks.stored_result(tmp_path / f"{name}.json", [])
        for name in names
        if os.path.exists(tmp_path / f"{name}.json")
    }
    table = benchmarks.summary_table(
        names, records, failures={"joint": "exit 2: bench_joint: error: no ELPV"}, title="T"
    )
    assert table.startswith("T\n\n- device: CPU (2 cores), TensorFlow 2.21.0\n")
    assert _rows(table) == [
        "| adafilter (small_cnn, 64 px, float32) | train step time adafilter / plain | <= 2.2 "
        "| 1.55 | yes |",
        "| adafilter (small_cnn, 64 px, float32) | infer step time adafilter / plain | — "
        "| 1.79 | — |",
        "| antialias (small_cnn, 64 px, float32) | step time antialiased / original | <= 1.2 "
        "| 2.7 | no |",
        "| pipeline (small_cnn, 64 px, float32) | pipeline / in-memory | >= 0.9 | 0.95 | yes |",
        "| relevance (small_cnn, 64 px, float32) | per_layer / one_pass | — | not measured | — |",
        "| joint | — | — | failed: exit 2: bench_joint: error: no ELPV | — |",
        "| retrieval | — | — | missing (not run) | — |",
    ]


@pytest.mark.parametrize(
    "value, goal, met",
    [
        (1.2, {"at_most": 1.2}, "yes"),
        (1.2001, {"at_most": 1.2}, "no"),
        (0.9, {"at_least": 0.9}, "yes"),
        (0.8999, {"at_least": 0.9}, "no"),
        (1.0, {"at_least": 0.9, "at_most": 1.1}, "yes"),
        (None, {"at_most": 1.0}, "—"),
    ],
)
def test_goal_met(value, goal, met):
    assert benchmarks.goal_met(value, goal) == met


def test_failure_reason_is_the_last_error_line(tmp_path):
    log = tmp_path / "joint.log"
    log.write_text("device: CPU\nTraceback (most recent call last):\nValueError: bad\n"
                   "bench_joint: error: the index is stale\n\n")
    assert benchmarks.failure_reason(str(log), 2) == (
        "exit 2: bench_joint: error: the index is stale (log: joint.log)"
    )
    assert benchmarks.failure_reason(str(tmp_path / "none.log"), 1).startswith("exit 1: no output")


@pytest.mark.slow
def test_a_benchmark_writes_its_figures_as_json(tmp_path):
    """A real, tiny run of the cheapest benchmark."""
    path = tmp_path / "adafilter.json"
    done = helpers.run_tool(
        "bench_adafilter.py", "--rounds=1", "--steps=1", "--batch_size=2", "--image_size=16",
        "--backbone=small_cnn", f"--output={path}",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[0].startswith("device: CPU (")
    results = json.loads(path.read_text())
    assert results["argv"] == [
        "--rounds=1", "--steps=1", "--batch_size=2", "--image_size=16", "--backbone=small_cnn"
    ]
    assert results["device"] == done.stdout.splitlines()[0]
    assert (results["precision"], results["backbone"], results["image_size"]) == (
        "float32", "small_cnn", 16
    )
    train, infer = results["headline"]
    assert train["goal"] == {"at_most": 2.2} and train["value"] > 0
    assert infer["goal"] is None and infer["value"] > 0
    assert train["value"] == results["train_ratio"]["paired"]


@pytest.mark.slow
def test_bench_all_quick_runs_resumes_and_writes_the_table(tmp_path):
    arguments = ("bench_all.py", "--quick", "--only=adafilter,relevance", "--backbone=small_cnn",
                 f"--output_dir={tmp_path}")
    done = helpers.run_tool(*arguments)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "bench_relevance: keeps its keras.applications default" in done.stdout
    table = (tmp_path / "summary.md").read_text()
    assert table in done.stdout
    rows = _rows(table)
    assert rows[0].startswith("| adafilter (small_cnn, 32 px, float32) | train step time")
    assert rows[0].endswith((" yes |", " no |"))
    assert any(row.startswith("| relevance (MobileNet, 32 px, float32)") for row in rows)
    again = helpers.run_tool(*arguments)
    assert again.returncode == 0 and again.stdout.count(": kept ") == 2
    # bench_relevance takes sizes from 32 on: its failure is a row, and the status is 1.
    failed = helpers.run_tool(*arguments, "--image_size=16")
    assert failed.returncode == 1
    assert re.search(
        r"^\| relevance \| — \| — \| failed: exit 1: .*image_size.* \(log: relevance.log\) \| — \|$",
        (tmp_path / "summary.md").read_text(), re.M,
    ), (tmp_path / "summary.md").read_text()


def _antialias_lines():
    """Lines as tools/bench_antialias.py prints them (its format strings)."""
    timing = ["Step time: small_cnn + head at 64x64x1, batch 32, BlurPool filt_size=4 ..."]
    for name, ms, ratio in (("original", 10.0, 1.0), ("antialiased", 27.0, 2.7),
                            ("stem_kept", 17.5, 1.75), ("ktft", 35.4, 3.54)):
        timing.append(f"{name:>12}: median {ms:7.1f} ms/step, {ratio:.3f}x the original "
                      f"(rounds: {ms:.1f})")
    for name, ratio, fastest, flops in (("antialiased", 2.7, 2.5, 1.15), ("stem_kept", 1.75, 1.7, 1.03)):
        timing.append(f"{name} / original step time, medians: {ratio:.3f}, fastest rounds: "
                      f"{fastest:.3f}  (goal <= 1.2); forward FLOPs: {flops:.3f}x")
    shift = [f"{'model':>13} | accuracy | consistency | diagonal-sweep accuracy min / mean | run"]
    for row, accuracy, consistency in (("baseline", 0.75, 0.9), ("antialias_ft", 0.7, 0.95)):
        shift.append(f"{row:>13} | {accuracy:8.4f} | {consistency:11.4f} | "
                     f"{0.6:.4f} / {0.65:.4f} | runs/{row} 0")
    return timing, shift


def test_antialias_figures_read_from_its_printed_lines():
    timing, shift = _antialias_lines()
    figures, headline = benchmarks.antialias_figures(timing, shift)
    assert figures["backbone"] == "small_cnn"
    assert figures["ratio_medians"] == {
        "original": 1.0, "antialiased": 2.7, "stem_kept": 1.75, "ktft": 3.54
    }
    assert figures["ratio_fastest"] == {"antialiased": 2.5, "stem_kept": 1.7}
    assert figures["forward_flops_ratio"] == {"antialiased": 1.15, "stem_kept": 1.03}
    assert figures["shift_robustness"]["antialias_ft"] == {
        "accuracy": 0.7, "consistency": 0.95, "sweep_accuracy_min": 0.6,
        "sweep_accuracy_mean": 0.65, "run_dir": "runs/antialias_ft 0",
    }
    assert [(h["measure"], h["value"], h["goal"]) for h in headline] == [
        ("step time antialiased / original (medians)", 2.7, {"at_most": 1.2}),
        ("step time stem_kept / original (medians)", 1.75, {"at_most": 1.2}),
        ("step time ktft / original (medians)", 3.54, None),
        ("shift consistency, baseline", 0.9, None),
        ("shift consistency, antialias_ft", 0.95, None),
    ]
    assert benchmarks.antialias_figures(timing, None)[0].keys() == {
        "backbone", "step_ms", "ratio_medians", "ratio_fastest", "forward_flops_ratio"
    }
    with pytest.raises(ValueError, match="step-time figures"):
        benchmarks.antialias_figures(["the format changed"], None)
    with pytest.raises(ValueError, match="shift-robustness figures"):
        benchmarks.antialias_figures(None, shift[:1])
