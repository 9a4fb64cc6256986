"""Moving LoRA adapters between Hugging Face PEFT and Keras.

`load_peft_adapter` reads a PEFT LoRA adapter directory (`adapter_config.json`
and `adapter_model.safetensors`) into a KerasHub model converted from the
same Hugging Face checkpoint; `save_peft_adapter` writes a model's LoRA
adapter in PEFT's format, so `peft.PeftModel.from_pretrained` loads it.

Each supported architecture has a small table from Hugging Face module names
(`encoder.layer.{i}.attention.self.query`) to KerasHub layer paths
(`transformer_layer_{i}/self_attention_layer/query`). For every entry, the
2-D view of the KerasHub kernel (`KernelView`: input axes x output axes) is
the transposed Hugging Face weight, as KerasHub's converters port it: BERT's
and Llama's per-head query kernels `(hidden, heads, head_dim)`, Gemma's
`(heads, hidden, head_dim)` and the attention outputs
`(heads, head_dim, hidden)` all flatten, through the view, to
`weight.T`. So PEFT's `lora_A.weight` `(r, in)` and `lora_B.weight`
`(out, r)` are our `lora_a` `(in, r)` and `lora_b` `(r, out)` transposed,
with no per-head reordering. `tests/test_interop.py` checks this against
PyTorch outputs.

The safetensors files are read and written with the `safetensors` package
(no PyTorch needed): `safetensors.numpy.save_file` writes them, and
`safetensors.deserialize` parses and checks them (its NumPy loader has no
bfloat16, a common dtype for PEFT adapters, so the raw little-endian data is
turned into float32 arrays here). Directories are written atomically
(`keras_adapters._io.atomic_directory`).
"""

import dataclasses
import json
import math
import os
import re
import warnings
import weakref

import numpy as np
import safetensors
import safetensors.numpy
from keras import ops

from keras_adapters import _io
from keras_adapters import _validation
from keras_adapters import layers as adapter_layers
from keras_adapters import model as adapter_model
from keras_adapters import targeting
from keras_adapters.adapters.base import ADAPTER_METHODS
from keras_adapters.adapters.base import Adapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLE_WEIGHTS_FILE = "adapter_model.bin"
_KEY_PREFIX = "base_model.model."
# PEFT task types an exported adapter may declare. With "SEQ_CLS",
# "TOKEN_CLS" and "QUESTION_ANS", PEFT adds the task head to
# `modules_to_save` and fails to load a file without the head's weights,
# which save_peft_adapter does not write.
_TASK_TYPES = (None, "FEATURE_EXTRACTION", "CAUSAL_LM")
_TASK_TYPES_WITH_HEADS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")


@dataclasses.dataclass(frozen=True)
class _Architecture:
    """How one KerasHub architecture names the modules PEFT adapts.

    Attributes:
        name: shown in messages.
        backbone_class: the `keras_hub.models` backbone class name.
        hf_classes: prefixes of the Hugging Face class names of this family
            (`"Bert"` for `BertModel`, `BertForSequenceClassification`).
        modules: `(Hugging Face module, KerasHub layer path)` templates;
            `{i}` is the transformer layer index.
        ambiguous_leaves: last module-name components that also name
            modules outside `modules` in some Hugging Face class (BERT's
            `dense`), so `target_modules` never uses them alone.
        prefixes: `(keras_hub task class name or None, module prefix, PEFT
            task type)`: the default Hugging Face model a saved adapter is
            named for; `None` is the backbone and any other task.
    """

    name: str
    backbone_class: str
    hf_classes: tuple
    modules: tuple
    ambiguous_leaves: tuple
    prefixes: tuple

    def defaults(self, model):
        """`(module prefix, task type)` of the Hugging Face model for `model`."""
        import keras_hub

        for task, prefix, task_type in self.prefixes:
            cls = getattr(keras_hub.models, task, None) if task else None
            if cls is not None and isinstance(model, cls):
                return prefix, task_type
        return next((p, t) for task, p, t in self.prefixes if task is None)


