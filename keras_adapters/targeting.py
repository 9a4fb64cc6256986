"""Which layers of a model an adapter attaches to.

A target is any of:

- an attention role set, `attention("query", "value")`: the W_q/W_k/W_v/W_o
  projections, as each KerasHub architecture names them;
- an MLP role set, `mlp("up", "down")`: the feed-forward projections (gate,
  up, down), as each KerasHub architecture names them, the stacked expert
  weights of mixture-of-experts layers included;
- an expert role set, `experts("gate", "up", "down")`: only the stacked
  expert weights of mixture-of-experts layers;
- a string: a layer name (`"query"` matches every layer named `query`), or a
  regular expression that must `re.fullmatch` the layer's `path`
  (`r"transformer_layer_[0-5]/.*/(query|value)"`);
- a callable `layer -> bool`;
- a list or tuple of the above (a layer matching any of them).
"""

import re
from collections.abc import Callable

import keras

from keras_adapters import _keras_internals as internals
from keras_adapters.kernels import SUPPORTED_LAYERS
from keras_adapters.kernels import ExpertProjection
from keras_adapters.roles import ATTENTION_ROLES
from keras_adapters.roles import MLP_ROLES
from keras_adapters.roles import attention_role
from keras_adapters.roles import check_mlp_roles
from keras_adapters.roles import check_roles
from keras_adapters.roles import layer_role
from keras_adapters.roles import mlp_roles


def relative_path(root_name, path):
    """`path` without the leading `<root_name>/` that subclassed models add.

    Adapter groups, adapter files and `.keras` configs store relative paths,
    so they fit a fresh instance of the same model whose auto-generated name
    differs (`my_model_1`).
    """
    path = path or ""
    prefix = f"{root_name}/"
    return path[len(prefix) :] if root_name and path.startswith(prefix) else path


class Target:
    """Base class of structured targets (`attention(...)`)."""

    def matches(self, layer, parent) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class AttentionTarget(Target):
    """The attention projections with the given roles."""

    def __init__(self, roles):
        self.roles = tuple(roles)

    def matches(self, layer, parent):
        return attention_role(layer, parent) in self.roles

    def describe(self):
        return f"attention{self.roles}"

    def __repr__(self):
        return f"attention({', '.join(repr(r) for r in self.roles)})"


class MLPTarget(Target):
    """The MLP (feed-forward) projections with the given roles."""

    def __init__(self, roles):
        self.roles = tuple(roles)

    def matches(self, layer, parent):
        # A fused projection (Qwen-MoE's gate and up experts) matches when
        # all its roles are asked for.
        roles = mlp_roles(layer, parent)
        return bool(roles) and set(roles) <= set(self.roles)

    def describe(self):
        return f"mlp{self.roles}"

    def __repr__(self):
        return f"mlp({', '.join(repr(r) for r in self.roles)})"


class ExpertsTarget(MLPTarget):
    """The stacked expert weights of MoE layers with the given MLP roles."""

    def matches(self, layer, parent):
        return isinstance(layer, ExpertProjection) and super().matches(layer, parent)

    def describe(self):
        return f"experts{self.roles}"

    def __repr__(self):
        return f"experts({', '.join(repr(r) for r in self.roles)})"


class PathsTarget(Target):
    """Exactly the layers with these paths, relative to `root` if given.

    Used to restore saved adapters; paths may omit the `<root name>/` prefix
    that layers of subclassed models carry.
    """

    def __init__(self, paths, root_name=None):
        self.paths = tuple(paths)
        self.root_name = root_name

    def matches(self, layer, parent):
        return relative_path(self.root_name, layer.path) in self.paths

    def describe(self):
        return f"paths{list(self.paths)}"


def attention(*roles: str) -> AttentionTarget:
    """Targets attention projections by role, on any supported architecture.

    Args:
        *roles: one or more of `"query"`, `"key"`, `"value"`,
            `"attention_output"`. No roles means all four.

    Returns:
        A target for `enable_adapter`.

    Example:

    >>> import keras_adapters as ka
    >>> ka.attention("query", "value")
    attention('query', 'value')
    """
    return AttentionTarget(check_roles(roles or ATTENTION_ROLES))


def mlp(*roles: str) -> MLPTarget:
    """Targets MLP (feed-forward) projections by role, on any supported
    architecture.

    `"up"` maps the hidden size to the intermediate size, `"down"` maps it
    back, `"gate"` is the second up-projection of gated MLPs (Llama,
    Mistral, Qwen, Gemma, Phi-3, SmolLM3; BERT, GPT-2, Falcon, Bloom and
    ViT have none). The names each architecture uses are in
    `keras_adapters.roles.MLP_ROLE_NAMES`.

    Args:
        *roles: one or more of `"gate"`, `"up"`, `"down"`. No roles means
            all three.

    Returns:
        A target for `enable_adapter`; combine it with attention roles in a
        list: `[ka.attention("query", "value"), ka.mlp("up", "down")]`.

    Example:

    >>> import keras_adapters as ka
    >>> ka.mlp("up", "down")
    mlp('up', 'down')
    """
    return MLPTarget(check_mlp_roles(roles or MLP_ROLES))


