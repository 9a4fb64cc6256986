"""Writes the Hugging Face PEFT fixtures under `tests/data/peft/`.

Run once, from a Python environment with torch, transformers, peft and
safetensors (not the Keras one), and commit the output:

    python tests/data/make_peft_fixtures.py
    python tests/data/make_peft_fixtures.py --dora   # only the DoRA fixtures
    python tests/data/make_peft_fixtures.py --embeddings  # only embed_tokens

A full run writes everything; `--dora` writes only the DoRA adapters
(`bert_dora/`, `gemma_dora/`) on the existing base checkpoints, their
PyTorch outputs (`outputs_dora.npz`) and versions (`versions_dora.json`),
and leaves every other file as it is.

It writes tiny, randomly initialized Hugging Face checkpoints (BERT, Llama,
Gemma) that KerasHub's `from_preset` converts, a PEFT LoRA adapter for each
(with random nonzero `lora_A` and `lora_B`, so the adapter changes the
outputs), the PyTorch outputs with and without each adapter for fixed token
ids and padding mask (`outputs.npz`), and the library versions
(`versions.json`). Everything is float32 and seeded, and the folder stays
well under 1 MB.
"""

import argparse
import json
import pathlib
import platform
import shutil

import numpy as np
import peft
import safetensors
import torch
import transformers

OUT = pathlib.Path(__file__).resolve().parent / "peft"
# Larger than the usual 0.02, so that attention is peaked and a wrong head
# layout in the query/key projections changes the outputs noticeably.
INIT_RANGE = 0.2
LORA_STD = 0.2
BATCH, LENGTH = 2, 8


def _inputs():
    rng = np.random.default_rng(0)
    token_ids = rng.integers(5, 100, size=(BATCH, LENGTH)).astype("int32")
    padding_mask = np.ones((BATCH, LENGTH), "int32")
    padding_mask[1, 5:] = 0  # Right padding on the second sequence.
    token_ids[padding_mask == 0] = 0
    return token_ids, padding_mask


