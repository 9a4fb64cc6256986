"""Adapters on several devices: `keras.distribution` (JAX) and `tf.distribute`.

Data parallel training needs nothing from keras_adapters beyond one rule: the
adapter variables must be created the way the model's own variables were.

- JAX, `keras.distribution.DataParallel` or `ModelParallel`: call
  `enable_adapter` while the distribution is active (after
  `keras.distribution.set_distribution(...)` or inside `distribution.scope()`).
- TensorFlow, `tf.distribute.MirroredStrategy` (and other strategies): call
  `enable_adapter` inside the `strategy.scope()` the model was built in.

`enable_adapter` checks this and raises a clear error otherwise.

Model parallel training (JAX) shards the base kernels with a
`keras.distribution.LayoutMap`. Each adapter variable is then laid out like
the kernel it adapts, at creation, by a rule stated on the 2-D view of the
kernel (`d_in x d_out`, see `keras_adapters.layers.KernelView`): an adapter
declares, for each axis of each of its variables, whether it runs along the
view's input dimension (`"in"`), its output dimension (`"out"`) or neither
(`None`), in its `variable_axes` class attribute. An `"in"` axis is sharded
like the kernel's input axes, an `"out"` axis like its output axes, other axes
are replicated:

| variable | shape | layout |
| --- | --- | --- |
| `lora_a`, `hut_a` | `(d_in, r)` | `(input mesh axis, None)` |
| `lora_b`, `hut_b` | `(r, d_out)` | `(None, output mesh axis)` |
| `qgoft_blocks` | `(d_in - 1, 2, 2)` | replicated |
| `goft_cayley` | `(d_in - 1,)` | replicated |
| `qgoft_scale`, `goft_scale` | `(d_in,)` | `(input mesh axis,)` |

For a kernel with more than two axes (KerasHub's `EinsumDense` attention
kernels), the input mesh axis is the mesh axis of the first sharded kernel
axis among the input axes, in the order the view flattens them (the outermost
one: its shards are contiguous blocks of the flattened dimension); likewise
for the output axes. If no input axis is sharded, the `"in"` axes are
replicated. If the flattened size is not divisible by the mesh axis size, that
axis is replicated too.

An entry of the active `LayoutMap` that matches an adapter variable's path
takes precedence over the rule (as it would for any Keras variable);
`adapter_layout_map` adds such entries, derived from the kernel entries.
"""

import contextlib
import re

import keras

from keras_adapters import _keras_internals as internals
from keras_adapters.layers import KernelView
from keras_adapters.layers import check_supported
from keras_adapters.layers import is_adapted

__all__ = [
    "KernelDerivedLayout",
    "adapter_layout_map",
    "adapter_variable_axes",
    "view_mesh_axes",
]

INPUT = "in"
OUTPUT = "out"

# The suffix of a layout-map key that selects `Dense`/`EinsumDense` kernels,
# as in KerasHub's `decoder_block.*attention.*(query|key|value).kernel`.
_KERNEL_SUFFIX = "kernel"


class KernelDerivedLayout(keras.distribution.TensorLayout):
    """A `LayoutMap` value: lay an adapter variable out like its kernel.

    `adapter_layout_map` stores one for each kernel entry of a layout map,
    under a key that matches the adapter variables of the same layers. It
    carries the kernel entry's per-axis layout; which kernel axes are the
    input axes depends on each layer's einsum equation, which a regex key
    cannot know, so the layout is resolved for each adapter variable when
    `enable_adapter` creates it (see the module docstring for the rule).
    Keras itself never receives one: adapter variables are only created by
    `Adapter.add_variable`, which resolves it first.

    Args:
        kernel_layout: the kernel entry, a `keras.distribution.TensorLayout`.
    """

    def __init__(self, kernel_layout):
        if not isinstance(kernel_layout, keras.distribution.TensorLayout):
            raise ValueError(
                "`kernel_layout` must be a keras.distribution.TensorLayout; "
                f"received {kernel_layout!r}."
            )
        super().__init__(kernel_layout.axes, kernel_layout.device_mesh)

    def resolve(self, view, variable_axes):
        """The `TensorLayout` of an adapter variable of a layer with `view`."""
        return _derived_layout(self.axes, self.device_mesh, view, variable_axes)


