"""Adapter files: all-or-nothing loads, clear errors, atomic saves."""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys

import h5py
import keras
import numpy as np
import pytest
from cases import MODELS

import keras_adapters as ka

CASE = MODELS["bert"]


def _numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _source():
    """A BERT classifier with two adapters ("a": LoRA, "b": HUT), "b" active."""
    model = CASE.build(0)
    ka.enable_adapter(model, ka.LoRA(rank=2), targets=CASE.targets, name="a")
    ka.enable_adapter(model, ka.HUT(rank=2), targets=ka.attention("value"), name="b")
    rng = np.random.default_rng(0)
    for variable in model.trainable_weights + ka.adapter_variables(model):
        variable.assign(rng.normal(scale=0.1, size=variable.shape))
    ka.set_active_adapters(model, "b")
    return model


@pytest.fixture(scope="module")
def source_file(tmp_path_factory):
    model = _source()
    path = str(tmp_path_factory.mktemp("source") / "ab.adapter.weights.h5")
    ka.save_adapter_weights(model, path)
    return model, path


@pytest.fixture(scope="module")
def targets():
    """Models that failed loads must leave unchanged: a fresh one, and one
    with an adapter of its own ("mine", inactive next to an active "other")."""
    fresh = CASE.build(1)
    adapted = CASE.build(2)
    ka.enable_adapter(
        adapted, ka.LoRA(rank=1), targets=ka.attention("query"), name="mine"
    )
    ka.enable_adapter(
        adapted, ka.LoRA(rank=1), targets=ka.attention("key"), name="other"
    )
    for variable in ka.adapter_variables(adapted):
        variable.assign(np.full(variable.shape, 0.25))
    ka.set_active_adapters(adapted, "other")
    return [fresh, adapted]


def _state(model):
    return {
        "class": type(model),
        "layer classes": [type(layer) for layer in model._flatten_layers()],
        "paths": [v.path for v in model.weights],
        "values": [_numpy(v).copy() for v in model.weights],
        "trainable": [v.trainable for v in model.weights],
        "layers trainable": [layer.trainable for layer in model._flatten_layers()],
        "names": ka.adapter_names(model),
        "active": ka.active_adapters(model),
    }


def _assert_same_state(model, before):
    after = _state(model)
    for key in before:
        if key == "values":
            for a, b in zip(after[key], before[key], strict=True):
                np.testing.assert_array_equal(a, b)
        else:
            assert after[key] == before[key], key


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _spec_edit(function):
    def edit(f):
        spec = json.loads(f.attrs["keras_adapters"])
        f.attrs["keras_adapters"] = json.dumps(function(spec))

    return edit


def _raw_spec(text):
    def edit(f):
        f.attrs["keras_adapters"] = text

    return edit


def _last_dataset(f, prefix, suffix=""):
    names = []
    f[prefix].visititems(
        lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None
    )
    return f"{prefix}/" + [n for n in names if n.endswith(suffix)][-1]


def _replace_dataset(prefix, make):
    def edit(f):
        name = _last_dataset(f, prefix, ".b" if prefix == "adapters" else "")
        old = f[name][()]
        del f[name]
        f[name] = make(old)

    return edit


def _delete_dataset(prefix):
    def edit(f):
        del f[_last_dataset(f, prefix, ".b" if prefix == "adapters" else "")]

    return edit


def _with(spec, index, **changes):
    spec["groups"][index].update(changes)
    return spec


def _bad_path(spec):
    group = spec["groups"][1]
    old = group["layer_paths"][0]
    group["layer_paths"][0] = "transformer_layer_9/self_attention_layer/value"
    spec["kernel_shapes"][group["layer_paths"][0]] = spec["kernel_shapes"][old]
    return spec


def _config(spec, index, **changes):
    spec["groups"][index]["adapter"]["config"].update(changes)
    return spec