def _randomize_lora(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                parameter.copy_(
                    torch.randn(parameter.shape, generator=generator) * LORA_STD
                )


def _randomize_dora(model, seed):
    """Random `lora_A`, `lora_B`, and magnitudes `m = ||W + s B A|| (1 + 0.2 z)`,
    so that `m / ||V||` is not one and the check sees the magnitude."""
    _randomize_lora(model, seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if "lora_magnitude_vector" in name:
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.mul_(1.0 + 0.2 * noise)


def _linear_modules(model):
    return sorted(
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    )


def _peft_model(base, **lora_kwargs):
    config = peft.LoraConfig(init_lora_weights=False, **lora_kwargs)
    model = peft.get_peft_model(base, config)
    model.eval()
    return model


def _save_adapter(model, directory, base_name):
    model.save_pretrained(directory)
    # PEFT also writes a model card; the fixture does not need it.
    (directory / "README.md").unlink()
    # PEFT records the base model's path as given; keep the fixture
    # independent of where it was generated.
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = f"tests/data/peft/{base_name}"
    # PEFT writes target_modules from a set; sort it so reruns are identical.
    if isinstance(config["target_modules"], list):
        config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def bert(token_ids, padding_mask, outputs, modules):
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=2,
        # KerasHub's BERT uses the tanh approximation of GELU; with the exact
        # GELU of real BERT checkpoints the conversion alone differs by ~1e-3,
        # which would hide small mapping errors.
        hidden_act="gelu_new",
        initializer_range=INIT_RANGE,
    )
    torch.manual_seed(0)
    base = transformers.BertModel(config).eval()
    modules["BertModel"] = _linear_modules(base)
    base_dir = OUT / "bert"
    base.save_pretrained(base_dir, safe_serialization=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [f"w{i}" for i in range(config.vocab_size - len(specials))]
    (base_dir / "vocab.txt").write_text("\n".join(specials + words) + "\n")
    (base_dir / "tokenizer_config.json").write_text(
        json.dumps({"do_lower_case": True, "tokenizer_class": "BertTokenizer"}) + "\n"
    )
    ids = torch.tensor(token_ids, dtype=torch.long)
    mask = torch.tensor(padding_mask, dtype=torch.long)

    def run(model):
        with torch.no_grad():
            result = model(input_ids=ids, attention_mask=mask)
        return (
            result.last_hidden_state.numpy(),
            result.pooler_output.numpy(),
        )

    outputs["bert/sequence_output"], outputs["bert/pooled_output"] = run(base)

    # 1. On BertModel: query and value, plain LoRA scaling.
    model = _peft_model(
        base,
        r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        target_modules=["query", "value"],
        task_type="FEATURE_EXTRACTION",
    )
    _randomize_lora(model, seed=1)
    outputs["bert_lora/sequence_output"], outputs["bert_lora/pooled_output"] = run(
        model
    )
    _save_adapter(model, OUT / "bert_lora", "bert")

    # 2. On BertForSequenceClassification (module names start with
    # `bert.`): key and every `dense` (attention output, intermediate,
    # output, pooler), rsLoRA scaling. No task type, so PEFT does not add
    # the classifier to `modules_to_save`.
    torch.manual_seed(0)
    classifier = transformers.BertForSequenceClassification.from_pretrained(
        base_dir, num_labels=2
    ).eval()
    modules["BertForSequenceClassification"] = _linear_modules(classifier)
    model = _peft_model(
        classifier,
        r=2,
        lora_alpha=3,
        use_rslora=True,
        target_modules=["key", "dense"],
    )
    _randomize_lora(model, seed=2)
    body = model.base_model.model.bert
    (
        outputs["bert_lora_all/sequence_output"],
        outputs["bert_lora_all/pooled_output"],
    ) = run(body)
    _save_adapter(model, OUT / "bert_lora_all", "bert")


def decoder(kind, token_ids, padding_mask, outputs, modules):
    if kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            initializer_range=INIT_RANGE,
        )
        cls = transformers.LlamaForCausalLM
    else:
        # head_dim (16) differs from hidden / heads (8), as in Gemma 7B, so
        # the query kernel (heads, hidden, head_dim) is not square per head.
        config = transformers.GemmaConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=64,
            rms_norm_eps=1e-6,
            hidden_activation="gelu_pytorch_tanh",
            initializer_range=INIT_RANGE,
        )
        cls = transformers.GemmaForCausalLM
    torch.manual_seed(0)
    base = cls(config).eval()
    modules[cls.__name__] = _linear_modules(base)
    if kind == "gemma":
        # Gemma's RMSNorm scales by (1 + weight) and initializes weight to 0;
        # random weights test that the conversion keeps the convention.
        with torch.no_grad():
            for name, parameter in base.named_parameters():
                if "norm" in name:
                    parameter.normal_(0.0, 0.2)
    base_dir = OUT / kind
    base.save_pretrained(base_dir, safe_serialization=True)
    ids = torch.tensor(token_ids, dtype=torch.long)
    mask = torch.tensor(padding_mask, dtype=torch.long)

    def run(body):
        # The decoder body (`LlamaModel`, `GemmaModel`): its last hidden
        # state comes after the final norm, like KerasHub's backbone output.
        with torch.no_grad():
            result = body(input_ids=ids, attention_mask=mask)
        return result.last_hidden_state.numpy()

    outputs[f"{kind}/sequence_output"] = run(base.model)
    model = _peft_model(
        base,
        r=4,
        lora_alpha=16,
        use_rslora=(kind == "llama"),
        lora_dropout=0.05,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        task_type="CAUSAL_LM",
    )
    _randomize_lora(model, seed=3)
    outputs[f"{kind}_lora/sequence_output"] = run(model.base_model.model.model)
    _save_adapter(model, OUT / f"{kind}_lora", kind)