_ARCHITECTURES = (
    _Architecture(
        name="BERT",
        backbone_class="BertBackbone",
        hf_classes=("Bert",),
        modules=(
            (
                "encoder.layer.{i}.attention.self.query",
                "transformer_layer_{i}/self_attention_layer/query",
            ),
            (
                "encoder.layer.{i}.attention.self.key",
                "transformer_layer_{i}/self_attention_layer/key",
            ),
            (
                "encoder.layer.{i}.attention.self.value",
                "transformer_layer_{i}/self_attention_layer/value",
            ),
            (
                "encoder.layer.{i}.attention.output.dense",
                "transformer_layer_{i}/self_attention_layer/attention_output",
            ),
            (
                "encoder.layer.{i}.intermediate.dense",
                "transformer_layer_{i}/feedforward_intermediate_dense",
            ),
            (
                "encoder.layer.{i}.output.dense",
                "transformer_layer_{i}/feedforward_output_dense",
            ),
            ("pooler.dense", "pooled_dense"),
            ("embeddings.word_embeddings", "token_embedding"),
        ),
        ambiguous_leaves=("dense",),
        prefixes=(
            (None, "", "FEATURE_EXTRACTION"),  # BertModel
            # BertForSequenceClassification; no task type (see _TASK_TYPES).
            ("BertTextClassifier", "bert.", None),
            ("BertMaskedLM", "bert.", None),
        ),
    ),
    _Architecture(
        name="Llama",
        backbone_class="LlamaBackbone",  # Llama3Backbone is a subclass.
        hf_classes=("Llama",),
        modules=(
            (
                "layers.{i}.self_attn.q_proj",
                "transformer_layer_{i}/self_attention/query",
            ),
            ("layers.{i}.self_attn.k_proj", "transformer_layer_{i}/self_attention/key"),
            (
                "layers.{i}.self_attn.v_proj",
                "transformer_layer_{i}/self_attention/value",
            ),
            (
                "layers.{i}.self_attn.o_proj",
                "transformer_layer_{i}/self_attention/attention_output",
            ),
            (
                "layers.{i}.mlp.gate_proj",
                "transformer_layer_{i}/feedforward_gate_dense",
            ),
            (
                "layers.{i}.mlp.up_proj",
                "transformer_layer_{i}/feedforward_intermediate_dense",
            ),
            (
                "layers.{i}.mlp.down_proj",
                "transformer_layer_{i}/feedforward_output_dense",
            ),
            ("embed_tokens", "token_embedding"),
        ),
        ambiguous_leaves=(),
        prefixes=((None, "model.", "CAUSAL_LM"),),  # LlamaForCausalLM
    ),
    _Architecture(
        name="Gemma",
        backbone_class="GemmaBackbone",
        hf_classes=("Gemma",),
        modules=(
            ("layers.{i}.self_attn.q_proj", "decoder_block_{i}/attention/query"),
            ("layers.{i}.self_attn.k_proj", "decoder_block_{i}/attention/key"),
            ("layers.{i}.self_attn.v_proj", "decoder_block_{i}/attention/value"),
            (
                "layers.{i}.self_attn.o_proj",
                "decoder_block_{i}/attention/attention_output",
            ),
            ("layers.{i}.mlp.gate_proj", "decoder_block_{i}/ffw_gating"),
            ("layers.{i}.mlp.up_proj", "decoder_block_{i}/ffw_gating_2"),
            ("layers.{i}.mlp.down_proj", "decoder_block_{i}/ffw_linear"),
            ("embed_tokens", "token_embedding"),
        ),
        ambiguous_leaves=(),
        prefixes=((None, "model.", "CAUSAL_LM"),),  # GemmaForCausalLM
    ),
)

# PEFT LoRA settings that change the adapter's math or add trained weights
# beyond A and B, with the only value (or values) keras_adapters imports.
_REQUIRED_SETTINGS = {
    "use_dora": ((False, None), "DoRA (weight-decomposed LoRA)"),
    "bias": (("none", None), "trained biases"),
    "lora_bias": ((False, None), "a trained bias on lora_B"),
    "modules_to_save": ((None, []), "fully trained extra modules"),
    "fan_in_fan_out": ((False, None), "transposed (Conv1D) weights"),
    "use_qalora": ((False, None), "QALoRA"),
    "trainable_token_indices": ((None, [], {}), "trainable token embeddings"),
    "alora_invocation_tokens": ((None, []), "activated LoRA"),
    "layer_replication": ((None, []), "layer replication"),
    "target_parameters": ((None, []), "LoRA on parameters (MoE experts)"),
    "use_bdlora": ((None, False), "block-diagonal LoRA"),
    "arrow_config": ((None,), "Arrow routing"),
    "kasa_config": ((None,), "KaSA"),
    "monteclora_config": ((None,), "MonteCLoRA"),
    "velora_config": ((None,), "VeLoRA"),
    "megatron_config": ((None,), "Megatron layers"),
}
# PEFT LoRA settings that do not change an imported adapter (bookkeeping,
# initialization, module selection already reflected by the tensors).
_IGNORED_SETTINGS = {
    "peft_type",
    "task_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "r",
    "lora_alpha",
    "rank_pattern",  # mapped to layer paths by _with_patterns
    "alpha_pattern",
    "lora_dropout",
    "use_rslora",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "init_lora_weights",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "runtime_config",
    "megatron_core",
    "qalora_group_size",
    "ensure_weight_tying",
}


@dataclasses.dataclass(frozen=True)
class _Origin:
    """Where an imported adapter came from, for `save_peft_adapter` defaults."""

    adapter: Adapter
    module_prefix: str
    task_type: str | None
    base_model_name_or_path: str | None


# Adapted root model -> {adapter name: _Origin}.
_ORIGINS = weakref.WeakKeyDictionary()


