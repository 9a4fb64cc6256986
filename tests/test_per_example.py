"""Per-example adapters: each example of a batch through its own adapter.

Every check compares against the model with only that example's adapter
active (`ka.set_active_adapters`, which runs the ordinary one-adapter path),
in float32 with a relative tolerance of 1e-5.
"""

import os

import keras
import keras_hub
import numpy as np
import pytest
from _fixtures import Checkpoint
from _fixtures import backend_independent
from cases import MODELS
from keras import ops

import keras_adapters as ka
from keras_adapters import per_example

RNG = np.random.default_rng(0)
PEFT = os.path.join(os.path.dirname(__file__), "data", "peft")


def _numpy(x):
    return np.asarray(ops.convert_to_numpy(x), "float64")


def _relative(got, want):
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _randomize(model, names=None, scale=0.3):
    for variable in ka.adapter_variables(model, names):
        variable.assign(RNG.normal(scale=scale, size=variable.shape).astype("float32"))


def _alone(model, x, names):
    with ka.set_active_adapters(model, names):
        return _numpy(model(x, training=False))


def _expected(references, ids):
    """Row i of the reference of adapter `ids[i]`."""
    return np.stack([references[int(k)][i] for i, k in enumerate(ids)])


class _CountingModel(per_example.PerExampleModel):
    """Counts how often `call` runs in Python: once per trace under jit."""

    traces = 0

    def call(self, inputs, training=None):
        self.traces += 1
        return super().call(inputs, training=training)


@pytest.fixture(scope="module")
def bert():
    """A tiny BERT classifier with LoRA "a" (r=2) and "b" (r=3, rsLoRA) on
    query and value, random adapter values, and each adapter's outputs."""
    case = MODELS["bert"]
    model = case.build(0)
    # A larger head makes every adapter's effect on the logits plain.
    head = model.get_layer("logits")
    head.kernel.assign(head.kernel * 30.0)
    ka.enable_adapter(model, ka.LoRA(rank=2), targets=case.targets, name="a")
    ka.enable_adapter(
        model,
        ka.LoRA(rank=3, alpha=5, use_rslora=True),
        targets=case.targets,
        name="b",
    )
    _randomize(model)
    references = {
        -1: _alone(model, case.x, []),
        0: _alone(model, case.x, ["a"]),
        1: _alone(model, case.x, ["b"]),
    }
    serving = ka.per_example_adapters(model, ["a", "b"])
    serving.compile(jit_compile=True)
    return case, model, serving, references


IDS = {
    "mixed": np.arange(16) % 3 - 1,
    "all adapter b": np.ones(16),
    "all base": -np.ones(16),
}


@pytest.mark.parametrize("pattern", list(IDS))
def test_each_example_gets_its_adapter_alone(bert, pattern):
    case, _, serving, references = bert
    ids = IDS[pattern].astype("int32")
    x = {**case.x, "adapter_id": ids}
    expected = _expected(references, ids)
    eager = _numpy(serving(x))
    compiled = _numpy(serving.predict_on_batch(x))  # jit_compile=True
    assert _relative(eager, expected) <= 1e-5
    assert _relative(compiled, expected) <= 1e-5
    if pattern == "mixed":  # the adapters do change the outputs
        assert _relative(references[0], references[-1]) > 1e-2
        assert _relative(references[1], references[0]) > 1e-2


def test_out_of_range_ids_raise_eagerly_and_give_the_base_model_under_jit(bert):
    case, _, serving, references = bert
    ids = np.array([2, -2, 0, 1] * 4, "int32")
    with pytest.raises(ValueError, match=r"values \[-2, 2\] are out of range.*-1"):
        serving({**case.x, "adapter_id": ids})
    compiled = _numpy(serving.predict_on_batch({**case.x, "adapter_id": ids}))
    expected = _expected(references, np.where(ids > 1, -1, np.maximum(ids, -1)))
    assert _relative(compiled, expected) <= 1e-5


class _ScaledLoRA(ka.LoRA):
    """A DoRA-like stand-in: LoRA, then a learned scale per output column:
    `x W' = (x W + s x A B) * m`. Its hook returns an `output_scale`."""

    method = "scaled_lora_test"
    additive = False

    def build(self, kernel, factory):
        super().build(kernel, factory)
        factory("column_scale", (kernel.d_out,), "ones")

    def call(self, weights, kernel, inputs, training=None):
        outputs = kernel.project(inputs)
        outputs += self.delta(weights, kernel, inputs, training=training)
        return kernel.scale_outputs(outputs, weights["column_scale"])

    def adapted_matrix(self, weights, matrix):
        return super().adapted_matrix(weights, matrix) * weights["column_scale"]

    def per_example_factors(self, weights, kernel):
        factors = super().per_example_factors(weights, kernel)
        return {**factors, "output_scale": weights["column_scale"]}


