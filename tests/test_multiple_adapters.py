"""Several named adapters on one model: switch, delete, combine, save, merge."""

import os
import re
import types
import warnings

import keras
import numpy as np
import pytest
from cases import MODELS

import keras_adapters as ka
from keras_adapters import layers as adapter_layers

RNG = np.random.default_rng(0)


def _numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x), dtype="float64")


def _dense_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,), name="features")
    outputs = keras.layers.Dense(5, name="proj")(inputs)
    return keras.Model(inputs, outputs, name="dense_model")


def _randomize(model, names=None):
    """Gives the adapters random values, so each one changes the outputs."""
    for variable in ka.adapter_variables(model, names):
        values = RNG.normal(size=variable.shape)
        variable.assign(values.astype("float32"))


def _lora_delta(layer, name):
    slot = adapter_layers.slots(layer)[name]
    return slot.adapter.scale * _numpy(slot["lora_a"]) @ _numpy(slot["lora_b"])


def _bert_with_two_adapters():
    case = MODELS["bert"]
    model = case.build(0)
    ka.enable_adapter(model, ka.LoRA(rank=2), targets=ka.attention("query"), name="a")
    ka.enable_adapter(
        model,
        ka.LoRA(rank=3, alpha=6),
        targets=ka.attention("query", "value"),
        name="b",
    )
    _randomize(model)
    return case, model


def test_names_active_set_and_variable_paths():
    case, model = _bert_with_two_adapters()
    assert ka.adapter_names(model) == ["a", "b"]
    assert model.adapter_names == ["a", "b"]
    assert ka.active_adapters(model) == ["a", "b"]
    query = ka.adapted_layers(model)[0]
    assert list(adapter_layers.slots(query)) == ["a", "b"]
    paths = [v.path for v in ka.adapter_variables(model, "b")]
    assert paths and all(re.fullmatch(r".*/(lora_a|lora_b)\.b", p) for p in paths)
    assert len(ka.adapter_variables(model)) == 2 * 2 + 4 * 2
    with pytest.raises(ValueError, match=r"Unknown adapter names \['c'\]"):
        ka.set_active_adapters(model, ["a", "c"])
    with pytest.raises(ValueError, match="must be an adapter name or a list"):
        ka.set_active_adapters(model, [1])
    assert ka.active_adapters(model) == ["a", "b"]


def test_active_adapters_add_up_on_a_shared_layer_like_numpy():
    model = _dense_model()
    layer = model.get_layer("proj")
    kernel, bias = _numpy(layer._kernel), _numpy(layer.bias)
    ka.enable_adapter(model, ka.LoRA(rank=2, alpha=4), targets="proj", name="a")
    ka.enable_adapter(model, ka.LoRA(rank=1), targets="proj", name="b")
    _randomize(model)
    x = RNG.normal(size=(4, 6)).astype("float32")
    delta_a, delta_b = _lora_delta(layer, "a"), _lora_delta(layer, "b")
    expected = {
        ("a", "b"): x @ (kernel + delta_a + delta_b) + bias,
        ("a",): x @ (kernel + delta_a) + bias,
        ("b",): x @ (kernel + delta_b) + bias,
        (): x @ kernel + bias,
    }
    for names, reference in expected.items():
        ka.set_active_adapters(model, list(names))
        np.testing.assert_allclose(_numpy(model(x)), reference, atol=1e-5)
        np.testing.assert_allclose(
            _numpy(layer.kernel),
            kernel + sum({"a": delta_a, "b": delta_b}[n] for n in names),
            atol=1e-6,
        )


def test_non_additive_adapters_compose_in_order_like_numpy():
    model = _dense_model()
    layer = model.get_layer("proj")
    kernel, bias = _numpy(layer._kernel), _numpy(layer.bias)
    ka.enable_adapter(model, ka.HUT(rank=2, alpha=2), targets="proj", name="hut")
    ka.enable_adapter(model, ka.LoRA(rank=2), targets="proj", name="lora")
    _randomize(model)
    slot = adapter_layers.slots(layer)["hut"]
    hut = slot.adapter.scale * _numpy(slot["hut_a"]) @ _numpy(slot["hut_b"])
    expected = kernel * (1 + hut) + _lora_delta(layer, "lora")
    x = RNG.normal(size=(4, 6)).astype("float32")
    np.testing.assert_allclose(_numpy(model(x)), x @ expected + bias, atol=1e-5)


