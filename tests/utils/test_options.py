"""Declared options: `option` metadata and `check_option`'s verdicts."""

import dataclasses

import numpy as np
import pytest

from keras_seltransfer.utils.options import check_option
from keras_seltransfer.utils.options import option
from keras_seltransfer.utils.options import option_info


@dataclasses.dataclass
class _Options:
    rate: float = option(0.5, "A rate.", above=0.0, upper=1.0)
    steps: int = option(3, "Steps.", lower=1)
    level: int = option(0, "Level.", lower=0, upper=2)
    mode: str = option("a", "Mode.", choices=("a", "b"))
    channels: int = option(None, "Channels.", type=int, choices=(1, 3))
    flag: bool = option(True, "A flag.")
    share: float = option(0.1, "A share.", lower=0.0, below=1.0)
    name: str = option(None, "A name.")


def _field(name):
    return {f.name: f for f in dataclasses.fields(_Options)}[name]


@pytest.mark.parametrize(
    "name, value",
    [("rate", 1.0), ("rate", 1e-9), ("steps", 1), ("steps", np.int64(7)), ("level", 2),
     ("mode", "b"), ("channels", None), ("channels", 3), ("flag", False), ("share", 0.0),
     ("name", None), ("name", "x"), ("rate", 1)],
)
def test_allowed_values_pass(name, value):
    check_option(_field(name), value)


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("rate", 0.0, r"`rate` must be a number in \(0, 1\]. Received: rate=0.0"),
        ("rate", 1.5, r"`rate` must be a number in \(0, 1\]"),
        ("rate", float("nan"), r"`rate` must be a number"),
        ("rate", True, r"Received: rate=True"),
        ("steps", 0, r"`steps` must be a positive int. Received: steps=0"),
        ("steps", 2.0, r"`steps` must be a positive int. Received: steps=2.0"),
        ("level", 3, r"`level` must be an int in \[0, 2\]"),
        ("mode", "c", r"`mode` must be one of \('a', 'b'\). Received: mode='c'"),
        ("channels", 2, r"`channels` must be one of \(1, 3\)"),
        ("channels", True, r"`channels` must be one of \(1, 3\). Received: channels=True"),
        ("flag", 1, r"`flag` must be True or False"),
        ("share", 1.0, r"`share` must be a number in \[0, 1\)"),
        ("name", 3, r"`name` must be a string"),
        ("steps", None, r"`steps` must be set. Received: steps=None"),
    ],
)
def test_bad_values_name_the_option_and_what_was_expected(name, value, message):
    with pytest.raises(ValueError, match=message):
        check_option(_field(name), value)


def test_metadata_and_types():
    info = option_info(_field("rate"))
    assert info["help"] == "A rate." and info["type"] is float and info["above"] == 0.0
    assert option_info(_field("name"))["type"] is str
    with pytest.raises(ValueError, match="was not made with `option"):
        option_info(dataclasses.field(default=1))


def test_name_list_parses_comma_separated_layer_names():
    from keras_seltransfer.utils.naming import name_list

    assert name_list(" a, b ,,c", "ktft_layers") == ["a", "b", "c"]
    assert name_list(None, "ktft_layers") is None
    with pytest.raises(ValueError, match=r"Received: delta_layers=' , '"):
        name_list(" , ", "delta_layers")
