"""The deconfounded protocol of tools/reproduce.py: its search, statistics
and one end-to-end invocation on tiny data."""

import json
import os

import numpy as np
import pytest
from scipy import stats as scipy_stats

from tests import helpers
from tools.results import protocol
from tools.results import protocol_runner
from tools.results import protocol_tables
from keras_seltransfer.comparison import stats



def test_every_fine_tuning_row_starts_from_the_same_stage_1_grid():
    for row in protocol.ROWS:
        trials = protocol.stage1_trials(row)
        assert len(trials) <= protocol.TRIALS
        assert all(t["method"] == row.overrides["method"] for t in trials)
        if row.stage1 is None:
            assert {(t["learning_rate"], t["batchnorm"]) for t in trials} == {
                (lr, bn) for lr in protocol.LEARNING_RATES for bn in protocol.BATCHNORM_MODES
            }
    # AdaFilter gates every conv of the backbone, so its BatchNorm dimension
    # is the gated batch norm's mode (`batchnorm` alone was a no-op there).
    trials = protocol.stage1_trials(protocol.ROWS_BY_NAME["adafilter"])
    assert {(t["learning_rate"], t["gated_batchnorm"]) for t in trials} == {
        (lr, bn) for lr in protocol.LEARNING_RATES for bn in protocol.BATCHNORM_MODES
    }


def test_stage_2_fills_the_same_budget_for_every_row():
    # A row with two settings spends stage 2 on them; a row with none on
    # learning rates next to the best: every fine-tuning row gets TRIALS trials.
    for row in protocol.ROWS:
        if row.stage1 is not None:
            continue
        best = dict(protocol.stage1_trials(row)[0])
        second = protocol.stage2_trials(row, best)
        assert len(protocol.stage1_trials(row)) + len(second) == protocol.TRIALS, row.name
        settings = [t for t in second if t["learning_rate"] == best["learning_rate"]]
        assert len(settings) == min(
            sum(len(v) for _, v in row.search), protocol.TRIALS - 4
        ), row.name
    sjft = protocol.ROWS_BY_NAME["sjft"]
    best = {**sjft.overrides, "learning_rate": 3e-4, "batchnorm": "train"}
    assert protocol.stage2_trials(sjft, best) == [
        {**best, "max_level": 0}, {**best, "joint_bn_stats": "target"}
    ]
    baseline = protocol.ROWS_BY_NAME["baseline"]
    best = {"method": "baseline", "learning_rate": 1e-3, "batchnorm": "frozen"}
    assert [t["learning_rate"] for t in protocol.stage2_trials(baseline, best)] == pytest.approx(
        [1e-3 / 3, 3e-3]
    )
    with pytest.raises(ValueError, match="budget is 3"):
        protocol.stage1_trials(baseline, budget=3)


def test_joint_rows_run_at_single_task_steps():
    assert protocol.ROWS_BY_NAME["sjft"].overrides["joint_steps"] == "single_task"


def test_trial_slugs_name_what_differs_and_seeds_follow_the_fraction():
    base = {"method": "sjft"}
    assert protocol.trial_slug({**base, "learning_rate": 3e-4, "max_level": 0}, base) == (
        "learning_rate=0.0003,max_level=0"
    )
    assert protocol.trial_slug(base, base) == "defaults"
    assert len(protocol.seeds_for(0.15)) == len(protocol.seeds_for(0.3)) == 5
    assert len(protocol.seeds_for(0.5)) == len(protocol.seeds_for(1.0)) == 3


def test_paired_interval_matches_scipy_and_the_verdict_needs_the_interval():
    differences = [0.02, 0.05, 0.01, 0.04, 0.03]
    mean, low, high = stats.paired_interval(differences)
    reference = scipy_stats.ttest_1samp(differences, 0.0).confidence_interval(0.95)
    assert mean == pytest.approx(np.mean(differences))
    assert (low, high) == pytest.approx((reference.low, reference.high))
    assert stats.verdict(low, high) == "better"
    assert stats.verdict(-0.01, 0.02) == "no difference"
    assert stats.verdict(-0.03, -0.01) == "worse"


