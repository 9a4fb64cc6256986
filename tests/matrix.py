"""The shared test matrix: every invariant of DESIGN.md section 4, per method.

`SharedMatrix` gathers the suites that run in the test process. A test file
runs them for some adapter methods with one class:

    class TestMyMethod(SharedMatrix):
        methods = ("my_method",)

`conftest.py` parametrizes each suite's fixtures from `methods` (any method in
the registry, `keras_adapters.adapters.base.ADAPTER_METHODS`, built from its
`example()`). `test_adapter_matrix.py` runs them for every method the library
registers; `test_custom_method.py` defines a method in the test file itself
and gets the same matrix with no other edit.

Each suite builds and trains once per (method, model) and class, then checks
one invariant per test against that state. The checks in other processes
(another backend, several devices) cost a backend start-up each, so they run
once, in `test_adapter_matrix.TestOtherBackend` and `TestSeveralDevices`,
for every registered method: the library's and those that test modules
define (pytest imports every test module before it runs any test). The
scripts import the modules that define the methods, so methods defined in
test files work there too.
"""

import dataclasses
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from cases import BATCH
from cases import MODELS
from cases import layer_inputs
from cases import max_relative_difference
from cases import predict
from cases import quantized_bert

import keras_adapters as ka
from keras_adapters import _keras_internals as internals
from keras_adapters import layers as adapter_layers
from keras_adapters.adapters.base import ADAPTER_METHODS
from keras_adapters.adapters.base import numpy_values
from keras_adapters.targeting import relative_path

BACKEND = keras.backend.backend()
HERE = os.path.dirname(__file__)
EPSILON = keras.config.epsilon()


def example(method):
    """The registered method's small example configuration."""
    return ADAPTER_METHODS[method].example()


def registered_methods():
    """Every method in the registry at run time, in registration order."""
    return tuple(ADAPTER_METHODS)


def method_modules(methods):
    """Modules to import (besides keras_adapters) to register `methods`."""
    modules = {ADAPTER_METHODS[m].__module__ for m in methods}
    return sorted(m for m in modules if not m.startswith("keras_adapters."))


def _numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _numpy_by_path(variables, model_name=None):
    """`{path: value}`; paths relative to `model_name` if given."""
    return {relative_path(model_name, v.path): _numpy(v).copy() for v in variables}


def _run_script(script, args, backend, methods, extra_env=None, timeout=900):
    """Runs `tests/<script>` under `backend`, importing `methods`' modules."""
    command = [sys.executable, os.path.join(HERE, script), *args]
    for module in method_modules(methods):
        command += ["--import", module]
    env = {**os.environ, "KERAS_BACKEND": backend, **(extra_env or {})}
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


def _check_layer_against_reference(layer, base_kernel, rtol=1e-4):
    """One adapted layer: its `kernel` and outputs against the method's NumPy
    `reference_matrix`, from the adapter's variables alone."""
    (slot,) = [s for s in adapter_layers.slots(layer).values() if s.active]
    kernel = slot.kernel
    base = np.asarray(_numpy(kernel.to_matrix(base_kernel)), "float64")
    values = {k: v.astype("float64") for k, v in numpy_values(slot).items()}
    expected = slot.adapter.reference_matrix(values, base)
    adapted = _numpy(kernel.to_matrix(layer.kernel))
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(adapted, expected, rtol=0, atol=1e-5 * scale)
    x = layer_inputs(kernel, np.random.default_rng(3))
    want = _numpy(kernel.apply(x, kernel.from_matrix(expected.astype("float32"))))
    if getattr(layer, "bias", None) is not None:
        want = want + _numpy(layer.bias)
    if getattr(layer, "activation", None) is not None:
        want = _numpy(layer.activation(want))
    got = _numpy(layer(x))
    if kernel.transposable:
        # The tied output projection: `x W'^T`, then the layer's soft cap.
        hidden = np.random.default_rng(4).normal(size=(2, 3, kernel.d_out))
        hidden = hidden.astype("float32")
        logits = hidden.astype("float64") @ expected.T
        cap = layer.logit_soft_cap
        if cap is not None:
            logits = np.tanh(logits / cap) * cap
        reverse = _numpy(layer(hidden, reverse=True))
        np.testing.assert_allclose(
            reverse, logits, rtol=0, atol=rtol * np.max(np.abs(logits))
        )
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * np.max(np.abs(want)))