def load_peft_adapter(model, path, *, name: str = "default"):
    """Loads a Hugging Face PEFT LoRA adapter into a KerasHub model.

    The model must be converted from the Hugging Face checkpoint the adapter
    was trained on (for example `keras_hub.models.BertBackbone.from_preset`
    on that checkpoint's directory or `hf://` handle), or be a Task whose
    backbone is. Each module PEFT adapted becomes a `ka.LoRA` adapter on the
    matching KerasHub layer, with PEFT's rank, alpha, rsLoRA scaling and
    dropout, and the factors transposed into `lora_a` and `lora_b`. The
    adapted model then computes what the PEFT model computes; train it
    further, merge it, or save it with `ka.save_adapter_weights` or
    `save_peft_adapter`.

    Supported: LoRA adapters (`peft_type` `"LORA"`), and DoRA ones
    (`use_dora=True`, imported as `ka.DoRA` with PEFT's
    `lora_magnitude_vector`), of BERT, Llama and Gemma models on their
    attention and MLP projections, stored as safetensors.
    Every check runs first: an adapter that cannot be imported exactly
    raises and leaves the model unchanged.

    Args:
        model: a built KerasHub `BertBackbone`, `LlamaBackbone` (Llama 3
            included) or `GemmaBackbone`, or a Task built on one.
        path: the adapter directory (holding `adapter_config.json` and
            `adapter_model.safetensors`).
        name: the adapter's name in `model`.

    Returns:
        The `AdapterReport` of the `enable_adapter` call.

    Raises:
        FileNotFoundError: `path` has no `adapter_config.json` or no weights.
        ValueError: the adapter is not plain LoRA or DoRA (trained biases,
            `modules_to_save`, another `peft_type`, a base-changing
            `init_lora_weights` such as LoftQ), it
            adapts modules without a KerasHub counterpart, its shapes do not
            fit the model, the weights are not safetensors, or the model's
            architecture has no mapping.

    Example:

    ```python
    import keras_hub
    import keras_adapters as ka

    backbone = keras_hub.models.BertBackbone.from_preset("tests/data/peft/bert")
    ka.interop.load_peft_adapter(backbone, "tests/data/peft/bert_lora")
    ```
    """
    adapter_model.check_model(model)
    name = _validation.check_name("name", name)
    root = _root(model)
    architecture = _architecture(root)
    directory = _check_adapter_directory(path)
    config = _read_config(directory)
    lora = _lora_from_config(config, architecture, directory)
    tensors = _read_safetensors(os.path.join(directory, WEIGHTS_FILE))
    prefix, factors = _match_tensors(tensors, architecture, directory, type(lora))
    lora = _with_patterns(lora, config, factors, directory)
    plan = _plan(root, architecture, factors, lora, config, directory)
    report = adapter_model.enable_adapter(
        model,
        lora,
        targets=targeting.PathsTarget(sorted(plan), root.name),
        name=name,
    )
    try:
        for layer_path, _, slot in _lora_layers(model, name)[1]:
            for variable_name, value in plan[layer_path].items():
                slot[variable_name].assign(value)
    except BaseException:  # interrupted: leave the model as it was
        adapter_model.delete_adapter(model, name)
        raise
    _ORIGINS.setdefault(root, {})[name] = _Origin(
        adapter=lora,
        module_prefix=prefix,
        task_type=config.get("task_type"),
        base_model_name_or_path=config.get("base_model_name_or_path"),
    )
    return report


