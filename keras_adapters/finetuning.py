"""Full (non-adapter) fine-tuning of chosen attention projections.

`attention_full(model, roles=("query", "value"))` makes the kernels (and, by
default, the biases) of those projections trainable, plus a KerasHub Task's
own head, and freezes every other weight: the "Full FT (QV)" setting of the
attention paper (Yao et al., IJCAI 2025, Table 2). Combine it with
`ka.optimizers.attention_lr` for eta_V = lambda * eta_Q.
"""

import dataclasses
import math

from keras_adapters import _keras_internals as internals
from keras_adapters import _validation
from keras_adapters import model as adapter_model
from keras_adapters import targeting
from keras_adapters._tables import format_table
from keras_adapters.roles import check_roles


@dataclasses.dataclass
class FineTuningReport:
    """What `attention_full` made trainable. `print(report)` shows a table.

    Attributes:
        roles: the attention roles fine-tuned.
        trainable: `[(variable path, shape, params, why)]` for every
            trainable variable, `why` being its role or `"head"` /
            `"keep_trainable"`.
        trainable_params: trainable parameters of the model.
        total_params: all parameters of the model.
    """

    roles: tuple
    trainable: list
    trainable_params: int
    total_params: int

    @property
    def trainable_paths(self):
        return [row[0] for row in self.trainable]

    def __str__(self):
        header = ("variable", "shape", "params", "why")
        rows = [
            (path, "x".join(map(str, shape)), f"{params:,}", why)
            for path, shape, params, why in self.trainable
        ]
        out = [f"Full fine-tuning of attention{self.roles}"]
        out += format_table(header, rows)
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        out.append(
            f"trainable {self.trainable_params:,} of {self.total_params:,} "
            f"parameters ({share:.2f}%)"
        )
        return "\n".join(out)


def attention_full(
    model,
    roles=("query", "value"),
    *,
    train_bias: bool = True,
    keep_trainable=None,
) -> FineTuningReport:
    """Fine-tunes the attention projections of `roles` in full; freezes the rest.

    Trainable afterwards: the kernel of every attention projection with one
    of `roles` (`ka.attention(*roles)` selects them, on every architecture it
    supports), its bias when `train_bias` (and the projection has one), a
    KerasHub Task's own weights (its head, e.g. `logits`), and the weights
    of the `keep_trainable` layers. Every other weight of the model is
    frozen. Non-trainable state (normalization statistics) stays as it is.

    The attention paper's "Full FT (QV)" trains `W_q` and `W_v` with their
    biases and the classifier: its 21.85M parameters for QKV on
    RoBERTa-base are 12 x 3 x (768 x 768 + 768) plus the 592k of the
    classification head, so the default `train_bias=True` reproduces it.

    Use `ka.optimizers.attention_lr(optimizer, value_ratio=...)` to give the
    value kernels a larger learning rate. Compile the model after calling
    this function.

    Args:
        model: a built Keras model, a KerasHub `Backbone`, or a KerasHub
            `Task` (its backbone's attention is fine-tuned and its head stays
            trainable). It must not have adapters.
        roles: attention roles to fine-tune, from `"query"`, `"key"`,
            `"value"`, `"attention_output"`.
        train_bias: bool; whether the projections' biases are trained too.
        keep_trainable: layers whose weights also stay trainable: a layer
            name, a regex that fullmatches `layer.path`, a callable
            `layer -> bool`, or a list of these (the forms `enable_adapter`
            takes as `targets`).

    Returns:
        A `FineTuningReport` listing every trainable variable.

    Raises:
        ValueError: on a bad argument, a model with adapters, or no layer
            with one of `roles` (the message lists the candidate layers).

    Example:

    ```python
    report = ka.attention_full(classifier, roles=("query", "value"))
    print(report)
    classifier.compile(
        optimizer=ka.optimizers.attention_lr(
            keras.optimizers.AdamW(1e-5), value_ratio=4
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    ```
    """
    adapter_model.check_model(model)
    roles = check_roles(roles)
    train_bias = _validation.check_bool("train_bias", train_bias)
    if adapter_model.adapted_layers(model):
        raise ValueError(
            f"Model '{model.name}' has adapters; attention_full is full "
            "fine-tuning. Call ka.merge_adapters(model) first, or train the "
            "adapters instead."
        )
    root = adapter_model.adapted_root(model)
    hits = targeting.resolve_targets(root, targeting.attention(*roles))
    kept = (
        []
        if keep_trainable is None
        else [layer for layer, _ in targeting.resolve_targets(model, keep_trainable)]
    )

    why = {}
    for layer, parent in hits:
        role = targeting.attention_role(layer, parent)
        kernel = getattr(layer, "_kernel", None)
        if kernel is None:
            raise ValueError(
                f"Layer '{layer.path}' has attention role {role!r} but is a "
                f"{type(layer).__name__} without a kernel; attention_full "
                "fine-tunes Dense and EinsumDense projections."
            )
        why[id(kernel)] = role
        if train_bias and getattr(layer, "bias", None) is not None:
            why[id(layer.bias)] = role
    if root is not model:
        root_ids = {id(v) for v in root.weights}
        for v in model.weights:
            if id(v) not in root_ids:
                why.setdefault(id(v), "head")
    for layer in kept:
        for v in layer.weights:
            why.setdefault(id(v), "keep_trainable")

    # Per variable, as enable_adapter freezes (see model.freeze_all_but).
    adapter_model.freeze_all_but(model, set(why))
    internals.reset_compiled_functions(model)

    trainable = [
        (v.path, tuple(v.shape), math.prod(v.shape), why[id(v)])
        for v in model.trainable_weights
    ]
    return FineTuningReport(
        roles=roles,
        trainable=trainable,
        trainable_params=sum(row[2] for row in trainable),
        total_params=sum(math.prod(v.shape) for v in model.weights),
    )