def test_switching_under_jit_compile_never_reuses_a_stale_function():
    case, model = _bert_with_two_adapters()
    # A larger head makes every adapter's effect on the logits plain.
    head = model.get_layer("logits")
    head.kernel.assign(head.kernel * 100.0)
    model.compile(loss=case.loss, jit_compile=True)
    references = {}
    for names in (["a"], ["b"], []):
        with ka.set_active_adapters(model, names):
            references[tuple(names)] = _numpy(model(case.x, training=False))
    for one, other in [(("a",), ("b",)), (("a",), ()), (("b",), ())]:
        assert np.abs(references[one] - references[other]).max() > 1e-4
    for names in (["a"], ["b"], [], ["a"]):
        ka.set_active_adapters(model, names)
        predictions = model.predict(case.x, verbose=0)
        np.testing.assert_allclose(predictions, references[tuple(names)], atol=1e-5)


def test_disable_adapters_is_a_context_manager():
    case, model = _bert_with_two_adapters()
    ka.set_active_adapters(model, "b")
    adapted = _numpy(model(case.x))
    with ka.disable_adapters(model) as same:
        assert same is model and ka.active_adapters(model) == []
        base = _numpy(model(case.x))
    assert ka.active_adapters(model) == ["b"]
    np.testing.assert_allclose(_numpy(model(case.x)), adapted, atol=1e-6)
    ka.delete_adapter(model, "a")
    ka.delete_adapter(model, "b")
    np.testing.assert_allclose(_numpy(model(case.x)), base, atol=1e-5)


def _values(model):
    return {v.path: _numpy(v) for v in model.weights}


def _changed(before, after):
    return {p for p, v in before.items() if not np.array_equal(v, after[p])}


@pytest.fixture(scope="module")
def switched_training():
    """One story, shared by the two tests below (two compiled train steps, not
    three): train with "a" active; switch to "b" (silently) and predict; try to
    train without compiling again; compile again and train "b"."""
    case, model = _bert_with_two_adapters()
    run = types.SimpleNamespace(case=case, model=model)
    ka.set_active_adapters(model, "a")
    model.compile(optimizer="adam", loss=case.loss, jit_compile=True)
    run.before_a = _values(model)
    model.fit(case.x, case.y, epochs=1, verbose=0)
    run.after_a = _values(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # switching (to predict, say) is silent
        ka.set_active_adapters(model, "b")
    run.switch_warnings = [str(w.message) for w in caught]
    run.predictions = model.predict(case.x, verbose=0)
    run.errors = []
    for train in (
        lambda: model.fit(case.x, case.y, epochs=1, verbose=0),
        lambda: model.train_on_batch(case.x, case.y),
    ):
        try:
            train()
        except ValueError as error:
            run.errors.append(error)
        else:
            run.errors.append(None)
    run.trainable_ids = {id(v) for v in model.trainable_weights}
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2), loss=case.loss, jit_compile=True
    )
    run.before_b = _values(model)
    model.fit(case.x, case.y, epochs=2, batch_size=8, verbose=0)
    run.after_b = _values(model)
    return run


def test_fit_trains_only_the_active_adapters(switched_training):
    run = switched_training
    model = run.model
    active, inactive = ["b"], ["a"]
    assert ka.active_adapters(model) == active
    trainable_ids = run.trainable_ids
    assert all(id(v) in trainable_ids for v in ka.adapter_variables(model, active))
    assert not any(
        id(v) in trainable_ids for v in ka.adapter_variables(model, inactive)
    )
    head = {v.path for v in model.weights if "logits" in v.path}
    # With "b" active, and (the first run of the story) with "a" active.
    for before, after, active, inactive in [
        (run.before_b, run.after_b, ["b"], ["a"]),
        (run.before_a, run.after_a, ["a"], ["b"]),
    ]:
        changed = _changed(before, after)
        assert {v.path for v in ka.adapter_variables(model, active)} <= changed
        assert not {v.path for v in ka.adapter_variables(model, inactive)} & changed
        assert changed - head == {v.path for v in ka.adapter_variables(model, active)}


