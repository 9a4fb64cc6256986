"""Attention roles (W_q, W_k, W_v, W_o): the one table and the one rule.

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


def check_roles(roles, argument="roles") -> tuple:
    """`roles` (a role or a sequence of roles) as a tuple without repeats."""
    if isinstance(roles, str):
        roles = (roles,)
    if not isinstance(roles, (list, tuple)) or not roles:
        raise ValueError(
            f"`{argument}` must be a non-empty tuple of attention roles from "
            f"{list(ATTENTION_ROLES)}; received {roles!r}."
        )
    for role in roles:
        if role not in ATTENTION_ROLES:
            raise ValueError(
                f"Unknown attention role {role!r} in `{argument}`; the roles are "
                f"{list(ATTENTION_ROLES)}."
            )
    return tuple(dict.fromkeys(roles))
