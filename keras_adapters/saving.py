"""Adapter-only weight files.

An adapter file is an HDF5 file holding:

- the attribute `keras_adapters`: JSON with the format version, the adapters
  (method, hyperparameters, adapted layer paths and kernel shapes) and the
  names of the other trainable weights saved with them;
- `adapters/<layer path>/<variable>`: every adapter variable, float32;
- `extras/<variable path>`: the other weights `enable_adapter` left
  trainable (a KerasHub Task's head, `keep_trainable` layers), so a file
  restores everything that was trained.

It holds arrays and JSON only, so loading it cannot execute code.
"""

import json
import os
import tempfile

import h5py
import keras
import numpy as np

from keras_adapters import layers as adapter_layers
from keras_adapters import model as adapter_model
from keras_adapters import targeting
from keras_adapters.kernels import quantized as quantization

FORMAT_VERSION = 1
_ATTRIBUTE = "keras_adapters"


def _check_path(path, for_writing):
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"`path` must be a str or os.PathLike; received {path!r}.")
    path = os.fspath(path)
    if not path.endswith(".h5"):
        raise ValueError(
            f"Adapter files end in '.h5' (e.g. 'news.adapter.weights.h5'); "
            f"received {path!r}."
        )
    if not for_writing and not os.path.isfile(path):
        raise FileNotFoundError(f"No adapter file at {path!r}.")
    return path


def save_adapter_weights(model, path, names=None) -> None:
    """Saves the adapters of `model` (and its other trainable weights).

    The file is small: its size follows the adapter parameters, not the
    model. It is written to a temporary file in the same directory and then
    renamed over `path`, so an interrupted save never corrupts an existing
    file.

    Args:
        model: a model with adapters.
        path: where to write, ending in `.h5`.
        names: adapter names to save (a name or a list); all by default.
            The file also records which of them are active.

    Example:

    ```python
    ka.save_adapter_weights(classifier, "news.adapter.weights.h5")
    ```
    """
    path = _check_path(path, for_writing=True)
    groups = adapter_model.adapter_groups(model)
    if not groups:
        raise ValueError(
            f"Model '{model.name}' has no adapters to save; enable_adapter() first."
        )
    if names is not None:
        names = adapter_model.check_names(model, names, "names")
        groups = [g for g in groups if g.name in names]
    names = [g.name for g in groups]
    adapted = [
        layer
        for layer in adapter_model.adapted_layers(model)
        if any(n in names for n in adapter_layers.slots(layer))
    ]
    root_name = adapter_model.adapted_root(model).name

    def layer_key(layer):
        return targeting.relative_path(root_name, layer.path)

    def variable_key(variable):
        return targeting.relative_path(model.name, variable.path)

    adapter_ids = {id(v) for v in adapter_model.adapter_variables(model)}
    active = adapter_model.active_adapters(model)
    extras = [v for v in model.trainable_weights if id(v) not in adapter_ids]
    spec = {
        "format_version": FORMAT_VERSION,
        "keras_version": keras.__version__,
        "backend": keras.backend.backend(),
        "model_class": type(model).__name__,
        "groups": [g.to_config() for g in groups],
        "active": [n for n in names if n in active],
        "kernel_shapes": {
            layer_key(layer): list(layer._keras_adapters_kernel.kernel_shape)
            for layer in adapted
        },
        "extras": {variable_key(v): list(v.shape) for v in extras},
    }
    directory = os.path.dirname(os.path.abspath(path))
    handle, tmp = tempfile.mkstemp(
        dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp"
    )
    os.close(handle)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs[_ATTRIBUTE] = json.dumps(spec)
            for layer in adapted:
                variables = adapter_layers.adapter_variables(layer, names)
                for name, variable in variables.items():
                    f[f"adapters/{layer_key(layer)}/{name}"] = _numpy(variable)
            for variable in extras:
                f[f"extras/{variable_key(variable)}"] = _numpy(variable)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _numpy(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable))