def test_training_after_a_switch_needs_compile_and_then_trains_the_new_adapter(
    switched_training,
):
    run = switched_training
    assert run.switch_warnings == []
    assert run.predictions.shape == (len(run.case.y), 3)
    assert len(run.errors) == 2  # fit and train_on_batch
    for error in run.errors:
        assert isinstance(error, ValueError)
        assert re.search(r"call model.compile\(...\) again", str(error))
    b = {v.path for v in ka.adapter_variables(run.model, "b")}
    assert b & _changed(run.before_b, run.after_b)


def test_delete_adapter_removes_only_its_variables_and_keeps_base_weights():
    case, model = _bert_with_two_adapters()
    base = MODELS["bert"].build(0)
    base_paths = [v.path for v in base.weights]
    ka.delete_adapter(model, "a")
    assert ka.adapter_names(model) == ["b"]
    assert not ka.adapter_variables(model, "b") == []
    assert not [v for v in model.weights if v.path.endswith(".a")]
    # Only "b" remains, so the outputs are those of "b" alone on the base.
    reference = MODELS["bert"].build(0)
    ka.enable_adapter(
        reference, ka.LoRA(rank=3, alpha=6), targets=ka.attention("query", "value")
    )
    for target, source in zip(
        ka.adapter_variables(reference), ka.adapter_variables(model, "b"), strict=True
    ):
        target.assign(source)
    np.testing.assert_allclose(
        _numpy(model(case.x)), _numpy(reference(case.x)), atol=1e-5
    )
    ka.delete_adapter(model, "b")
    assert type(model) is type(base) and not ka.adapted_layers(model)
    assert [v.path for v in model.weights] == base_paths
    assert [v.trainable for v in model.weights] == [v.trainable for v in base.weights]
    np.testing.assert_allclose(_numpy(model(case.x)), _numpy(base(case.x)), atol=1e-5)
    with pytest.raises(ValueError, match=r"Unknown adapter names \['zzz'\]"):
        ka.delete_adapter(model, "zzz")


def test_merge_per_name_keeps_outputs_and_other_adapters():
    case, model = _bert_with_two_adapters()
    expected = _numpy(model(case.x))
    merged = ka.merge_adapters(model, names="a")
    assert len(merged) == 2 and ka.adapter_names(model) == ["b"]
    np.testing.assert_allclose(_numpy(model(case.x)), expected, atol=2e-5)
    ka.merge_adapters(model)
    assert not ka.adapted_layers(model)
    np.testing.assert_allclose(_numpy(model(case.x)), expected, atol=2e-5)


def test_merge_default_is_the_active_adapters_only():
    case, model = _bert_with_two_adapters()
    ka.set_active_adapters(model, "b")
    expected = _numpy(model(case.x))
    ka.merge_adapters(model)
    assert ka.adapter_names(model) == ["a"] and ka.active_adapters(model) == []
    np.testing.assert_allclose(_numpy(model(case.x)), expected, atol=2e-5)
    with pytest.raises(ValueError, match="no active adapters"):
        ka.merge_adapters(model)