class _LoRAWithoutHook(ka.LoRA):
    method = "lora_without_hook_test"


def test_einsum_and_dense_layers_an_output_scale_hook_and_dropout():
    """One functional model: EinsumDense `abc,cde->abde` and Dense layers,
    adapters of several ranks and scales, a method hook with an output
    scale (as DoRA's), and adapter dropout, which applies in training to
    the examples of that adapter only."""
    case = MODELS["functional"]
    model = case.build(0)
    targets = case.targets
    ka.enable_adapter(model, ka.LoRA(rank=2), targets=targets, name="a")
    ka.enable_adapter(model, ka.LoRA(rank=1, alpha=3), targets=targets, name="b")
    ka.enable_adapter(model, _ScaledLoRA(rank=2), targets="proj", name="scaled")
    dropout = ka.LoRA(rank=2, dropout=0.5)
    ka.enable_adapter(model, dropout, targets="hidden", name="drop")
    _randomize(model)
    names = ["b", "a", "scaled", "drop"]
    x = case.x
    ids = np.arange(len(x)) % 5 - 1
    references = {-1: _alone(model, x, [])}
    references.update({k: _alone(model, x, [n]) for k, n in enumerate(names)})
    serving = ka.per_example_adapters(model, names)
    assert serving.input_keys == ["features", "adapter_id"]
    inputs = {"features": x, "adapter_id": ids}
    inference = _numpy(serving(inputs))
    assert _relative(inference, _expected(references, ids)) <= 1e-5
    training = _numpy(serving(inputs, training=True))
    changed = np.abs(training - inference).max(axis=-1) > 1e-6
    np.testing.assert_array_equal(changed, ids == 3)


def test_pissa_and_rank_pattern_adapters_per_example(tmp_path):
    """A PiSSA adapter (its kept initial factors: rank 2 r) and one with a
    per-layer rank pattern, each example against its adapter alone; hot-swap
    refuses the PiSSA slot and changes nothing."""
    case = MODELS["bert"]
    model = case.build(0)
    ka.enable_adapter(
        model, ka.LoRA(rank=2, init="pissa"), targets=case.targets, name="p"
    )
    ka.enable_adapter(
        model,
        ka.LoRA(rank=1, rank_pattern={".*/value": 3}, alpha_pattern={".*/value": 6}),
        targets=case.targets,
        name="q",
    )
    _randomize(model)
    references = {
        n: _alone(model, case.x, names)
        for n, names in [(-1, []), (0, ["p"]), (1, ["q"])]
    }
    assert _relative(references[0], references[-1]) > 1e-3
    ids = (np.arange(16) % 3 - 1).astype("int32")
    serving = ka.per_example_adapters(model, ["p", "q"])
    got = _numpy(serving({**case.x, "adapter_id": ids}))
    assert _relative(got, _expected(references, ids)) <= 1e-5

    ka.save_adapter_weights(model, tmp_path / "q.h5", names="q")
    before = [_numpy(v) for v in ka.adapter_variables(model, "p")]
    with pytest.raises(ValueError, match="init='pissa'"):
        serving.load_adapter("p", tmp_path / "q.h5")
    for old, new in zip(before, ka.adapter_variables(model, "p"), strict=True):
        np.testing.assert_array_equal(old, _numpy(new))


def test_dora_per_example_equals_dora_alone_and_refuses_training_dropout():
    case = MODELS["functional"]
    model = case.build(0)
    ka.enable_adapter(model, ka.LoRA(rank=2), targets=case.targets, name="l")
    ka.enable_adapter(
        model, ka.DoRA(rank=2, dropout=0.1), targets=case.targets, name="d"
    )
    _randomize(model)
    references = {
        n: _alone(model, case.x, names)
        for n, names in [(-1, []), (0, ["l"]), (1, ["d"])]
    }
    assert _relative(references[1], references[-1]) > 1e-2
    ids = (np.arange(16) % 3 - 1).astype("int32")
    serving = ka.per_example_adapters(model, ["l", "d"])
    serving.compile(jit_compile=True)
    inputs = {"features": case.x, "adapter_id": ids}
    assert _relative(_numpy(serving(inputs)), _expected(references, ids)) <= 1e-5
    compiled = _numpy(serving.predict_on_batch(inputs))
    assert _relative(compiled, _expected(references, ids)) <= 1e-5
    with pytest.raises(ValueError, match=r"adapter 'd' \(DoRA\) with dropout=0.1"):
        serving(inputs, training=True)


