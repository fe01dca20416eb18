"""Every public name has a docstring, and every public function and class an example.

The public names are those in `__all__` of `keras_seltransfer` and of each of
its modules that defines `__all__`. Modules must have a docstring; functions
and classes a docstring with an `Example:` / `Examples:` section or a `>>>`
line, as in Keras.
"""

import importlib
import inspect
import pkgutil
import re

import pytest

import keras_seltransfer

# The apps define absl flags when imported, so importing all of them in one
# process would define the shared flags twice; they are entry points, checked
# by their `--help` tests, not API.
NOT_WALKED = ("keras_seltransfer.apps",)

_EXAMPLE = re.compile(r"^\s*Examples?:\s*$|^\s*>>>", re.MULTILINE)


def _under(name, prefixes):
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def _modules():
    modules = [keras_seltransfer]
    for info in pkgutil.walk_packages(keras_seltransfer.__path__, "keras_seltransfer."):
        if not _under(info.name, NOT_WALKED):
            modules.append(importlib.import_module(info.name))
    return [module for module in modules if hasattr(module, "__all__")]


def _public_names():
    for module in _modules():
        for name in module.__all__:
            yield pytest.param(module, name, id=f"{module.__name__}.{name}")


def _home(obj):
    return obj.__name__ if inspect.ismodule(obj) else getattr(obj, "__module__", "")


@pytest.mark.parametrize("module, name", list(_public_names()))
def test_public_name_is_documented_with_an_example(module, name):
    assert hasattr(module, name), f"{module.__name__}.__all__ lists {name!r}, which it lacks"
    obj = getattr(module, name)
    if inspect.ismodule(obj):
        assert (obj.__doc__ or "").strip(), f"module {obj.__name__} has no docstring"
    elif inspect.isclass(obj) or inspect.isfunction(obj):
        doc = inspect.getdoc(obj) or ""
        assert doc.strip(), f"{module.__name__}.{name} has no docstring"
        assert _EXAMPLE.search(doc), f"{module.__name__}.{name}'s docstring has no example"
    # Constants (choice tuples, names) carry no docstring of their own; the
    # functions that take them document their values.


def test_walk_finds_the_checked_packages():
    walked = {module.__name__ for module in _modules()}
    for expected in (
        "keras_seltransfer",
        "keras_seltransfer.callbacks",
        "keras_seltransfer.layers",
        "keras_seltransfer.losses",
        "keras_seltransfer.optimizers",
        "keras_seltransfer.utils",
    ):
        assert expected in walked
