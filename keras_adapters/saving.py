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

import h5py
import keras
import numpy as np

from keras_adapters import _io
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
    model. It is written atomically (`keras_adapters._io.atomic_file`): to a
    temporary file beside `path`, fsynced, then renamed over `path`, so an
    interrupted save leaves the old file (or none) and no temporary file. An
    existing file keeps its permission mode, and a symlink at `path` is
    written through (its target is replaced, the link kept).

    Args:
        model: a model with adapters.
        path: where to write, ending in `.h5`. Its directory must exist.
        names: adapter names to save (a name or a list); all by default.
            The file also records which of them are active.

    Raises:
        ValueError: a bad `path` or `names`, or a model without adapters.
        FileNotFoundError: the directory of `path` does not exist.

    Example:

    ```python
    ka.save_adapter_weights(classifier, "news.adapter.weights.h5")
    ```
    """
    path = _check_path(path, for_writing=True)
    adapter_model.check_model(model)
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
    with _io.atomic_file(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs[_ATTRIBUTE] = json.dumps(spec)
        for layer in adapted:
            variables = adapter_layers.adapter_variables(layer, names)
            for name, variable in variables.items():
                f[f"adapters/{layer_key(layer)}/{name}"] = _numpy(variable)
        for variable in extras:
            f[f"extras/{variable_key(variable)}"] = _numpy(variable)


def _numpy(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable))


def read_adapter_spec(path) -> dict:
    """The JSON description stored in an adapter file, checked.

    Args:
        path: an adapter file written by `save_adapter_weights`.

    Returns:
        The description: `format_version`, `groups` (each adapter's name,
        configuration and layer paths), `active`, `kernel_shapes`, `extras`
        and where it was saved from (`keras_version`, `backend`,
        `model_class`).

    Raises:
        ValueError: the file is not an HDF5 adapter file, its description is
            not valid JSON or lacks what an adapter file holds (the message
            names the file and what is wrong), or it has another format
            version.
        FileNotFoundError: there is no file at `path`.

    Example:

    ```python
    spec = ka.read_adapter_spec("news.adapter.weights.h5")
    print([group["name"] for group in spec["groups"]])
    ```
    """
    path = _check_path(path, for_writing=False)
    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get(_ATTRIBUTE)
    except OSError as error:
        raise ValueError(f"{path!r} is not a readable HDF5 file: {error}") from None
    if raw is None:
        raise ValueError(f"{path!r} is not a keras_adapters adapter file.")
    return _parse_spec(raw, path)


def _parse_spec(raw, path):
    def bad(what):
        return ValueError(
            f"Adapter file {path!r} has a corrupted description (its "
            f"'{_ATTRIBUTE}' attribute): {what}."
        )

    if not isinstance(raw, (str, bytes)):
        raise bad(f"expected a JSON string, found {type(raw).__name__}")

    def refuse_constant(name):
        raise bad(f"it holds {name}; every number must be finite")

    try:
        spec = json.loads(raw, parse_constant=refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise bad(f"not valid JSON ({error})") from None
    if not isinstance(spec, dict):
        raise bad(f"expected a JSON object, found a {type(spec).__name__}")
    if spec.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path!r} has adapter file format {spec.get('format_version')!r}; "
            f"this version of keras_adapters reads format {FORMAT_VERSION}."
        )

    def strings(value):
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    def shapes(value, low):
        return isinstance(value, dict) and all(
            isinstance(shape, list)
            and all(
                isinstance(d, int) and not isinstance(d, bool) and d >= low
                for d in shape
            )
            for shape in value.values()
        )

    groups = spec.get("groups")
    if not isinstance(groups, list) or not groups:
        raise bad(f"'groups' must be a non-empty list, found {groups!r:.100}")
    for i, group in enumerate(groups):
        if not isinstance(group, dict):
            raise bad(f"groups[{i}] must be an object, found {group!r:.100}")
        name = group.get("name")
        if not isinstance(name, str) or not name.isidentifier():
            raise bad(f"groups[{i}] has no valid 'name' (found {name!r:.100})")
        if not isinstance(group.get("adapter"), dict):
            raise bad(f"adapter {name!r} has no 'adapter' configuration object")
        if not strings(group.get("layer_paths")) or not group["layer_paths"]:
            raise bad(f"adapter {name!r} has no 'layer_paths' list of strings")
        if not strings(group.get("keep_trainable_paths", [])):
            raise bad(f"adapter {name!r}: 'keep_trainable_paths' is not a list")
    names = [g["name"] for g in groups]
    if len(set(names)) != len(names):
        raise bad(f"adapter names repeat: {names}")
    if not strings(spec.get("active", [])) or not set(spec.get("active", [])) <= set(
        names
    ):
        raise bad(f"'active' must list adapters of the file, found {spec['active']!r}")
    if not shapes(spec.get("kernel_shapes"), 1):
        raise bad("'kernel_shapes' must map layer paths to lists of positive ints")
    if not shapes(spec.get("extras", {}), 0):
        raise bad("'extras' must map weight paths to lists of ints")
    missing = sorted(
        {p for g in groups for p in g["layer_paths"]} - set(spec["kernel_shapes"])
    )
    if missing:
        raise bad(f"no kernel shape recorded for the layers {missing}")
    spec.setdefault("extras", {})
    spec.setdefault("active", names)
    spec.setdefault("model_class", "model")
    return spec


def _adapter_groups(spec, path):
    groups = []
    for config in spec["groups"]:
        try:
            groups.append(adapter_model.AdapterGroup.from_config(config))
        except Exception as error:  # a user's config: any error is the file's
            raise ValueError(
                f"Adapter file {path!r}: the configuration of adapter "
                f"{config['name']!r} is invalid: {error}"
            ) from None
    return groups


def _datasets_of(group):
    """`{name: h5py.Dataset}` directly in an HDF5 group."""
    if not isinstance(group, h5py.Group):
        return {}
    return {k: v for k, v in group.items() if isinstance(v, h5py.Dataset)}


def _read_array(dataset, where, problems):
    """The dataset's values if they are finite numbers, else None (and a problem)."""
    try:
        value = dataset[()]
    except (OSError, TypeError, ValueError) as error:
        problems.append(f"{where}: unreadable ({error})")
        return None
    value = np.asarray(value)
    if value.dtype.kind not in "iuf":
        problems.append(f"{where}: holds {value.dtype} data, not numbers")
        return None
    if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
        problems.append(f"{where}: holds NaN or infinite values")
        return None
    return value


