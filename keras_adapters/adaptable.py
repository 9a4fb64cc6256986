"""`adaptable_layers`: which layers of a model adapters can attach to.

Lists every layer of a model that holds a kernel (or an embedding table),
its kind (`"dense"`, `"einsum_dense"`, `"embedding"`, `"conv"`), its
attention or MLP role, its kernel and 2-D view, and which of the registered
adapter methods adapt it; layers no adapter attaches to (a grouped or
depthwise convolution, a quantized embedding, ...) are listed with the
reason. Nothing in the model changes.
"""

import dataclasses

import keras

from keras_adapters import _keras_internals as internals
from keras_adapters._tables import format_table
from keras_adapters._validation import check_model
from keras_adapters.adapters.base import ADAPTER_METHODS
from keras_adapters.kernels import LAYER_KINDS
from keras_adapters.kernels import SUPPORTED_LAYERS
from keras_adapters.kernels import UnsupportedLayerError
from keras_adapters.kernels import adapts_kind
from keras_adapters.kernels import frozen_kernel
from keras_adapters.roles import layer_role

# The variables that make a layer a candidate even if no adapter takes it.
_KERNEL_NAMES = ("kernel", "embeddings", "depthwise_kernel", "pointwise_kernel")


@dataclasses.dataclass(frozen=True)
class AdaptableLayer:
    """One layer with a kernel.

    Attributes:
        path: the layer's path.
        class_name: its class.
        kind: its kind (`"dense"`, `"einsum_dense"`, `"embedding"`,
            `"conv"`), or None if no adapter attaches to it.
        role: its attention or MLP role (`"query"`, `"up"`, ...), or None.
        kernel_shape: the kernel's (logical) shape, or None.
        view: `(d_in, d_out)` of its 2-D view, or None.
        methods: the registered methods that adapt it.
        reason: why no adapter attaches to it, or None.
    """

    path: str
    class_name: str
    kind: str | None
    role: str | None
    kernel_shape: tuple | None
    view: tuple | None
    methods: tuple
    reason: str | None = None


@dataclasses.dataclass(frozen=True)
class AdaptableLayers:
    """What `adaptable_layers` found. `print()` shows a summary per kind,
    then the layers no adapter attaches to.

    Attributes:
        model_name: the model's name.
        layers: an `AdaptableLayer` per layer with a kernel, in layer order.
    """

    model_name: str
    layers: tuple

    @property
    def kinds(self) -> dict:
        """`{kind: {"layers": count, "roles": [...], "methods": [...]}}` for
        the kinds the model has, in `LAYER_KINDS` order."""
        found = {}
        for kind in LAYER_KINDS:
            rows = [row for row in self.layers if row.kind == kind]
            if rows:
                roles = sorted({row.role for row in rows if row.role})
                found[kind] = {
                    "layers": len(rows),
                    "roles": roles,
                    "methods": list(rows[0].methods),
                }
        return found

    @property
    def unsupported(self) -> list:
        """The layers no adapter attaches to."""
        return [row for row in self.layers if row.kind is None]

    def paths(self, kind=None, method=None) -> list:
        """Paths of the adaptable layers, of `kind` and adaptable by
        `method` (a method name) if given."""
        return [
            row.path
            for row in self.layers
            if row.kind is not None
            and (kind is None or row.kind == kind)
            and (method is None or method in row.methods)
        ]

    def __str__(self):
        out = [f"Adaptable layers of '{self.model_name}':"]
        rows = [
            (
                kind,
                info["layers"],
                ", ".join(info["roles"]) or "-",
                ", ".join(info["methods"]) or "-",
            )
            for kind, info in self.kinds.items()
        ]
        out += format_table(("kind", "layers", "roles", "methods"), rows)
        for row in self.unsupported:
            out.append(f"not adaptable {row.path} ({row.class_name}): {row.reason}")
        return "\n".join(out)


def methods_for_kind(kind) -> tuple:
    """The registered method names whose `layer_kinds` include `kind`."""
    return tuple(
        method
        for method, cls in ADAPTER_METHODS.items()
        if adapts_kind(cls.layer_kinds, kind)
    )


def _has_kernel(layer):
    return any(
        isinstance(getattr(layer, name, None), keras.Variable) for name in _KERNEL_NAMES
    )


def _not_adaptable(layer, path, role, reason):
    name = type(layer).__name__
    return AdaptableLayer(path, name, None, role, None, None, (), reason)


def adaptable_layers(model: keras.Model) -> AdaptableLayers:
    """Lists the layers of `model` adapters can attach to, by kind.

    Args:
        model: a built Keras model (a KerasHub `Task`: its backbone and
            head are both listed).

    Returns:
        An `AdaptableLayers` report: per layer its kind, role, kernel shape,
        2-D view and the registered methods that adapt it; the layers with
        a kernel that no adapter takes, with the reason.

    Raises:
        ValueError: `model` is not a built Keras model.

    Example:

    ```python
    report = ka.adaptable_layers(classifier)
    print(report)
    lora_targets = report.paths(method="lora")
    ```
    """
    check_model(model)
    rows = []
    for layer, parent in internals.layers_with_parents(model):
        supported = isinstance(layer, SUPPORTED_LAYERS)
        if not supported and not _has_kernel(layer):
            continue
        path = layer.path or layer.name
        role = layer_role(layer, parent)
        if not supported:
            reason = (
                f"{type(layer).__name__} layers are not supported; adapters "
                "attach to Dense, EinsumDense, Embedding and Conv1D/2D/3D layers"
            )
            rows.append(_not_adaptable(layer, path, role, reason))
            continue
        try:
            kernel = getattr(layer, "_keras_adapters_kernel", None) or frozen_kernel(
                layer
            )
        except UnsupportedLayerError as error:
            rows.append(_not_adaptable(layer, path, role, str(error)))
            continue
        rows.append(
            AdaptableLayer(
                path=path,
                class_name=type(layer).__name__,
                kind=kernel.kind,
                role=role,
                kernel_shape=tuple(kernel.kernel_shape),
                view=(kernel.d_in, kernel.d_out),
                methods=methods_for_kind(kernel.kind),
            )
        )
    return AdaptableLayers(model_name=model.name, layers=tuple(rows))