def save_peft_adapter(
    model,
    path,
    *,
    name: str = "default",
    base_model_name_or_path: str | None = None,
    module_prefix: str | None = None,
    task_type: str | None = "auto",
    overwrite: bool = False,
) -> None:
    """Writes a model's LoRA adapter as a Hugging Face PEFT adapter directory.

    The directory holds `adapter_config.json` (`peft_type` `"LORA"`, `r`,
    `lora_alpha`, `use_rslora`, `lora_dropout`, `target_modules`, ...) and
    `adapter_model.safetensors` with the tensors PEFT expects
    (`base_model.model.<module>.lora_A.weight` `(r, in)` and
    `...lora_B.weight` `(out, r)`; for a `ka.DoRA` adapter also
    `use_dora: true` and `...lora_magnitude_vector` `(out,)`), so
    `peft.PeftModel.from_pretrained(hf_model, path)` loads it into the
    Hugging Face model the KerasHub model was converted from.

    PEFT matches tensors to modules by their full names, which depend on the
    Hugging Face class the adapter is loaded into: `BertModel` names its
    modules `encoder.layer.0...`, `BertForSequenceClassification`
    `bert.encoder.layer.0...`, `LlamaForCausalLM` `model.layers.0...`. For
    an adapter imported with `load_peft_adapter`, the defaults reproduce the
    imported file's names, task type and base model. Otherwise they are:
    BERT backbone: `BertModel` (prefix `""`, task `"FEATURE_EXTRACTION"`);
    `BertTextClassifier`: `BertForSequenceClassification` (`"bert."`, no
    task type); Llama and Gemma: `*ForCausalLM` (`"model."`,
    `"CAUSAL_LM"`).

    Only the LoRA factors are written; a Task's trained head and other
    `keep_trainable` weights are not (a warning says so; save them with
    `ka.save_adapter_weights`). The directory is written beside `path` and
    renamed into place, so an interrupted save leaves no partial adapter.

    Args:
        model: a KerasHub BERT, Llama or Gemma backbone, or a Task built on
            one, with a LoRA adapter.
        path: the directory to write.
        name: which adapter of `model` to write.
        base_model_name_or_path: recorded in `adapter_config.json` (PEFT's
            `AutoPeftModel` classes load the base model from it).
        module_prefix: the prefix of the transformer body's module names in
            the Hugging Face model the adapter is for (`""`, `"bert."`,
            `"model."`); see above for the default.
        task_type: PEFT's task type: `"CAUSAL_LM"`, `"FEATURE_EXTRACTION"`
            or `None`; `"auto"` picks the default described above. Task
            types with a head (`"SEQ_CLS"`, ...) are refused: PEFT then
            expects the head's weights, which are not written.
        overwrite: replace `path` if it is a non-empty directory (its whole
            content is replaced).

    Raises:
        ValueError: `model` has no LoRA adapter named `name` (HUT and qGOFT
            adapters have no PEFT LoRA equivalent), an adapted layer has no
            Hugging Face counterpart, the architecture has no mapping, a bad
            argument, or `path` is a non-empty directory and `overwrite` is
            False.

    Example:

    ```python
    ka.interop.save_peft_adapter(backbone, "exported_lora")
    ```
    """
    adapter_model.check_model(model)
    root = _root(model)
    architecture = _architecture(root)
    lora, rows = _lora_layers(model, name)
    origin = _ORIGINS.get(root, {}).get(name)
    if origin is not None and origin.adapter is not lora:
        origin = None
    default_prefix, default_task = (
        (origin.module_prefix, origin.task_type)
        if origin is not None
        else architecture.defaults(model)
    )
    if module_prefix is None:
        module_prefix = default_prefix
    if not isinstance(module_prefix, str) or not re.fullmatch(
        r"(?:[A-Za-z_]\w*\.)*", module_prefix
    ):
        raise ValueError(
            "`module_prefix` must be '' or dotted module names ending in '.', "
            f"such as 'bert.' or 'model.'; received {module_prefix!r}."
        )
    if task_type == "auto":
        task_type = default_task
    if task_type in _TASK_TYPES_WITH_HEADS:
        raise ValueError(
            f"`task_type={task_type!r}` is not supported: with it PEFT expects the "
            "task head's weights in the adapter (modules_to_save), and "
            "save_peft_adapter writes only the LoRA factors. Use task_type=None "
            "(PeftModel.from_pretrained loads it into any Hugging Face class) or "
            f"one of {list(_TASK_TYPES)}."
        )
    if task_type not in _TASK_TYPES:
        raise ValueError(
            f"`task_type` must be one of {list(_TASK_TYPES)} or 'auto'; "
            f"received {task_type!r}."
        )
    if base_model_name_or_path is None and origin is not None:
        base_model_name_or_path = origin.base_model_name_or_path
    if base_model_name_or_path is not None and not isinstance(
        base_model_name_or_path, str
    ):
        raise ValueError(
            "`base_model_name_or_path` must be a str or None; received "
            f"{base_model_name_or_path!r}."
        )
    path = _check_output_directory(path, overwrite)

    to_module = _keras_to_hf(architecture)
    modules, unmapped = {}, []
    for layer_path, _, slot in rows:
        module = to_module(layer_path)
        if module is None:
            unmapped.append(layer_path)
        else:
            modules[module] = slot
    if unmapped:
        raise ValueError(
            f"Adapter {name!r} adapts layers without a Hugging Face "
            f"{architecture.name} counterpart: {unmapped}. PEFT export supports "
            f"these layers: {[k for _, k in architecture.modules]}."
        )
    tensors = {}
    for module, slot in modules.items():
        key = f"{_KEY_PREFIX}{module_prefix}{module}"
        # The layer's own configuration (its rank from a rank_pattern).
        adapter = slot.adapter
        embedding = slot.kernel.kind == "embedding"
        if embedding and not _embeds(type(adapter)):
            raise ValueError(
                f"Adapter {name!r} is a {type(adapter).__name__} on the embedding "
                f"'{slot.layer.path}'; PEFT export of embedding adapters supports "
                "LoRA and DoRA."
            )
        for tensor, value in adapter.to_peft_tensors(slot).items():
            if embedding and tensor in _EMBEDDING_NAMES:
                # lora_embedding_A (r, vocab), no `.weight`
                tensors[f"{key}.{_EMBEDDING_NAMES[tensor]}"] = value
            else:
                suffix = _tensor_suffix(type(adapter), tensor)
                tensors[f"{key}.{tensor}{suffix}"] = value
    available = {m for m in map(to_module, _layer_paths(root)) if m is not None}
    rank_pattern, alpha_pattern = _peft_patterns(lora, modules)
    config = {
        "peft_type": lora.peft_type,
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "target_modules": _target_modules(
            architecture, set(modules), available, module_prefix
        ),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_dora": False,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        "lora_bias": False,
    }
    config.update(lora.peft_config())  # the method's own settings win (use_dora)
    _warn_about_other_trained_weights(model, name)
    with _io.atomic_directory(path, overwrite=overwrite) as staging:
        with open(os.path.join(staging, CONFIG_FILE), "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
        safetensors.numpy.save_file(
            {k: np.ascontiguousarray(v, dtype="<f4") for k, v in tensors.items()},
            os.path.join(staging, WEIGHTS_FILE),
            metadata={"format": "pt"},
        )


# Per-module ranks and alphas (PEFT's rank_pattern and alpha_pattern).


def _peft_pattern_key(pattern, module):
    r"""PEFT's rule: the first key with `re.match(rf"(.*\.)?({key})$",
    module)`, or None."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _with_patterns(lora, config, factors, directory):
    """`lora` with PEFT's `rank_pattern`/`alpha_pattern` resolved for each
    imported module and keyed by the KerasHub layer path instead."""
    patterns = {}
    for name in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(name) or {}
        if not isinstance(pattern, dict):
            raise ValueError(
                f"{os.path.join(directory, CONFIG_FILE)!r}: `{name}` must be an "
                f"object {{module pattern: value}}; found {pattern!r}."
            )
        patterns[name] = pattern
    if not any(patterns.values()):
        return lora
    resolved = {"rank_pattern": {}, "alpha_pattern": {}}
    for layer_path, (module, _) in sorted(factors.items()):
        for name, pattern in patterns.items():
            try:
                key = _peft_pattern_key(pattern, module)
            except re.error as error:
                raise ValueError(
                    f"{os.path.join(directory, CONFIG_FILE)!r}: a `{name}` key is "
                    f"not a valid regular expression: {error}."
                ) from None
            if key is not None:
                resolved[name][re.escape(layer_path)] = pattern[key]
    try:
        return type(lora).from_config({**lora.get_config(), **resolved})
    except ValueError as error:
        raise ValueError(
            f"{os.path.join(directory, CONFIG_FILE)!r} has an invalid per-module "
            f"setting: {error}"
        ) from None


def _peft_patterns(lora, modules):
    """`(rank_pattern, alpha_pattern)` for PEFT: the modules whose layer
    configuration differs from the adapter's, keyed by module name."""
    top = lora.peft_config()
    rank_pattern, alpha_pattern = {}, {}
    for module, slot in sorted(modules.items()):
        own = slot.adapter.peft_config()
        if own["r"] != top["r"]:
            rank_pattern[module] = own["r"]
        if own["lora_alpha"] != top["lora_alpha"]:
            alpha_pattern[module] = own["lora_alpha"]
    return rank_pattern, alpha_pattern


# Access to the model's adapters (one place, for several adapters per layer).


def _root(model):
    return adapter_model.adapted_root(model)


def _lora_layers(model, name):
    """The LoRA adapter `name` of `model` and its layers.

    Returns:
        `(adapter, [(layer path relative to the root, layer, AdapterSlot)])`,
        in the order the adapter group lists its layers.
    """
    groups = adapter_model.adapter_groups(model)
    if not groups:
        raise ValueError(
            f"Model '{model.name}' has no adapters; enable a ka.LoRA adapter or "
            "load one with load_peft_adapter() first."
        )
    group = next((g for g in groups if g.name == name), None)
    if group is None:
        raise ValueError(
            f"Model '{model.name}' has no adapter named {name!r}; it has "
            f"{[g.name for g in groups]}."
        )
    if group.adapter.peft_type is None:
        raise ValueError(
            f"Adapter {name!r} of model '{model.name}' is "
            f"{type(group.adapter).__name__} ({group.adapter.method}); only LoRA "
            "adapters have a PEFT LoRA equivalent. Supported: ka.LoRA."
        )
    root = _root(model)
    layers = {
        targeting.relative_path(root.name, layer.path): layer
        for layer in adapter_model.adapted_layers(root)
    }
    rows = []
    for layer_path in group.layer_paths:
        layer = layers[layer_path]
        slot = adapter_layers.slots(layer)[name]
        rows.append((layer_path, layer, slot))
    return group.adapter, rows


def _layer_paths(root):
    return [
        targeting.relative_path(root.name, layer.path)
        for layer, _ in targeting.candidate_layers(root)
    ]


def _warn_about_other_trained_weights(model, name):
    adapter_ids = {id(v) for v in adapter_model.adapter_variables(model)}
    others = [v.path for v in model.trainable_weights if id(v) not in adapter_ids]
    if others:
        shown = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
        warnings.warn(
            f"save_peft_adapter writes only the LoRA factors of adapter {name!r}; "
            f"{len(others)} other trainable weights of model '{model.name}' "
            f"({shown}) are not in the PEFT adapter. Save them with "
            "ka.save_adapter_weights(model, path).",
            stacklevel=3,
        )


# The architecture tables.


def _architecture(root):
    try:
        import keras_hub
    except ImportError:
        keras_hub = None
    for architecture in _ARCHITECTURES:
        if keras_hub is None:
            break
        cls = getattr(keras_hub.models, architecture.backbone_class, None)
        if cls is not None and isinstance(root, cls):
            return architecture
    supported = [f"{a.name} ({a.backbone_class})" for a in _ARCHITECTURES]
    raise ValueError(
        f"PEFT interop has no module mapping for model '{root.name}' of class "
        f"{type(root).__name__}. Supported KerasHub backbones (and Tasks built "
        f"on them): {', '.join(supported)}."
    )


def _template_regex(template):
    parts = [re.escape(part) for part in template.split("{i}")]
    return re.compile(r"(?P<i>\d+)".join(parts))


def _hf_to_keras(architecture):
    """`module -> (prefix, keras layer path)`, or `None` if it has no mapping."""
    patterns = [
        (
            re.compile(
                r"(?P<prefix>(?:[A-Za-z_]\w*\.)*?)" + _template_regex(hf).pattern
            ),
            keras_template,
        )
        for hf, keras_template in architecture.modules
    ]

    def convert(module):
        for pattern, keras_template in patterns:
            match = pattern.fullmatch(module)
            if match:
                path = keras_template.replace("{i}", match.groupdict().get("i") or "")
                return match["prefix"], path
        return None

    return convert


def _keras_to_hf(architecture):
    """`keras layer path -> module` (without prefix), or `None`."""
    patterns = [
        (_template_regex(keras_template), hf)
        for hf, keras_template in architecture.modules
    ]

    def convert(layer_path):
        for pattern, hf in patterns:
            match = pattern.fullmatch(layer_path)
            if match:
                return hf.replace("{i}", match.groupdict().get("i") or "")
        return None

    return convert


def _target_names(architecture):
    return [hf for hf, _ in architecture.modules]


def _target_supported(target, architecture):
    """Whether PEFT's rule (module name == target or ends with "." + target)
    lets the `target_modules` entry `target` select a mapped module."""
    target_parts = target.split(".")
    for hf, _ in architecture.modules:
        parts = hf.split(".")
        n = min(len(parts), len(target_parts))
        if all(
            t == p or (p == "{i}" and t.isdigit())
            for t, p in zip(target_parts[-n:], parts[-n:], strict=True)
        ):
            return True
    return False


def _target_modules(architecture, adapted, available, prefix):
    """PEFT's `target_modules` selecting exactly the `adapted` modules.

    A list of last name components (`["query", "value"]`) when that selects
    exactly `adapted` among the mapped modules and no other module of the
    Hugging Face model; otherwise a regex that fullmatches the full module
    names.
    """

    def leaf(module):
        return module.rsplit(".", 1)[-1]

    leaves = sorted({leaf(m) for m in adapted})
    if all(
        name not in architecture.ambiguous_leaves
        and {m for m in available if leaf(m) == name}
        == {m for m in adapted if leaf(m) == name}
        for name in leaves
    ):
        return leaves
    return "|".join(re.escape(prefix + m) for m in sorted(adapted))


# Reading and checking an adapter directory.


def _check_adapter_directory(path):
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"`path` must be a str or os.PathLike; received {path!r}.")
    directory = os.fspath(path)
    _io.recover_directory(directory)  # a save killed mid-swap
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"No PEFT adapter directory at {directory!r} (expected a directory "
            f"holding {CONFIG_FILE} and {WEIGHTS_FILE})."
        )
    if not os.path.isfile(os.path.join(directory, CONFIG_FILE)):
        raise FileNotFoundError(f"No {CONFIG_FILE} in {directory!r}.")
    if not os.path.isfile(os.path.join(directory, WEIGHTS_FILE)):
        if os.path.isfile(os.path.join(directory, _PICKLE_WEIGHTS_FILE)):
            raise ValueError(
                f"{directory!r} holds {_PICKLE_WEIGHTS_FILE} (PyTorch pickle); only "
                f"{WEIGHTS_FILE} is supported, since loading a pickle can run "
                "arbitrary code. Convert it where PyTorch and PEFT are "
                "installed: PeftModel.from_pretrained(base, path)"
                ".save_pretrained(new_path) writes safetensors."
            )
        raise FileNotFoundError(f"No {WEIGHTS_FILE} in {directory!r}.")
    return directory


