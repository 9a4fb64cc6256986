"""`.keras` files of adapted models: what a damaged file does on load."""

import json
import zipfile

import keras
import numpy as np
import pytest

import keras_adapters as ka


def _adapted_model():
    inputs = keras.Input((4,), name="features")
    hidden = keras.layers.Dense(4, name="hidden")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))
    ka.enable_adapter(model, ka.LoRA(rank=2), targets="hidden", name="news")
    return model


def _rewrite_config(path, edit):
    with zipfile.ZipFile(path) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    config = json.loads(members["config.json"])
    edit(config)
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def test_an_active_list_naming_an_unknown_adapter_is_refused(tmp_path):
    path = str(tmp_path / "model.keras")
    model = _adapted_model()
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert ka.active_adapters(loaded) == ["news"]
    np.testing.assert_allclose(
        loaded.predict(np.ones((1, 4)), verbose=0),
        model.predict(np.ones((1, 4)), verbose=0),
    )

    def rename_active(config):
        config["config"]["active"] = ["sports"]

    _rewrite_config(path, rename_active)
    with pytest.raises(ValueError, match=r"active adapters \['sports'\].*\['news'\]"):
        keras.saving.load_model(path)


def test_saving_keeps_the_file_mode_and_writes_through_a_symlink(tmp_path):
    import os

    target = tmp_path / "target.keras"
    link = tmp_path / "link.keras"
    model = _adapted_model()
    model.save(str(target))
    os.chmod(target, 0o640)
    os.symlink(target, link)
    model.save(str(link))
    assert os.path.islink(link) and oct(os.stat(target).st_mode & 0o777) == "0o640"
    assert ka.active_adapters(keras.saving.load_model(str(link))) == ["news"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.keras", "target.keras"]


def test_a_model_that_cannot_be_saved_leaves_the_old_file(tmp_path):
    path = tmp_path / "model.keras"
    path.write_bytes(b"old")

    class Unregistered(keras.Model):
        pass

    inputs = keras.Input((4,))
    model = Unregistered(inputs, keras.layers.Dense(2, name="proj")(inputs))
    ka.enable_adapter(model, ka.LoRA(rank=1), targets="proj")
    with pytest.raises(NotImplementedError, match="not registered"):
        model.save(str(path))
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.keras"]