def _derived_layout(kernel_axes, device_mesh, view, variable_axes):
    """The layout of an adapter variable, derived from its kernel's layout.

    Args:
        kernel_axes: the kernel's layout, one mesh axis name or None per
            kernel axis.
        device_mesh: the `keras.distribution.DeviceMesh`.
        view: the kernel's `KernelView`.
        variable_axes: for each axis of the adapter variable, `"in"`, `"out"`
            or None.

    Returns:
        A `keras.distribution.TensorLayout`.
    """
    return keras.distribution.TensorLayout(
        adapter_variable_axes(kernel_axes, view, variable_axes, device_mesh),
        device_mesh,
    )


def view_mesh_axes(kernel_axes, view, device_mesh=None) -> tuple:
    """`(input mesh axis, output mesh axis)` of a kernel's 2-D view.

    Args:
        kernel_axes: the kernel's layout: one mesh axis name (or None) per
            kernel axis, in the kernel's own axis order.
        view: the kernel's `KernelView` (`perm` lists the input axes, then
            the output axes), or the built `Dense`/`EinsumDense` layer.
        device_mesh: optional `keras.distribution.DeviceMesh`; with it, an
            axis whose flattened size is not divisible by the mesh axis size
            is replicated (None).

    Returns:
        A pair of mesh axis names or None: the mesh axis of the first sharded
        input axis (in view order), and of the first sharded output axis.

    Example:

    ```python
    # Gemma's query kernel (heads, hidden, head_dim) = (4, 16, 8), sharded
    # ("model", "batch", None) by GemmaBackbone.get_layout_map: its input
    # axis is `hidden`, its output axes `heads, head_dim`.
    view_mesh_axes(("model", "batch", None), view)  # ("batch", "model")
    ```
    """
    view = _as_view(view)
    if isinstance(kernel_axes, str) or not isinstance(kernel_axes, (tuple, list)):
        raise ValueError(
            "`kernel_axes` must be a tuple with one mesh axis name or None per "
            f"kernel axis; received {kernel_axes!r}."
        )
    kernel_axes = tuple(kernel_axes)
    if len(kernel_axes) != len(view.kernel_shape):
        raise ValueError(
            f"The kernel layout {kernel_axes} has {len(kernel_axes)} axes but the "
            f"kernel has shape {view.kernel_shape}."
        )
    n_in = len(view.in_shape)

    def first_sharded(axes, size):
        names = [kernel_axes[i] for i in axes if kernel_axes[i] is not None]
        if not names:
            return None
        name = names[0]
        if device_mesh is not None and name in device_mesh.axis_names:
            mesh_size = device_mesh.shape[device_mesh.axis_names.index(name)]
            if size % mesh_size:
                return None
        return name

    return (
        first_sharded(view.perm[:n_in], view.d_in),
        first_sharded(view.perm[n_in:], view.d_out),
    )


def _as_view(view):
    if isinstance(view, KernelView):
        return view
    if isinstance(view, keras.layers.Layer):
        return check_supported(view) if not is_adapted(view) else KernelView(view)
    raise ValueError(
        "`view` must be a KernelView or a built Dense/EinsumDense layer; "
        f"received {view!r}."
    )