def _read_config(directory):
    path = os.path.join(directory, CONFIG_FILE)

    def refuse_constant(name):
        raise ValueError(f"{path!r} holds {name}; every number must be finite.")

    with open(path, "rb") as f:
        raw = f.read()
    try:
        config = json.loads(raw.decode("utf-8"), parse_constant=refuse_constant)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path!r} is not UTF-8 text: {error}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path!r} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path!r} does not hold a JSON object.")
    return config


def _lora_from_config(config, architecture, directory):
    """Checks a PEFT config and returns the matching `ka.LoRA`."""
    peft_type = config.get("peft_type")
    if peft_type not in {c.peft_type for c in ADAPTER_METHODS.values()} - {None}:
        raise ValueError(
            f"{directory!r} is a PEFT adapter with peft_type={peft_type!r}; only "
            "LoRA adapters (peft_type='LORA') can be imported."
        )
    method = _peft_method(config)
    settings = getattr(method, "peft_settings", {})
    problems = []
    for key, (allowed, what) in _REQUIRED_SETTINGS.items():
        if key in settings:  # the method's own setting (DoRA's use_dora)
            continue
        if key in config and config[key] not in allowed:
            problems.append(
                f"{key}={config[key]!r} ({what}; supported: "
                f"{' or '.join(repr(a) for a in allowed)})"
            )
    for key, value in config.items():
        if key not in _REQUIRED_SETTINGS and key not in _IGNORED_SETTINGS:
            if value not in (None, False, {}, [], ""):
                problems.append(
                    f"{key}={value!r} (a setting keras_adapters does not know)"
                )
    if problems:
        raise ValueError(
            f"The PEFT LoRA adapter in {directory!r} uses settings keras_adapters "
            "cannot import exactly: " + "; ".join(problems) + ". Only plain LoRA "
            "(optionally rsLoRA) on the mapped modules is supported."
        )
    targets = config.get("target_modules")
    if isinstance(targets, (list, tuple)):
        unsupported = [
            t for t in targets if not _target_supported(str(t), architecture)
        ]
        if unsupported:
            raise ValueError(
                f"The PEFT adapter in {directory!r} targets modules without a "
                f"KerasHub {architecture.name} counterpart: {unsupported}. "
                "Supported modules (or a suffix of them): "
                f"{_target_names(architecture)}."
            )
    try:
        return method.from_peft_config(config)
    except ValueError as error:
        raise ValueError(
            f"{os.path.join(directory, CONFIG_FILE)!r} has an invalid LoRA "
            f"setting: {error}"
        ) from None