def test_paired_rows_pair_by_seed_and_best_baseline_is_chosen_on_validation():
    cells = []
    for seed, (a, b) in enumerate([(0.70, 0.66), (0.72, 0.69), (0.75, 0.70)]):
        cells += [
            {"row": "sjft", "fraction": 0.15, "seed": seed, "balanced_accuracy": a, "accuracy": a},
            {"row": "lp", "fraction": 0.15, "seed": seed, "balanced_accuracy": b, "accuracy": b},
        ]
    cells.append({"row": "sjft", "fraction": 0.15, "seed": 9, "balanced_accuracy": 0.0, "accuracy": 0.0})
    paired = protocol_tables.paired_rows(cells, "lp", [0.15], ["sjft", "lp"])
    assert len(paired) == 2 and paired[0]["seeds"] == [0, 1, 2]  # seed 9 has no partner
    assert paired[0]["mean"] == pytest.approx(np.mean([0.04, 0.03, 0.05]))
    choices = {
        "lp": {"kind": "baseline", "validation_loss": 0.41},
        "baseline": {"kind": "baseline", "validation_loss": 0.45},
        "sjft": {"kind": "method", "validation_loss": 0.30},
    }
    assert protocol_runner.best_baseline(choices) == "lp"


def _reproduce(*args, timeout=600):
    # The deconfounded protocol is the default: no --protocol flag.
    return helpers.run_tool("reproduce.py", *args, timeout=timeout)


def test_the_summary_file_gets_only_its_targets_block(tmp_path):
    path = tmp_path / "RESULTS.md"
    marker = protocol_tables.summary_marker("numpy:/data/a.npz")
    other = protocol_tables.summary_marker("elpv")
    assert marker != other and marker.startswith("<!-- deconfounded-table:")
    path.write_text(f"intro\n{marker}\nold\n{marker}\nmiddle\n{other}\nkept\n{other}\nend\n")
    assert protocol_tables.splice_summary(str(path), "numpy:/data/a.npz", "new table")
    assert path.read_text() == (
        f"intro\n{marker}\nnew table\n{marker}\nmiddle\n{other}\nkept\n{other}\nend\n"
    )
    # A file without the pair is left alone, and a missing file is not made.
    plain = tmp_path / "plain.md"
    plain.write_text(f"intro\n{marker}\n")
    assert not protocol_tables.splice_summary(str(plain), "numpy:/data/a.npz", "new table")
    assert plain.read_text() == f"intro\n{marker}\n"
    assert not protocol_tables.splice_summary(str(tmp_path / "none.md"), "elpv", "x")
    assert not (tmp_path / "none.md").exists()