def adapter_variable_axes(kernel_axes, view, variable_axes, device_mesh=None):
    """The layout (mesh axis names) of one adapter variable.

    Args:
        kernel_axes: the kernel's layout, one mesh axis name or None per axis.
        view: the kernel's `KernelView`, or the built layer.
        variable_axes: for each axis of the adapter variable, `"in"` (it runs
            along the view's `d_in`), `"out"` (along `d_out`) or None.
        device_mesh: optional `keras.distribution.DeviceMesh` (see
            `view_mesh_axes`).

    Returns:
        A tuple with one mesh axis name or None per variable axis.

    Example:

    ```python
    # lora_a (d_in, r) and lora_b (r, d_out) of a Dense kernel sharded
    # (None, "model"):
    adapter_variable_axes((None, "model"), view, ("in", None))  # (None, None)
    adapter_variable_axes((None, "model"), view, (None, "out"))  # (None, "model")
    ```
    """
    if isinstance(variable_axes, str) or not isinstance(variable_axes, (tuple, list)):
        raise ValueError(
            "`variable_axes` must be a tuple of 'in', 'out' or None, one per "
            f"axis of the adapter variable; received {variable_axes!r}."
        )
    bad = [a for a in variable_axes if a not in (INPUT, OUTPUT, None)]
    if bad:
        raise ValueError(
            f"`variable_axes` entries must be 'in', 'out' or None; received "
            f"{tuple(variable_axes)!r}."
        )
    in_axis, out_axis = view_mesh_axes(kernel_axes, view, device_mesh)
    mesh_axis = {INPUT: in_axis, OUTPUT: out_axis, None: None}
    axes = [mesh_axis[a] for a in variable_axes]
    # A mesh axis shards at most one axis of a variable.
    seen = set()
    for i, name in enumerate(axes):
        if name is not None and name in seen:
            axes[i] = None
        seen.add(name)
    return tuple(axes)


def _adapter_variable_names():
    from keras_adapters.adapters.base import ADAPTER_METHODS

    names = set()
    for cls in ADAPTER_METHODS.values():
        names.update(getattr(cls, "variable_axes", {}))
    return sorted(names)


def adapter_layout_map(layout_map):
    """A copy of `layout_map` with entries for adapter variables.

    For every entry whose key selects kernels (a regex or path ending with
    `kernel`, such as `decoder_block.*attention.*(query|key|value).kernel` in
    `keras_hub.models.GemmaBackbone.get_layout_map(mesh)`), the copy has one
    more entry whose key is the same regex with `kernel` replaced by an
    alternation of the adapter variable names (`lora_a`, `lora_b`, `hut_a`,
    ..., of every registered adapter method, optionally followed by
    `.<adapter name>`). A regex `S kernel` fullmatches
    `<layer>/kernel` exactly when `S <name>` fullmatches `<layer>/<name>`, so
    the new key selects the adapter variables of exactly the layers whose
    kernels the original key selects, and it matches nothing before adapters
    exist.

    Its value is a `KernelDerivedLayout` carrying the kernel entry's layout.
    Which kernel axes are input axes depends on each layer's einsum equation,
    which a regex cannot know, so it is resolved per variable when
    `enable_adapter` creates it, by the rule in this module's docstring.

    Using it is optional: without it, `enable_adapter` derives the same
    layouts from the kernels' actual layouts. It makes the layout map
    describe every variable the model will have, and lets you override an
    adapter entry (replace the value with a plain `TensorLayout`) before the
    adapters are created. Call it before creating the `ModelParallel`
    distribution, so the distribution holds the extended map.

    Args:
        layout_map: a `keras.distribution.LayoutMap`.

    Returns:
        A new `keras.distribution.LayoutMap` on the same device mesh; the
        argument is not modified. Entries already present under a derived
        key are kept, so applying it twice changes nothing.

    Raises:
        ValueError: if `layout_map` is not a `LayoutMap`.

    Example:

    ```python
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"))
    layout_map = ka.distribution.adapter_layout_map(
        keras_hub.models.GemmaBackbone.get_layout_map(mesh)
    )
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
    )
    gemma = keras_hub.models.GemmaCausalLM.from_preset("gemma_2b_en")
    gemma.enable_adapter(ka.LoRA(rank=8))
    ```
    """
    if not isinstance(layout_map, keras.distribution.LayoutMap):
        raise ValueError(
            "`layout_map` must be a keras.distribution.LayoutMap; received "
            f"{layout_map!r}."
        )
    names = "|".join(re.escape(n) for n in _adapter_variable_names())
    extended = keras.distribution.LayoutMap(layout_map.device_mesh)
    derived = {}
    for key in layout_map:
        layout = layout_map[key]
        extended[key] = layout
        if isinstance(layout, KernelDerivedLayout) or not key.endswith(_KERNEL_SUFFIX):
            continue
        prefix = key[: -len(_KERNEL_SUFFIX)]
        if _is_complete_regex(prefix):
            # Named adapters' variables are `lora_a.<name>` (see AdapterSlot).
            derived[rf"{prefix}(?:{names})(?:\.\w+)?"] = KernelDerivedLayout(layout)
    # `key in extended` would regex-match; only exact keys count. An
    # existing entry (from an earlier call, or the user's) is kept.
    existing = set(extended)
    for key, layout in derived.items():
        if key not in existing:
            extended[key] = layout
    return extended


