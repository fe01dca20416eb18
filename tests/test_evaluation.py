import json

import numpy as np
import pytest

from keras_seltransfer import evaluation


def test_report_against_hand_computed_values():
    labels = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 0, 2])
    probs = np.eye(3)[predicted] * 0.8 + 0.2 / 3
    report = evaluation.classification_report(labels, probs, ["a", "b", "c"])
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["per_class_accuracy"] == pytest.approx({"a": 2 / 3, "b": 1 / 2, "c": 1.0})
    assert report["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert report["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert report["support"] == {"a": 3, "b": 2, "c": 1}


def test_majority_class_collapse_shows_in_balanced_accuracy():
    labels = np.array([0] * 7 + [1] * 3)
    probs = np.tile([0.9, 0.1], (10, 1))
    report = evaluation.classification_report(labels, probs, ["ok", "defect"])
    assert report["accuracy"] == pytest.approx(0.7)
    assert report["balanced_accuracy"] == pytest.approx(0.5)


def test_class_absent_from_test_set_is_reported_as_none():
    report = evaluation.classification_report(
        np.array([0, 1]), np.array([[1.0, 0, 0], [0, 1.0, 0]]), ["a", "b", "c"]
    )
    assert report["per_class_accuracy"]["c"] is None
    assert report["balanced_accuracy"] == pytest.approx(1.0)


def test_shape_errors():
    with pytest.raises(ValueError, match="probabilities"):
        evaluation.classification_report(np.array([0, 1]), np.ones((3, 2)), ["a", "b"])
    with pytest.raises(ValueError, match="class names"):
        evaluation.classification_report(np.array([0, 1]), np.ones((2, 2)), ["a", "b", "c"])


def test_write_report(tmp_path):
    report = evaluation.classification_report(
        np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]), ["ok", "defect"]
    )
    report["method"] = "baseline"
    json_path, md_path = evaluation.write_report(report, str(tmp_path))
    assert json.load(open(json_path))["accuracy"] == 1.0
    md = open(md_path).read()
    assert "- method: baseline" in md and "| defect | 1 | 1.0000 |" in md


def test_predict_dataset_on_empty_dataset():
    import tensorflow as tf

    empty = tf.data.Dataset.from_tensor_slices(
        (np.zeros((0, 2), "float32"), np.zeros((0,), "int32"))
    ).batch(2)
    with pytest.raises(ValueError, match="empty"):
        evaluation.predict_dataset(lambda x, training=False: x, empty)
