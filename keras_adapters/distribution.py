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

import re

import keras

from keras_adapters.adapters.base import ADAPTER_METHODS
from keras_adapters.placement import KernelDerivedLayout
from keras_adapters.placement import adapter_variable_axes
from keras_adapters.placement import view_mesh_axes

__all__ = [
    "KernelDerivedLayout",
    "adapter_layout_map",
    "adapter_variable_axes",
    "view_mesh_axes",
]

# The suffixes of layout-map keys that select kernels: `Dense`/`EinsumDense`
# and convolution kernels, as in KerasHub's
# `decoder_block.*attention.*(query|key|value).kernel`, and embedding tables
# (`token_embedding/embeddings`).
_KERNEL_SUFFIXES = ("kernel", "embeddings")


def _adapter_variable_names():
    names = set()
    for cls in ADAPTER_METHODS.values():
        names.update(getattr(cls, "variable_axes", {}))
    return sorted(names)


def adapter_layout_map(
    layout_map: keras.distribution.LayoutMap,
) -> keras.distribution.LayoutMap:
    """A copy of `layout_map` with entries for adapter variables.

    For every entry whose key selects kernels (a regex or path ending with
    `kernel`, such as `decoder_block.*attention.*(query|key|value).kernel` in
    `keras_hub.models.GemmaBackbone.get_layout_map(mesh)`, or with
    `embeddings` for embedding tables), the copy has one
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
        suffix = next((x for x in _KERNEL_SUFFIXES if key.endswith(x)), None)
        if isinstance(layout, KernelDerivedLayout) or suffix is None:
            continue
        prefix = key[: -len(suffix)]
        if suffix != "kernel" and not prefix:
            continue  # a bare `embeddings` key names no layer
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