def _fit_and_save(model, case, epochs, directory):
    """Full-batch `fit` under XLA, then the adapter file: `(losses, path)`."""
    model.compile(
        optimizer=keras.optimizers.Adam(3e-2), loss=case.loss, jit_compile=True
    )
    history = model.fit(case.x, case.y, batch_size=BATCH, epochs=epochs, verbose=0)
    path = str(directory / "a.weights.h5")
    ka.save_adapter_weights(model, path)
    return history.history["loss"], path


# ---------------------------------------------------------------- float models


@dataclasses.dataclass
class Trained:
    method: str
    model_id: str
    model: keras.Model
    base_weights: list
    base_kernels: dict
    base_outputs: np.ndarray
    init_outputs: np.ndarray
    outputs: np.ndarray
    frozen_before: dict
    adapter_before: dict
    losses: list
    report: ka.AdapterReport
    adapter_file: str


def _fresh_base(trained):
    """The same architecture with the same base weights, no adapters."""
    model = MODELS[trained.model_id].build(1)
    model.set_weights(trained.base_weights)
    return model


class AdapterMatrix:
    """Float models: identity at init, training under XLA, files, merges."""

    methods = ()
    # Gemma's transposed 3-D EinsumDense kernels (a causal LM), a functional
    # model's Dense and EinsumDense, a KerasHub ViT (Conv2D patches, an
    # Embedding of positions, MultiHeadAttention), a KerasHub ResNet (1 x 1
    # and 3 x 3 Conv2D between frozen batch normalizations) and a tied
    # ReversibleEmbedding language model with a causal Conv1D; BERT's
    # projections (a classifier) are in the quantized, cross-backend and
    # multi-device suites. A Mixtral's stacked expert kernels run for the
    # methods that adapt experts (`ModelCase.requires_kind`).
    models = ("gemma", "functional", "vit", "resnet", "tied_lm", "mixtral")

    @pytest.fixture(scope="class")
    def trained(self, request, tmp_path_factory):
        method, model_id = request.param
        case = MODELS[model_id]
        model = case.build(0)
        base_weights = model.get_weights()
        base_outputs = predict(model, case.x)
        report = ka.enable_adapter(
            model,
            example(method),
            targets=case.targets,
            keep_trainable=case.keep_trainable,
        )
        base_kernels = {
            layer.path: _numpy(layer._keras_adapters_kernel.dense())
            for layer in ka.adapted_layers(model)
        }
        init_outputs = predict(model, case.x)
        frozen_before = _numpy_by_path(model.non_trainable_weights)
        adapter_before = _numpy_by_path(ka.adapter_variables(model))
        losses, path = _fit_and_save(
            model, case, case.epochs, tmp_path_factory.mktemp(f"{method}-{model_id}")
        )
        return Trained(
            method=method,
            model_id=model_id,
            model=model,
            base_weights=base_weights,
            base_kernels=base_kernels,
            base_outputs=base_outputs,
            init_outputs=init_outputs,
            outputs=predict(model, case.x),
            frozen_before=frozen_before,
            adapter_before=adapter_before,
            losses=losses,
            report=report,
            adapter_file=path,
        )

    def test_identity_at_init(self, trained):
        difference = max_relative_difference(trained.init_outputs, trained.base_outputs)
        assert difference <= 1e-6

    def test_report_lists_the_adapted_layers(self, trained):
        adapted = ka.adapted_layers(trained.model)
        assert trained.report.adapted_paths == [layer.path for layer in adapted]
        assert trained.report.adapter_params == sum(
            int(np.prod(v.shape)) for v in ka.adapter_variables(trained.model)
        )
        text = str(trained.report)
        assert all(path in text for path in trained.report.adapted_paths)

    def test_only_adapters_and_head_are_trainable(self, trained):
        model = trained.model
        adapter_ids = {id(v) for v in ka.adapter_variables(model)}
        extras = [v for v in model.trainable_weights if id(v) not in adapter_ids]
        if hasattr(model, "backbone"):
            backbone_ids = {id(v) for v in model.backbone.weights}
            assert not any(id(v) in backbone_ids for v in extras)
        else:
            kept = {"head"} if MODELS[trained.model_id].keep_trainable else set()
            assert {v.path.split("/")[-2] for v in extras} == kept
        assert adapter_ids <= {id(v) for v in model.trainable_weights}

    def test_fit_changes_nothing_but_trainable_weights(self, trained):
        after = _numpy_by_path(trained.model.non_trainable_weights)
        assert after.keys() == trained.frozen_before.keys()
        for path, value in trained.frozen_before.items():
            np.testing.assert_array_equal(after[path], value, err_msg=path)
        changed = _numpy_by_path(ka.adapter_variables(trained.model))
        assert any(
            not np.array_equal(changed[p], v) for p, v in trained.adapter_before.items()
        )

    def test_fit_with_jit_reduces_the_loss(self, trained):
        assert np.all(np.isfinite(trained.losses))
        # Full-batch steps on a fixed batch: a steady decrease is the signal.
        assert trained.losses[-1] < trained.losses[0] - 0.01, trained.losses
        assert min(trained.losses[-3:]) < min(trained.losses[:3]), trained.losses

    def test_layers_match_the_numpy_reference(self, trained):
        for layer in ka.adapted_layers(trained.model):
            _check_layer_against_reference(layer, trained.base_kernels[layer.path])

    def test_adapter_file_round_trip_into_fresh_model(self, trained):
        fresh = _fresh_base(trained)
        ka.load_adapter_weights(fresh, trained.adapter_file)
        case = MODELS[trained.model_id]
        np.testing.assert_allclose(
            predict(fresh, case.x), trained.outputs, rtol=1e-5, atol=1e-5
        )
        restored = _numpy_by_path(ka.adapter_variables(fresh), fresh.name)
        trained_values = _numpy_by_path(
            ka.adapter_variables(trained.model), trained.model.name
        )
        for path, value in trained_values.items():
            np.testing.assert_array_equal(restored[path], value, err_msg=path)
        # Only adapter parameters and the trained head go into the file.
        full = os.path.join(os.path.dirname(trained.adapter_file), "full.weights.h5")
        trained.model.save_weights(full)
        assert os.path.getsize(trained.adapter_file) < os.path.getsize(full)

    def test_merge_is_exact_and_leaves_plain_layers(self, trained):
        fresh = _fresh_base(trained)
        ka.load_adapter_weights(fresh, trained.adapter_file)
        adapted = ka.adapted_layers(fresh)
        adapter_names = {
            name
            for layer in adapted
            for name in adapter_layers.adapter_variables(layer)
        }
        merged_paths = ka.merge_adapters(fresh)
        assert merged_paths == [layer.path for layer in adapted]
        case = MODELS[trained.model_id]
        assert max_relative_difference(predict(fresh, case.x), trained.outputs) <= 1e-5
        assert ka.adapted_layers(fresh) == []
        for layer in adapted:
            assert isinstance(layer, adapter_layers.SUPPORTED_LAYERS)
            assert not adapter_layers.is_adapted(layer)
            assert not adapter_names & {v.name for v in layer.weights}
        assert len(fresh.weights) == len(trained.base_weights)
        # Trainable flags are back to what the base model had (layers and
        # variables: batch normalization statistics stay non-trainable).
        base = _fresh_base(trained)
        assert [v.trainable for v in fresh.weights] == [
            v.trainable for v in base.weights
        ]
        assert [layer.trainable for layer in fresh._flatten_layers()] == [
            layer.trainable for layer in base._flatten_layers()
        ]

    def test_keras_file_round_trip_keeps_adapters(self, trained, tmp_path):
        path = str(tmp_path / "model.keras")
        trained.model.save(path)
        loaded = keras.saving.load_model(path)
        case = MODELS[trained.model_id]
        np.testing.assert_allclose(
            predict(loaded, case.x), trained.outputs, rtol=1e-5, atol=1e-5
        )
        groups = ka.model.adapter_groups(loaded)
        assert [g.adapter for g in groups] == [example(trained.method)]
        original = _numpy_by_path(
            ka.adapter_variables(trained.model), trained.model.name
        )
        reloaded = _numpy_by_path(ka.adapter_variables(loaded), loaded.name)
        assert original.keys() == reloaded.keys()
        for path_, value in original.items():
            np.testing.assert_array_equal(reloaded[path_], value, err_msg=path_)
        assert _numpy_by_path(loaded.trainable_weights, loaded.name).keys() == (
            _numpy_by_path(trained.model.trainable_weights, trained.model.name).keys()
        )


