"""`method="auto"`: candidates, folds, the selection rule, and whole runs."""

import json
import os

import numpy as np
import pytest

from keras_seltransfer import training
from keras_seltransfer.training import auto
from keras_seltransfer.training import defaults
from keras_seltransfer.training import finetuning
from tests import helpers


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto_world")
    return {
        "target": "numpy:" + helpers.write_npz(root / "target.npz", num_per_class=20),
        "backbone": helpers.saved_backbone(root / "backbone.keras"),
    }


def _config(world, run_dir, **fields):
    return helpers.small_run_config(
        **{
            "target": world["target"],
            "backbone": world["backbone"],
            "output_dir": str(run_dir),
            "method": "auto",
            "auto_candidates": "linear_probe,baseline",
            "auto_folds": 2,
            "epochs": 1,
            **fields,
        }
    )


# Candidates ------------------------------------------------------------------


def test_default_candidates_are_registered_methods():
    candidates = auto.parse_candidates(None, training.FinetuneConfig)
    assert [c.label for c in candidates] == list(defaults.AUTO_CANDIDATES)
    assert candidates[3].method == "baseline" and candidates[3].overrides == {"batchnorm": "train"}


def test_candidate_settings_are_typed():
    (candidate,) = auto.parse_candidates(
        [" baseline : learning_rate=1e-4 : batchnorm=train : deterministic=true "],
        training.FinetuneConfig,
    )
    assert candidate.method == "baseline"
    assert candidate.overrides == {"learning_rate": 1e-4, "batchnorm": "train", "deterministic": True}
    assert candidate.label == "baseline:learning_rate=0.0001:batchnorm=train:deterministic=True"


@pytest.mark.parametrize(
    "spec, match",
    [
        ("linear_probe,magic", r"`auto_candidates` takes method names from .* Received: 'magic'"),
        ("auto", r"Received: 'auto'"),
        (" , ", r"must name at least one method"),
        ("baseline,baseline", r"'baseline' is listed twice"),
        ("baseline:colour=red", r"unknown option 'colour'"),
        ("baseline:auto_folds=3", r"unknown option 'auto_folds'"),
        ("baseline:fraction=0.5", r"`fraction` is the same for every candidate"),
        ("baseline:batchnorm", r"settings are written option=value"),
        ("baseline:epochs=many", r"`epochs` takes a int\. Received: epochs='many'"),
        ("baseline:export=maybe", r"`export` is the same"),
        ("baseline:deterministic=maybe", r"`deterministic` takes a bool"),
    ],
)
def test_bad_candidates(spec, match):
    with pytest.raises(ValueError, match=match):
        auto.parse_candidates(spec, training.FinetuneConfig)


def test_config_checks_candidates_before_training(world, tmp_path):
    with pytest.raises(ValueError, match=r"Candidate 'baseline:batchnorm=sideways'.*batchnorm"):
        _config(world, tmp_path, auto_candidates="baseline:batchnorm=sideways")
    with pytest.raises(ValueError, match=r"Candidate 'linear_probe:epochs=0'.*epochs"):
        _config(world, tmp_path, auto_candidates="linear_probe:epochs=0")
    assert not os.path.exists(tmp_path / "auto")
    assert _config(world, tmp_path).is_joint is False


# Folds -----------------------------------------------------------------------


def test_fold_splits_partition_and_stratify():
    labels = np.array([0] * 12 + [1] * 6 + [2] * 9)
    splits = auto.fold_splits(labels, folds=3, seed=4)
    held = np.concatenate([h for _, h in splits])
    np.testing.assert_array_equal(np.sort(held), np.arange(len(labels)))
    for fit, held_out in splits:
        assert not np.intersect1d(fit, held_out).size
        np.testing.assert_array_equal(np.bincount(labels[held_out]), [4, 2, 3])
    again = auto.fold_splits(labels, folds=3, seed=4)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(splits, again))


