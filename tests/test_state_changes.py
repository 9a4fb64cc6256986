"""Results follow the adapters: no stale compiled function after any change.

Every change of a model's adapters (enable, switch, disable, merge, delete,
load) is followed by greedy `generate()` and by `predict()`, compared with a
model built in that state from scratch. Keras caches `predict_function` and
KerasHub's `CausalLM` caches `generate_function`; both must be dropped.
"""

import keras
import keras_hub
import numpy as np
import pytest

import keras_adapters as ka

SEQ = 12


def _lm():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=32,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=SEQ,
    )
    lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    lm.compile(sampler="greedy")
    return lm


def _prompt():
    ids = np.zeros((2, SEQ), "int32")
    ids[:, :3] = [[5, 6, 7], [9, 3, 2]]
    mask = np.zeros((2, SEQ), bool)
    mask[:, :3] = True
    return {"token_ids": ids, "padding_mask": mask}


def _outputs(lm):
    """(greedy tokens, predicted logits) of `lm` on the prompt."""
    prompt = _prompt()
    tokens = lm.generate(prompt, stop_token_ids=None)["token_ids"]
    logits = lm.predict(prompt, verbose=0)
    return np.asarray(tokens), np.asarray(logits)


def _randomize(lm, name, seed):
    """Large random adapter values, so that every adapter changes the tokens."""
    rng = np.random.default_rng(seed)
    for variable in ka.adapter_variables(lm, name):
        variable.assign(rng.normal(scale=2.0, size=variable.shape))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Adapter files `a` and `b` (LoRA on query/value), and a state's outputs."""
    directory = tmp_path_factory.mktemp("state")
    lm = _lm()
    paths = {}
    for seed, name in enumerate(["a", "b"]):
        ka.enable_adapter(lm, ka.LoRA(rank=2), name=name)
        _randomize(lm, name, seed)
        paths[name] = str(directory / f"{name}.weights.h5")
        ka.save_adapter_weights(lm, paths[name], names=[name])
    return paths


def _fresh(files, names=()):
    """A model built in the state `names` active (from scratch)."""
    lm = _lm()
    for name in names:
        ka.load_adapter_weights(lm, files[name])
    return _outputs(lm)


def _assert_same(got, want):
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)


def test_every_change_of_adapters_reaches_generate_and_predict(files):
    base, with_a, with_b = _fresh(files), _fresh(files, "a"), _fresh(files, "b")
    # The states differ, so a stale function would be caught.
    assert not np.array_equal(base[0], with_a[0])
    assert not np.array_equal(with_a[0], with_b[0])

    lm = _lm()
    _assert_same(_outputs(lm), base)  # compiled once in the base state
    ka.load_adapter_weights(lm, files["a"])
    _assert_same(_outputs(lm), with_a)  # load
    ka.load_adapter_weights(lm, files["b"])
    ka.set_active_adapters(lm, ["b"])
    _assert_same(_outputs(lm), with_b)  # switch
    ka.disable_adapters(lm)
    _assert_same(_outputs(lm), base)  # disable
    ka.set_active_adapters(lm, ["a"])
    _assert_same(_outputs(lm), with_a)
    ka.delete_adapter(lm, "a")
    _assert_same(_outputs(lm), base)  # delete (b is inactive)
    ka.set_active_adapters(lm, ["b"])
    ka.merge_adapters(lm)
    _assert_same(_outputs(lm), with_b)  # merge
    assert ka.adapted_layers(lm) == []


def test_enable_adapter_reaches_generate(files):
    lm = _lm()
    base = _outputs(lm)
    ka.enable_adapter(lm, ka.LoRA(rank=2), name="a")
    _assert_same(_outputs(lm), base)  # identity at init, recompiled
    _randomize(lm, "a", 0)  # values change, the compiled function stays valid
    _assert_same(_outputs(lm), _fresh(files, "a"))
