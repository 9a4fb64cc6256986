"""SavedModel export, verified in a fresh process.

`export_saved_model` exports a copy of the model with its adapters merged, so
the SavedModel holds plain kernels: no adapter variables, no adapter ops, and
nothing that needs keras_adapters to load. With `adapters=[...]` it exports
the per-example model instead (`keras_adapters.per_example`): the base
weights once, the named adapters' factors, and an `adapter_id` input; still
plain TensorFlow ops.
"""

import dataclasses
import os
import subprocess
import sys
import tempfile

import keras
import numpy as np

from keras_adapters import _io
from keras_adapters import _validation
from keras_adapters import merge
from keras_adapters import model as adapter_model
from keras_adapters import per_example
from keras_adapters import targeting
from keras_adapters._model_inputs import _Inputs
from keras_adapters._model_inputs import _inputs
from keras_adapters._model_inputs import _model_inputs

# Runs in a fresh interpreter that only has TensorFlow: it loads the
# SavedModel, calls `serving_default` on the saved inputs and saves outputs.
_VERIFY_SCRIPT = """
import sys
sys.modules["keras_adapters"] = None  # the SavedModel must not need it
import numpy as np
import tensorflow as tf
path, inputs_file, outputs_file, needs_text_ops = sys.argv[1:5]
if needs_text_ops == "1":
    import tensorflow_text  # registers the tokenizer ops  # noqa: F401
loaded = tf.saved_model.load(path)
serve = loaded.signatures["serving_default"]
inputs = dict(np.load(inputs_file))
outputs = serve(**{k: tf.constant(v) for k, v in inputs.items()})
weights = [int(np.prod(v.shape)) for v in loaded.variables if v.dtype.is_floating]
np.savez(
    outputs_file,
    __variables__=np.array([len(loaded.variables), sum(weights)]),
    **{k: v.numpy() for k, v in outputs.items()},
)
"""


class ExportVerificationError(RuntimeError):
    """The reloaded SavedModel does not reproduce the model's outputs."""


@dataclasses.dataclass
class ExportReport:
    """What `export_saved_model` wrote and how it was checked.

    Attributes:
        path: the SavedModel directory.
        merged_layers: paths of the layers whose adapters were merged.
        inputs: `{name: (shape, dtype)}` of the `serving_default` signature.
        num_variables: variables in the reloaded SavedModel.
        num_parameters: the total size of its floating-point variables (the
            weights; random-seed states are not counted).
        max_relative_difference: between the reloaded SavedModel and the
            (unmerged) model on the verification inputs; None if not verified.
        notes: anything worth knowing (e.g. "the model has no adapters").
        adapters: the adapters served per example (`adapter_id` k is
            `adapters[k]`), or `[]` for a merged export.
    """

    path: str
    merged_layers: list
    inputs: dict
    num_variables: int
    num_parameters: int
    max_relative_difference: float | None
    notes: list
    adapters: list = dataclasses.field(default_factory=list)

    def __str__(self):
        lines = [f"SavedModel at {self.path}"]
        lines += [f"  input {n}: shape {s}, {d}" for n, (s, d) in self.inputs.items()]
        if self.adapters:
            ids = ", ".join(f"{k} = {n}" for k, n in enumerate(self.adapters))
            what = f"adapters per example (adapter_id -1 = base, {ids})"
        else:
            what = f"{len(self.merged_layers)} adapted layers merged"
        lines.append(
            f"  {what}; "
            f"{self.num_variables} variables, {self.num_parameters:,} parameters"
        )
        if self.max_relative_difference is not None:
            lines.append(
                "  verified in a fresh process: max relative difference "
                f"{self.max_relative_difference:.2e}"
            )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _sequence_bound(model):
    if isinstance(model, per_example.PerExampleModel):
        model = model.model
    backbone = getattr(model, "backbone", model)
    return getattr(backbone, "max_sequence_length", None)