# ------------------------------------------------------------ quantized bases

QUANTIZED_CASE = MODELS["bert"]
WEIGHT_ONLY_INT8 = keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)


def reference_kernel(layer):
    """The dequantized kernel `int8 / scale` of an int8 BERT projection."""
    kernel = _numpy(layer._kernel).astype("float64")
    scale = _numpy(layer.kernel_scale).astype("float64")
    # Keras stores one scale per output unit, laid out like the outputs:
    # (1, 1, heads, head_dim) for query/value (kernel (hidden, heads, head_dim)).
    return kernel / scale.reshape((1,) + kernel.shape[1:])


def reference_quantize_inputs(x):
    """Keras' default int8 activation quantizer: abs-max per token."""
    scale = 127.0 / (np.max(np.abs(x), axis=-1, keepdims=True) + EPSILON)
    return np.clip(np.round(x * scale), -127, 127) / scale


def reference_requantized(matrix):
    """Keras' int8 kernel quantizer (abs-max per output unit), dequantized."""
    scale = 127.0 / (np.max(np.abs(matrix), axis=0, keepdims=True) + EPSILON)
    return np.clip(np.round(matrix * scale), -127, 127) / scale


def reference_adapted_matrix(layer, matrix):
    """`W'` on the `(d_in, d_out)` view, from the adapter's variables."""
    (slot,) = adapter_layers.slots(layer).values()
    values = {k: v.astype("float64") for k, v in numpy_values(slot).items()}
    return slot.adapter.reference_matrix(values, matrix)