def _read_values(path, spec, layer_paths):
    """`({layer path: {name: array}}, {weight path: array})` from the file,
    with every dataset checked: present, numbers, finite, extras' shapes."""
    problems, adapters, extras = [], {}, {}
    try:
        _read_datasets(path, spec, layer_paths, problems, adapters, extras)
    except (OSError, KeyError, TypeError, ValueError) as error:
        problems.append(f"unreadable: {type(error).__name__}: {error}")
    return adapters, extras, problems


def _read_datasets(path, spec, layer_paths, problems, adapters, extras):
    with h5py.File(path, "r") as f:
        for layer_path in layer_paths:
            datasets = _datasets_of(f.get(f"adapters/{layer_path}"))
            if not datasets:
                problems.append(f"no adapter weights for layer '{layer_path}'")
            adapters[layer_path] = {
                name: _read_array(d, f"adapters/{layer_path}/{name}", problems)
                for name, d in datasets.items()
            }
        for variable_path, shape in spec["extras"].items():
            dataset = f.get(f"extras/{variable_path}")
            where = f"extras/{variable_path}"
            if not isinstance(dataset, h5py.Dataset):
                problems.append(f"{where}: missing")
                continue
            value = _read_array(dataset, where, problems)
            if value is not None and list(value.shape) != shape:
                problems.append(
                    f"{where}: shape {value.shape}, the description {tuple(shape)}"
                )
            extras[variable_path] = value