def read_adapter_spec(path) -> dict:
    """The JSON description stored in an adapter file."""
    path = _check_path(path, for_writing=False)
    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get(_ATTRIBUTE)
    except OSError as error:
        raise ValueError(f"{path!r} is not a readable HDF5 file: {error}") from None
    if raw is None:
        raise ValueError(f"{path!r} is not a keras_adapters adapter file.")
    spec = json.loads(raw)
    if spec.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path!r} has adapter file format {spec.get('format_version')!r}; "
            f"this version of keras_adapters reads format {FORMAT_VERSION}."
        )
    return spec


def load_adapter_weights(model, path) -> None:
    """Loads an adapter file into `model`, re-creating the adapters if needed.

    Into a freshly built base model, this attaches the saved adapters to the
    saved layers and restores every adapter variable (and the other trained
    weights, such as a Task's head) exactly, so training can resume. Adapters
    the model already has under the same names (and with the same
    configuration) only get their values restored; the file's other adapters
    are added, active as they were when saved, next to the model's own.

    Every check runs before anything changes: a file that does not fit the
    model (another architecture, other kernel shapes, other adapters) raises
    a `ValueError` and leaves the model as it was.

    Args:
        model: a built Keras model of the architecture the file was saved
            from.
        path: an adapter file written by `save_adapter_weights`.
    """
    spec = read_adapter_spec(path)
    groups = [adapter_model.AdapterGroup.from_config(g) for g in spec["groups"]]
    adapter_model.check_model(model)
    root = adapter_model.adapted_root(model)
    existing = {g.name: g for g in adapter_model.adapter_groups(model)}
    conflicts = [g for g in groups if g.name in existing and existing[g.name] != g]
    if conflicts:
        raise ValueError(
            f"Model '{model.name}' already has adapters named "
            f"{[g.name for g in conflicts]} that differ from the file's "
            f"{[(g.name, g.adapter) for g in conflicts]}. Load the file into a "
            "model without adapters of those names, or with the same adapters "
            "(ka.delete_adapter(model, name) removes one)."
        )
    layers_by_path = {
        targeting.relative_path(root.name, layer.path): layer
        for layer, _ in targeting.candidate_layers(root)
    }
    problems = []
    for layer_path, shape in spec["kernel_shapes"].items():
        layer = layers_by_path.get(layer_path)
        if layer is None:
            problems.append(f"no Dense/EinsumDense layer at '{layer_path}'")
        elif list(quantization.logical_kernel_shape(layer)) != shape:
            problems.append(
                f"'{layer_path}' has kernel shape "
                f"{quantization.logical_kernel_shape(layer)}, the file {tuple(shape)}"
            )
    variables_by_path = {
        targeting.relative_path(model.name, v.path): v for v in model.weights
    }
    for variable_path, shape in spec["extras"].items():
        variable = variables_by_path.get(variable_path)
        if variable is None:
            problems.append(f"no weight at '{variable_path}'")
        elif list(variable.shape) != shape:
            problems.append(
                f"weight '{variable_path}' has shape {tuple(variable.shape)}, the "
                f"file {tuple(shape)}"
            )
    if problems:
        raise ValueError(
            f"Adapter file {path!r} (saved from a {spec['model_class']}) does not "
            f"fit model '{model.name}':\n  " + "\n  ".join(problems)
        )
    new_groups = [g for g in groups if g.name not in existing]
    if new_groups:
        adapter_model.enable_groups(model, new_groups, active=spec.get("active"))
    names = [g.name for g in groups]
    with h5py.File(path, "r") as f:
        for layer in adapter_model.adapted_layers(model):
            key = targeting.relative_path(root.name, layer.path)
            variables = adapter_layers.adapter_variables(layer, names)
            for name, variable in variables.items():
                variable.assign(f[f"adapters/{key}/{name}"][()])
        for variable_path in spec["extras"]:
            variables_by_path[variable_path].assign(f[f"extras/{variable_path}"][()])