def _peft_method(config):
    """The registered adapter class a PEFT config describes.

    Of the classes with the config's `peft_type`, those whose `peft_settings`
    (class attribute, default `{}`; DoRA's is `{"use_dora": True}`) the
    config has; the one with the most settings wins (DoRA over LoRA).
    """
    peft_type = config.get("peft_type")
    candidates = [
        cls
        for cls in ADAPTER_METHODS.values()
        if cls.peft_type is not None
        and cls.peft_type == peft_type
        and all(
            config.get(k) == v for k, v in getattr(cls, "peft_settings", {}).items()
        )
    ]
    if not candidates:
        raise ValueError(f"No adapter method imports peft_type={peft_type!r}.")
    return max(candidates, key=lambda cls: len(getattr(cls, "peft_settings", {})))


def _tensor_suffix(cls, tensor):
    """What follows a tensor's name in its PEFT key: `.weight`, unless the
    method's `peft_tensor_suffixes` says otherwise (DoRA's
    `lora_magnitude_vector` has none)."""
    return getattr(cls, "peft_tensor_suffixes", {}).get(tensor, ".weight")


def _tensor_key(cls):
    """The regex of a PEFT tensor key of method `cls`."""
    names = "|".join(map(re.escape, cls.peft_tensors))
    suffixes = "|".join(
        re.escape(s) for s in sorted({_tensor_suffix(cls, n) for n in cls.peft_tensors})
    )
    return re.compile(
        re.escape(_KEY_PREFIX)
        + rf"(?P<module>.+)\.(?P<factor>{names})(?P<suffix>{suffixes})"
    )