README = """\
# PEFT interop fixtures

Written by `tests/data/make_peft_fixtures.py` (library versions in
`versions.json`); used by `tests/test_interop.py` and `docs/peft_interop.md`.
Do not edit by hand: change the script and run it again.

- `bert/`, `llama/`, `gemma/`: tiny random Hugging Face checkpoints
  (`config.json`, `model.safetensors`; BERT also `vocab.txt` and
  `tokenizer_config.json`) that KerasHub's `from_preset` converts.
- `bert_lora/`: PEFT LoRA on `BertModel`, `query` and `value`, r=4, alpha=8,
  dropout 0.1.
- `bert_lora_all/`: PEFT LoRA on `BertForSequenceClassification` (module
  names start with `bert.`), `key` and every `dense` (attention output,
  intermediate, output, pooler), r=2, alpha=3, rsLoRA.
- `llama_lora/`, `gemma_lora/`: PEFT LoRA on `*ForCausalLM`, all seven
  projections, r=4, alpha=16 (rsLoRA for Llama), dropout 0.05.
- `outputs.npz`: `token_ids` and `padding_mask` (2 x 8, right padding), and
  the PyTorch outputs `<fixture>/sequence_output` (and BERT's
  `pooled_output`) of each base model and each adapter.
- `linear_modules.json`: the names of every `torch.nn.Linear` of each
  Hugging Face class, to check what an exported `target_modules` selects.
- `bert_dora/`, `gemma_dora/` (`--dora`): PEFT DoRA (`use_dora=True`) on
  `BertModel` (`query`, `value`, `attention.output.dense`; r=4, alpha=8,
  dropout 0.1) and `GemmaForCausalLM` (the four attention projections; r=4,
  alpha=16, rsLoRA), with random factors and magnitudes;
  `outputs_dora.npz` holds their PyTorch outputs (same inputs as
  `outputs.npz`), `versions_dora.json` the library versions.
- `llama_embed_lora/`, `gemma_embed_lora/` (`--embeddings`): PEFT LoRA on
  `embed_tokens` (tensors `lora_embedding_A` `(r, vocab)` and
  `lora_embedding_B` `(hidden, r)`), `q_proj` and `v_proj` of the `llama`
  (untied) and `gemma` (tied) checkpoints, r=3, alpha=6, random factors;
  `outputs_embeddings.npz` holds the decoder bodies' outputs,
  `versions_embeddings.json` the library versions.
- `llama_embed_dora/` (`--embeddings`): the same targets on `llama` with PEFT
  DoRA (`use_dora=True`: `lora_magnitude_vector` `(hidden,)` for the table),
  random factors and magnitudes; its output is in `outputs_embeddings.npz`.
"""


def dora(token_ids, padding_mask):
    """DoRA adapters on the existing `bert` and `gemma` checkpoints."""
    outputs = {}
    ids = torch.tensor(token_ids, dtype=torch.long)
    mask = torch.tensor(padding_mask, dtype=torch.long)

    # 1. BertModel: query, value and the attention output (which has a bias,
    # that DoRA does not scale); dropout (inactive in eval mode).
    base = transformers.BertModel.from_pretrained(OUT / "bert").eval()
    torch.manual_seed(0)  # PEFT's initial factors, from which m starts
    model = _peft_model(
        base,
        r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        use_dora=True,
        target_modules=["query", "value", "attention.output.dense"],
        task_type="FEATURE_EXTRACTION",
    )
    _randomize_dora(model, seed=4)
    with torch.no_grad():
        result = model(input_ids=ids, attention_mask=mask)
    outputs["bert_dora/sequence_output"] = result.last_hidden_state.numpy()
    outputs["bert_dora/pooled_output"] = result.pooler_output.numpy()
    _save_adapter(model, OUT / "bert_dora", "bert")

    # 2. GemmaForCausalLM: the four attention projections (the query kernel
    # is (heads, hidden, head_dim) in KerasHub: a transposed 2-D view), rsLoRA.
    base = transformers.GemmaForCausalLM.from_pretrained(OUT / "gemma").eval()
    torch.manual_seed(0)
    model = _peft_model(
        base,
        r=4,
        lora_alpha=16,
        use_rslora=True,
        use_dora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        task_type="CAUSAL_LM",
    )
    _randomize_dora(model, seed=5)
    with torch.no_grad():
        result = model.base_model.model.model(input_ids=ids, attention_mask=mask)
    outputs["gemma_dora/sequence_output"] = result.last_hidden_state.numpy()
    _save_adapter(model, OUT / "gemma_dora", "gemma")
    return outputs


def _versions():
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "generated_by": "tests/data/make_peft_fixtures.py",
    }


