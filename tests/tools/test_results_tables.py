"""tools/results/tables.py: the tables and results.json from a small fake result set."""

import json

import pytest

from tools.results import tables


@pytest.fixture
def settings(make_settings):
    return make_settings(
        rows=("baseline", "sjft", "combo"), fractions=[0.15, 1.0], seeds=[0, 1],
        lrs=[1e-3, 3e-4], epochs=20, patience=20, quick=False,
    )


def _run(row, fraction, seed, accuracy, balanced):
    return {"row": row, "fraction": fraction, "seed": seed, "learning_rate": 1e-3,
            "accuracy": accuracy, "balanced_accuracy": balanced, "seconds": 10.0}


RESULTS = [
    _run("baseline", 0.15, 0, 0.70, 0.50),
    _run("baseline", 0.15, 1, 0.80, 0.60),
    _run("baseline", 1.0, 0, 0.90, 0.80),
    _run("sjft", 0.15, 0, 0.75, 0.55),
]
CHOICES = {
    "baseline": {"learning_rate": 0.001, "validation_loss": {"0.001": 0.4, "0.0003": 0.5}},
    "sjft": {"learning_rate": 0.0003, "validation_loss": {}},
    "combo": {"learning_rate": None, "combination": None, "label": None, "validation_loss": {}},
}


def test_cell_is_mean_and_population_std():
    assert tables.cell([]) == "-"
    assert tables.cell(RESULTS[:2]) == "0.750 ± 0.050 / 0.550 ± 0.050"


def test_table_text(settings):
    assert tables.table(settings, CHOICES, RESULTS).splitlines() == [
        "| row | paper | lr | 15% | 100% | authors' figure (their data) |",
        "|---|---|---|---|---|---|",
        "| Fine-tuning (no source) | Ge & Yu 2017 | 0.001 | 0.750 ± 0.050 / 0.550 ± 0.050 | "
        "0.900 ± 0.000 / 0.800 ± 0.000 | 80.4 |",
        "| SJFT, conv filter bank (full method) | Ge & Yu 2017 | 0.0003 | "
        "0.750 ± 0.000 / 0.550 ± 0.000 | - | 90.2 |",
        "| Best combination (chosen on validation) | this toolkit | - | - | - | - |",
    ]
    chosen = dict(CHOICES, combo={"learning_rate": 3e-4, "label": "SJFT on an AdaFilter backbone"})
    last = tables.table(settings, chosen, RESULTS).splitlines()[-1]
    assert last.startswith("| Best combination (chosen on validation): SJFT on an AdaFilter backbone |")


def test_investigation_table_beside_the_parent_row():
    assert tables.investigation_table(RESULTS, []) == ""
    ablation = dict(_run("baseline_bntrain", 0.15, 0, 0.72, 0.52), parent="baseline")
    assert tables.investigation_table(RESULTS, [ablation]).splitlines() == [
        "| row | parent row at 15% | ablation at 15% |",
        "|---|---|---|",
        "| Fine-tuning, BatchNorm trained | 0.750 ± 0.050 / 0.550 ± 0.050 | "
        "0.720 ± 0.000 / 0.520 ± 0.000 |",
    ]


def test_body_adds_ablations_and_shift_only_when_present(settings):
    plain = tables.body(settings, CHOICES, RESULTS, [], {})
    assert plain == tables.table(settings, CHOICES, RESULTS)
    shift = {("baseline", 0.15, 0): {"consistency": 0.9,
                                     "sweep": {"shifts": [-1, 0, 1], "accuracy": [0.6, 0.7, 0.8]}}}
    ablation = dict(_run("baseline_bntrain", 0.15, 0, 0.72, 0.52), parent="baseline")
    text = tables.body(settings, CHOICES, RESULTS, [ablation], shift)
    assert "\n\nAblations (same budget" in text and "\n\nShift consistency (Zhang" in text
    assert "| Fine-tuning (no source) | 0.900 ± 0.000 / 0.700 ± 0.000 | - |" in text
    assert tables.shifted_accuracy(shift[("baseline", 0.15, 0)]["sweep"]) == 0.7


def test_settings_text(settings):
    environment = {"machine": "x86_64 Linux, 2 CPUs", "tensorflow": "2.x", "keras": "3.x",
                   "python": "3.11"}
    text = tables.settings_text(settings, RESULTS, {"a": 1800.0, "b": 1800.0}, environment)
    assert text.startswith("Target elpv (fixed held-out test split), source fashion_mnist, ")
    assert "from {0.001, 0.0003} by validation cross-entropy at 15%, seed 0." in text
    assert "4 cells, 2 runs with the tuning trials and ablations, 1.00 h of run time" in text


def test_write_tables_keeps_the_schema_and_the_discussion(tmp_path):
    (tmp_path / "RESULTS.md").write_text(
        f"intro\n{tables.MARKER}\nold table\n{tables.MARKER}\ndiscussion\n"
    )
    shift = {("baseline", 0.15, 0): {"consistency": 0.9, "sweep": {"shifts": [0], "accuracy": [1]}}}
    document = tables.results_document("header", {"python": "3"}, CHOICES, RESULTS, [], shift)
    tables.write_tables(str(tmp_path), "header", "the table", document)
    stored = json.loads((tmp_path / "results.json").read_text())
    assert list(stored) == [
        "settings", "environment", "choices", "runs", "investigations", "shift_consistency"
    ]
    assert stored["runs"] == RESULTS
    assert stored["shift_consistency"] == [
        {"row": "baseline", "fraction": 0.15, "seed": 0, "consistency": 0.9}
    ]
    assert (tmp_path / "results_table.md").read_text() == "header\n\nthe table\n"
    assert (tmp_path / "RESULTS.md").read_text() == (
        f"intro\n{tables.MARKER}\nheader\n\nthe table\n{tables.MARKER}\ndiscussion\n"
    )
    tables.splice(str(tmp_path / "new.md"), tables.MARKER, "t")
    assert (tmp_path / "new.md").read_text() == f"{tables.MARKER}\nt\n{tables.MARKER}\n"