def eager_outputs(model):
    return _numpy(model(QUANTIZED_CASE.x, training=False))


class QuantizedMatrix:
    """Adapters on an int8 (W8A8) KerasHub BERT: the QLoRA workflow."""

    methods = ()

    @pytest.fixture(scope="class")
    def quantized(self, request, tmp_path_factory):
        method = request.param
        model = quantized_bert()
        base = eager_outputs(model)
        ka.enable_adapter(model, example(method), targets=QUANTIZED_CASE.targets)
        init = eager_outputs(model)
        frozen = _numpy_by_path(model.non_trainable_weights)
        losses, path = _fit_and_save(
            model, QUANTIZED_CASE, 8, tmp_path_factory.mktemp(f"int8-{method}")
        )
        return dict(
            method=method,
            model=model,
            base=base,
            init=init,
            frozen=frozen,
            losses=losses,
            outputs=eager_outputs(model),
            adapter_file=path,
        )

    def test_quantized_identity_at_init(self, quantized):
        assert max_relative_difference(quantized["init"], quantized["base"]) <= 1e-5

    def test_quantized_fit_lowers_the_loss_and_keeps_the_int8_kernels(self, quantized):
        losses = quantized["losses"]
        assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
        after = _numpy_by_path(quantized["model"].non_trainable_weights)
        for path, value in quantized["frozen"].items():
            np.testing.assert_array_equal(after[path], value, err_msg=path)
        for layer in ka.adapted_layers(quantized["model"]):
            assert layer.quantization_mode == "int8"
            assert layer._kernel.path in quantized["frozen"]

    def test_quantized_layer_matches_numpy_reference(self, quantized):
        """An adapted int8 layer against NumPy: dequantized kernel, Keras'
        input quantizer, the method's reference formula."""
        layer = ka.adapted_layers(quantized["model"])[-1]
        x = np.random.default_rng(3).normal(size=(2, 5, 16)).astype("float32")
        adapted = reference_adapted_matrix(
            layer, reference_kernel(layer).reshape(16, 16)
        )
        inputs = reference_quantize_inputs(x.astype("float64"))
        expected = (inputs @ adapted).reshape(2, 5, 2, 8) + _numpy(layer.bias)
        np.testing.assert_allclose(_numpy(layer(x)), expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            _numpy(layer.kernel), adapted.reshape(16, 2, 8), rtol=1e-5, atol=1e-6
        )

    def test_quantized_adapter_file_round_trip(self, quantized):
        fresh = quantized_bert()
        ka.load_adapter_weights(fresh, quantized["adapter_file"])
        np.testing.assert_allclose(
            eager_outputs(fresh), quantized["outputs"], rtol=1e-5, atol=1e-5
        )

    def test_quantized_merge_float_weight_only_equals_unmerged(self, quantized):
        model = quantized_bert(config=WEIGHT_ONLY_INT8, rebuilt=False)
        ka.load_adapter_weights(model, quantized["adapter_file"])
        adapted = ka.adapted_layers(model)
        unmerged = eager_outputs(model)
        expected = {layer.path: _numpy(layer.kernel) for layer in adapted}
        report = ka.merge_adapters(model, quantized="float")
        assert max_relative_difference(eager_outputs(model), unmerged) <= 1e-5
        for layer, row in zip(adapted, report.layers, strict=True):
            assert layer.quantization_mode is None
            np.testing.assert_array_equal(_numpy(layer._kernel), expected[layer.path])
            assert row.kernel_max_abs_error == 0.0

    def test_quantized_merge_requantize_reports_the_numpy_error(self, quantized):
        model = quantized_bert()
        ka.load_adapter_weights(model, quantized["adapter_file"])
        adapted = ka.adapted_layers(model)
        exact = {
            layer.path: reference_adapted_matrix(
                layer, reference_kernel(layer).reshape(16, 16)
            )
            for layer in adapted
        }
        report = ka.merge_adapters(model, quantized="requantize")
        for layer, row in zip(adapted, report.layers, strict=True):
            assert row.path == layer.path and row.result == "int8"
            assert layer.quantization_mode == "int8" and not layer._kernel.trainable
            error = reference_requantized(exact[layer.path]) - exact[layer.path]
            expected = np.linalg.norm(error) / np.linalg.norm(exact[layer.path])
            # A method that keeps each column on the int8 grid (per-output
            # scaling) re-quantizes to float rounding: hence `abs`.
            assert row.kernel_relative_error == pytest.approx(
                expected, rel=1e-3, abs=1e-6
            )
        assert ka.adapted_layers(model) == []