# PEFT's LoRA on an `nn.Embedding` stores `lora_embedding_A` `(r, vocab)`
# and `lora_embedding_B` `(dim, r)` (no `.weight`): the layouts of a linear
# layer's `lora_A` `(r, in)` and `lora_B` `(out, r)`, the table's 2-D view
# being `(vocab, dim)` = (in, out). With `save_embedding_layers` (PEFT's
# default when an embedding is targeted) it also stores the whole base
# table as `<module>.base_layer.weight`.
# DoRA on an embedding adds `lora_magnitude_vector` `(dim,)`, named as on a
# linear layer.
_EMBEDDING_TENSORS = {"lora_embedding_A": "lora_A", "lora_embedding_B": "lora_B"}
_EMBEDDING_NAMES = {v: k for k, v in _EMBEDDING_TENSORS.items()}
_BASE_TABLE = "base_layer"


def _embeds(cls):
    """Whether PEFT stores this method on an `nn.Embedding` (LoRA, DoRA)."""
    return tuple(cls.peft_tensors[:2]) == ("lora_A", "lora_B")


def _embedding_keys(tensors, cls):
    """`tensors` with PEFT's embedding names in the linear layers' names
    (LoRA and DoRA), and the set of modules that are embeddings."""
    if not _embeds(cls):
        return tensors, {}, set()
    renamed, embeddings = {}, set()
    for key, value in tensors.items():
        module, _, tensor = key.rpartition(".")
        if tensor in _EMBEDDING_TENSORS:
            embeddings.add(module)
            key = f"{module}.{_EMBEDDING_TENSORS[tensor]}.weight"
        renamed[key] = value
    tables = {}
    for module in embeddings:
        table = renamed.pop(f"{module}.{_BASE_TABLE}.weight", None)
        if table is not None:
            tables[module] = table
    return renamed, tables, embeddings


def _match_tensors(tensors, architecture, directory, cls):
    """Groups PEFT tensors by KerasHub layer.

    Returns:
        `(module prefix, {keras layer path: (module, {tensor name: array})})`,
        the tensor names being `cls.peft_tensors` (`lora_A`, `lora_B`), and
        for an embedding whose file holds its base table, `"base_layer"`.
    """
    convert = _hf_to_keras(architecture)
    tensors, tables, _ = _embedding_keys(tensors, cls)
    tensor_key = _tensor_key(cls)
    unexpected, unsupported, prefixes, factors = [], [], set(), {}
    for key, value in tensors.items():
        match = tensor_key.fullmatch(key)
        if match is not None and match["suffix"] != _tensor_suffix(
            cls, match["factor"]
        ):
            match = None
        if match is None:
            unexpected.append(key)
            continue
        mapped = convert(match["module"])
        if mapped is None:
            unsupported.append(match["module"])
            continue
        prefix, layer_path = mapped
        prefixes.add(prefix)
        entry = factors.setdefault(layer_path, (match["module"], {}))
        entry[1][match["factor"]] = value
        table = tables.get(key.rsplit(".", 2)[0])
        if table is not None:
            entry[1][_BASE_TABLE] = table
    if unexpected:
        raise ValueError(
            f"{os.path.join(directory, WEIGHTS_FILE)!r} holds tensors that are not "
            "LoRA factors of linear or embedding layers (biases, DoRA "
            "magnitudes, DoRA on embeddings, modules_to_save?), which "
            "keras_adapters cannot import: "
            f"{sorted(unexpected)[:8]}."
        )
    if unsupported:
        raise ValueError(
            f"The PEFT adapter in {directory!r} adapts modules without a KerasHub "
            f"{architecture.name} counterpart: {sorted(set(unsupported))[:8]}. "
            f"Supported modules: {_target_names(architecture)}."
        )
    if not factors:
        raise ValueError(f"The PEFT adapter in {directory!r} holds no LoRA tensors.")
    if len(prefixes) > 1:
        raise ValueError(
            f"The PEFT adapter in {directory!r} mixes module prefixes "
            f"{sorted(prefixes)}; expected one Hugging Face model's names."
        )
    incomplete = [
        m
        for m, f in factors.values()
        if set(f) - {_BASE_TABLE} != set(cls.peft_tensors)
    ]
    if incomplete:
        raise ValueError(
            f"The PEFT adapter in {directory!r} lacks "
            f"{' or '.join(cls.peft_tensors)} for {sorted(incomplete)}."
        )
    return prefixes.pop(), factors


