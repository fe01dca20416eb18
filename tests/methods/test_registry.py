"""The method registry: every method is one module, found on import, and a
new module is all a new method needs (the README's walkthrough, run)."""

import dataclasses
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys

import pytest

from keras_seltransfer import methods
from keras_seltransfer import training
from keras_seltransfer.methods import registry
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_module_of_the_package_registers_what_it_declares():
    modules = {
        m.name for m in pkgutil.iter_modules(methods.__path__) if m.name not in ("base", "registry")
    }
    declared = {type(methods.get(name)).__module__.rsplit(".", 1)[1] for name in methods.names()}
    declared |= {
        methods.get_transform(name).apply.__module__.rsplit(".", 1)[1]
        for name in methods.transform_names()
    }
    assert modules == declared
    assert methods.names()[:2] == ("baseline", "l2sp")
    assert set(methods.joint_methods()) == {
        "sjft", "sjft_nogrowth", "sjft_all", "sjft_random", "sjft_random_neighbours"
    }


def test_every_method_option_is_a_config_field_and_documented():
    fields = {f.name: f for f in dataclasses.fields(training.FinetuneConfig)}
    for cls in methods.options_classes():
        for option in dataclasses.fields(cls):
            assert option.name in fields, option.name
            assert f"    {option.name}: " in training.FinetuneConfig.__doc__
            assert fields[option.name].default == option.default


def test_compose_suggests_only_what_works():
    with pytest.raises(ValueError) as info:
        methods.check_compose("antialias_ft", "adafilter")
    message = str(info.value)
    assert "--method=adafilter --compose=antialias" in message
    assert "compose='antialias,adafilter'" not in message  # antialias_ft applies antialias
    methods.check_compose("adafilter", "antialias")
    with pytest.raises(ValueError, match="compose='antialias,adafilter'"):
        methods.check_compose("baseline", "adafilter,antialias")


def test_registry_errors():
    with pytest.raises(ValueError, match=r"`method` must be one of \('baseline'"):
        methods.get("magic")
    with pytest.raises(ValueError, match="`method` must be one of"):
        training.FinetuneConfig(method="magic")
    with pytest.raises(TypeError, match="takes a Method instance"):
        methods.register("baseline")

    class Clash(methods.Method):
        name = "baseline"

    with pytest.raises(ValueError, match="already registered"):
        methods.register(Clash())

    class BadBatchNorm(methods.Method):
        name = "bad_batchnorm"
        default_batchnorm = "moving"

    with pytest.raises(ValueError, match="`default_batchnorm` must be 'frozen' or 'train'"):
        methods.register(BadBatchNorm())
    assert "bad_batchnorm" not in methods.names()
    with pytest.raises(ValueError, match="needs `steps_per_epoch`"):
        methods.MethodSetup(model=None, train_data=lambda epoch: None)


def test_a_method_registered_at_run_time_trains_through_the_loop(tmp_path):
    """A method without options of its own, registered after import: its
    setup's loss is what the loop compiles (plain fine-tuning's loss equals
    its cross-entropy metric; the smoothed loss does not), and the run writes
    every output."""
    import keras

    class HalfSmoothed(methods.Method):
        name = "half_smoothed_test"

        def setup(self, config, model, context):
            def loss(labels, probabilities):
                one_hot = keras.ops.one_hot(
                    keras.ops.cast(keras.ops.reshape(labels, (-1,)), "int32"), context.num_classes
                )
                target = one_hot * 0.5 + 0.5 / context.num_classes
                return keras.losses.categorical_crossentropy(target, probabilities)

            return methods.MethodSetup(model=model, compile_kwargs={"loss": loss})

    methods.register(HalfSmoothed())
    try:
        config = helpers.small_run_config(
            method="half_smoothed_test",
            target="numpy:" + helpers.write_npz(tmp_path / "target.npz", num_per_class=20),
            backbone=helpers.saved_backbone(tmp_path / "backbone.keras", pretrain_epochs=1),
            output_dir=str(tmp_path / "run"),
            epochs=1,
            export=False,
        )
        outputs = training.finetune(config)
    finally:
        registry._METHODS.pop("half_smoothed_test")
    history = outputs["report"]["history"]
    assert abs(history["loss"][0] - history["crossentropy"][0]) > 0.02
    assert os.path.isfile(outputs["model"])
    plain = training.finetune(dataclasses.replace(
        config, method="baseline", output_dir=str(tmp_path / "plain")
    ))["report"]["history"]
    assert plain["loss"][0] == pytest.approx(plain["crossentropy"][0], abs=1e-4)


def _readme_example():
    text = open(os.path.join(ROOT, "README.md")).read()
    match = re.search(r"<!-- new-method-example -->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its new-method example"
    return match.group(1)


@pytest.mark.slow
def test_the_readme_walkthrough_adds_a_method_with_one_new_file(tmp_path):
    """Copies the package, adds the README's example module and nothing
    else, and runs the new method from Python and from the app."""
    copy = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(os.path.join(ROOT, "keras_seltransfer"), copy / "keras_seltransfer", ignore=ignore)
    shutil.copytree(os.path.join(ROOT, "apps"), copy / "apps", ignore=ignore)
    (copy / "keras_seltransfer" / "methods" / "label_smoothing.py").write_text(_readme_example())
    target = helpers.write_npz(tmp_path / "target.npz", num_per_class=20)
    backbone = helpers.saved_backbone(tmp_path / "backbone.keras", pretrain_epochs=1)
    env = {**os.environ, "PYTHONPATH": str(copy), "TF_CPP_MIN_LOG_LEVEL": "3"}
    script = f"""
import json, keras_seltransfer
from keras_seltransfer import training
assert keras_seltransfer.__file__.startswith({str(copy)!r}), keras_seltransfer.__file__
config = training.FinetuneConfig(
    method="label_smoothing", smoothing=0.3, target="numpy:{target}", backbone="{backbone}",
    image_size=16, batch_size=8, epochs=1, verbose=0, tensorboard=False, export=False,
    output_dir="{tmp_path / 'run'}",
)
out = training.finetune(config)
print(json.dumps({{"history": out["report"]["history"], "config": json.load(open(
    "{tmp_path / 'run' / 'config.json'}"))}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=copy, env=env, capture_output=True, text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["config"]["method"] == "label_smoothing" and out["config"]["smoothing"] == 0.3
    assert abs(out["history"]["loss"][0] - out["history"]["crossentropy"][0]) > 0.02
    helped = subprocess.run(
        [sys.executable, "-m", "apps.finetune", "--help"], cwd=copy, env=env,
        capture_output=True, text=True, timeout=300,
    )
    assert "label_smoothing fine-tuning with label-smoothed targets" in helped.stdout
    assert "--smoothing: label_smoothing: probability mass" in helped.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "apps.finetune", "--method=label_smoothing", "--smoothing=1",
         f"--target=numpy:{target}", f"--backbone={backbone}"],
        cwd=copy, env=env, capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 2
    assert "`smoothing` must be a number in [0, 1). Received: smoothing=1.0" in bad.stderr
