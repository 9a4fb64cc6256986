"""Small models for the tests, data they learn, and which layers to adapt.

The adapter methods come from the registry (`ADAPTER_METHODS`, each with its
`example()`); `matrix.py` runs every shared invariant for them on these
models, under whichever Keras backend the session uses.
"""

import dataclasses
from collections.abc import Callable

import keras
import keras_hub
import numpy as np

import keras_adapters as ka

SEQ = 8
VOCAB = 64
BATCH = 16


@dataclasses.dataclass
class ModelCase:
    """A small model, data it learns, and which layers to adapt."""

    # (seed, **backbone_kwargs) -> model with random weights; KerasHub cases
    # pass the keyword arguments to the backbone (`dropout=0.0`, say).
    build: Callable
    x: object
    y: np.ndarray
    targets: object
    loss: object
    # A KerasHub Task adapts its backbone; a plain model keeps these trainable.
    keep_trainable: object = None
    # Full-batch training steps that show a clear loss decrease.
    epochs: int = 20
    # A layer kind the targets must reach: the matrix runs the case only for
    # the methods that adapt it (`Adapter.layer_kinds`).
    requires_kind: str | None = None
    # The methods the matrix runs this case for (None: every method), for a
    # case whose layer kinds other cases already cover for the rest.
    methods: tuple | None = None


def _token_data(seed=0):
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(1, VOCAB, (BATCH, SEQ)).astype("int32")
    padding_mask = np.ones((BATCH, SEQ), "int32")
    padding_mask[: BATCH // 2, SEQ - 2 :] = 0
    return token_ids, padding_mask


def _bert(seed, **backbone_kwargs):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCAB,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=SEQ,
        **backbone_kwargs,
    )
    return keras_hub.models.BertTextClassifier(
        backbone=backbone, num_classes=3, preprocessor=None, dropout=0.0
    )


def _gpt2(seed, **backbone_kwargs):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=SEQ,
        **backbone_kwargs,
    )
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def _gemma(seed, **backbone_kwargs):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=VOCAB,
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
        **backbone_kwargs,
    )
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


def _llama(seed, **backbone_kwargs):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=VOCAB,
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        **backbone_kwargs,
    )
    return keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)


def _mixtral(seed, **backbone_kwargs):
    """A tiny KerasHub Mixtral: one decoder layer whose sparse MoE block
    keeps 4 experts as stacked kernels (top 2 per token)."""
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.MixtralBackbone(
        vocabulary_size=VOCAB,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=16,
        num_experts=4,
        top_k=2,
        **backbone_kwargs,
    )
    return keras_hub.models.MixtralCausalLM(backbone=backbone, preprocessor=None)


def _functional(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4, 8), name="features")
    x = keras.layers.EinsumDense(
        "abc,cde->abde", output_shape=(4, 2, 6), bias_axes="de", name="proj"
    )(inputs)
    x = keras.layers.Reshape((4, 12), name="merge_heads")(x)
    x = keras.layers.Dense(16, activation="relu", name="hidden")(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    return keras.Model(inputs, outputs, name="functional_model")


@keras.saving.register_keras_serializable(package="keras_adapters_tests")
class SubclassedModel(keras.Model):
    """A subclassed model with its own config, to test plain Keras models."""

    def __init__(self, width=16, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.encoder = keras.layers.Dense(width, activation="gelu", name="encoder")
        self.mixer = keras.layers.Dense(width, name="mixer")
        self.head = keras.layers.Dense(3, name="head")

    def call(self, inputs):
        return self.head(self.mixer(self.encoder(inputs)) + inputs[..., :1])

    def get_config(self):
        return {**super().get_config(), "width": self.width}


def _subclassed(seed):
    keras.utils.set_random_seed(seed)
    model = SubclassedModel(name="subclassed_model")
    model(np.zeros((1, 12), "float32"))
    return model


def _vit(seed, **backbone_kwargs):
    """A tiny KerasHub ViT classifier: a Conv2D patch embedding, an
    `Embedding` of positions and Keras `MultiHeadAttention` blocks."""
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(8, 8, 3),
        patch_size=4,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        mlp_dim=16,
        **backbone_kwargs,
    )
    return keras_hub.models.ViTImageClassifier(
        backbone=backbone, num_classes=3, preprocessor=None
    )


def _resnet(seed):
    """A tiny KerasHub ResNet classifier (one bottleneck block): 1 x 1 and
    3 x 3 `Conv2D` layers between frozen `BatchNormalization` layers, a
    projection shortcut, global pooling and a Dense head."""
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[16],
        input_conv_kernel_sizes=[3],
        # KerasHub requires 64 filters in the first stack.
        stackwise_num_filters=[64],
        stackwise_num_blocks=[1],
        stackwise_num_strides=[1],
        block_type="bottleneck_block",
        image_shape=(8, 8, 3),
    )
    return keras_hub.models.ResNetImageClassifier(
        backbone=backbone, num_classes=3, preprocessor=None
    )