def test_merge_refuses_to_reorder_non_additive_adapters():
    model = _dense_model()
    ka.enable_adapter(model, ka.HUT(rank=2), targets="proj", name="hut")
    ka.enable_adapter(model, ka.LoRA(rank=2), targets="proj", name="lora")
    _randomize(model)
    x = RNG.normal(size=(4, 6)).astype("float32")
    expected = _numpy(model(x))
    weights = [_numpy(v) for v in model.weights]
    with pytest.raises(ValueError, match=r"merging \['lora'\] before \['hut'\]"):
        ka.merge_adapters(model, names="lora")
    assert all(
        np.array_equal(a, _numpy(b))
        for a, b in zip(weights, model.weights, strict=True)
    )
    ka.merge_adapters(model, names="hut")  # the first one: exact
    np.testing.assert_allclose(_numpy(model(x)), expected, atol=1e-5)
    ka.merge_adapters(model, names="lora")
    np.testing.assert_allclose(_numpy(model(x)), expected, atol=1e-5)


def test_combine_adapters_is_the_weighted_sum_of_deltas():
    case, model = _bert_with_two_adapters()
    weights = {"a": 0.7, "b": -0.3}
    report = ka.combine_adapters(model, weights, name="mix")
    assert ka.adapter_names(model) == ["a", "b", "mix"]
    assert ka.active_adapters(model) == ["a", "b"]  # the combination starts off
    assert report.adapter.rank == 5
    assert len(report.adapted) == 4  # query (a and b) and value (b only)
    for layer in ka.adapted_layers(model):
        layer_slots = adapter_layers.slots(layer)
        expected = sum(
            w * _lora_delta(layer, n) for n, w in weights.items() if n in layer_slots
        )
        np.testing.assert_allclose(_lora_delta(layer, "mix"), expected, atol=1e-5)
    # The combined adapter alone equals the base plus the weighted deltas.
    ka.set_active_adapters(model, "mix")
    combined = _numpy(model(case.x))
    ka.merge_adapters(model)
    ka.delete_adapter(model, "a")
    ka.delete_adapter(model, "b")
    np.testing.assert_allclose(_numpy(model(case.x)), combined, atol=2e-5)


def test_a_combined_adapter_wider_than_its_layer_saves_and_loads(tmp_path):
    model = _dense_model()
    ka.enable_adapter(model, ka.LoRA(rank=4), targets="proj", name="a")
    ka.enable_adapter(model, ka.LoRA(rank=5), targets="proj", name="b")
    _randomize(model)
    ka.combine_adapters(model, {"a": 1.0, "b": 1.0}, name="both")  # rank 9 > 5
    ka.set_active_adapters(model, "both")
    x = RNG.normal(size=(4, 6)).astype("float32")
    path = os.fspath(tmp_path / "both.adapter.weights.h5")
    ka.save_adapter_weights(model, path, names="both")
    fresh = _dense_model()
    ka.load_adapter_weights(fresh, path)
    np.testing.assert_allclose(_numpy(fresh(x)), _numpy(model(x)), atol=1e-5)


def test_combine_adapters_validates_everything_first():
    case, model = _bert_with_two_adapters()
    ka.enable_adapter(model, ka.HUT(rank=2), targets=ka.attention("key"), name="h")
    count = len(model.weights)
    bad = [
        ({"a": 0.5, "zz": 0.5}, "mix", r"Unknown adapter names \['zz'\]"),
        ({"a": 0.5, "h": 0.5}, "mix", "LoRA adapters only"),
        ({"a": float("nan")}, "mix", "must be a finite number"),
        ({"a": True}, "mix", "must be a finite number"),
        ({}, "mix", "non-empty dict"),
        ({"a": 1.0}, "b", "already has an adapter named 'b'"),
    ]
    for weights, name, message in bad:
        with pytest.raises(ValueError, match=message):
            ka.combine_adapters(model, weights, name=name)
    assert len(model.weights) == count