def load_adapter_weights(model, path) -> None:
    """Loads an adapter file into `model`, re-creating the adapters if needed.

    Into a freshly built base model, this attaches the saved adapters to the
    saved layers and restores every adapter variable (and the other trained
    weights, such as a Task's head) exactly, so training can resume. Adapters
    the model already has under the same names (and with the same
    configuration) only get their values restored; the file's other adapters
    are added, active as they were when saved, next to the model's own.

    Loading is all-or-nothing. The whole file is checked against the model
    first: its description, each adapter's configuration, every layer path
    and kernel shape, and every stored array (present, numbers, finite,
    with the shape its variable has). If anything does not fit, or loading
    is interrupted, the adapters it added are removed again and the model's
    weights, adapters, active adapters, trainable flags and layer classes
    are as they were.

    Args:
        model: a built Keras model of the architecture the file was saved
            from.
        path: an adapter file written by `save_adapter_weights`.

    Raises:
        ValueError: the file is corrupted or does not fit the model (the
            message names the file and every problem found).
        FileNotFoundError: there is no file at `path`.

    Example:

    ```python
    classifier = build_classifier()  # the same architecture, fresh weights
    ka.load_adapter_weights(classifier, "news.adapter.weights.h5")
    ```
    """
    spec = read_adapter_spec(path)
    path = os.fspath(path)
    adapter_model.check_model(model)
    groups = _adapter_groups(spec, path)
    root = adapter_model.adapted_root(model)
    existing = {g.name: g for g in adapter_model.adapter_groups(model)}
    conflicts = [g for g in groups if g.name in existing and existing[g.name] != g]
    if conflicts:
        raise ValueError(
            f"Cannot load adapter file {path!r}: model '{model.name}' already has "
            "adapters named "
            f"{[g.name for g in conflicts]} that differ from the file's "
            f"{[(g.name, g.adapter) for g in conflicts]}. Load the file into a "
            "model without adapters of those names, or with the same adapters "
            "(ka.delete_adapter(model, name) removes one)."
        )
    layers_by_path = {
        targeting.relative_path(root.name, layer.path): layer
        for layer, _ in targeting.candidate_layers(root)
    }
    layer_paths = list(dict.fromkeys(p for g in groups for p in g.layer_paths))
    problems = []
    for layer_path in layer_paths:
        shape = spec["kernel_shapes"][layer_path]
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
    if not problems:
        adapter_values, extra_values, problems = _read_values(path, spec, layer_paths)
    if problems:
        raise _does_not_fit(path, spec, model, problems)

    new_groups = [g for g in groups if g.name not in existing]
    names = [g.name for g in groups]
    extras = [(variables_by_path[p], v) for p, v in extra_values.items()]
    before = _State.of(model, [v for v, _ in extras], names)
    try:
        if new_groups:
            adapter_model.enable_groups(model, new_groups, active=spec["active"])
        assignments = []
        for layer in adapter_model.adapted_layers(model):
            key = targeting.relative_path(root.name, layer.path)
            if key not in adapter_values:
                continue
            variables = adapter_layers.adapter_variables(layer, names)
            stored = adapter_values[key]
            for name in sorted(set(variables) | set(stored)):
                where = f"adapters/{key}/{name}"
                if name not in stored:
                    problems.append(f"{where}: missing")
                elif name not in variables:
                    problems.append(f"{where}: no such variable in the adapters")
                elif tuple(variables[name].shape) != stored[name].shape:
                    problems.append(
                        f"{where}: shape {stored[name].shape}, but the adapter "
                        f"{tuple(variables[name].shape)} (another rank or "
                        "configuration than the description says?)"
                    )
                else:
                    assignments.append((variables[name], stored[name]))
        if problems:
            raise _does_not_fit(path, spec, model, problems)
        for variable, value in assignments + extras:
            variable.assign(value)
    except BaseException as error:
        before.restore(model, [g.name for g in new_groups])
        if isinstance(error, Exception) and not isinstance(error, ValueError):
            raise ValueError(
                f"Loading adapter file {path!r} into model '{model.name}' failed; "
                f"the model is unchanged: {type(error).__name__}: {error}"
            ) from error
        raise


def _does_not_fit(path, spec, model, problems):
    return ValueError(
        f"Adapter file {path!r} (saved from a {spec['model_class']}) does not "
        f"fit model '{model.name}'; nothing was changed:\n  " + "\n  ".join(problems)
    )


class _State:
    """What a failed load puts back: the active set, the values of the
    existing variables it writes, and every weight's trainable flag."""

    def __init__(self, active, values, flags):
        self.active, self.values, self.flags = active, values, flags

    @classmethod
    def of(cls, model, extras, names):
        existing = [
            v
            for layer in adapter_model.adapted_layers(model)
            for v in adapter_layers.adapter_variables(
                layer, [n for n in names if n in adapter_layers.slots(layer)]
            ).values()
        ]
        return cls(
            adapter_model.active_adapters(model),
            [(v, np.array(keras.ops.convert_to_numpy(v))) for v in existing + extras],
            [(v, v.trainable) for v in model.weights],
        )

    def restore(self, model, added):
        present = set(adapter_model.adapter_names(model))
        for name in reversed(added):
            if name in present:
                adapter_model.delete_adapter(model, name)
        for layer in adapter_model.adapted_layers(model):  # a half-attached group
            for name in adapter_layers.slots(layer):
                if name in added:
                    adapter_layers.detach(layer, name, merge=False)
        if adapter_model.adapter_names(model):
            adapter_model.set_active_adapters(model, self.active)
        for variable, value in self.values:
            variable.assign(value)
        for variable, flag in self.flags:
            variable.trainable = flag