@pytest.mark.slow  # the default run keeps its cheaper sibling
def test_deconfounded_protocol_searches_runs_controls_and_resumes(tmp_path):
    target = helpers.write_npz(tmp_path / "target.npz", num_per_class=20)
    source = helpers.write_npz(tmp_path / "source.npz", num_per_class=20, num_classes=3, seed=4)
    backbone = helpers.saved_backbone(tmp_path / "backbone.keras")
    out = tmp_path / "results"
    summary = tmp_path / "summary.md"
    marker = protocol_tables.summary_marker(f"numpy:{target}")
    summary.write_text(f"# Results\n{marker}\n{marker}\ndiscussion\n")
    args = [
        f"--target=numpy:{target}", f"--source=numpy:{source}", f"--backbone={backbone}",
        f"--output_dir={out}", f"--summary={summary}",
        "--rows=baseline,sjft", "--controls=sjft_uniform_draws",
        "--fractions=1", "--tune_fraction=1", "--seeds=0,1", "--tune_seeds=0", "--trials=5",
        "--epochs=1", "--image_size=16", "--batch_size=8", "--noplots",
    ]
    first = _reproduce(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    # Per row 5 search runs (seed 0, one of which is the grid's seed-0 cell)
    # and the grid's seed 1; then the control at both seeds.
    assert first.stdout.count(": training") == 2 * 6 + 2
    results = json.load(open(out / "results.json"))
    choices = results["choices"]
    for name in ("baseline", "sjft"):
        trials = choices[name]["trials"]
        assert [t["stage"] for t in trials] == [1, 1, 1, 1, 2]
        best = min(trials, key=lambda t: t["validation_loss"])
        assert choices[name]["overrides"] == best["overrides"]
        assert choices[name]["validation_loss"] == best["validation_loss"]
    # sjft's stage-2 trial changes its first setting from the best stage-1 trial.
    stage1 = min(choices["sjft"]["trials"][:4], key=lambda t: t["validation_loss"])
    assert choices["sjft"]["trials"][4]["overrides"] == {**stage1["overrides"], "max_level": 0}
    assert results["best_baseline"] == "baseline"
    assert {(r["row"], r["seed"]) for r in results["runs"]} == {
        (row, seed) for row in ("baseline", "sjft") for seed in (0, 1)
    }
    control = results["controls"]
    assert len(control) == 2 and all(r["trial"].endswith("target_draws=uniform") or
                                     "target_draws=uniform" in r["trial"] for r in control)
    with open(os.path.join(control[0]["run_dir"], "config.json")) as f:
        config = json.load(f)
    chosen = choices["sjft"]["overrides"]
    assert config["target_draws"] == "uniform" and config["joint_steps"] == "single_task"
    assert config["learning_rate"] == chosen["learning_rate"]
    assert {p["row"] for p in results["paired"]} == {"sjft", "sjft_uniform_draws"}
    table = (out / "results_table.md").read_text()
    assert "Paired differences to the best baseline (Fine-tuning)" in table
    assert "SJFT, lists grow but hard images are not repeated" in table
    assert summary.read_text() == f"# Results\n{marker}\n{table.strip()}\n{marker}\ndiscussion\n"

    again = _reproduce(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert ": training" not in again.stdout
    assert json.load(open(out / "results.json"))["runs"] == results["runs"]

    unknown = _reproduce(*args[:-1], "--rows=baseline,nonsense")
    assert unknown.returncode != 0 and "Unknown rows ['nonsense']" in unknown.stderr


def test_each_method_is_paired_with_the_row_its_paper_claims_to_improve_on():
    rows = [protocol.ROWS_BY_NAME[n] for n in ("baseline", "antialias_ft", "ktft", "sjft")]
    settings = type("Settings", (), {"rows": rows, "fractions": (0.15,)})()
    scores = {"baseline": (0.70, 0.72, 0.71), "antialias_ft": (0.72, 0.75, 0.73),
              "ktft": (0.71, 0.74, 0.76), "sjft": (0.70, 0.73, 0.70)}
    cells = [{"row": row, "fraction": 0.15, "seed": seed, "balanced_accuracy": v, "accuracy": v}
             for row, values in scores.items() for seed, v in enumerate(values)]
    claims = protocol_tables.paper_claims(cells, settings)
    pairs = {(c["row"], c["reference"]) for c in claims}
    # adafilter and filter_transfer are not rows here, so they are left out.
    assert pairs == {("sjft", "baseline"), ("antialias_ft", "baseline"), ("ktft", "baseline"),
                     ("ktft", "antialias_ft")}
    ktft = [c for c in claims if c["row"] == "ktft" and c["reference"] == "antialias_ft"
            and c["metric"] == "accuracy"][0]
    diffs = np.subtract(scores["ktft"], scores["antialias_ft"])
    half = scipy_stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / np.sqrt(3)
    assert ktft["mean"] == pytest.approx(diffs.mean())
    assert (ktft["low"], ktft["high"]) == pytest.approx((diffs.mean() - half, diffs.mean() + half))
    table = protocol_tables.paired_table(claims, protocol_tables.labels_of(settings)).splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == [
        "| Anti-aliased fine-tuning - Fine-tuning",
        "| KTFT (anti-aliased, knowledge-transferred) - Fine-tuning",
        "| KTFT (anti-aliased, knowledge-transferred) - Anti-aliased fine-tuning",
        "| SJFT (selective joint fine-tuning) - Fine-tuning",
    ]