def _signature(inputs, input_signature, sequence_length):
    """`({name: (shape, dtype)}, polymorphic shape strings)`."""
    import tensorflow as tf

    if input_signature is not None:
        if not isinstance(input_signature, dict) or not all(
            isinstance(s, tf.TensorSpec) for s in input_signature.values()
        ):
            raise ValueError(
                "`input_signature` must be a dict {input name: tf.TensorSpec}; "
                f"received {input_signature!r}."
            )
        if inputs is not None and sorted(input_signature) != sorted(inputs.names):
            raise ValueError(
                f"`input_signature` names {sorted(input_signature)} do not match "
                f"the model's inputs {sorted(inputs.names)}."
            )
        specs = {n: (tuple(s.shape), s.dtype.name) for n, s in input_signature.items()}
    else:
        specs = {
            n: (tuple(t.shape), t.dtype)
            for n, t in zip(inputs.names, inputs.tensors, strict=True)
        }
    if sequence_length is not None:
        sequence_length = _validation.check_number(
            "sequence_length",
            sequence_length,
            low=1,
            integer=True,
            allowed="a positive int (fixed shapes) or None (dynamic)",
        )
        specs = {
            n: (
                (shape[0], sequence_length, *shape[2:]) if len(shape) >= 2 else shape,
                d,
            )
            for n, (shape, d) in specs.items()
        }
    polymorphic = {}
    for name, (shape, _) in specs.items():
        dims = ["b"] + [
            "s" if (i == 1 and d is None) else (str(d) if d is not None else f"d{i}")
            for i, d in enumerate(shape[1:], start=1)
        ]
        polymorphic[name] = "(" + ", ".join(dims) + ")"
    return specs, polymorphic


def _sample_inputs(model, specs, batch_size=3, sequence_length=8):
    backbone = getattr(model, "backbone", model)
    vocabulary = getattr(backbone, "vocabulary_size", 2)
    bound = _sequence_bound(model) or sequence_length
    rng = np.random.default_rng(0)
    samples = {}
    for name, (shape, dtype) in specs.items():
        concrete = [batch_size] + [
            (min(sequence_length, bound) if d is None else d) for d in shape[1:]
        ]
        if "int" in str(dtype) or "bool" in str(dtype):
            if "mask" in name:
                value = np.ones(concrete)
            elif "segment" in name:
                value = np.zeros(concrete)
            else:
                value = rng.integers(0, min(vocabulary, 1000), concrete)
        else:
            value = rng.normal(size=concrete)
        samples[name] = value.astype(dtype)
    return samples


def _copy(model):
    """A copy of `model` (adapters included) with the same weights."""
    config = keras.saving.serialize_keras_object(model)
    # The copy is never trained: without its compile config, Keras neither
    # compiles it nor warns that a KerasHub task's compile() was not replayed.
    config.pop("compile_config", None)
    copy = keras.saving.deserialize_keras_object(config)
    source = {targeting.relative_path(model.name, v.path): v for v in model.variables}
    for variable in copy.variables:
        key = targeting.relative_path(copy.name, variable.path)
        if key in source and tuple(source[key].shape) == tuple(variable.shape):
            variable.assign(source[key])
    return copy


def _per_example_copy(model, names):
    """A `PerExampleModel` over a copy of `model` that keeps only `names`."""
    copy = _copy(model)
    for name in adapter_model.adapter_names(copy):
        if name not in names:
            adapter_model.delete_adapter(copy, name)
    return per_example.PerExampleModel(copy, names)


def _plain_copy(model):
    """A copy of `model` with the same weights and its adapters merged."""
    copy = _copy(model)
    merged = []
    # The export computes what the model computes now: inactive adapters go.
    active = adapter_model.active_adapters(copy)
    for name in adapter_model.adapter_names(copy):
        if name not in active:
            adapter_model.delete_adapter(copy, name)
    if active:
        merged = merge.merge_adapters(copy)
    return copy, merged