def test_fold_splits_need_enough_images_per_class():
    with pytest.raises(ValueError, match=r"`auto_folds=5` needs at least 5 images of every class.*"
                       r"class 1 has 3\. Pass auto_folds=3 or fewer"):
        auto.fold_splits([0] * 10 + [1] * 3, folds=5, seed=0)


# The selection rule ----------------------------------------------------------


def _reference_one_se(table):
    """The one-standard-error rule written out fold by fold."""
    k = len(table[0])
    means = [sum(row) / k for row in table]
    best = max(range(len(table)), key=lambda i: (means[i], -i))
    for i, row in enumerate(table):
        d = [table[best][f] - row[f] for f in range(k)]
        mean = sum(d) / k
        var = sum((x - mean) ** 2 for x in d) / (k - 1)
        if mean <= (var / k) ** 0.5 + 1e-12:
            return i, best


def test_select_matches_a_fold_by_fold_reference():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, k = rng.integers(2, 6), rng.integers(2, 6)
        table = np.round(rng.uniform(0.5, 0.9, (n, k)), 2).tolist()
        scores = {f"m{i}": row for i, row in enumerate(table)}
        choice, best = _reference_one_se(table)
        picked = auto.select(scores)
        assert picked["choice"] == f"m{choice}" and picked["best"] == f"m{best}"
        assert auto.select(scores, rule="best")["choice"] == f"m{best}"


def test_select_prefers_the_simpler_candidate_within_noise():
    # sjft is better on average by 0.01, but the paired differences vary
    # (0.03, -0.02, 0.02): SE 0.0153 > 0.01, so the simpler lp_ft is kept.
    scores = {"lp_ft": [0.70, 0.75, 0.68], "sjft": [0.73, 0.73, 0.70]}
    picked = auto.select(scores)
    d = np.array([0.03, -0.02, 0.02])
    se = d.std(ddof=1) / np.sqrt(3)
    assert picked["best"] == "sjft" and picked["choice"] == "lp_ft"
    assert picked["candidates"]["lp_ft"]["se"] == pytest.approx(se)
    assert picked["candidates"]["lp_ft"]["difference"] == pytest.approx(d.mean())
    assert "simplest candidate within one standard error" in picked["reason"]
    # A consistent gain (0.02 on every fold: SE 0) is not noise.
    assert auto.select({"lp_ft": [0.70, 0.72, 0.68], "sjft": [0.72, 0.74, 0.70]})["choice"] == "sjft"
    # Ties go to the simpler.
    assert auto.select({"a": [0.7, 0.8], "b": [0.8, 0.7]}, rule="best")["choice"] == "a"
    # One fold: no standard error, the best.
    one = auto.select({"a": [0.70], "b": [0.71]})
    assert one["choice"] == "b" and "one fold" in one["reason"]


def test_select_errors():
    with pytest.raises(ValueError, match=r"`rule` must be one of \('one_se', 'best'\)"):
        auto.select({"a": [1.0]}, rule="median")
    with pytest.raises(ValueError, match="at least one candidate"):
        auto.select({})
    with pytest.raises(ValueError, match=r"same \(nonzero\) number of folds.*a: 2, b: 1"):
        auto.select({"a": [0.1, 0.2], "b": [0.1]})


def test_single_split_agreement():
    result = auto.single_split_agreement({"a": [0.7, 0.8, 0.6, 0.9], "b": [0.75, 0.7, 0.7, 0.7]})
    # Means 0.75 and 0.7125: a is best; a wins folds 2 and 4.
    assert result == {"agreement": 0.5, "fold_winners": ["b", "a", "b", "a"]}


# Whole runs ------------------------------------------------------------------