def test_adapter_files_per_name(tmp_path):
    case, model = _bert_with_two_adapters()
    ka.set_active_adapters(model, "b")
    path_b = os.fspath(tmp_path / "b.adapter.weights.h5")
    path_all = os.fspath(tmp_path / "all.adapter.weights.h5")
    ka.save_adapter_weights(model, path_b, names="b")
    ka.save_adapter_weights(model, path_all)
    assert ka.read_adapter_spec(path_b)["active"] == ["b"]
    assert [g["name"] for g in ka.read_adapter_spec(path_b)["groups"]] == ["b"]

    only_b = MODELS["bert"].build(0)
    ka.load_adapter_weights(only_b, path_b)
    assert ka.adapter_names(only_b) == ["b"]
    for ours, theirs in zip(
        ka.adapter_variables(only_b), ka.adapter_variables(model, "b"), strict=True
    ):
        assert ours.path.split("/")[-1] == theirs.path.split("/")[-1]
        np.testing.assert_array_equal(_numpy(ours), _numpy(theirs))

    both = MODELS["bert"].build(0)
    both.load_adapter_weights(path_all)
    assert both.adapter_names == ["a", "b"] and both.active_adapters == ["b"]
    np.testing.assert_allclose(_numpy(both(case.x)), _numpy(model(case.x)), atol=1e-5)
    # Loading "a" next to an existing "b": "b" keeps its values.
    only_b.load_adapter_weights(path_all)
    assert only_b.adapter_names == ["b", "a"]
    # A file whose adapter differs from the model's same-named adapter.
    other = MODELS["bert"].build(0)
    ka.enable_adapter(other, ka.LoRA(rank=1), name="b")
    weights = [_numpy(v) for v in other.weights]
    with pytest.raises(ValueError, match=r"already has adapters named \['b'\]"):
        ka.load_adapter_weights(other, path_all)
    assert [_numpy(v).shape for v in other.weights] == [w.shape for w in weights]


def test_keras_file_keeps_every_adapter_and_the_active_set(tmp_path):
    case, model = _bert_with_two_adapters()
    ka.set_active_adapters(model, "a")
    expected = _numpy(model(case.x))
    path = os.fspath(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.adapter_names == ["a", "b"] and loaded.active_adapters == ["a"]
    np.testing.assert_allclose(_numpy(loaded(case.x)), expected, atol=1e-5)
    ka.set_active_adapters(loaded, "b")
    ka.set_active_adapters(model, "b")
    np.testing.assert_allclose(_numpy(loaded(case.x)), _numpy(model(case.x)), atol=1e-5)


def test_export_uses_the_active_adapters_only(tmp_path):
    tf = pytest.importorskip("tensorflow")
    model = _dense_model()
    ka.enable_adapter(model, ka.LoRA(rank=2), targets="proj", name="a")
    ka.enable_adapter(model, ka.LoRA(rank=2), targets="proj", name="b")
    _randomize(model)
    ka.set_active_adapters(model, "b")
    x = RNG.normal(size=(4, 6)).astype("float32")
    expected = _numpy(model(x))
    path = os.fspath(tmp_path / "export")
    ka.export_saved_model(model, path, verify=False)
    assert ka.adapter_names(model) == ["a", "b"]  # the user's model keeps both
    outputs = tf.saved_model.load(path).signatures["serving_default"](
        features=tf.constant(x)
    )
    np.testing.assert_allclose(
        next(iter(outputs.values())).numpy(), expected, atol=1e-5
    )


def test_learning_rate_roles_and_layouts_match_named_adapter_variables():
    case, model = _bert_with_two_adapters()
    role = ka.role("lora_b")
    matched = [v for v in ka.adapter_variables(model) if role.matches(v)]
    assert len(matched) == 6  # a: one query layer per block; b: query and value
    value = ka.role("value")
    assert [v for v in ka.adapter_variables(model, "b") if value.matches(v)]
    # adapter_layout_map's derived keys cover named adapter variables.
    mesh = keras.distribution.DeviceMesh(
        (1,), ("model",), keras.distribution.list_devices()[:1]
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["dense.*kernel"] = (None, "model")
    extended = ka.distribution.adapter_layout_map(layout_map)
    derived = [k for k in extended if k != "dense.*kernel"]
    assert len(derived) == 1
    assert re.fullmatch(derived[0], "dense_1/lora_a.news")
    assert re.fullmatch(derived[0], "dense_1/lora_b")
    assert not re.fullmatch(derived[0], "dense_1/bias")