# ----------------------------------------------------------- mixed precision


class PrecisionMatrix:
    """Mixed precision: training works, adapters stay float32, merges write
    the kernel's own dtype."""

    methods = ()

    @pytest.fixture
    def dtype_policy(self):
        previous = keras.config.dtype_policy()
        yield keras.config.set_dtype_policy
        keras.config.set_dtype_policy(previous)

    def test_mixed_precision_training_keeps_adapters_float32(
        self, method, dtype_policy
    ):
        # float16 with loss scaling, the stricter of the two mixed policies;
        # mixed_bfloat16 is checked with LoRA (test_precision_and_data.py) and
        # on an int8 base (test_quantized.py).
        # The functional model's Dense and EinsumDense projections: the
        # adapter's dtype handling, without a transformer's compile time
        # (KerasHub models train under mixed precision in
        # test_precision_and_data.py and test_quantized.py).
        self._check_mixed_precision(method, dtype_policy, "functional")

    def test_mixed_precision_on_embeddings_and_convolutions(self, method, dtype_policy):
        # The tied embedding (float32 table, float16 lookups, the reverse
        # projection) and a causal Conv1D.
        self._check_mixed_precision(method, dtype_policy, "tied_lm")

    @staticmethod
    def _check_mixed_precision(method, dtype_policy, model_id):
        dtype_policy("mixed_float16")
        case = MODELS[model_id]
        model = case.build(0)
        ka.enable_adapter(
            model,
            example(method),
            targets=case.targets,
            keep_trainable=case.keep_trainable,
        )
        assert all(v.dtype == "float32" for v in ka.adapter_variables(model))
        adapted = ka.adapted_layers(model)
        kernel_dtypes = [internals.kernel_variable(la).dtype for la in adapted]
        model.compile(
            optimizer=keras.optimizers.Adam(1e-2), loss=case.loss, jit_compile=True
        )
        history = model.fit(case.x, case.y, batch_size=BATCH, epochs=2, verbose=0)
        assert np.all(np.isfinite(history.history["loss"]))
        assert all(v.dtype == "float32" for v in ka.adapter_variables(model))
        before_merge = np.asarray(model(case.x, training=False), "float32")
        ka.merge_adapters(model)
        assert [internals.kernel_variable(la).dtype for la in adapted] == (
            kernel_dtypes
        )
        after_merge = np.asarray(model(case.x, training=False), "float32")
        # Half-precision compute: merged and unmerged agree to its resolution.
        np.testing.assert_allclose(after_merge, before_merge, atol=0.1, rtol=0.05)