def export_saved_model(
    model,
    path,
    *,
    overwrite: bool = False,
    input_signature=None,
    sequence_length: int | None = None,
    sample_inputs=None,
    preprocessor=None,
    verify: bool = True,
    tolerance: float = 1e-5,
    adapters=None,
) -> ExportReport:
    """Exports `model` with merged adapters as a TensorFlow SavedModel.

    The adapters are merged into a copy of the weights: `model` keeps its
    adapters and stays trainable. The SavedModel has a `serving_default`
    signature whose inputs are named as the model's inputs (the keys of a
    dict of inputs, as KerasHub models take; else each `keras.Input`'s
    `name`, or `inputs` (one input, as a `keras.Sequential`) and `inputs_0`,
    `inputs_1`, ... for inputs created without a name); on both backends
    the batch size and, for token inputs of shape `(batch, None)`, one
    sequence length shared by all inputs are dynamic (bounded by a KerasHub
    backbone's `max_sequence_length`). The export is written to a staging
    directory beside `path`, reloaded in a fresh Python process that cannot
    import keras_adapters, compared with `model` on sample inputs, and only
    then swapped into place atomically (`keras_adapters._io`): `path`
    always holds the old or the new complete export, and an export killed
    mid-swap is restored (and its leftovers removed) by the next call.

    With `adapters=[...]`, the SavedModel serves those adapters per example
    instead (`ka.per_example_adapters`): `serving_default` takes the
    model's inputs plus `adapter_id`, int32 of shape `(batch,)`, and gives
    example `i` the output of the model with only adapter
    `adapters[adapter_id[i]]` (`-1`: the base model; ids out of range also
    give the base model, as nothing can raise inside a served graph). It
    holds the base weights once and each adapter's factors, and loads with
    `tf.saved_model.load` alone. The verification covers every id.

    Args:
        model: a built Keras model, with or without adapters (without, it is
            exported as is, with a note in the report).
        path: the SavedModel directory to create.
        overwrite: bool; replace an existing non-empty directory at `path`
            (it keeps its permission mode).
        input_signature: `{input name: tf.TensorSpec}`; defaults to the
            model's symbolic inputs.
        sequence_length: export fixed shapes with this sequence length
            instead of a dynamic one.
        sample_inputs: `{input name: array}` for the verification; by default
            random token ids (and all-ones masks) are made from the signature.
            With a preprocessor: `{"texts": array of str}`.
        preprocessor: a KerasHub preprocessor to put in front of the model
            (`True`: the model's own `preprocessor`), so the SavedModel takes
            raw strings: `serving_default(texts=<string tensor (batch,)>)`.
            TensorFlow backend only: its tokenizers are TensorFlow Text ops,
            which export; on JAX tokenize in the serving client instead.
        verify: reload and compare in a fresh process (recommended).
        tolerance: the largest accepted relative difference.
        adapters: None (merge the active adapters), or a list of adapter
            names to serve per example. With `sample_inputs`, include
            `adapter_id`.

    Returns:
        An `ExportReport`.

    Raises:
        ValueError: bad arguments, a model that is not built, or an existing
            directory at `path` without `overwrite=True`.
        ExportVerificationError: the reloaded SavedModel does not match; no
            directory is left at `path`.

    Example:

    ```python
    report = ka.export_saved_model(classifier, "serving/news")
    many = ka.export_saved_model(
        classifier, "serving/all", adapters=["news", "sports"]
    )
    ```
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"Expected a Keras model, received {model!r}.")
    if not model.built:
        raise ValueError(
            f"Model '{model.name}' is not built; call it on data or build() first."
        )
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"`path` must be a str or os.PathLike; received {path!r}.")
    overwrite = _validation.check_bool("overwrite", overwrite)
    verify = _validation.check_bool("verify", verify)
    path = os.path.abspath(os.fspath(path))
    _io.recover_directory(path)
    if os.path.lexists(path) and (not os.path.isdir(path) or os.listdir(path)):
        if not overwrite:
            raise ValueError(
                f"{path!r} exists and is not an empty directory; pass "
                "overwrite=True to replace it."
            )
    tolerance = _validation.check_number(
        "tolerance", tolerance, low=0, low_inclusive=False
    )
    preprocessor = _check_preprocessor(model, preprocessor)
    serving = None
    if adapters is not None:
        serving = per_example.PerExampleModel(model, adapters)
    if model.inputs:
        inputs = _inputs(model)
    elif isinstance(input_signature, dict):  # a subclassed model takes a dict
        inputs = _Inputs("dict", tuple(input_signature), ())
    else:
        inputs = None
    if inputs is None and input_signature is None:
        _model_inputs(model)  # raises: the inputs are unknown
    specs, polymorphic = _signature(inputs, input_signature, sequence_length)
    if preprocessor is not None:
        specs = {"texts": ((None,), "string")}
    if serving is not None:
        specs[per_example.ADAPTER_ID] = ((None,), "int32")
        polymorphic[per_example.ADAPTER_ID] = "(b)"
    if serving is not None and sample_inputs is None:
        sample_inputs = _per_example_samples(model, serving, specs, preprocessor)
    sample_inputs = _check_sample_inputs(model, sample_inputs, specs, preprocessor)
    if serving is not None:
        serving._check_range(sample_inputs[per_example.ADAPTER_ID])
    notes = []
    if preprocessor is not None:
        notes.append(
            "the SavedModel contains TensorFlow Text ops: `import tensorflow_text` "
            "before tf.saved_model.load (TF Serving: use a build with TF Text)"
        )
    if not adapter_model.adapter_groups(model):
        notes.append("the model has no adapters; it was exported as is")
    # Called directly: `predict` would run a Task's own preprocessor.
    if preprocessor is not None:
        features = preprocessor(sample_inputs["texts"])
    else:
        features = inputs.structure(sample_inputs)
    if serving is not None:
        if not isinstance(features, dict):
            features = {n: sample_inputs[n] for n in inputs.names}
        ids = sample_inputs[per_example.ADAPTER_ID]
        features = {**features, per_example.ADAPTER_ID: ids}
        expected = keras.ops.convert_to_numpy(serving(features, training=False))
        plain, merged = _per_example_copy(model, serving.slots), []
        notes.append(
            f"serves {serving.slots} per example: adapter_id k is adapter k, -1 "
            "(and ids out of range) the base model"
        )
        structure = dict
    else:
        expected = keras.ops.convert_to_numpy(model(features, training=False))
        plain, merged = _plain_copy(model)
        structure = inputs.structure if inputs is not None else dict

    with _io.atomic_directory(path, overwrite=overwrite) as staging:
        if preprocessor is not None:
            _export_with_preprocessor(
                plain, preprocessor, staging, per_example=serving is not None
            )
        else:
            _export(plain, staging, structure, specs, polymorphic, sequence_length)
        difference = None
        if verify:
            outputs, (num_variables, num_parameters) = _run_in_fresh_process(
                staging, sample_inputs, needs_text_ops=preprocessor is not None
            )
            difference = _max_relative_difference(outputs, expected)
            if not difference <= tolerance:
                raise ExportVerificationError(
                    f"The reloaded SavedModel differs from model '{model.name}' by "
                    f"a relative {difference:.2e} (tolerance {tolerance:.0e}); "
                    "nothing was written."
                )
        else:
            num_variables, num_parameters = _loaded_variables(
                staging, needs_text_ops=preprocessor is not None
            )
    return ExportReport(
        path=path,
        merged_layers=merged,
        inputs={n: (s, str(d)) for n, (s, d) in specs.items()},
        num_variables=num_variables,
        num_parameters=num_parameters,
        max_relative_difference=difference,
        notes=notes,
        adapters=serving.slots if serving is not None else [],
    )


def _per_example_samples(model, serving, specs, preprocessor):
    """Verification inputs whose ids cover the base model and every adapter."""
    count = len(serving.slots) + 1
    batch = max(3, count)
    if preprocessor is not None:
        texts = ["a b c", "hello world", "x"]
        samples = {"texts": np.array([texts[i % 3] for i in range(batch)])}
    else:
        model_specs = {k: v for k, v in specs.items() if k != per_example.ADAPTER_ID}
        samples = _sample_inputs(model, model_specs, batch_size=batch)
    ids = np.arange(batch) % count - 1
    return {**samples, per_example.ADAPTER_ID: ids.astype("int32")}


def _check_sample_inputs(model, sample_inputs, specs, preprocessor):
    """`{name: array}` for the verification, in the signature's dtypes."""
    if sample_inputs is None:
        if preprocessor is not None:
            return {"texts": np.array(["a b c", "hello world", "x"])}
        return _sample_inputs(model, specs)
    if not isinstance(sample_inputs, dict) or sorted(sample_inputs) != sorted(specs):
        raise ValueError(
            f"`sample_inputs` must be a dict with the keys {sorted(specs)}; "
            f"received {sample_inputs!r:.200}."
        )
    checked = {}
    for name, value in sample_inputs.items():
        shape, dtype = specs[name]
        if dtype == "string":
            array = np.asarray(value)
            if (
                array.ndim != 1
                or array.dtype.kind not in "USO"
                or not all(isinstance(t, (str, bytes)) for t in array.tolist())
            ):
                raise ValueError(
                    f"`sample_inputs[{name!r}]` must be a 1-D array of strings "
                    f"(one text per example); received {value!r:.200}."
                )
            checked[name] = array.astype(str) if array.dtype.kind == "O" else array
            continue
        array = np.asarray(value)
        if array.dtype.kind != "b":  # a tokenizer may give a bool padding mask
            array = _validation.check_finite_array(f"sample_inputs[{name!r}]", array)
        if array.ndim != len(shape) or any(
            d is not None and d != a for d, a in zip(shape, array.shape, strict=True)
        ):
            raise ValueError(
                f"`sample_inputs[{name!r}]` must have the shape {shape} (None: any "
                f"size); received an array of shape {array.shape}."
            )
        checked[name] = array.astype(dtype)  # the signature's dtypes
    return checked


