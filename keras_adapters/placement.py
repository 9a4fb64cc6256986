"""Where adapter variables live under `keras.distribution` / `tf.distribute`.

An adapter declares, for each axis of each of its variables, whether it runs
along the kernel's 2-D view input dimension (`"in"`), its output dimension
(`"out"`) or neither (`None`), in its `variable_axes` class attribute. Under a
`keras.distribution` (JAX), `variable_layout` lays the variable out like
those dimensions of the kernel: the rule is documented in
`keras_adapters.distribution`, the public module. `layers.attach` hands this
module's `variable_layout` to the variable factory of every adapter, so
adapter methods never import it.
"""

import keras

from keras_adapters import _keras_internals as internals
from keras_adapters.kernels import KernelView
from keras_adapters.kernels import frozen_kernel

INPUT = "in"
OUTPUT = "out"
# The stack axes of a stacked kernel (the experts of an MoE layer), laid out
# like the kernel's leading axes.
STACK = "stack"


class KernelDerivedLayout(keras.distribution.TensorLayout):
    """A `LayoutMap` value: lay an adapter variable out like its kernel.

    `adapter_layout_map` stores one for each kernel entry of a layout map,
    under a key that matches the adapter variables of the same layers. It
    carries the kernel entry's per-axis layout; which kernel axes are the
    input axes depends on each layer's einsum equation, which a regex key
    cannot know, so the layout is resolved for each adapter variable when
    `enable_adapter` creates it (see the module docstring for the rule).
    Keras itself never receives one: adapter variables are only created by
    the variable factory `Adapter.build` gets, which resolves it first
    (`variable_layout`).

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
        return frozen_kernel(view)
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
            along the view's `d_in`), `"out"` (along `d_out`), `"stack"`
            (along the next stack axis of a stacked kernel, the experts of
            an `ExpertsKernel`; the variable factory adds these) or None.
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
    bad = [a for a in variable_axes if a not in (INPUT, OUTPUT, STACK, None)]
    if bad:
        raise ValueError(
            f"`variable_axes` entries must be 'in', 'out' or None ('stack' for "
            f"the expert axes of a stacked kernel); received "
            f"{tuple(variable_axes)!r}."
        )
    in_axis, out_axis = view_mesh_axes(kernel_axes, view, device_mesh)
    mesh_axis = {INPUT: in_axis, OUTPUT: out_axis, None: None}
    # "stack" entries take the kernel's leading (stack) axes in order; a
    # kernel without stack axes leaves them replicated.
    stack = list(kernel_axes[: len(getattr(view, "stack_shape", ()))])
    axes = [
        (stack.pop(0) if stack else None) if a == STACK else mesh_axis[a]
        for a in variable_axes
    ]
    # A mesh axis shards at most one axis of a variable.
    seen = set()
    for i, name in enumerate(axes):
        if name is not None and name in seen:
            axes[i] = None
        seen.add(name)
    return tuple(axes)


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


def variable_layout(kernel, name, shape, variable_axes):
    """The layout of a new adapter variable, or None for Keras' default.

    None unless a `keras.distribution` is active (JAX backend) and
    `variable_axes` is given. An entry of the active layout map that matches
    the variable's path wins (a `KernelDerivedLayout` entry is resolved for
    this kernel); otherwise the layout is derived from the kernel's layout.

    Args:
        kernel: the adapted layer's `FloatKernel`/`QuantizedKernel`.
        name: the variable's name on the layer (`lora_a`, `lora_a.news`).
        shape: its shape.
        variable_axes: `"in"`, `"out"` or None per axis of the variable, or
            None (no rule).
    """
    active = keras.distribution.distribution()
    if active is None or variable_axes is None or keras.backend.backend() != "jax":
        return None
    variable_axes = tuple(variable_axes)
    if len(variable_axes) != len(shape):
        raise ValueError(
            f"`variable_axes` of adapter variable {name!r} has "
            f"{len(variable_axes)} entries for a variable of shape {shape}."
        )
    path = f"{kernel.path}/{name}"
    layout = _explicit_layout(active, path)
    if isinstance(layout, KernelDerivedLayout):
        return layout.resolve(kernel, variable_axes)
    if layout is not None:
        _check_rank(layout, path, len(shape))
        return layout
    kernel_layout = active.get_variable_layout(kernel.storage_variables()[0])
    if kernel_layout is None:
        return None
    return _derived_layout(
        kernel_layout.axes, kernel_layout.device_mesh, kernel, variable_axes
    )


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
        laid_out = (
            internals.variable_layout(frozen_kernel(layer).storage_variables()[0])
            is not None
        )
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
        stack = len(frozen_kernel(layer).stack_shape)
        for name, axes in adapter.variable_axes.items():
            axes = (STACK,) * stack + tuple(axes)
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
        value = frozen_kernel(layer).storage_variables()[0].value
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
