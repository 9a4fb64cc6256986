"""Attention roles (W_q, W_k, W_v, W_o) and MLP roles (gate, up, down):
the tables and the rules.

A projection has role R when its name is one of R's sublayer names below and
the block that holds it is an attention block: a layer whose class name or
whose own name contains "attention" or "attn". `ka.attention(...)` applies
the rule to layers (`attention_role`); learning-rate rules apply it to
variable paths (`path_role`), where only the names are known.
"""

import re

ATTENTION_ROLES = ("query", "key", "value", "attention_output")

# Sublayer names per role, as the attention layers of KerasHub name them.
# BERT, RoBERTa, DistilBERT, GPT-2 and friends use Keras' MultiHeadAttention;
# Gemma, Llama, Mistral and Qwen use their own attention layers, with the same
# names. The aliases cover architectures that use the Hugging Face names:
# Bloom and Falcon name their projections `query_dense`, ..., `output_dense`;
# SmolLM3 `q_proj`, ..., `o_proj`; the ViTs of PaliGemma and Gemma 3
# `query_proj`, ..., `out_proj`. GPT-NeoX fuses Q, K and V into one
# `query_key_value` kernel, which has no single role (only its
# `attention_output` resolves).
ROLE_NAMES = {
    "query": ("query", "query_dense", "q_proj", "q", "query_proj"),
    "key": ("key", "key_dense", "k_proj", "k", "key_proj"),
    "value": ("value", "value_dense", "v_proj", "v", "value_proj"),
    "attention_output": (
        "attention_output",
        "output_dense",
        "o_proj",
        "out_proj",
        "output_proj",
    ),
}

# KerasHub names the attention block `self_attention_layer` (BERT family),
# `self_attention` (GPT-2, Llama, Mistral, Qwen, ...), `attention` (Gemma,
# Falcon, Phi-3), `self_attn` (SmolLM3) or `attn` (PaliGemma's ViT).
_ATTENTION_NAME = re.compile(r".*(attention|attn).*", re.IGNORECASE)


def is_attention_block(name: str, class_name: str = "") -> bool:
    """Whether a block named `name` (of class `class_name`) is attention."""
    return bool(
        _ATTENTION_NAME.fullmatch(name or "")
        or _ATTENTION_NAME.fullmatch(class_name or "")
    )


def projection_role(projection_name: str):
    """The role whose sublayer names include `projection_name`, or None."""
    for role, names in ROLE_NAMES.items():
        if projection_name in names:
            return role
    return None


def attention_role(layer, parent):
    """The attention role of `layer` held by `parent`, or None."""
    if parent is None or not is_attention_block(parent.name, type(parent).__name__):
        return None
    return projection_role(layer.name)


def path_role(path):
    """The attention role of the variable at `path`, or None.

    A variable's path is `<...>/<block>/<projection>/<variable>`; on KerasHub
    models this is the role `ka.attention()` resolves for the projection
    (tested for each supported architecture).
    """
    parts = (path or "").split("/")
    if len(parts) < 3 or not is_attention_block(parts[-3]):
        return None
    return projection_role(parts[-2])


def check_roles(roles, argument="roles", known=None, kind="attention") -> tuple:
    """`roles` (a role or a sequence of roles) as a tuple without repeats.

    `known` is the allowed roles (`ATTENTION_ROLES` by default) and `kind`
    names them in errors.
    """
    known = tuple(known or ATTENTION_ROLES)
    if isinstance(roles, str):
        roles = (roles,)
    if not isinstance(roles, (list, tuple)) or not roles:
        raise ValueError(
            f"`{argument}` must be a non-empty tuple of {kind} roles from "
            f"{list(known)}; received {roles!r}."
        )
    for role in roles:
        if role not in known:
            raise ValueError(
                f"Unknown {kind} role {role!r} in `{argument}`; the roles are "
                f"{list(known)}."
            )
    return tuple(dict.fromkeys(roles))


# MLP (feed-forward) roles. `up` maps the hidden size to the intermediate
# size, `down` maps it back, and `gate` is the second up-projection of gated
# MLPs (SwiGLU, GeGLU), whose activation multiplies `up`'s output.
MLP_ROLES = ("gate", "up", "down")

# Sublayer names per MLP role that say their role alone, as KerasHub names
# them: BERT, RoBERTa, DistilBERT, GPT-2 (`feedforward_*`, no gate); Llama,
# Mistral, Qwen, Qwen3, Phi-3 (`feedforward_gate_dense` too); Gemma
# (`ffw_gating` is the gate, `ffw_gating_2` the up-projection, `ffw_linear`
# the down-projection); Bloom (`mlp_*`); Falcon (`dense_h_to_4h`,
# `dense_4h_to_h`); SmolLM3 (`gate_proj`, ...); PaliGemma's ViT
# (`mlp_dense_1`, `mlp_dense_2`).
MLP_ROLE_NAMES = {
    "gate": ("feedforward_gate_dense", "ffw_gating", "gate_proj"),
    "up": (
        "feedforward_intermediate_dense",
        "ffw_gating_2",
        "up_proj",
        "mlp_intermediate_dense",
        "dense_h_to_4h",
        "mlp_dense_1",
    ),
    "down": (
        "feedforward_output_dense",
        "ffw_linear",
        "down_proj",
        "mlp_output_dense",
        "dense_4h_to_h",
        "mlp_dense_2",
    ),
}
# Generic names that have a role only inside an MLP block (a layer whose
# name or class name contains "mlp", "feedforward" or "ffn"): KerasHub's
# ViT names them `dense_1` and `dense_2` inside its `MLP` layer.
MLP_BLOCK_NAMES = {"up": ("dense_1", "fc1"), "down": ("dense_2", "fc2")}
_MLP_BLOCK = re.compile(r".*(mlp|feedforward|ffn).*", re.IGNORECASE)


def mlp_roles(layer, parent) -> tuple:
    """The MLP roles of `layer` held by `parent`: one role, none, or two for
    a fused projection (the `("gate", "up")` stacked expert weight of
    Qwen-MoE and Qwen3-MoE).

    The stacked expert weights of KerasHub's MoE layers carry their roles
    (`ExpertProjection.mlp_roles`); a router (`sparse_feedforward_gate_dense`)
    has none.
    """
    own = getattr(layer, "mlp_roles", None)
    if isinstance(own, tuple):
        return own
    role = mlp_role(layer, parent)
    return () if role is None else (role,)


def mlp_role(layer, parent):
    """The MLP role of `layer` held by `parent`, or None (a fused projection's
    roles joined by `+`: `"gate+up"`)."""
    own = getattr(layer, "mlp_roles", None)
    if isinstance(own, tuple):
        return "+".join(own) or None
    for role, names in MLP_ROLE_NAMES.items():
        if layer.name in names:
            return role
    if parent is None or not (
        _MLP_BLOCK.fullmatch(parent.name or "")
        or _MLP_BLOCK.fullmatch(type(parent).__name__)
    ):
        return None
    for role, names in MLP_BLOCK_NAMES.items():
        if layer.name in names:
            return role
    return None


def layer_role(layer, parent):
    """The attention or MLP role of `layer` held by `parent`, or None."""
    return attention_role(layer, parent) or mlp_role(layer, parent)


def check_mlp_roles(roles, argument="roles") -> tuple:
    """`roles` (an MLP role or a sequence of them) as a tuple without
    repeats."""
    return check_roles(roles, argument, known=MLP_ROLES, kind="MLP")