def _export(model, directory, structure, specs, polymorphic, sequence_length):
    """`structure`: `{name: value}` -> what the model is called with."""
    import tensorflow as tf

    tensor_specs = {
        n: tf.TensorSpec(shape, dtype, name=n) for n, (shape, dtype) in specs.items()
    }
    signature = [structure(tensor_specs)]
    kwargs = {}
    if keras.backend.backend() == "jax":
        bound = _sequence_bound(model)
        dynamic = any("s" in p.strip("()").split(", ") for p in polymorphic.values())
        constraints = (
            (f"s <= {bound}",) if bound and dynamic and not sequence_length else ()
        )
        kwargs["jax2tf_kwargs"] = {
            "polymorphic_shapes": [structure(polymorphic)],
            "polymorphic_constraints": constraints,
            "with_gradient": False,
        }
    model.export(
        directory,
        format="tf_saved_model",
        input_signature=signature,
        verbose=False,
        **kwargs,
    )


def _check_preprocessor(model, preprocessor):
    if preprocessor is None or preprocessor is False:
        return None
    if preprocessor is True:
        preprocessor = getattr(model, "preprocessor", None)
        if preprocessor is None:
            raise ValueError(
                f"Model '{model.name}' has no preprocessor; pass one as "
                "`preprocessor=` or leave it out to export the tokenized inputs."
            )
    if not isinstance(preprocessor, keras.layers.Layer):
        raise ValueError(
            "`preprocessor` must be a KerasHub preprocessor layer or True; "
            f"received {preprocessor!r}."
        )
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "Exporting with a preprocessor (raw strings in) needs the TensorFlow "
            "backend: KerasHub tokenizers are TensorFlow Text ops, which the "
            f"{keras.backend.backend()} backend cannot trace into a SavedModel. "
            "Export without `preprocessor` and tokenize in the serving client, "
            "or export under KERAS_BACKEND=tensorflow."
        )
    return preprocessor