def _plan(root, architecture, factors, lora, config, directory):
    """`{keras layer path: {variable name: value}}` after checking every shape
    against `root` (`Adapter.from_peft_tensors`)."""
    layers = {
        targeting.relative_path(root.name, layer.path): layer
        for layer, _ in targeting.candidate_layers(root)
    }
    base_class = config.get("auto_mapping") or {}
    base_class = (
        base_class.get("base_model_class") if isinstance(base_class, dict) else None
    )
    problems = []
    if isinstance(base_class, str) and not base_class.startswith(
        architecture.hf_classes
    ):
        problems.append(
            f"the adapter was trained on a {base_class}, the model is "
            f"{architecture.name} ({type(root).__name__})"
        )
    plan = {}
    for layer_path, (module, found) in sorted(factors.items()):
        layer = layers.get(layer_path)
        if layer is None:
            problems.append(f"{module}: the model has no layer '{layer_path}'")
            continue
        try:
            kernel = adapter_layers.check_supported(layer)
            found = dict(found)
            _check_base_table(found.pop(_BASE_TABLE, None), kernel)
            layer_lora = lora.for_layer(layer_path)
            values = layer_lora.from_peft_tensors(found, kernel)
            layer_lora.validate(kernel)
        except ValueError as error:  # UnsupportedLayerError too
            problems.append(f"{module}: {error}")
            continue
        if kernel.transposable and not config.get("ensure_weight_tying"):
            warnings.warn(
                f"{module} is a tied embedding: the KerasHub layer "
                f"'{layer_path}' also projects the outputs onto the vocabulary "
                "with the same table, so here the adapter changes the logits "
                "too (as in PEFT's merged model), while PEFT's unmerged model "
                "(ensure_weight_tying=False) applies it to the lookup only.",
                stacklevel=3,
            )
        plan[layer_path] = values
    if problems:
        raise ValueError(
            f"The PEFT adapter in {directory!r} does not fit model '{root.name}' "
            f"({type(root).__name__}); was the model converted from the adapter's "
            f"base model ({config.get('base_model_name_or_path')!r})?\n  "
            + "\n  ".join(problems)
        )
    return plan


def _check_base_table(table, kernel):
    """Raises unless a saved base embedding table equals the model's."""
    if table is None:
        return
    own = np.asarray(ops.convert_to_numpy(kernel.dense()), "float32")
    if table.shape != own.shape or not np.allclose(
        table, own, rtol=0, atol=1e-6 * max(float(np.max(np.abs(own))), 1e-30)
    ):
        raise ValueError(
            f"the file holds a base embedding table ({_BASE_TABLE}.weight, "
            f"shape {table.shape}) that differs from the layer's {own.shape} "
            "table (a resized or trained embedding?); only adapters of the "
            "model's own table can be imported"
        )


# safetensors: parsed and checked by the package; the float dtypes a LoRA
# factor may have, as little-endian NumPy dtypes (BF16 is widened by hand).

_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}


def _read_safetensors(path):
    """`{name: float32 array}` from a safetensors file of finite float tensors."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        entries = safetensors.deserialize(data)
    except Exception as error:  # SafetensorError, and anything a bad file raises
        raise ValueError(
            f"{path!r} is not a valid safetensors file: {error}."
        ) from None
    tensors = {}
    for key, info in entries:
        dtype, shape, raw = info["dtype"], list(info["shape"]), info["data"]
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(
                f"Tensor {key!r} in {path!r} has dtype {dtype}; LoRA factors must "
                f"be floating point ({', '.join(_SAFETENSORS_DTYPES)})."
            )
        numpy_dtype = np.dtype(_SAFETENSORS_DTYPES[dtype])
        if len(raw) != math.prod(shape) * numpy_dtype.itemsize:
            raise ValueError(
                f"{path!r} is not a valid safetensors file: the data of {key!r} "
                "does not fit its shape."
            )
        array = np.frombuffer(raw, dtype=numpy_dtype)
        if dtype == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        array = array.astype(np.float32).reshape(shape)
        if not np.all(np.isfinite(array)):
            raise ValueError(
                f"Tensor {key!r} in {path!r} holds NaN or infinite values; an "
                "adapter's factors must be finite."
            )
        tensors[key] = array
    return tensors


# Writing a directory atomically.


def _check_output_directory(path, overwrite):
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"`path` must be a str or os.PathLike; received {path!r}.")
    if not isinstance(overwrite, bool):
        raise ValueError(f"`overwrite` must be a bool; received {overwrite!r}.")
    path = os.path.abspath(os.fspath(path))
    _io.recover_directory(path)  # a save killed mid-swap
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(f"{path!r} exists and is not a directory.")
        if os.listdir(path) and not overwrite:
            raise ValueError(
                f"{path!r} is a non-empty directory; pass overwrite=True to "
                "replace it (its whole content)."
            )
    return path
