"""keras_seltransfer.comparison: row selection, the planned run count, and the
tables and paired differences checked against NumPy/SciPy on synthetic results."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from keras_seltransfer import comparison
from keras_seltransfer.comparison import search
from keras_seltransfer.comparison import tables


def _settings(rows, fractions=(0.15, 0.3), seeds=(0, 1, 2, 3), **overrides):
    values = dict(
        rows=comparison.select_rows(rows), fractions=list(fractions), seeds=list(seeds),
        tune_seeds=[0], tune_fraction=0.15, epochs=1, output_dir="out", runs_dir="out/runs",
        backbone="b.keras", target="numpy:t.npz", source=None, image_size=16, batch_size=8,
    )
    values.update(overrides)
    return comparison.ComparisonSettings(**values)


def test_select_rows_defaults_order_and_errors():
    default = [row.name for row in comparison.select_rows()]
    assert default == [n for n in search.DEFAULT_ROWS if n != "sjft"]
    with_source = [row.name for row in comparison.select_rows(source="numpy:s.npz")]
    assert with_source == list(search.DEFAULT_ROWS)
    # Table order, whatever order they are named in.
    assert [r.name for r in comparison.select_rows(["ktft", "baseline"])] == ["baseline", "ktft"]
    with pytest.raises(ValueError, match=r"Unknown: \['nonsense'\]") as error:
        comparison.select_rows(["baseline", "nonsense"])
    assert "Received: methods=baseline,nonsense" in str(error.value)
    assert "'linear_probe'" in str(error.value)  # the known rows are listed
    with pytest.raises(ValueError, match="each once"):
        comparison.select_rows(["baseline", "baseline"])
    with pytest.raises(ValueError, match=r"Received: source=None"):
        comparison.select_rows(["sjft"])
    search.validate_rows()


def test_planned_runs_counts_search_and_grid_once():
    # baseline: 4 stage-1 + 2 stage-2 trials on 1 tuning seed; linear_probe:
    # 1 trial. Grid: 2 fractions x 4 seeds per row, less the cell at 15% seed
    # 0, which is the chosen trial's search run.
    settings = _settings(["linear_probe", "baseline"])
    assert comparison.planned_runs(settings) == (6 + 1) + 2 * (2 * 4 - 1)
    # The tuning fraction outside the grid: nothing is shared.
    settings = _settings(["baseline"], fractions=[0.3], tune_seeds=[0, 1], trials=4)
    assert comparison.planned_runs(settings) == 4 * 2 + 4


def _synthetic(seed=0):
    """Three rows x two fractions x four seeds of test scores, and choices in
    which the best baseline on validation is not the best on test."""
    rng = np.random.default_rng(seed)
    names = ("linear_probe", "baseline", "adafilter")
    scores = {(n, f): rng.uniform(0.5, 0.9, size=(4, 2)) for n in names for f in (0.15, 0.3)}
    # A clear gain at 15%, so the verdicts are not all "no difference".
    scores["adafilter", 0.15] = scores["baseline", 0.15] + 0.05 + rng.normal(0, 0.01, (4, 2))
    results = [
        {"row": n, "fraction": f, "seed": s, "accuracy": float(scores[n, f][s, 0]),
         "balanced_accuracy": float(scores[n, f][s, 1])}
        for (n, f) in scores for s in range(4)
    ]
    choices = {
        "linear_probe": {"kind": "baseline", "validation_loss": 0.52,
                         "overrides": {"method": "linear_probe", "probe_pooling": "avg"}},
        "baseline": {"kind": "baseline", "validation_loss": 0.41,
                     "overrides": {"method": "baseline", "learning_rate": 3e-4,
                                   "batchnorm": "train"}},
        "adafilter": {"kind": "method", "validation_loss": 0.10,
                      "overrides": {"method": "adafilter", "learning_rate": 1e-3,
                                    "gated_batchnorm": "frozen"}},
    }
    return scores, results, choices


def test_paired_differences_to_the_best_baseline_match_scipy():
    scores, results, choices = _synthetic()
    settings = _settings(list(choices))
    text, paired = tables.body(settings, choices, results)
    # The best baseline is chosen on validation loss, never on test scores
    # (adafilter, with the lowest loss, is a method, not a baseline).
    assert comparison.best_baseline(choices) == "baseline"
    assert {p["reference"] for p in paired} == {"baseline"}
    assert {(p["row"], p["fraction"], p["metric"]) for p in paired} == {
        (n, f, m) for n in ("linear_probe", "adafilter") for f in (0.15, 0.3)
        for m in ("accuracy", "balanced_accuracy")
    }
    for p in paired:
        column = 0 if p["metric"] == "accuracy" else 1
        ours = scores[p["row"], p["fraction"]][:, column]
        theirs = scores["baseline", p["fraction"]][:, column]
        reference = scipy_stats.ttest_rel(ours, theirs).confidence_interval(0.95)
        assert p["seeds"] == [0, 1, 2, 3]
        assert p["mean"] == pytest.approx(np.mean(ours - theirs))
        assert (p["low"], p["high"]) == pytest.approx((reference.low, reference.high))
        expected = ("better" if reference.low > 0 else "worse" if reference.high < 0
                    else "no difference")
        assert p["verdict"] == expected
    assert {p["verdict"] for p in paired if p["row"] == "adafilter" and p["fraction"] == 0.15} == {
        "better"
    }
    assert "Paired differences to the best baseline (Fine-tuning)" in text
    line = next(
        row for row in text.splitlines()
        if row.startswith("| AdaFilter - Fine-tuning | 15% |")
    )
    bal = next(p for p in paired if p["row"] == "adafilter" and p["fraction"] == 0.15
               and p["metric"] == "balanced_accuracy")
    assert f"{bal['mean']:+.3f} [{bal['low']:+.3f}, {bal['high']:+.3f}] {bal['verdict']}" in line


def test_main_table_cells_are_mean_and_population_std_with_the_chosen_settings():
    scores, results, choices = _synthetic(seed=1)
    settings = _settings(list(choices))
    table = tables.main_table(settings, choices, results).splitlines()
    assert table[0] == (
        "| row | paper | kind | chosen on validation | val. loss | 15% | 30% |"
    )
    baseline = next(line for line in table if line.startswith("| Fine-tuning |"))
    columns = [c.strip() for c in baseline.strip("|").split("|")]
    assert columns[3] == "batchnorm=train,learning_rate=0.0003"
    assert columns[4] == "0.4100"
    for column, fraction in zip(columns[5:], (0.15, 0.3)):
        values = scores["baseline", fraction]
        mean, std = values.mean(axis=0), values.std(axis=0)  # population std (ddof 0)
        assert column == (f"{mean[0]:.3f} ± {std[0]:.3f} / {mean[1]:.3f} ± {std[1]:.3f}")
    # A row with no runs at a fraction shows "-", and one seed gives no interval.
    single = [r for r in results if r["seed"] == 0]
    assert tables.paired_rows(single, "baseline", [0.15], ["adafilter"]) == []
    assert tables.cell([]) == "-"


def test_write_outputs_is_atomic_and_complete(tmp_path):
    written = tables.write_outputs(str(tmp_path / "out"), "header", "| table |", {"runs": [1]})
    assert [p.rsplit("/", 1)[1] for p in written] == ["results_table.md", "results.json"]
    assert (tmp_path / "out" / "results_table.md").read_text() == "header\n\n| table |\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.json",
                                                                   "results_table.md"]