def _export_with_preprocessor(model, preprocessor, directory, per_example=False):
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.track(preprocessor)
    texts_spec = tf.TensorSpec((None,), tf.string, name="texts")

    if per_example:
        ids_spec = tf.TensorSpec((None,), tf.int32, name="adapter_id")

        def serve(texts, adapter_id):
            features = {**preprocessor(texts), "adapter_id": adapter_id}
            return model(features, training=False)

        signature = [texts_spec, ids_spec]
    else:

        def serve(texts):
            return model(preprocessor(texts), training=False)

        signature = [texts_spec]
    archive.add_endpoint("serve", serve, input_signature=signature)
    archive.write_out(directory, verbose=False)


def _run_in_fresh_process(directory, sample_inputs, needs_text_ops=False):
    with tempfile.TemporaryDirectory() as scratch:
        inputs_file = os.path.join(scratch, "inputs.npz")
        outputs_file = os.path.join(scratch, "outputs.npz")
        np.savez(inputs_file, **sample_inputs)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                _VERIFY_SCRIPT,
                directory,
                inputs_file,
                outputs_file,
                "1" if needs_text_ops else "0",
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        if result.returncode != 0:
            raise ExportVerificationError(
                "Reloading the SavedModel in a fresh process failed:\n"
                + result.stderr[-2000:]
            )
        with np.load(outputs_file) as outputs:
            counts = tuple(int(c) for c in outputs["__variables__"])
            return [outputs[k] for k in sorted(outputs) if k != "__variables__"], counts


def _max_relative_difference(outputs, expected):
    if len(outputs) != 1:
        raise ExportVerificationError(
            f"Expected one output from the SavedModel, received {len(outputs)}."
        )
    got = np.asarray(outputs[0], "float64")
    want = np.asarray(expected, "float64")
    if got.shape != want.shape:
        raise ExportVerificationError(
            f"The SavedModel's output has shape {got.shape}, the model's {want.shape}."
        )
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12))


def _loaded_variables(directory, needs_text_ops=False):
    """`(variables, floating-point parameters)` of a SavedModel."""
    import tensorflow as tf

    if needs_text_ops:
        import tensorflow_text  # noqa: F401
    variables = tf.saved_model.load(directory).variables
    weights = [int(np.prod(v.shape)) for v in variables if v.dtype.is_floating]
    return len(variables), sum(weights)