def _tied_lm(seed):
    """A functional language model with a tied KerasHub `ReversibleEmbedding`
    (the lookup and, with `reverse=True`, the output projection) and a
    causal `Conv1D` mixing positions."""
    keras.utils.set_random_seed(seed)
    token_ids = keras.Input((SEQ,), dtype="int32", name="token_ids")
    # Unit-scale rows, so that the base logits are far from uniform and
    # multiplicative methods (HUT, the orthogonal ones) have signal too.
    embedding = keras_hub.layers.ReversibleEmbedding(
        VOCAB,
        8,
        logit_soft_cap=30.0,
        embeddings_initializer=keras.initializers.RandomNormal(stddev=1.0),
        name="token_embedding",
    )
    x = embedding(token_ids)
    x = keras.layers.Conv1D(8, 3, padding="causal", activation="gelu", name="mixer")(x)
    logits = embedding(x, reverse=True)
    return keras.Model(token_ids, logits, name="tied_lm")


def _causal_lm_case(build):
    # One sequence repeated: a task the adapters can learn in a few steps.
    token_ids, padding_mask = _token_data()
    token_ids = np.tile(token_ids[:1], (BATCH, 1))
    x = {"token_ids": token_ids, "padding_mask": padding_mask}
    return ModelCase(
        build=build,
        x=x,
        y=np.roll(token_ids, -1, axis=1),
        # All four projections: enough capacity for every method to learn
        # the sequence in a few steps.
        targets=ka.attention(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def _model_cases():
    token_ids, padding_mask = _token_data()
    rng = np.random.default_rng(1)
    sparse_ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return {
        "bert": ModelCase(
            build=_bert,
            x={
                "token_ids": token_ids,
                "segment_ids": np.zeros_like(token_ids),
                "padding_mask": padding_mask,
            },
            y=rng.integers(0, 3, (BATCH,)),
            targets=ka.attention("query", "value"),
            loss=sparse_ce,
        ),
        "gpt2": _causal_lm_case(_gpt2),
        "gemma": _causal_lm_case(_gemma),
        "llama": _causal_lm_case(_llama),
        # Every expert weight (gate, up, down) of the MoE block, nothing else.
        "mixtral": dataclasses.replace(
            _causal_lm_case(_mixtral), targets=ka.experts(), requires_kind="experts"
        ),
        "vit": ModelCase(
            build=_vit,
            x=rng.normal(size=(BATCH, 8, 8, 3)).astype("float32"),
            y=rng.integers(0, 3, (BATCH,)),
            # Every layer kind ViT has: convolution, embedding, EinsumDense.
            targets=[
                "patch_embedding",
                "position_embedding",
                ka.attention("query", "value"),
            ],
            loss=sparse_ce,
        ),
        "resnet": ModelCase(
            build=_resnet,
            x=rng.normal(size=(BATCH, 8, 8, 3)).astype("float32"),
            y=rng.integers(0, 3, (BATCH,)),
            # Every convolution: the stem's 3 x 3, the block's 1 x 1 and 3 x 3
            # convolutions and its shortcut.
            targets=r".*conv1_conv|.*_block\d+_\d_conv",
            loss=sparse_ce,
            # PEFT's convolution methods; the others' Conv2D path runs on ViT's
            # patch embedding (a ResNet case costs each method about 25 s).
            methods=("lora", "dora"),
        ),
        "tied_lm": ModelCase(
            build=_tied_lm,
            x=np.tile(token_ids[:1], (BATCH, 1)),
            y=np.roll(np.tile(token_ids[:1], (BATCH, 1)), -1, axis=1),
            targets=["token_embedding", "mixer"],
            loss=sparse_ce,
        ),
        "functional": ModelCase(
            build=_functional,
            x=rng.normal(size=(BATCH, 4, 8)).astype("float32"),
            y=rng.integers(0, 3, (BATCH,)),
            targets=["proj", "hidden"],
            loss=sparse_ce,
            keep_trainable="head",
        ),
        "subclassed": ModelCase(
            build=_subclassed,
            x=rng.normal(size=(BATCH, 12)).astype("float32"),
            y=rng.integers(0, 3, (BATCH,)),
            targets=r".*/(encoder|mixer)",
            loss=sparse_ce,
            keep_trainable="head",
        ),
    }


MODELS = _model_cases()


_QUANTIZED = {}


def quantized_bert(mode="int8", config=None, rebuilt=True):
    """A fresh `"bert"` classifier (seed 0 weights), backbone quantized.

    Args:
        mode: `"int8"` or `"int4"`.
        config: a `keras.quantizers.QuantizationConfig`, or `None` for
            Keras' default (W8A8 for int8).
        rebuilt: quantize once per process and `(mode, config)`, then rebuild
            each model from that one's config with its weights, as `.keras`
            loading does (quantized policies in a `DTypePolicyMap`, no
            quantization config). A rebuilt model keeps an int4 block size
            but not an int8 config's activation quantizer: pass `False` to
            quantize directly.
    """
    if not rebuilt:
        model = MODELS["bert"].build(0)
        model.backbone.quantize(mode, config=config)
        return model
    key = (mode, id(config))
    if key not in _QUANTIZED:
        _QUANTIZED[key] = quantized_bert(mode, config, rebuilt=False)
    base = _QUANTIZED[key]
    model = type(base).from_config(base.get_config())
    model.set_weights(base.get_weights())
    return model


def predict(model, x):
    """The model's inference outputs for one batch `x`, as NumPy.

    Eager TensorFlow runs these tiny models in a fraction of the time it takes
    to trace a `predict` function (which every adapter change resets); under
    JAX, `predict`'s compiled function is the faster of the two.
    """
    if keras.backend.backend() == "tensorflow":
        return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))
    return np.asarray(model.predict(x, verbose=0, batch_size=BATCH))


def layer_inputs(view, rng):
    """Inputs a layer with this kernel view accepts: token ids for an
    embedding, images of twice the kernel size for a convolution, else
    `input_shape(view)` normal floats."""
    if view.kind == "embedding":
        return rng.integers(0, view.d_in, (2, 3)).astype("int32")
    if view.kind == "conv":
        window = tuple(2 * d for d in view.kernel_shape[:-2])
        shape = (2,) + window + (view.kernel_shape[-2],)
        return rng.normal(size=shape).astype("float32")
    return rng.normal(size=input_shape(view)).astype("float32")


def input_shape(view):
    """An input shape a layer with this kernel view accepts (batch axes 2, 3)."""
    if view.equation is None:
        return (2, 3, view.d_in)
    inputs, rest = view.equation.split("->")[0].split(",")
    sizes = dict(zip(rest, view.kernel_shape, strict=True))
    return tuple(sizes.get(c, 2 + i % 2) for i, c in enumerate(inputs))


def max_relative_difference(a, b):
    a, b = np.asarray(a, "float64"), np.asarray(b, "float64")
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))