def test_auto_run_scores_chooses_trains_and_resumes(world, tmp_path, monkeypatch):
    calls = []
    real = finetuning.fit_and_score

    def counted(config, train_ids, val_ids):
        calls.append((config.method, os.path.basename(config.output_dir)))
        return real(config, train_ids, val_ids)

    monkeypatch.setattr(finetuning, "fit_and_score", counted)
    config = _config(world, tmp_path / "run")
    outputs = training.finetune(config)
    assert sorted(calls) == [("baseline", "fold0"), ("baseline", "fold1"),
                             ("linear_probe", "fold0"), ("linear_probe", "fold1")]
    summary = outputs["report"]["auto"]
    assert summary["folds_used"] == 2 and summary["images"] == 30

    # Each fold score is the held-out images' balanced accuracy of a model
    # trained on the other fold only: recompute one from its stored report.
    train_full, _, train_ids, val_ids = finetuning.finetune_split(config)
    pool = np.concatenate([train_ids, val_ids])
    splits = auto.fold_splits(train_full.labels[pool], 2, config.seed)
    for label, row in summary["candidates"].items():
        assert row["status"] == "scored" and len(row["fold_scores"]) == 2
        for fold, (_, held) in enumerate(splits):
            path = tmp_path / "run" / "auto" / label / f"fold{fold}" / auto.FOLD_REPORT
            stored = json.loads(path.read_text())
            assert stored["held_out"] == pool[held].tolist()
            confusion = np.asarray(stored["report"]["confusion_matrix"])
            recall = np.diag(confusion) / confusion.sum(axis=1)
            assert row["fold_scores"][fold] == pytest.approx(recall.mean())
        assert row["mean"] == pytest.approx(np.mean(row["fold_scores"]))

    # The choice is trained as its own run would be, into the run directory.
    choice = outputs["report"]["auto_choice"]
    assert choice == summary["choice"] and outputs["report"]["method"] == choice
    own = training.finetune(
        helpers.small_run_config(
            target=world["target"], backbone=world["backbone"], method=choice, epochs=1,
            output_dir=str(tmp_path / "own"),
        )
    )["report"]
    assert outputs["report"]["confusion_matrix"] == own["confusion_matrix"]
    for name in ("model.keras", "report.md", "auto.json", "saved_model"):
        assert os.path.exists(tmp_path / "run" / name), name
    # One lock held over the folds and the final run (nested in it), all released.
    assert not list((tmp_path / "run").rglob("*.lock"))
    text = (tmp_path / "run" / "report.md").read_text()
    assert "## Method selection (--method=auto)" in text and f"**{choice}**" in text

    # Rerun after an interruption that lost one fold: only that fold trains.
    os.remove(tmp_path / "run" / "auto" / "baseline" / "fold1" / auto.FOLD_REPORT)
    calls.clear()
    again = training.finetune(config)
    assert calls == [("baseline", "fold1")]
    assert again["report"]["auto"]["choice"] == choice

    # Another setting for the same directory is refused, not silently mixed.
    with pytest.raises(ValueError, match=r"was run with other settings \(learning_rate"):
        auto.cross_validate(_config(world, tmp_path / "run", learning_rate=0.5))


def test_time_budget_completes_the_round_and_stops(world, tmp_path):
    config = _config(world, tmp_path / "run", auto_folds=3, auto_time_budget=1e-6)
    summary = auto.cross_validate(config)
    assert summary["folds_used"] == 1 and summary["folds"] == 3
    assert "time budget" in summary["stopped_early"]
    assert all(len(row["fold_scores"]) == 1 for row in summary["candidates"].values())
    assert summary["reason"].endswith("so the highest mean is taken")


def test_a_candidate_that_does_not_apply_is_left_out(world, tmp_path):
    # The backbone has no such layer: the method refuses while building, is
    # reported and left out (also when rerun), and the other is chosen.
    config = _config(world, tmp_path / "run", auto_candidates="ktft:ktft_layers=nope,linear_probe")
    for _ in range(2):
        summary = auto.cross_validate(config)
        row = summary["candidates"]["ktft:ktft_layers=nope"]
        assert row["status"].startswith("left out: ") and "nope" in row["status"]
        assert row["fold_scores"] == []
        assert summary["choice"] == "linear_probe"