def embeddings(token_ids, padding_mask):
    """LoRA on `embed_tokens` (and `q_proj`, `v_proj`) of the existing
    `llama` (untied) and `gemma` (tied: the output projection reuses the
    table) checkpoints: the decoder bodies' outputs, which the lookup feeds
    and the output projection does not touch."""
    outputs = {}
    ids = torch.tensor(token_ids, dtype=torch.long)
    mask = torch.tensor(padding_mask, dtype=torch.long)
    classes = {
        "llama": transformers.LlamaForCausalLM,
        "gemma": transformers.GemmaForCausalLM,
    }
    for kind, cls in classes.items():
        base = cls.from_pretrained(OUT / kind).eval()
        model = _peft_model(
            base,
            r=3,
            lora_alpha=6,
            target_modules=["embed_tokens", "q_proj", "v_proj"],
            task_type="CAUSAL_LM",
        )
        # PEFT names the embedding's factors lora_embedding_A/B.
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, parameter in sorted(model.named_parameters()):
                if "lora_" in name:
                    parameter.copy_(
                        torch.randn(parameter.shape, generator=generator) * LORA_STD
                    )
        with torch.no_grad():
            body = model.base_model.model.model
            result = body(input_ids=ids, attention_mask=mask)
        outputs[f"{kind}_embed_lora/sequence_output"] = result.last_hidden_state.numpy()
        _save_adapter(model, OUT / f"{kind}_embed_lora", kind)
    # DoRA on the untied Llama's `embed_tokens` (and q/v): random factors and
    # magnitudes (`lora_magnitude_vector` `(hidden,)`, the table's norms over
    # the vocabulary per hidden unit, times noise).
    base = classes["llama"].from_pretrained(OUT / "llama").eval()
    model = _peft_model(
        base,
        r=3,
        lora_alpha=6,
        use_dora=True,
        target_modules=["embed_tokens", "q_proj", "v_proj"],
        task_type="CAUSAL_LM",
    )
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if "lora_embedding_" in name or "lora_A" in name or "lora_B" in name:
                parameter.copy_(
                    torch.randn(parameter.shape, generator=generator) * LORA_STD
                )
            elif "lora_magnitude_vector" in name:
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.mul_(1.0 + 0.2 * noise)
        body = model.base_model.model.model
        result = body(input_ids=ids, attention_mask=mask)
    outputs["llama_embed_dora/sequence_output"] = result.last_hidden_state.numpy()
    _save_adapter(model, OUT / "llama_embed_dora", "llama")
    return outputs


def main_embeddings():
    """Writes only the embedding fixtures; the others stay as they are."""
    torch.set_num_threads(1)
    stored = np.load(OUT / "outputs.npz")
    token_ids, padding_mask = stored["token_ids"], stored["padding_mask"]
    for name in ("llama_embed_lora", "gemma_embed_lora", "llama_embed_dora"):
        if (OUT / name).exists():
            shutil.rmtree(OUT / name)
    outputs = embeddings(token_ids, padding_mask)
    np.savez_compressed(OUT / "outputs_embeddings.npz", **outputs)
    versions = {**_versions(), "generated_by": "make_peft_fixtures.py --embeddings"}
    (OUT / "versions_embeddings.json").write_text(json.dumps(versions, indent=2) + "\n")
    for path in sorted(OUT.rglob("*embed*")):
        if path.is_file():
            print(f"{path.relative_to(OUT)}: {path.stat().st_size:,} bytes")


def main_dora():
    """Writes only the DoRA fixtures; the others stay as they are."""
    torch.set_num_threads(1)
    stored = np.load(OUT / "outputs.npz")
    token_ids, padding_mask = stored["token_ids"], stored["padding_mask"]
    for name in ("bert_dora", "gemma_dora"):
        if (OUT / name).exists():
            shutil.rmtree(OUT / name)
    outputs = dora(token_ids, padding_mask)
    np.savez_compressed(OUT / "outputs_dora.npz", **outputs)
    versions = {**_versions(), "generated_by": "make_peft_fixtures.py --dora"}
    (OUT / "versions_dora.json").write_text(json.dumps(versions, indent=2) + "\n")
    (OUT / "README.md").write_text(README)
    for path in sorted(OUT.rglob("*dora*")):
        if path.is_file():
            print(f"{path.relative_to(OUT)}: {path.stat().st_size:,} bytes")


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    torch.set_num_threads(1)
    token_ids, padding_mask = _inputs()
    outputs = {"token_ids": token_ids, "padding_mask": padding_mask}
    # The names of every torch.nn.Linear of each Hugging Face model, to check
    # that an exported `target_modules` selects exactly the adapted ones.
    modules = {}
    bert(token_ids, padding_mask, outputs, modules)
    decoder("llama", token_ids, padding_mask, outputs, modules)
    decoder("gemma", token_ids, padding_mask, outputs, modules)
    (OUT / "linear_modules.json").write_text(json.dumps(modules, indent=1) + "\n")
    np.savez_compressed(OUT / "outputs.npz", **outputs)
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "generated_by": "tests/data/make_peft_fixtures.py",
    }
    (OUT / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    (OUT / "README.md").write_text(README)
    main_dora()
    main_embeddings()
    for path in sorted(OUT.rglob("*")):
        if path.is_file():
            print(f"{path.relative_to(OUT)}: {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dora", action="store_true", help="write only the DoRA fixtures"
    )
    parser.add_argument(
        "--embeddings",
        action="store_true",
        help="write only the embed_tokens LoRA fixtures",
    )
    arguments = parser.parse_args()
    if arguments.dora:
        main_dora()
    elif arguments.embeddings:
        main_embeddings()
    else:
        main()
