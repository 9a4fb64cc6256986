"""A catalogue of bad inputs to the public API.

Each case calls one public function with one bad argument (or a bad file or
directory) and checks three things: the exception type; that the message
names the bad value and what is allowed; and that nothing changed: every
weight, trainable flag, layer class, adapter name and active adapter of
every model in `world`, and the bytes, mode and names of every file under
its directory (no new files, no temporaries). The models and files are
built once for the module; a case that changed them would fail itself and,
as the state is compared with a snapshot taken once, every later case too.

`docs/how_adapters_attach.md` ("What is guaranteed") counts the cases.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable

import h5py
import keras
import keras_hub
import numpy as np
import pytest
from cases import MODELS

import keras_adapters as ka
from keras_adapters import interop

NAN, INF = float("nan"), float("inf")
PEFT_DATA = os.path.join(os.path.dirname(__file__), "data", "peft")


def _numpy(variable):
    return np.array(keras.ops.convert_to_numpy(variable))


def _model_state(model):
    layers = [model] + list(model._flatten_layers(include_self=False))
    return {
        "layer classes": [type(layer).__name__ for layer in layers],
        "layers trainable": [layer.trainable for layer in layers],
        "paths": [v.path for v in model.weights],
        "trainable": [v.trainable for v in model.weights],
        "values": [_numpy(v) for v in model.weights],
        "adapter names": ka.adapter_names(model),
        "active": ka.active_adapters(model),
    }


def _files_state(root):
    files = {}
    for directory, _, names in os.walk(root):
        files[os.path.relpath(directory, root)] = stat.S_IMODE(
            os.stat(directory).st_mode
        )
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            files[os.path.relpath(path, root)] = (
                digest,
                stat.S_IMODE(os.stat(path).st_mode),
            )
    return files


MODELS_OF_WORLD = ("plain", "adapted", "other", "bert")


@dataclasses.dataclass(repr=False)
class World:
    """The models and files every case may touch and must leave unchanged."""

    root: str
    plain: keras.Model  # functional, no adapters
    adapted: keras.Model  # functional: LoRA "a" (proj, hidden), HUT "b" (hidden)
    other: keras.Model  # functional: its own LoRA "a" (rank 1, hidden)
    bert: keras.Model  # BertBackbone of tests/data/peft/bert: HUT "hut", LoRA "lora"
    x: np.ndarray  # inputs of the functional models

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def snapshot(self):
        state = {key: _model_state(getattr(self, key)) for key in MODELS_OF_WORLD}
        return {**state, "files": _files_state(self.root)}


def _assert_same(before, after):
    for key in MODELS_OF_WORLD:
        for item, value in before[key].items():
            if item == "values":
                for a, b, path in zip(
                    value, after[key][item], before[key]["paths"], strict=True
                ):
                    np.testing.assert_array_equal(a, b, err_msg=f"{key}: {path}")
            else:
                assert after[key][item] == value, f"{key}: {item} changed"
    assert after["files"] == before["files"], "files changed"


def _write_peft(directory, edit=None, raw=None, weights=True):
    os.makedirs(directory)
    source = os.path.join(PEFT_DATA, "bert_lora")
    config_path = os.path.join(directory, "adapter_config.json")
    if raw is not None:
        with open(config_path, "wb") as f:
            f.write(raw)
    else:
        with open(os.path.join(source, "adapter_config.json")) as f:
            config = json.load(f)
        if edit is not None:
            config.update(edit)
        with open(config_path, "w") as f:
            f.write(json.dumps(config))  # NaN stays NaN: json writes it
    if weights:
        shutil.copy(os.path.join(source, "adapter_model.safetensors"), directory)


def _edit_spec(path, edit):
    with h5py.File(path, "r+") as f:
        f.attrs["keras_adapters"] = edit(f.attrs["keras_adapters"])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bad_inputs"))
    case = MODELS["functional"]
    plain = case.build(0)
    adapted = case.build(1)
    ka.enable_adapter(
        adapted,
        ka.LoRA(rank=2),
        targets=["proj", "hidden"],
        name="a",
        keep_trainable="head",
    )
    ka.enable_adapter(adapted, ka.HUT(rank=1), targets="hidden", name="b")
    rng = np.random.default_rng(0)
    for variable in ka.adapter_variables(adapted):
        variable.assign(rng.normal(scale=0.1, size=variable.shape))
    bert = keras_hub.models.BertBackbone.from_preset(os.path.join(PEFT_DATA, "bert"))
    ka.enable_adapter(bert, ka.HUT(rank=1), targets=ka.attention("key"), name="hut")
    ka.enable_adapter(bert, ka.LoRA(rank=1), targets=ka.attention("query"), name="lora")
    other = case.build(2)
    ka.enable_adapter(other, ka.LoRA(rank=1), targets="hidden", name="a")
    world = World(root, plain, adapted, other, bert, x=case.x[:2])

    ka.save_adapter_weights(adapted, world.path("a.adapter.weights.h5"))
    plain.save_weights(world.path("plain.weights.h5"))
    with open(world.path("text.adapter.weights.h5"), "w") as f:
        f.write("not an HDF5 file")
    for name, edit in {
        "not_json": lambda raw: "{not json",
        "nan_alpha": lambda raw: raw.replace('"alpha": null', '"alpha": NaN'),
        "list_spec": lambda raw: "[1, 2]",
    }.items():
        path = world.path(f"{name}.adapter.weights.h5")
        shutil.copy(world.path("a.adapter.weights.h5"), path)
        _edit_spec(path, edit)
    os.makedirs(world.path("directory.h5"))

    _write_peft(world.path("peft", "good"))
    _write_peft(world.path("peft", "not_json"), raw=b"{not json")
    _write_peft(world.path("peft", "latin1"), raw='{"r": "\xe9"}'.encode("latin-1"))
    _write_peft(world.path("peft", "list"), raw=b"[1, 2]")
    _write_peft(world.path("peft", "ia3"), {"peft_type": "IA3"})
    _write_peft(world.path("peft", "nan_alpha"), {"lora_alpha": NAN})
    _write_peft(world.path("peft", "inf_dropout"), {"lora_dropout": INF})
    _write_peft(world.path("peft", "rank_0"), {"r": 0})
    _write_peft(world.path("peft", "dora"), {"use_dora": True})
    _write_peft(world.path("peft", "bias"), {"bias": "all"})
    _write_peft(world.path("peft", "saved_modules"), {"modules_to_save": ["pooler"]})
    _write_peft(world.path("peft", "rank_pattern"), {"rank_pattern": {"query": 2}})
    _write_peft(world.path("peft", "targets"), {"target_modules": ["conv1d"]})
    _write_peft(world.path("peft", "no_weights"), weights=False)
    _write_peft(world.path("peft", "pickle"), weights=False)
    with open(world.path("peft", "pickle", "adapter_model.bin"), "wb") as f:
        f.write(b"pickle")
    os.makedirs(world.path("peft", "empty"))
    os.makedirs(world.path("export"))
    with open(world.path("export", "saved_model.pb"), "wb") as f:
        f.write(b"an earlier export")
    return world


@dataclasses.dataclass
class Case:
    call: Callable  # world -> None; must raise
    needles: tuple  # strings the message must contain
    error: type = ValueError


def bad(call, *needles, error=ValueError):
    return Case(call, needles, error)


def _unbuilt():
    return keras.Sequential([keras.layers.Dense(3)])


CASES = {
    # Adapter configurations: every method's arguments.
    "LoRA rank 0": bad(lambda w: ka.LoRA(rank=0), "`rank`", "a positive int", "0"),
    "LoRA rank -2": bad(lambda w: ka.LoRA(rank=-2), "a positive int", "-2"),
    "LoRA rank 2.5": bad(lambda w: ka.LoRA(rank=2.5), "a positive int", "2.5"),
    "LoRA rank str": bad(lambda w: ka.LoRA(rank="8"), "a positive int", "'8'"),
    "LoRA rank None": bad(lambda w: ka.LoRA(rank=None), "a positive int", "None"),
    "LoRA rank bool": bad(lambda w: ka.LoRA(rank=True), "a positive int", "True"),
    "LoRA rank NumPy float": bad(
        lambda w: ka.LoRA(rank=np.float32(8.5)), "a positive int", "8.5"
    ),
    "LoRA alpha NaN": bad(lambda w: ka.LoRA(rank=2, alpha=NAN), "`alpha`", "nan"),
    "LoRA alpha inf": bad(lambda w: ka.LoRA(rank=2, alpha=INF), "`alpha`", "inf"),
    "LoRA alpha 0": bad(lambda w: ka.LoRA(rank=2, alpha=0), "`alpha`", "positive", "0"),
    "LoRA alpha negative": bad(lambda w: ka.LoRA(rank=2, alpha=-16), "positive", "-16"),
    "LoRA alpha str": bad(lambda w: ka.LoRA(rank=2, alpha="16"), "`alpha`", "'16'"),
    "LoRA dropout NaN": bad(
        lambda w: ka.LoRA(rank=2, dropout=NAN), "`dropout`", "[0, 1)", "nan"
    ),
    "LoRA dropout 1": bad(lambda w: ka.LoRA(rank=2, dropout=1.0), "[0, 1)", "1.0"),
    "LoRA dropout -0.1": bad(lambda w: ka.LoRA(rank=2, dropout=-0.1), "[0, 1)", "-0.1"),
    "LoRA dropout inf": bad(lambda w: ka.LoRA(rank=2, dropout=INF), "[0, 1)", "inf"),
    "LoRA use_rslora str": bad(
        lambda w: ka.LoRA(rank=2, use_rslora="yes"), "`use_rslora`", "a bool", "'yes'"
    ),
    "LoRA use_rslora None": bad(
        lambda w: ka.LoRA(rank=2, use_rslora=None), "a bool", "None"
    ),
    "LoRA a_initializer None": bad(
        lambda w: ka.LoRA(rank=2, a_initializer=None),
        "`a_initializer`",
        "kaiming",
        "None",
    ),
    "LoRA a_initializer unknown": bad(
        lambda w: ka.LoRA(rank=2, a_initializer="nope"), "kaiming", "'nope'"
    ),
    "LoRA a_initializer another class": bad(
        lambda w: ka.LoRA(
            rank=2, a_initializer={"class_name": "Dense", "config": {"units": 2}}
        ),
        "`a_initializer`",
        "Keras initializer",
        "Dense",
    ),
    "LoRA b_initializer number": bad(
        lambda w: ka.LoRA(rank=2, b_initializer=3), "`b_initializer`", "3"
    ),
    "HUT rank 0": bad(lambda w: ka.HUT(rank=0), "`rank`", "a positive int", "0"),
    "HUT alpha NaN": bad(lambda w: ka.HUT(rank=2, alpha=NAN), "`alpha`", "nan"),
    "HUT alpha -inf": bad(lambda w: ka.HUT(rank=2, alpha=-INF), "`alpha`", "-inf"),
    "HUT a_initializer None": bad(
        lambda w: ka.HUT(rank=2, a_initializer=None), "`a_initializer`", "None"
    ),
    "QGOFT orthogonality NaN": bad(
        lambda w: ka.QGOFT(orthogonality=NAN), "`orthogonality`", ">= 0", "nan"
    ),
    "QGOFT orthogonality inf": bad(
        lambda w: ka.QGOFT(orthogonality=INF), "`orthogonality`", "inf"
    ),
    "QGOFT orthogonality negative": bad(
        lambda w: ka.QGOFT(orthogonality=-1e-3), ">= 0", "-0.001"
    ),
    "QGOFT orthogonality str": bad(
        lambda w: ka.QGOFT(orthogonality="0.1"), "`orthogonality`", "'0.1'"
    ),
    "QGOFT scale str": bad(lambda w: ka.QGOFT(scale="yes"), "`scale`", "bool", "'yes'"),
    "GOFT scale None": bad(lambda w: ka.GOFT(scale=None), "`scale`", "bool", "None"),
    "SoftOrthogonality NaN": bad(
        lambda w: ka.SoftOrthogonality(NAN), "`strength`", "> 0", "nan"
    ),
    "SoftOrthogonality 0": bad(lambda w: ka.SoftOrthogonality(0), "> 0", "0"),
    "SoftOrthogonality inf": bad(lambda w: ka.SoftOrthogonality(INF), "inf"),
    # enable_adapter: models, targets, names.
    "enable on a layer": bad(
        lambda w: ka.enable_adapter(keras.layers.Dense(3), ka.LoRA(rank=2)),
        "Keras model",
        "Dense",
    ),
    "enable on a string": bad(
        lambda w: ka.enable_adapter("bert", ka.LoRA(rank=2)), "Keras model", "'bert'"
    ),
    "enable on an unbuilt model": bad(
        lambda w: ka.enable_adapter(_unbuilt(), ka.LoRA(rank=2), targets=".*"),
        "is not built",
        "build()",
    ),
    "enable a string adapter": bad(
        lambda w: ka.enable_adapter(w.plain, "lora", targets="proj"),
        "`adapter`",
        "ka.LoRA",
        "'lora'",
    ),
    "enable None adapter": bad(
        lambda w: ka.enable_adapter(w.plain, None, targets="proj"), "`adapter`", "None"
    ),
    "target matches nothing": bad(
        lambda w: ka.enable_adapter(w.plain, ka.LoRA(rank=2), targets="q_proj"),
        "'q_proj' matches no layer",
        "hidden",
    ),
    "target is an int": bad(
        lambda w: ka.enable_adapter(w.plain, ka.LoRA(rank=2), targets=12),
        "target",
        "12",
    ),
    "target is an empty list": bad(
        lambda w: ka.enable_adapter(w.plain, ka.LoRA(rank=2), targets=[]),
        "`targets`",
        "empty list",
        "at least one target",
    ),
    "target list holds None": bad(
        lambda w: ka.enable_adapter(w.plain, ka.LoRA(rank=2), targets=[None]),
        "target",
        "None",
    ),
    "target is a bad regex": bad(
        lambda w: ka.enable_adapter(w.plain, ka.LoRA(rank=2), targets="proj("),
        "not a valid regular expression",
        "'proj('",
    ),
    "target is an unsupported layer": bad(
        lambda w: ka.enable_adapter(w.plain, ka.LoRA(rank=2), targets="pool"),
        "GlobalAveragePooling1D",
        "Dense, EinsumDense, Embedding and Conv1D/Conv2D/Conv3D",
    ),
    "target role unknown": bad(lambda w: ka.attention("querry"), "'querry'", "query"),
    "target role not a str": bad(lambda w: ka.attention(3), "3", "query"),
    "target role of a model without attention": bad(
        lambda w: ka.enable_adapter(w.plain, ka.LoRA(rank=2)),
        "matches no layer",
        "proj",
    ),
    "rank larger than the layer": bad(
        lambda w: ka.enable_adapter(w.plain, ka.LoRA(rank=9), targets="proj"),
        "rank 9",
        "min(d_in, d_out)",
    ),
    "keep_trainable matches nothing": bad(
        lambda w: ka.enable_adapter(
            w.plain, ka.LoRA(rank=2), targets="proj", keep_trainable="classifier"
        ),
        "'classifier'",
        "head",
    ),
    "adapter name with a space": bad(
        lambda w: ka.enable_adapter(
            w.plain, ka.LoRA(rank=2), targets="proj", name="a b"
        ),
        "`name`",
        "identifier",
        "'a b'",
    ),
    "adapter name empty": bad(
        lambda w: ka.enable_adapter(w.plain, ka.LoRA(rank=2), targets="proj", name=""),
        "identifier",
        "''",
    ),
    "adapter name an int": bad(
        lambda w: ka.enable_adapter(w.plain, ka.LoRA(rank=2), targets="proj", name=3),
        "identifier",
        "3",
    ),
    "adapter name taken": bad(
        lambda w: ka.enable_adapter(
            w.adapted, ka.LoRA(rank=2), targets="proj", name="a"
        ),
        "already has an adapter named 'a'",
        "another `name=`",
    ),
    "second adapter too large for one layer": bad(
        lambda w: ka.enable_adapter(
            w.adapted, ka.LoRA(rank=9), targets=["hidden", "proj"], name="c"
        ),
        "rank 9",
        "min(d_in, d_out)",
    ),
    "keep_trainable an int": bad(
        lambda w: ka.enable_adapter(
            w.plain, ka.LoRA(rank=2), targets="proj", keep_trainable=7
        ),
        "target",
        "7",
    ),
    "targets a layer object of another model": bad(
        lambda w: ka.enable_adapter(
            w.plain, ka.LoRA(rank=2), targets=w.other.get_layer("hidden")
        ),
        "Invalid target",
        "<Dense name=hidden",
        "'hidden'",
    ),
    # Switching, deleting, combining.
    "set_active unknown name": bad(
        lambda w: ka.set_active_adapters(w.adapted, "zzz"), "['zzz']", "['a', 'b']"
    ),
    "set_active one unknown of two": bad(
        lambda w: ka.set_active_adapters(w.adapted, ["a", "zzz"]),
        "['zzz']",
        "['a', 'b']",
    ),
    "set_active an int": bad(
        lambda w: ka.set_active_adapters(w.adapted, 3), "`names`", "list of names", "3"
    ),
    "set_active None": bad(
        lambda w: ka.set_active_adapters(w.adapted, None), "`names`", "None"
    ),
    "set_active on a model without adapters": bad(
        lambda w: ka.set_active_adapters(w.plain, "a"),
        "has no adapters",
        "enable_adapter()",
    ),
    "disable on a model without adapters": bad(
        lambda w: ka.disable_adapters(w.plain), "has no adapters", "enable_adapter()"
    ),
    "delete unknown name": bad(
        lambda w: ka.delete_adapter(w.adapted, "zzz"), "['zzz']", "['a', 'b']"
    ),
    "delete a list": bad(
        lambda w: ka.delete_adapter(w.adapted, ["a"]), "`name`", "['a']"
    ),
    "delete on a model without adapters": bad(
        lambda w: ka.delete_adapter(w.plain, "a"), "['a']", "[]"
    ),
    "adapter_variables unknown name": bad(
        lambda w: ka.adapter_variables(w.adapted, "zzz"), "['zzz']", "['a', 'b']"
    ),
    "combine empty weights": bad(
        lambda w: ka.combine_adapters(w.adapted, {}, name="mix"),
        "`weights`",
        "non-empty dict",
        "{}",
    ),
    "combine weights a list": bad(
        lambda w: ka.combine_adapters(w.adapted, ["a"], name="mix"),
        "`weights`",
        "['a']",
    ),
    "combine NaN weight": bad(
        lambda w: ka.combine_adapters(w.adapted, {"a": NAN}, name="mix"),
        "weights['a']",
        "nan",
    ),
    "combine unknown name": bad(
        lambda w: ka.combine_adapters(w.adapted, {"zzz": 1.0}, name="mix"),
        "['zzz']",
        "['a', 'b']",
    ),
    "combine into a taken name": bad(
        lambda w: ka.combine_adapters(w.adapted, {"a": 0.5}, name="b"),
        "already has an adapter named 'b'",
    ),
    "combine into a bad name": bad(
        lambda w: ka.combine_adapters(w.adapted, {"a": 0.5}, name="m x"),
        "`name`",
        "'m x'",
    ),
    "combine a weight keyed by an int": bad(
        lambda w: ka.combine_adapters(w.adapted, {1: 0.5}, name="mix"),
        "`weights`",
        "[1]",
    ),
    "combine a HUT adapter": bad(
        lambda w: ka.combine_adapters(w.adapted, {"b": 0.5}, name="mix"),
        "HUT adapters cannot be combined",
        "['lora']",
    ),
    "combine mixed methods": bad(
        lambda w: ka.combine_adapters(w.adapted, {"a": 0.5, "b": 0.5}, name="mix"),
        "HUT",
        "LoRA",
    ),
    # Merging (float and quantized).
    "merge without adapters": bad(
        lambda w: ka.merge_adapters(w.plain), "has no adapters to merge"
    ),
    "merge unknown name": bad(
        lambda w: ka.merge_adapters(w.adapted, "zzz"), "['zzz']", "['a', 'b']"
    ),
    "merge names an int": bad(
        lambda w: ka.merge_adapters(w.adapted, 3), "`names`", "3"
    ),
    "merge out of order": bad(
        lambda w: ka.merge_adapters(w.adapted, "b"), "'b'", "'a'"
    ),
    "merge quantized choice unknown": bad(
        lambda w: ka.merge_adapters(w.adapted, quantized="int8"),
        "`quantized`",
        "'float'",
        "'int8'",
    ),
    "merge quantized True": bad(
        lambda w: ka.merge_adapters(w.adapted, quantized=True),
        "`quantized`",
        "'requantize'",
        "True",
    ),
    "merge_and_measure unknown choice": bad(
        lambda w: ka.quantization.merge_and_measure(w.adapted, "int4", w.x),
        "`quantized`",
        "'float'",
        "'int4'",
    ),
    "merge_and_measure None": bad(
        lambda w: ka.quantization.merge_and_measure(w.adapted, None, w.x),
        "`quantized`",
        "None",
    ),
    "merge_and_measure unknown name": bad(
        lambda w: ka.quantization.merge_and_measure(w.adapted, "float", w.x, "zzz"),
        "['zzz']",
        "['a', 'b']",
    ),
    # Adapter files.
    "save to an int path": bad(
        lambda w: ka.save_adapter_weights(w.adapted, 3), "`path`", "os.PathLike", "3"
    ),
    "save to a .npz": bad(
        lambda w: ka.save_adapter_weights(w.adapted, w.path("x.npz")), "'.h5'", "x.npz"
    ),
    "save to a missing directory": bad(
        lambda w: ka.save_adapter_weights(w.adapted, w.path("missing", "x.h5")),
        "missing",
        error=FileNotFoundError,
    ),
    "save over a directory": bad(
        lambda w: ka.save_adapter_weights(w.adapted, w.path("directory.h5")),
        "directory.h5",
        "is a directory",
    ),
    "save unknown names": bad(
        lambda w: ka.save_adapter_weights(w.adapted, w.path("x.h5"), names="zzz"),
        "['zzz']",
        "['a', 'b']",
    ),
    "save a model without adapters": bad(
        lambda w: ka.save_adapter_weights(w.plain, w.path("x.h5")),
        "has no adapters to save",
    ),
    "save a string model": bad(
        lambda w: ka.save_adapter_weights("model", w.path("x.h5")),
        "Keras model",
        "'model'",
    ),
    "load from a directory": bad(
        lambda w: ka.load_adapter_weights(w.plain, w.path("directory.h5")),
        "directory.h5",
        error=FileNotFoundError,
    ),
    "load from an int path": bad(
        lambda w: ka.load_adapter_weights(w.plain, 3), "`path`", "os.PathLike", "3"
    ),
    "load a missing file": bad(
        lambda w: ka.load_adapter_weights(w.plain, w.path("missing.h5")),
        "missing.h5",
        error=FileNotFoundError,
    ),
    "load a Keras weights file": bad(
        lambda w: ka.load_adapter_weights(w.plain, w.path("plain.weights.h5")),
        "plain.weights.h5",
        "not a keras_adapters adapter file",
    ),
    "load a text file": bad(
        lambda w: ka.load_adapter_weights(w.plain, w.path("text.adapter.weights.h5")),
        "text.adapter.weights.h5",
        "not a readable HDF5 file",
    ),
    "load a spec that is not JSON": bad(
        lambda w: ka.load_adapter_weights(
            w.plain, w.path("not_json.adapter.weights.h5")
        ),
        "not_json.adapter.weights.h5",
        "not valid JSON",
    ),
    "load a spec that is a list": bad(
        lambda w: ka.load_adapter_weights(
            w.plain, w.path("list_spec.adapter.weights.h5")
        ),
        "list_spec.adapter.weights.h5",
        "JSON object",
    ),
    "load a spec with NaN": bad(
        lambda w: ka.load_adapter_weights(
            w.plain, w.path("nan_alpha.adapter.weights.h5")
        ),
        "nan_alpha.adapter.weights.h5",
        "NaN",
        "finite",
    ),
    "load into a model that has these adapters": bad(
        lambda w: ka.load_adapter_weights(w.other, w.path("a.adapter.weights.h5")),
        "already has adapters",
    ),
    "load into another architecture": bad(
        lambda w: ka.load_adapter_weights(w.bert, w.path("a.adapter.weights.h5")),
        "does not fit model",
        "proj",
    ),
    "read_adapter_spec missing": bad(
        lambda w: ka.read_adapter_spec(w.path("none.h5")),
        "none.h5",
        error=FileNotFoundError,
    ),
    "read_adapter_spec of a list spec": bad(
        lambda w: ka.read_adapter_spec(w.path("list_spec.adapter.weights.h5")),
        "list_spec.adapter.weights.h5",
        "JSON object",
    ),
    # PEFT directories.
    "PEFT missing directory": bad(
        lambda w: interop.load_peft_adapter(w.bert, w.path("peft", "none")),
        "none",
        "adapter_config.json",
        error=FileNotFoundError,
    ),
    "PEFT empty directory": bad(
        lambda w: interop.load_peft_adapter(w.bert, w.path("peft", "empty")),
        "adapter_config.json",
        "empty",
        error=FileNotFoundError,
    ),
    "PEFT path an int": bad(
        lambda w: interop.load_peft_adapter(w.bert, 3), "`path`", "os.PathLike", "3"
    ),
    "PEFT config not JSON": bad(
        lambda w: interop.load_peft_adapter(w.bert, w.path("peft", "not_json")),
        "not_json",
        "not valid JSON",
    ),
    "PEFT config not UTF-8": bad(
        lambda w: interop.load_peft_adapter(w.bert, w.path("peft", "latin1")),
        "latin1",
        "not UTF-8",
    ),
    "PEFT config a list": bad(
        lambda w: interop.load_peft_adapter(w.bert, w.path("peft", "list")),
        "list",
        "JSON object",
    ),
    "PEFT type IA3": bad(
        lambda w: interop.load_peft_adapter(w.bert, w.path("peft", "ia3")),
        "'IA3'",
        "'LORA'",
    ),
    "PEFT lora_alpha NaN": bad(
        lambda w: interop.load_peft_adapter(w.bert, w.path("peft", "nan_alpha")),
        "NaN",
        "finite",
    ),
    "PEFT lora_dropout inf": bad(
        lambda w: interop.load_peft_adapter(w.bert, w.path("peft", "inf_dropout")),
        "Infinity",
        "finite",
    ),
    "PEFT rank 0": bad(
        lambda w: interop.load_peft_adapter(w.bert, w.path("peft", "rank_0")),
        "rank_0/adapter_config.json",
        "`r` must be a positive int; received 0",
    ),
    # DoRA is supported: a DoRA config without its magnitude vectors is not.
    "PEFT DoRA without magnitudes": bad(
        lambda w: interop.load_peft_adapter(w.bert, w.path("peft", "dora")),
        "lacks lora_A or lora_B or lora_magnitude_vector",
        "encoder.layer.0.attention.self.query",
    ),
    "PEFT trained biases": bad(
        lambda w: interop.load_peft_adapter(w.bert, w.path("peft", "bias")),
        "bias='all'",
        "'none'",
    ),
    "PEFT modules_to_save": bad(
        lambda w: interop.load_peft_adapter(w.bert, w.path("peft", "saved_modules")),
        "modules_to_save=['pooler']",
    ),
    # Patterns are supported: one whose ranks the tensors do not have is not.
    "PEFT rank_pattern that the tensors do not follow": bad(
        lambda w: interop.load_peft_adapter(w.bert, w.path("peft", "rank_pattern")),
        "encoder.layer.0.attention.self.query: lora_A (4, 32)",
        "but r=2",
        "need (2, 32)",
    ),
    "PEFT unknown target module": bad(
        lambda w: interop.load_peft_adapter(w.bert, w.path("peft", "targets")),
        "['conv1d']",
        "query",
    ),
    "PEFT no weights": bad(
        lambda w: interop.load_peft_adapter(w.bert, w.path("peft", "no_weights")),
        "adapter_model.safetensors",
        "no_weights",
        error=FileNotFoundError,
    ),
    "PEFT pickle weights": bad(
        lambda w: interop.load_peft_adapter(w.bert, w.path("peft", "pickle")),
        "adapter_model.bin",
        "adapter_model.safetensors",
    ),
    "PEFT bad name": bad(
        lambda w: interop.load_peft_adapter(w.bert, w.path("peft", "good"), name="a-b"),
        "`name`",
        "'a-b'",
    ),
    "PEFT name taken": bad(
        lambda w: interop.load_peft_adapter(w.bert, w.path("peft", "good"), name="hut"),
        "already has an adapter named 'hut'",
    ),
    "PEFT into a model without a mapping": bad(
        lambda w: interop.load_peft_adapter(w.plain, w.path("peft", "good")),
        "functional_model",
        "Bert",
    ),
    "PEFT save a HUT adapter": bad(
        lambda w: interop.save_peft_adapter(w.bert, w.path("out"), name="hut"),
        "'hut'",
        "LoRA",
    ),
    "PEFT save unknown name": bad(
        lambda w: interop.save_peft_adapter(w.bert, w.path("out"), name="zzz"),
        "'zzz'",
        "['hut', 'lora']",
    ),
    "PEFT save overwrite str": bad(
        lambda w: interop.save_peft_adapter(
            w.bert, w.path("out"), overwrite="yes", name="lora"
        ),
        "`overwrite`",
        "bool",
        "'yes'",
    ),
    "PEFT save over a non-empty directory": bad(
        lambda w: interop.save_peft_adapter(
            w.bert, w.path("peft", "good"), name="lora"
        ),
        "non-empty directory",
        "overwrite=True",
    ),
    "PEFT save module_prefix without a dot": bad(
        lambda w: interop.save_peft_adapter(
            w.bert, w.path("out"), module_prefix="bert", name="lora"
        ),
        "`module_prefix`",
        "'bert.'",
        "'bert'",
    ),
    "PEFT save unknown task_type": bad(
        lambda w: interop.save_peft_adapter(
            w.bert, w.path("out"), task_type="CHAT", name="lora"
        ),
        "`task_type`",
        "'auto'",
        "'CHAT'",
    ),
    # Optimizers.
    "lr_multipliers NaN": bad(
        lambda w: ka.optimizers.lr_multipliers(keras.optimizers.Adam(), {"x": NAN}),
        "'x'",
        "> 0",
        "nan",
    ),
    "lr_multipliers 0": bad(
        lambda w: ka.optimizers.lr_multipliers(keras.optimizers.Adam(), {"x": 0}),
        "> 0",
        "0",
    ),
    "lr_multipliers str value": bad(
        lambda w: ka.optimizers.lr_multipliers(keras.optimizers.Adam(), {"x": "2"}),
        "> 0",
        "'2'",
    ),
    "lr_multipliers int rule": bad(
        lambda w: ka.optimizers.lr_multipliers(keras.optimizers.Adam(), {3: 2.0}),
        "rule",
        "ka.role",
        "3",
    ),
    "lr_multipliers bad regex": bad(
        lambda w: ka.optimizers.lr_multipliers(keras.optimizers.Adam(), {"(": 2.0}),
        "'('",
        "regular expression",
    ),
    "lr_multipliers not a dict": bad(
        lambda w: ka.optimizers.lr_multipliers(keras.optimizers.Adam(), [("x", 2.0)]),
        "`multipliers`",
        "dict",
        "[('x', 2.0)]",
    ),
    "lr_multipliers string optimizer": bad(
        lambda w: ka.optimizers.lr_multipliers("adam", {"x": 2.0}),
        "`optimizer`",
        "'adam'",
    ),
    "lr_multipliers scale_weight_decay str": bad(
        lambda w: ka.optimizers.lr_multipliers(
            keras.optimizers.Adam(), {"x": 2.0}, scale_weight_decay="yes"
        ),
        "`scale_weight_decay`",
        "bool",
        "'yes'",
    ),
    "loraplus ratio NaN": bad(
        lambda w: ka.optimizers.loraplus(keras.optimizers.Adam(), NAN),
        "`ratio`",
        "> 0",
        "nan",
    ),
    "loraplus ratio 0": bad(
        lambda w: ka.optimizers.loraplus(keras.optimizers.Adam(), 0), "`ratio`", "0"
    ),
    "attention_lr value_ratio inf": bad(
        lambda w: ka.optimizers.attention_lr(keras.optimizers.Adam(), INF),
        "`value_ratio`",
        "inf",
    ),
    "attention_lr query_ratio negative": bad(
        lambda w: ka.optimizers.attention_lr(
            keras.optimizers.Adam(), 4.0, query_ratio=-1
        ),
        "`query_ratio`",
        "> 0",
        "-1",
    ),
    "role unknown": bad(lambda w: ka.role("querry"), "'querry'", "'value'", "lora_b"),
    "role an int": bad(lambda w: ka.role(3), "`role`", "3"),
    # Export.
    "export a string": bad(
        lambda w: ka.export_saved_model("model", w.path("serving")),
        "Keras model",
        "'model'",
    ),
    "export an unbuilt model": bad(
        lambda w: ka.export_saved_model(_unbuilt(), w.path("serving")),
        "is not built",
    ),
    "export to an int path": bad(
        lambda w: ka.export_saved_model(w.adapted, 3), "`path`", "os.PathLike", "3"
    ),
    "export over an export": bad(
        lambda w: ka.export_saved_model(w.adapted, w.path("export")),
        "export",
        "overwrite=True",
    ),
    "export over a file": bad(
        lambda w: ka.export_saved_model(w.adapted, w.path("plain.weights.h5")),
        "plain.weights.h5",
        "overwrite=True",
    ),
    "export overwrite str": bad(
        lambda w: ka.export_saved_model(w.adapted, w.path("serving"), overwrite="yes"),
        "`overwrite`",
        "bool",
        "'yes'",
    ),
    "export verify None": bad(
        lambda w: ka.export_saved_model(w.adapted, w.path("serving"), verify=None),
        "`verify`",
        "bool",
        "None",
    ),
    "export tolerance NaN": bad(
        lambda w: ka.export_saved_model(w.adapted, w.path("serving"), tolerance=NAN),
        "`tolerance`",
        "nan",
    ),
    "export tolerance 0": bad(
        lambda w: ka.export_saved_model(w.adapted, w.path("serving"), tolerance=0),
        "`tolerance`",
        "> 0",
    ),
    "export sequence_length 0": bad(
        lambda w: ka.export_saved_model(
            w.adapted, w.path("serving"), sequence_length=0
        ),
        "`sequence_length`",
        "0",
    ),
    "export sample inputs of other names": bad(
        lambda w: ka.export_saved_model(
            w.adapted, w.path("serving"), sample_inputs={"tokens": w.x}
        ),
        "`sample_inputs`",
        "['features']",
        "tokens",
    ),
    "export sample inputs with NaN": bad(
        lambda w: ka.export_saved_model(
            w.adapted, w.path("serving"), sample_inputs={"features": w.x * NAN}
        ),
        "sample_inputs['features']",
        "finite",
    ),
    "export sample inputs of another shape": bad(
        lambda w: ka.export_saved_model(
            w.adapted, w.path("serving"), sample_inputs={"features": w.x[:, :2]}
        ),
        "sample_inputs['features']",
        "(None, 4, 8)",
        "(2, 2, 8)",
    ),
    "export input_signature a string": bad(
        lambda w: ka.export_saved_model(
            w.adapted, w.path("serving"), input_signature="features"
        ),
        "`input_signature`",
        "'features'",
    ),
    "export preprocessor True without one": bad(
        lambda w: ka.export_saved_model(
            w.adapted, w.path("serving"), preprocessor=True
        ),
        "has no preprocessor",
    ),
    "export preprocessor a string": bad(
        lambda w: ka.export_saved_model(
            w.adapted, w.path("serving"), preprocessor="bert"
        ),
        "`preprocessor`",
        "'bert'",
    ),
    # Distribution.
    "layout map a dict": bad(
        lambda w: ka.distribution.adapter_layout_map({"x": None}),
        "`layout_map`",
        "LayoutMap",
        "{'x': None}",
    ),
    "mesh axes of a kernel given as a str": bad(
        lambda w: ka.distribution.view_mesh_axes("model", w.plain.get_layer("hidden")),
        "`kernel_axes`",
        "one mesh axis name or None per kernel axis",
        "'model'",
    ),
    "mesh axes of the wrong length": bad(
        lambda w: ka.distribution.view_mesh_axes(
            ("model",), w.plain.get_layer("hidden")
        ),
        "('model',)",
        "(12, 16)",
    ),
    "mesh axes of a view given as a str": bad(
        lambda w: ka.distribution.view_mesh_axes((None, "model"), "hidden"),
        "`view`",
        "Dense/EinsumDense",
        "'hidden'",
    ),
    "mesh axes of an unbuilt layer": bad(
        lambda w: ka.distribution.view_mesh_axes(
            (None, "model"), keras.layers.Dense(4)
        ),
        "not built",
    ),
    "variable axes given as a str": bad(
        lambda w: ka.distribution.adapter_variable_axes(
            (None, "model"), w.plain.get_layer("hidden"), "in"
        ),
        "`variable_axes`",
        "'in', 'out' or None",
        "'in'",
    ),
    "variable axes with an unknown entry": bad(
        lambda w: ka.distribution.adapter_variable_axes(
            (None, "model"), w.plain.get_layer("hidden"), ("in", "sideways")
        ),
        "'in', 'out' or None",
        "('in', 'sideways')",
    ),
    "kernel-derived layout of None": bad(
        lambda w: ka.distribution.KernelDerivedLayout(None),
        "`kernel_layout`",
        "TensorLayout",
        "None",
    ),
    "layout map None": bad(
        lambda w: ka.distribution.adapter_layout_map(None), "LayoutMap", "None"
    ),
}


@pytest.fixture(scope="module")
def snapshot(world):
    return world.snapshot()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_and_changes_nothing(name, world, snapshot):
    case = CASES[name]
    with pytest.raises(case.error) as info:
        case.call(world)
    message = str(info.value)
    missing = [needle for needle in case.needles if needle not in message]
    assert not missing, f"{missing} not in the message: {message}"
    _assert_same(snapshot, world.snapshot())