BAD_FILES = {
    "missing dataset": (_delete_dataset("adapters"), "missing"),
    "string dataset": (_replace_dataset("adapters", lambda old: "abc"), "not numbers"),
    "wrong shape": (
        _replace_dataset("adapters", lambda old: np.zeros((3, 3), "float32")),
        "shape (3, 3)",
    ),
    "NaN values": (
        _replace_dataset("adapters", lambda old: np.full(old.shape, np.nan)),
        "NaN or infinite",
    ),
    "inf in extras": (
        _replace_dataset("extras", lambda old: np.full(old.shape, np.inf)),
        "NaN or infinite",
    ),
    "missing extra": (_delete_dataset("extras"), "missing"),
    "extra of another shape": (
        _replace_dataset("extras", lambda old: np.zeros((2, 2))),
        "shape (2, 2)",
    ),
    "spec rank differs from the stored factors": (
        _spec_edit(lambda s: _config(s, 0, rank=1)),
        "another rank",
    ),
    "second group with a bad layer path": (
        _spec_edit(_bad_path),
        "no Dense/EinsumDense layer at 'transformer_layer_9",
    ),
    "spec is not JSON": (_raw_spec("{not json"), "not valid JSON"),
    "spec without groups": (
        _spec_edit(lambda s: {k: v for k, v in s.items() if k != "groups"}),
        "'groups' must be a non-empty list",
    ),
    "spec is a list": (_raw_spec("[1, 2]"), "expected a JSON object"),
    "group is not an object": (
        _spec_edit(lambda s: {**s, "groups": [1]}),
        "groups[0] must be an object",
    ),
    "layer paths are not strings": (
        _spec_edit(lambda s: _with(s, 0, layer_paths=[1])),
        "no 'layer_paths' list",
    ),
    "active names an unknown adapter": (
        _spec_edit(lambda s: {**s, "active": ["zzz"]}),
        "'active' must list adapters",
    ),
    "kernel shape is not a list of ints": (
        _spec_edit(lambda s: {**s, "kernel_shapes": {"x": "16"}}),
        "'kernel_shapes' must map",
    ),
    "unknown method": (
        _spec_edit(lambda s: _with(s, 1, adapter={"method": "nope", "config": {}})),
        "Unknown adapter method 'nope'",
    ),
    "NaN alpha": (
        _spec_edit(lambda s: _config(s, 0, alpha=float("nan"))),
        "holds NaN; every number must be finite",
    ),
    "inf dropout": (
        _spec_edit(lambda s: _config(s, 0, dropout=float("-inf"))),
        "holds -Infinity",
    ),
    "initializer naming another registered class": (
        _spec_edit(
            lambda s: _config(
                s,
                0,
                a_initializer={"class_name": "keras_adapters>HUT", "config": {}},
            )
        ),
        "a_initializer",
    ),
    "unknown config argument": (
        _spec_edit(lambda s: _config(s, 0, colour="red")),
        "colour",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_a_bad_file_raises_and_changes_nothing(kind, source_file, targets, tmp_path):
    _, good = source_file
    edit, message = BAD_FILES[kind]
    path = str(tmp_path / "bad.adapter.weights.h5")
    shutil.copy(good, path)
    with h5py.File(path, "r+") as f:
        edit(f)
    digest = _digest(path)
    for model in targets:
        before = _state(model)
        with pytest.raises(ValueError) as error:
            ka.load_adapter_weights(model, path)
        assert path in str(error.value)
        assert message in str(error.value)
        _assert_same_state(model, before)
    assert _digest(path) == digest


def test_a_good_file_loads_next_to_existing_adapters(source_file, targets, tmp_path):
    source, path = source_file
    model = CASE.build(0)
    ka.enable_adapter(
        model, ka.LoRA(rank=1), targets=ka.attention("query"), name="mine"
    )
    ka.load_adapter_weights(model, path)
    assert ka.adapter_names(model) == ["mine", "a", "b"]
    assert ka.active_adapters(model) == ["mine", "b"]
    ka.set_active_adapters(model, ka.active_adapters(source))
    np.testing.assert_allclose(
        _numpy(model(CASE.x)), _numpy(source(CASE.x)), rtol=1e-5, atol=1e-6
    )


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_save_keeps_the_mode_and_writes_through_symlinks(source_file, tmp_path):
    source, _ = source_file
    real = tmp_path / "shared"
    real.mkdir()
    target = real / "news.adapter.weights.h5"
    ka.save_adapter_weights(source, target)
    os.chmod(target, 0o644)
    link = tmp_path / "current.adapter.weights.h5"
    link.symlink_to(target)
    ka.save_adapter_weights(source, link, names="a")
    assert link.is_symlink()
    assert _mode(target) == 0o644
    assert [g["name"] for g in ka.read_adapter_spec(target)["groups"]] == ["a"]
    assert sorted(os.listdir(real)) == ["news.adapter.weights.h5"]


def test_save_removes_temporaries_of_killed_saves(source_file, tmp_path):
    source, _ = source_file
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    stale = tmp_path / f".a.adapter.weights.h5.tmp-{process.pid}-0123abcd"
    stale.write_bytes(b"half a file")
    ka.save_adapter_weights(source, tmp_path / "a.adapter.weights.h5")
    assert os.listdir(tmp_path) == ["a.adapter.weights.h5"]


def test_save_refuses_bad_arguments(source_file, tmp_path):
    source, _ = source_file
    with pytest.raises(ValueError, match="`path` must be a str"):
        ka.save_adapter_weights(source, 3)
    with pytest.raises(ValueError, match="Expected a Keras model"):
        ka.save_adapter_weights("model", str(tmp_path / "a.h5"))
    with pytest.raises(ValueError, match=r"Unknown adapter names \['zzz'\]"):
        ka.save_adapter_weights(source, str(tmp_path / "a.h5"), names="zzz")
    with pytest.raises(FileNotFoundError, match="No directory"):
        ka.save_adapter_weights(source, str(tmp_path / "missing" / "a.h5"))
    assert os.listdir(tmp_path) == []