def test_a_model_without_symbolic_inputs_takes_inputs():
    case = MODELS["subclassed"]
    model = case.build(0)
    ka.enable_adapter(model, ka.LoRA(rank=2), targets=case.targets, name="a")
    _randomize(model)
    serving = ka.per_example_adapters(model, ["a"])
    assert serving.input_keys == ["inputs", "adapter_id"]
    ids = np.arange(len(case.x)) % 2 - 1
    references = {-1: _alone(model, case.x, []), 0: _alone(model, case.x, ["a"])}
    got = _numpy(serving({"inputs": case.x, "adapter_id": ids}))
    assert _relative(got, _expected(references, ids)) <= 1e-5


@backend_independent
def test_refusals_name_the_problem():
    case = MODELS["functional"]
    model = case.build(0)
    ka.enable_adapter(model, ka.LoRA(rank=2), targets="hidden", name="a")
    ka.enable_adapter(model, ka.HUT(rank=2), targets="hidden", name="hut")
    ka.enable_adapter(model, _LoRAWithoutHook(rank=2), targets="hidden", name="sub")
    with pytest.raises(
        ValueError, match=r"'hut'.*HUT \(method 'hut'\).*\['dora', 'lora'\]"
    ):
        ka.per_example_adapters(model, ["a", "hut"])
    # A subclass that may change the math must define the hook itself.
    with pytest.raises(ValueError, match=r"'lora_without_hook_test'.*support"):
        ka.per_example_adapters(model, ["sub"])
    with pytest.raises(ValueError, match=r"Unknown adapter names \['c'\]"):
        ka.per_example_adapters(model, ["a", "c"])
    with pytest.raises(ValueError, match="repeats an adapter name"):
        ka.per_example_adapters(model, ["a", "a"])
    with pytest.raises(ValueError, match="non-empty list"):
        ka.per_example_adapters(model, "a")
    serving = ka.per_example_adapters(model, ["a"])
    with pytest.raises(ValueError, match=r"keys \['features', 'adapter_id'\]"):
        serving({"features": case.x})
    with pytest.raises(ValueError, match=r"shape \(batch,\); received shape \(16, 1\)"):
        serving({"features": case.x, "adapter_id": np.zeros((16, 1), "int32")})
    with pytest.raises(ValueError, match="must hold ints"):
        serving({"features": case.x, "adapter_id": np.zeros(16, "float32")})
    with pytest.raises(ValueError, match=r"`slot` must be one of \['a'\]"):
        serving.load_adapter(3, "x.h5")
    ka.delete_adapter(model, "a")
    with pytest.raises(ValueError, match=r"Unknown adapter names \['a'\]"):
        serving({"features": case.x, "adapter_id": np.zeros(16, "int32")})


def test_fit_trains_each_adapter_on_its_own_examples_only(bert):
    """One SGD step on a mixed batch, twice from the same state: the second
    time the labels of every example without id 0 differ. Adapter "a"
    (id 0) must get exactly the same update; adapter "b" (id 1) another."""
    case, model, _, _ = bert
    serving = ka.per_example_adapters(model, ["a", "b"])
    serving.compile(
        optimizer=keras.optimizers.SGD(0.5), loss=case.loss, jit_compile=True
    )
    ids = (np.arange(16) % 3 - 1).astype("int32")
    x = {**case.x, "adapter_id": ids}
    other_labels = np.where(ids == 0, case.y, (case.y + 1) % 3)
    checkpoint = Checkpoint(serving)
    updates = []
    try:
        for labels in (case.y, other_labels):
            checkpoint.restore()
            before = {v.path: _numpy(v) for v in ka.adapter_variables(model)}
            serving.fit(x, labels, batch_size=16, epochs=1, shuffle=False, verbose=0)
            updates.append(
                {
                    v.path: _numpy(v) - before[v.path]
                    for v in ka.adapter_variables(model)
                }
            )
    finally:
        checkpoint.restore()
    for path, update in updates[0].items():
        assert np.abs(update).max() > 0, path  # both adapters trained at once
        if path.endswith(".a"):
            np.testing.assert_allclose(updates[1][path], update, rtol=1e-5, atol=1e-9)
        else:
            difference = np.abs(updates[1][path] - update).max()
            assert difference > 1e-2 * np.abs(update).max(), path