def experts(*roles: str) -> ExpertsTarget:
    """Targets the stacked expert weights of mixture-of-experts layers by
    MLP role (KerasHub's Mixtral, Qwen-MoE and Qwen3-MoE experts layers).

    Each expert weight of an experts layer is reachable as
    `<experts layer path>/<weight name>` (such as
    `.../sparse_moe_block/experts/expert_feedforward_gate_dense`); `ka.mlp`
    reaches them too, together with dense MLP projections. A fused gate and
    up weight (Qwen-MoE, Qwen3-MoE) is selected when both `"gate"` and
    `"up"` are asked for. The router, a `Dense` that picks the experts, has
    no MLP role: neither target selects it (name it to adapt it).

    Args:
        *roles: one or more of `"gate"`, `"up"`, `"down"`. No roles means
            all three.

    Returns:
        A target for `enable_adapter`.

    Example:

    >>> import keras_adapters as ka
    >>> ka.experts("gate", "up")
    experts('gate', 'up')
    """
    return ExpertsTarget(check_mlp_roles(roles or MLP_ROLES))


def _string_matcher(pattern):
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ValueError(
            f"Target {pattern!r} is not a valid regular expression: {error}."
        ) from None

    def matches(layer, parent):
        return layer.name == pattern or (
            layer.path is not None and compiled.fullmatch(layer.path) is not None
        )

    return matches


def _matchers(targets):
    """`[(description, match(layer, parent) -> bool)]` for `targets`."""
    if isinstance(targets, (list, tuple)):
        if not targets:
            raise ValueError("`targets` is an empty list; give at least one target.")
        return [m for target in targets for m in _matchers(target)]
    if isinstance(targets, Target):
        return [(targets.describe(), targets.matches)]
    if isinstance(targets, str):
        return [(repr(targets), _string_matcher(targets))]
    if isinstance(targets, keras.layers.Layer):
        # A layer is callable, but calling it on candidate layers fails deep
        # inside Keras.
        raise ValueError(
            f"Invalid target: the layer object {targets!r}; pass its name "
            f"({targets.name!r}) or a regex on its path, or a callable "
            "layer -> bool."
        )
    if isinstance(targets, Callable):
        name = getattr(targets, "__name__", repr(targets))
        return [(f"callable {name}", lambda layer, parent: bool(targets(layer)))]
    raise ValueError(
        f"Invalid target {targets!r} of type {type(targets).__name__}; a target is "
        "ka.attention(...), ka.mlp(...), ka.experts(...), a layer name or path "
        "regex (str), a callable layer -> bool, or a list of these."
    )


def candidate_layers(model):
    """`[(layer, parent)]` for every layer of `model` adapters attach to."""
    return [
        (layer, parent)
        for layer, parent in internals.layers_with_parents(model)
        if isinstance(layer, SUPPORTED_LAYERS)
    ]


def resolve_targets(model, targets):
    """Finds the layers of `model` that `targets` selects.

    Returns:
        `[(layer, parent)]` in the model's layer order.

    Raises:
        ValueError: a target matches no layer; the message lists the layers
            that could have matched.
    """
    matchers = _matchers(targets)
    everything = list(internals.layers_with_parents(model))
    selected = []
    for description, match in matchers:
        hits = [(layer, parent) for layer, parent in everything if match(layer, parent)]
        if not hits:
            raise ValueError(
                f"Target {description} matches no layer of model '{model.name}'. "
                f"{_describe_candidates(model)}"
            )
        for hit in hits:
            if all(hit[0] is not s[0] for s in selected):
                selected.append(hit)
    order = {id(layer): i for i, (layer, _) in enumerate(everything)}
    return sorted(selected, key=lambda hit: order[id(hit[0])])


def _describe_candidates(model, limit=40):
    rows = []
    for layer, parent in candidate_layers(model):
        role = layer_role(layer, parent)
        rows.append(f"  {layer.path}" + (f"  (role: {role})" if role else ""))
    if not rows:
        return "The model has no layer adapters attach to."
    more = f"\n  ... and {len(rows) - limit} more" if len(rows) > limit else ""
    return "Candidate layers (path, role):\n" + "\n".join(rows[:limit]) + more