def _is_complete_regex(prefix):
    """Whether `prefix + "kernel"` is `prefix` followed by a literal `kernel`.

    Rejects prefixes that do not compile on their own or end inside a
    construct (`x|kernel`, `(?:a|kernel`, `\\` escapes): for those the
    substitution could change what the key matches.
    """
    if prefix.endswith("\\") or "|" in _top_level(prefix):
        return False
    try:
        re.compile(prefix)
    except re.error:
        return False
    return True


def _top_level(pattern):
    """The characters of `pattern` outside groups, classes and escapes."""
    depth, out, i, in_class = 0, [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif depth == 0:
            out.append(c)
        i += 1
    return "".join(out)


class _PinnedLayout:
    """The active distribution, except for one variable path's layout.

    Keras asks the active distribution for a new variable's layout as it
    creates it (`distribution.get_variable_layout(variable)`) and
    `add_weight` has no `layout` argument, so a layout is given to one
    variable by making this the active distribution while it is created.
    """

    def __init__(self, base, path, layout):
        self._base = base
        self._path = path
        self._layout = layout

    def get_variable_layout(self, variable):
        if variable.path == self._path:
            return self._layout
        return self._base.get_variable_layout(variable)

    def get_tensor_layout(self, path):
        return self._base.get_tensor_layout(path)

    def get_data_layout(self, data_shape):
        return self._base.get_data_layout(data_shape)

    @property
    def device_mesh(self):
        return self._base.device_mesh

    @property
    def batch_dim_name(self):
        return self._base.batch_dim_name


def _explicit_layout(distribution, path):
    """The active layout map's entry for `path`, or None.

    `ModelParallel` answers `get_tensor_layout(path)` from its layout map and
    returns None without a matching entry (its `get_variable_layout` would
    fall back to a replicated layout instead); `DataParallel` returns None.
    """
    try:
        return distribution.get_tensor_layout(path)
    except NotImplementedError:
        return None


@contextlib.contextmanager
def variable_layout_scope(layer, name, shape, variable_axes):
    """Creates adapter variable `name` of `layer` with its derived layout.

    Used by `Adapter.add_variable` around `layer.add_weight`. Does nothing
    unless a `keras.distribution` is active (JAX backend) and
    `variable_axes` is given.

    Args:
        layer: the adapted `Dense`/`EinsumDense` layer.
        name: the variable's name.
        shape: its shape.
        variable_axes: `"in"`, `"out"` or None per axis of the variable, or
            None (no rule: Keras' default layout).
    """
    active = keras.distribution.distribution()
    if (
        active is None
        or variable_axes is None
        or keras.backend.backend() != "jax"
        or isinstance(active, _PinnedLayout)
    ):
        yield
        return
    variable_axes = tuple(variable_axes)
    if len(variable_axes) != len(shape):
        raise ValueError(
            f"`variable_axes` of adapter variable {name!r} has "
            f"{len(variable_axes)} entries for a variable of shape {shape}."
        )
    path = f"{layer.path}/{name}"
    view = KernelView(layer)
    layout = _explicit_layout(active, path)
    if isinstance(layout, KernelDerivedLayout):
        layout = layout.resolve(view, variable_axes)
    elif layout is None:
        kernel_layout = active.get_variable_layout(layer._kernel)
        if kernel_layout is None:
            yield
            return
        layout = _derived_layout(
            kernel_layout.axes, kernel_layout.device_mesh, view, variable_axes
        )
    else:
        _check_rank(layout, path, len(shape))
    keras.distribution.set_distribution(_PinnedLayout(active, path, layout))
    try:
        yield
    finally:
        keras.distribution.set_distribution(active)


def check_variable_placement(adapter, layers):
    """Raises `ValueError` if `adapter`'s variables cannot be placed like `layers`.

    `enable_adapter` calls this before it changes anything. Adapter variables
    are created after the model, and must be created under the same
    distribution as the model's variables:

    - JAX: if the kernels were created under a `keras.distribution`, one must
      be active now, and the other way round; an entry of the active layout
      map that matches an adapter variable must have the variable's rank.
    - TensorFlow: if the kernels are `tf.distribute` variables, their
      strategy's `scope()` must be active now, and the other way round.

    Args:
        adapter: the adapter about to be attached.
        layers: the layers about to be adapted.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        _check_jax_placement(layers)
        _check_layout_entries(adapter, layers)
    elif backend == "tensorflow":
        _check_tf_placement(layers)


def _check_jax_placement(layers):
    active = keras.distribution.distribution()
    for layer in layers:
        laid_out = internals.variable_layout(layer._kernel) is not None
        if laid_out and active is None:
            raise ValueError(
                f"The kernel of layer '{layer.path}' was created under a "
                "keras.distribution, but none is active now. Call enable_adapter "
                "inside `with distribution.scope():` (or after "
                "keras.distribution.set_distribution(distribution)), so that the "
                "adapter variables are laid out on the same devices."
            )
        if not laid_out and active is not None:
            raise ValueError(
                "A keras.distribution is active, but the kernel of layer "
                f"'{layer.path}' was created without one (the model was built "
                "before the distribution was set). Build the model under the "
                "distribution, then enable adapters under it too."
            )


def _check_layout_entries(adapter, layers):
    active = keras.distribution.distribution()
    if active is None:
        return
    for layer in layers:
        for name, axes in adapter.variable_axes.items():
            path = f"{layer.path}/{name}"
            try:
                layout = _explicit_layout(active, path)
            except ValueError as error:
                raise ValueError(
                    f"The layout map is ambiguous for adapter variable '{path}': "
                    f"{error}"
                ) from None
            _check_rank(layout, path, len(axes))


def _check_rank(layout, path, rank):
    if (
        layout is None
        or isinstance(layout, KernelDerivedLayout)
        or len(layout.axes) == rank
    ):
        return
    raise ValueError(
        f"The layout map entry for '{path}' has {len(layout.axes)} axes "
        f"{tuple(layout.axes)}, but that adapter variable has {rank}. Anchor "
        "the key that matches it (for example end it with 'kernel'), or give "
        "adapter variables their own entries with "
        "ka.distribution.adapter_layout_map()."
    )


def _check_tf_placement(layers):
    import tensorflow as tf

    current = tf.distribute.get_strategy() if tf.distribute.has_strategy() else None
    for layer in layers:
        value = layer._kernel.value
        strategy = None
        if isinstance(value, tf.distribute.DistributedValues):
            strategy = value.distribute_strategy
        if strategy is not None and current is not strategy:
            raise ValueError(
                f"The kernel of layer '{layer.path}' is a "
                f"{type(strategy).__name__} variable: the model was built inside "
                "`strategy.scope()`. Call enable_adapter inside the same "
                "`with strategy.scope():` so that the adapter variables are "
                "distributed variables too."
            )
        if strategy is None and current is not None:
            raise ValueError(
                f"enable_adapter was called inside a {type(current).__name__} "
                f"scope, but the kernel of layer '{layer.path}' is not a "
                "distributed variable (the model was built outside the scope). "
                "Build the model inside `strategy.scope()` as well."
            )