def test_hot_swap_from_an_adapter_file_and_a_peft_directory_does_not_retrace(
    tmp_path,
):
    """Loading weights into a slot is a variable assignment: the compiled
    predict function keeps running (no new trace), with the new weights.
    The PEFT adapter's outputs are checked against PyTorch's."""
    backbone = keras_hub.models.BertBackbone.from_preset(os.path.join(PEFT, "bert"))
    targets = ka.attention("query", "value")
    ka.enable_adapter(backbone, ka.LoRA(rank=4), targets=targets, name="slot0")
    ka.enable_adapter(backbone, ka.LoRA(rank=4), targets=targets, name="slot1")
    ka.enable_adapter(backbone, ka.LoRA(rank=2, alpha=5), targets=targets, name="src")
    ka.enable_adapter(backbone, ka.LoRA(rank=8), targets=targets, name="big")
    _randomize(backbone)
    ka.save_adapter_weights(backbone, tmp_path / "src.h5", names="src")
    ka.save_adapter_weights(backbone, tmp_path / "big.h5", names="big")
    outputs = np.load(os.path.join(PEFT, "outputs.npz"))
    tokens = np.tile(outputs["token_ids"], (2, 1))
    x = {
        "token_ids": tokens,
        "segment_ids": np.zeros_like(tokens),
        "padding_mask": np.tile(outputs["padding_mask"], (2, 1)),
    }
    ids = np.array([-1, -1, 1, 1], "int32")
    with ka.set_active_adapters(backbone, ["src"]):
        reference = _numpy(backbone(x)["sequence_output"])

    serving = _CountingModel(backbone, ["slot0", "slot1"])
    serving.compile(jit_compile=True)
    serving.predict_on_batch({**x, "adapter_id": ids})
    traces = serving.traces
    assert traces >= 1

    serving.load_adapter("slot1", tmp_path / "src.h5")  # rank 2 into rank 4
    swapped = serving.predict_on_batch({**x, "adapter_id": ids})
    sequence = _numpy(swapped["sequence_output"])
    assert _relative(sequence[2:], reference[2:]) <= 1e-5

    serving.load_adapter(1, os.path.join(PEFT, "bert_lora"))  # alpha 8: scale 2
    swapped = serving.predict_on_batch({**x, "adapter_id": ids})
    sequence = _numpy(swapped["sequence_output"])
    np.testing.assert_allclose(
        sequence[2:], outputs["bert_lora/sequence_output"], atol=1e-4, rtol=1e-4
    )
    np.testing.assert_allclose(
        sequence[:2], outputs["bert/sequence_output"], atol=1e-4, rtol=1e-4
    )
    assert serving.traces == traces  # nothing was traced (or compiled) again
    assert ka.adapter_names(backbone) == ["slot0", "slot1", "src", "big"]

    before = [_numpy(v) for v in ka.adapter_variables(backbone, "slot1")]
    with pytest.raises(ValueError, match="rank-8 LoRA into a slot of rank 4"):
        serving.load_adapter("slot1", tmp_path / "big.h5")
    after = [_numpy(v) for v in ka.adapter_variables(backbone, "slot1")]
    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(old, new)


def test_export_serves_each_adapter_per_example_without_the_library(bert, tmp_path):
    """`verify=True` reloads the SavedModel in a fresh process that cannot
    import keras_adapters and checks every id there; this process then
    serves it with another batch size and sequence length."""
    import tensorflow as tf

    case, model, _, _ = bert
    ka.enable_adapter(model, ka.LoRA(rank=2), targets=case.targets, name="other")
    try:
        report = ka.export_saved_model(model, tmp_path / "many", adapters=["b", "a"])
    finally:
        ka.delete_adapter(model, "other")
    assert report.adapters == ["b", "a"]
    assert report.inputs["adapter_id"] == ((None,), "int32")
    assert report.max_relative_difference <= 1e-5
    loaded = tf.saved_model.load(report.path)
    names = [v.name for v in loaded.variables if "lora" in v.name]
    assert sorted({n.split(".")[-1].split(":")[0] for n in names}) == ["a", "b"]
    x = {k: v[:5, :6] for k, v in case.x.items()}
    ids = np.array([1, 0, -1, 1, 7], "int32")
    served = loaded.signatures["serving_default"](
        **{k: tf.constant(v) for k, v in {**x, "adapter_id": ids}.items()}
    )
    served = next(iter(served.values())).numpy()
    references = {-1: _alone(model, x, []), 0: _alone(model, x, ["b"])}
    references[1] = _alone(model, x, ["a"])
    expected = _expected(references, np.where(ids > 1, -1, ids))
    assert _relative(served, expected) <= 1e-5