# --------------------------------------------------------------- other backend


class CrossBackendMatrix:
    """Files written under one backend load under the other, both ways, for
    every registered method (tests/cross_backend_check.py)."""

    @pytest.mark.skipif(
        BACKEND != "jax",
        reason="both directions run from the JAX session (one TensorFlow start-up)",
    )
    def test_files_load_under_the_other_backend(self, tmp_path):
        import cross_backend_check

        methods = registered_methods()
        written_here, written_there = tmp_path / "jax", tmp_path / "tensorflow"
        cross_backend_check.write(str(written_here), methods)
        args = ["--check", str(written_here), "--write", str(written_there)]
        args += ["--methods", ",".join(methods)]
        output = _run_script("cross_backend_check.py", args, "tensorflow", methods)
        # JAX files loaded under TensorFlow...
        cases = len(cross_backend_check.cases(methods))
        assert output.count("adapter file") == cases, output
        # ...and TensorFlow files under JAX.
        assert cross_backend_check.check(str(written_there)) == []
        assert len(list(written_there.glob("*.npz"))) == cases


# ------------------------------------------------------------- several devices


class DistributionMatrix:
    """Training on several devices equals one device; layouts follow the
    kernels (see tests/distribution_check.py), for every registered method."""

    @pytest.fixture(scope="class")
    def multi_device(self, tmp_path_factory):
        if BACKEND not in ("jax", "tensorflow"):
            pytest.skip(f"no multi-device check for the {BACKEND} backend")
        output = tmp_path_factory.mktemp("distribution") / "results.json"
        env = {}
        if BACKEND == "jax":
            env["XLA_FLAGS"] = (
                os.environ.get("XLA_FLAGS", "")
                + " --xla_force_host_platform_device_count=8"
            ).strip()
        methods = registered_methods()
        args = [str(output), "--methods", ",".join(methods)]
        _run_script("distribution_check.py", args, BACKEND, methods, env, 1200)
        with open(output) as f:
            return json.load(f)

    @staticmethod
    def _assert_same_losses(entry):
        np.testing.assert_allclose(
            entry["multi"], entry["single"], rtol=1e-5, atol=1e-6
        )
        assert entry["single"][-1] < entry["single"][0]  # Training did something.

    @pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on JAX")
    def test_data_parallel(self, multi_device):
        assert multi_device["devices"] == 8
        entry = multi_device["data_parallel"]
        self._assert_same_losses(entry)
        names = {path.rsplit("/", 1)[1].split(".")[0] for path in entry["layouts"]}
        expected = {n for m in registered_methods() for n in entry["variables"][m]}
        assert names == expected
        assert all(all(a is None for a in s) for s in entry["layouts"].values())
        assert entry["device_counts"] == [8]
        assert entry["merged_difference"] <= 1e-6

    @pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on JAX")
    def test_model_parallel_lays_adapters_out_like_their_kernels(self, multi_device):
        entry = multi_device["model_parallel"]
        self._assert_same_losses(entry)
        assert entry["layouts"]
        for path, layout in entry["layouts"].items():
            assert layout == entry["expected_layouts"][path], path
        assert entry["layout_map_layouts"] == entry["layouts"]
        assert entry["merged_kernel_layouts"] == entry["kernel_layouts"]
        assert entry["merged_difference"] <= 1e-6
        export = entry["export"]
        assert export["adapter_variables_exported"] == []
        assert export["relative_difference"] <= 1e-5

    @pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute")
    def test_mirrored_strategy(self, multi_device):
        assert multi_device["devices"] == 2
        entry = multi_device["mirrored"]
        assert entry["replicas"] == 2
        self._assert_same_losses(entry)
        assert entry["mirrored"] and all(entry["mirrored"].values())
        assert entry["merged_difference"] <= 1e-6
        assert entry["replicas_agree"]
        export = entry["export"]
        assert export["adapter_variables_exported"] == []
        assert export["relative_difference"] <= 1e-5


class SharedMatrix(AdapterMatrix, QuantizedMatrix, PrecisionMatrix):
    """The in-process suites; subclass it and set `methods`."""
