"""Linear probing then fine-tuning (LP-FT), with head-norm tracking.

Tomihari & Sato (NeurIPS 2024) explain LP-FT with the neural tangent kernel:
linear probing (training only the linear head on frozen features, with the
cross-entropy loss) grows the head's norm, and a large, already accurate head
makes the fine-tuning stage change the logits a lot while changing the
features little. The same holds with LoRA in the second stage (LP-LoRA).

- `linear_probe(model, train_data)` fits the head as an L2-regularised
  multinomial logistic regression on features computed once by the frozen
  model (the paper uses scikit-learn's `LogisticRegressionCV`; here a small
  head model is trained full-batch with `model.fit`), and copies it into the
  model's head.
- `lp_ft(model, train_data, finetune="full" | ka.LoRA(...))` runs both stages
  with `model.fit` and returns both histories.
- `HeadNormCallback` logs the head's Frobenius norm (`logs["head_norm"]`) and
  how far the head's input features moved from where they started on a fixed
  probe batch (`logs["feature_change"]`), every epoch, into `History`.
"""

import dataclasses

import keras
import numpy as np
from keras import ops

from keras_adapters import _validation
from keras_adapters import model as adapter_model
from keras_adapters.adapters.base import Adapter
from keras_adapters.workflows import heads


def _to_numpy(value):
    return np.asarray(ops.convert_to_numpy(value))


def head_norm(model, head=None) -> float:
    """The Frobenius norm of the linear head's kernel, `||V||_F`.

    Args:
        model: a built Keras model or KerasHub `Task`.
        head: the head (see `find_head`).

    Returns:
        A Python float.

    Example:

    ```python
    ka.workflows.head_norm(classifier)
    ```
    """
    layer = heads.find_head(model, head)
    return float(np.linalg.norm(_to_numpy(layer.kernel).astype("float64")))


def _feature_change(features, initial):
    """`||Phi - Phi_0||_F / sqrt(n)`: the RMS per-example feature change."""
    delta = np.asarray(features, "float64") - np.asarray(initial, "float64")
    delta = delta.reshape(delta.shape[0], -1)
    return float(np.sqrt(np.mean(np.sum(delta * delta, axis=1))))


class HeadNormCallback(keras.callbacks.Callback):
    """Logs the linear head's norm and the change of its input features.

    At the end of every epoch it adds to the epoch's logs (and so to the
    `History` returned by `fit`):

    - `"head_norm"`: the Frobenius norm `||V||_F` of the head's kernel;
    - `"feature_change"` (when `probe` is given): the root-mean-square, over
      the probe examples, of `||phi(x) - phi_0(x)||_2`, where `phi` are the
      head's input features now and `phi_0` those at the start of training
      (computed in inference mode, so dropout is off).

    These are the two quantities Tomihari & Sato track (their Tables 12-13):
    LP grows the head norm, and a large head norm makes the fine-tuning stage
    change the features less. The paper does not state its feature-change
    normalization; compare ratios between methods, not absolute values.

    Args:
        head: the head: a `Dense` layer, its name, or `None` for the layer
            computing the model's output (see `find_head`).
        probe: optional model inputs (a batch: array, or dict of arrays, as
            the model takes them) on which feature change is measured.
        feature_model: optional model from the inputs to the head's input
            features; by default built from the trained model's graph.

    Attributes:
        initial_head_norm: the head norm when training started.
        initial_features: `phi_0` on the probe batch (NumPy), or None.

    Example:

    ```python
    history = classifier.fit(
        x, y, epochs=3,
        callbacks=[ka.workflows.HeadNormCallback(probe=probe_x)],
    )
    history.history["head_norm"], history.history["feature_change"]
    ```
    """

    def __init__(self, head=None, probe=None, feature_model=None):
        super().__init__()
        if head is not None and not isinstance(head, (str, keras.layers.Layer)):
            raise ValueError(
                "`head` must be None, a layer name (str) or a Dense layer; "
                f"received {head!r}."
            )
        if feature_model is not None and not isinstance(feature_model, keras.Model):
            raise ValueError(
                f"`feature_model` must be a Keras model; received {feature_model!r}."
            )
        if feature_model is not None and probe is None:
            raise ValueError("`feature_model` is only used with a `probe` batch.")
        self.head = head
        self.probe = probe
        self.feature_model = feature_model
        self.initial_head_norm = None
        self.initial_features = None
        self._layer = None
        self._features = None

    def _compute_features(self):
        return _to_numpy(self._features(self.probe, training=False))

    def on_train_begin(self, logs=None):
        self._layer = heads.find_head(self.model, self.head)
        self.initial_head_norm = self._norm()
        if self.probe is not None:
            self._features = self.feature_model or heads.feature_extractor(
                self.model, self._layer
            )
            self.initial_features = self._compute_features()

    def _norm(self):
        kernel = _to_numpy(self._layer.kernel).astype("float64")
        return float(np.linalg.norm(kernel))

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        logs["head_norm"] = self._norm()
        if self.probe is not None:
            logs["feature_change"] = _feature_change(
                self._compute_features(), self.initial_features
            )


def _is_dataset(data):
    module = type(data).__module__ or ""
    return module.startswith("tensorflow") and hasattr(data, "element_spec")


def _num_examples(x):
    if isinstance(x, (dict, list, tuple)):
        items = x.items() if isinstance(x, dict) else enumerate(x)
        lengths = {name: len(value) for name, value in items}
        if not lengths:
            raise ValueError("The inputs `x` are an empty structure.")
        if len(set(lengths.values())) != 1:
            raise ValueError(f"The arrays of `x` differ in length: {lengths}.")
        return next(iter(lengths.values()))
    return len(x)


def _take(x, count):
    if isinstance(x, dict):
        return {name: value[:count] for name, value in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(value[:count] for value in x)
    return x[:count]


def _check_train_data(train_data, name="train_data"):
    """`("arrays", x, y)` or `("dataset", dataset, None)`."""
    if _is_dataset(train_data):
        return "dataset", train_data, None
    if not isinstance(train_data, (tuple, list)) or len(train_data) != 2:
        raise ValueError(
            f"`{name}` must be a tuple `(x, y)` of inputs and integer labels, or "
            f"a tf.data.Dataset of `(x, y)` batches; received {type(train_data)}."
        )
    x, y = train_data
    if x is None or y is None:
        raise ValueError(f"`{name}` must be `(x, y)` with labels; received None.")
    num = _num_examples(x)
    y = _to_numpy(y)
    if y.shape != (num,):
        raise ValueError(
            f"The labels of `{name}` must have shape ({num},) (one integer class "
            f"id per example); received shape {y.shape}."
        )
    if num == 0:
        raise ValueError(f"`{name}` has no examples.")
    return "arrays", x, y


def _check_labels(y, num_classes):
    y = np.asarray(y)
    if y.dtype.kind == "f" and np.all(y == np.round(y)):
        y = y.astype("int64")
    if y.dtype.kind not in "iu":
        raise ValueError(f"Labels must be integer class ids; got dtype {y.dtype}.")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"Labels must be class ids in [0, {num_classes}) (the head has "
            f"{num_classes} units); received values from {y.min()} to {y.max()}."
        )
    return y.astype("int32")


def _features_and_labels(extractor, train_data, batch_size, name="train_data"):
    kind, x, y = _check_train_data(train_data, name)
    if kind == "arrays":
        features = extractor.predict(x, batch_size=batch_size, verbose=0)
        return np.asarray(features), y
    features, labels = [], []
    # NumPy batches: a JAX model cannot take TensorFlow tensors.
    for batch in train_data.as_numpy_iterator():
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(
                f"`{name}` must yield `(x, y)` batches; received an element "
                f"of type {type(batch).__name__}."
            )
        features.append(np.asarray(extractor.predict_on_batch(batch[0])))
        labels.append(_to_numpy(batch[1]).reshape(-1))
    if not features:
        raise ValueError(f"`{name}` is an empty dataset.")
    return np.concatenate(features), np.concatenate(labels)


def linear_probe(
    model,
    train_data,
    *,
    head=None,
    l2=None,
    validation_data=None,
    epochs: int = 100,
    steps_per_epoch: int | None = None,
    learning_rate: float = 0.05,
    tolerance: float = 1e-6,
    patience: int = 3,
    batch_size: int = 64,
    verbose=0,
):
    """Fits the linear head on frozen features (stage 1 of LP-FT), in place.

    The head's input features are computed once, in inference mode, for the
    whole training set. The head is then fitted as a multinomial logistic
    regression with an L2 penalty on its kernel (not its bias): a fresh
    `Dense` layer, started at zero, trained full-batch with Adam and
    `model.fit` (`steps_per_epoch` full-batch steps per epoch) until the
    epoch's mean loss improves by less than `tolerance` for `patience` epochs
    (or `epochs` run out). Being convex, the problem has one
    solution, so the result does not depend on the head's random
    initialization. The fitted kernel and bias are copied into the head; no
    other weight of `model` changes.

    `l2 = 1 / (2 C n)` corresponds to scikit-learn's
    `LogisticRegression(C=C)` on `n` examples; the default `None` is
    scikit-learn's `C = 1`. The paper picks `C` by cross-validation
    (`LogisticRegressionCV`); here a sequence of `l2` values with
    `validation_data` picks the one whose head has the lowest validation
    cross-entropy.

    Args:
        model: a built functional model or KerasHub `Task` (with
            `preprocessor=None`) whose head computes logits.
        train_data: `(x, y)` with integer labels `y`, or a `tf.data.Dataset`
            of `(x, y)` batches (iterated once).
        head: the head (see `find_head`).
        l2: float >= 0, the penalty `l2 * ||V||_F^2` added to the mean
            cross-entropy; `None` for `1 / (2 n)`; or a sequence of such
            floats to choose from on `validation_data`.
        validation_data: `(x, y)` or a dataset, as `train_data`; needed when
            `l2` is a sequence.
        epochs: int >= 1, the maximum number of epochs.
        steps_per_epoch: int >= 1, full-batch steps per epoch: the features
            are held in memory this many times, so that one epoch runs its
            steps without returning to Python. `None`: 20, or fewer to keep
            the copies under 64 MB.
        learning_rate: float > 0, Adam's learning rate.
        tolerance: float >= 0, the loss improvement that counts as progress.
        patience: int >= 1, epochs without progress before stopping.
        batch_size: int >= 1, the batch size used to compute the features.
        verbose: passed to `fit`.

    Returns:
        The `History` of the chosen head's fit: `loss` (with the penalty),
        `accuracy` and `head_norm` per epoch. Also `history.l2`, the `l2`
        used; `history.l2_scores`, `{l2: validation loss}` when choosing; and
        with validation data `history.validation`, the fitted head's
        validation `{"loss", "accuracy"}` (cross-entropy, no penalty).

    Raises:
        ValueError: on bad arguments or labels, or a head that cannot be
            found.

    Example:

    ```python
    history = ka.workflows.linear_probe(
        classifier, (train_x, train_y),
        l2=(1e-4, 1e-3, 1e-2), validation_data=(val_x, val_y),
    )
    history.l2, history.history["head_norm"][-1]
    ```
    """
    layer = _check_probe_model(model, head)
    candidates = _check_l2(l2)
    if len(candidates) > 1 and validation_data is None:
        raise ValueError("Choosing among several `l2` values needs `validation_data`.")
    epochs = _validation.check_number("epochs", epochs, low=1, integer=True)
    if steps_per_epoch is not None:
        steps_per_epoch = _validation.check_number(
            "steps_per_epoch", steps_per_epoch, low=1, integer=True
        )
    learning_rate = _validation.check_number(
        "learning_rate", learning_rate, low=0, low_inclusive=False
    )
    tolerance = _validation.check_number("tolerance", tolerance, low=0)
    patience = _validation.check_number("patience", patience, low=1, integer=True)
    batch_size = _validation.check_number("batch_size", batch_size, low=1, integer=True)
    extractor = heads.feature_extractor(model, layer)
    num_classes = layer.kernel.shape[-1]

    def features_of(data, name):
        features, labels = _features_and_labels(extractor, data, batch_size, name)
        features = features.reshape(len(features), -1).astype("float32")
        if features.shape[1] != layer.kernel.shape[0]:
            raise ValueError(
                f"The head '{layer.name}' takes {layer.kernel.shape[0]} features "
                f"but its input has {features.shape[1]}; linear probing needs a "
                "head applied to a (batch, features) tensor."
            )
        return features, _check_labels(labels, num_classes)

    features, labels = features_of(train_data, "train_data")
    validation = None
    if validation_data is not None:
        validation = features_of(validation_data, "validation_data")
    candidates = [1.0 / (2.0 * len(features)) if c is None else c for c in candidates]
    if steps_per_epoch is None:
        steps_per_epoch = int(min(20, max(1, 2**26 // max(features.nbytes, 1))))

    best, scores = None, {}
    for l2_value in candidates:
        probe_head, history = _fit_head(
            features,
            labels,
            validation,
            l2_value,
            num_classes=num_classes,
            use_bias=layer.bias is not None,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            learning_rate=learning_rate,
            tolerance=tolerance,
            patience=patience,
            verbose=verbose,
        )
        if len(candidates) > 1:
            scores[l2_value] = history.validation["loss"]
            if best is not None and scores[l2_value] >= scores[best[0]]:
                continue
        best = (l2_value, probe_head, history)
    l2_value, probe_head, history = best
    layer.kernel.assign(ops.cast(probe_head.kernel, layer.kernel.dtype))
    if layer.bias is not None:
        layer.bias.assign(ops.cast(probe_head.bias, layer.bias.dtype))
    history.l2 = l2_value
    history.l2_scores = scores
    history.validation = getattr(history, "validation", None)
    return history


def _check_l2(l2):
    values = list(l2) if isinstance(l2, (list, tuple)) else [l2]
    if not values:
        raise ValueError("`l2` is an empty sequence.")
    for value in values:
        if value is not None:
            _validation.check_number("l2", value, low=0)
    return [None if v is None else float(v) for v in values]


def _fit_head(
    features,
    labels,
    validation,
    l2,
    *,
    num_classes,
    use_bias,
    epochs,
    steps_per_epoch,
    learning_rate,
    tolerance,
    patience,
    verbose,
):
    """A zero-initialised `Dense` head fitted full-batch on fixed features."""
    probe_head = keras.layers.Dense(
        num_classes,
        use_bias=use_bias,
        kernel_initializer="zeros",
        bias_initializer="zeros",
        kernel_regularizer=keras.regularizers.L2(l2) if l2 > 0 else None,
        dtype="float32",
        name="linear_probe",
    )
    head_model = keras.Sequential(
        [keras.Input((features.shape[1],)), probe_head], name="linear_probe"
    )
    head_model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile="auto",
        steps_per_execution=steps_per_epoch,
    )
    # Every batch is the whole training set.
    history = head_model.fit(
        np.tile(features, (steps_per_epoch, 1)),
        np.tile(labels, steps_per_epoch),
        batch_size=len(features),
        epochs=epochs,
        shuffle=False,
        verbose=verbose,
        callbacks=[
            HeadNormCallback(probe_head),
            keras.callbacks.EarlyStopping(
                monitor="loss", min_delta=tolerance, patience=patience
            ),
        ],
    )
    if validation is not None:
        # The validation loss of the final head (without the L2 penalty).
        logits = head_model.predict(validation[0], batch_size=4096, verbose=0)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        value = float(ops.convert_to_numpy(loss(validation[1], logits)))
        accuracy = float(np.mean(np.argmax(logits, axis=-1) == validation[1]))
        history.validation = {"loss": value, "accuracy": accuracy}
    return probe_head, history


def _shuffled_dataset(x, y, batch_size, seed):
    import tensorflow as tf

    return (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
    )


def _check_probe_model(model, head):
    layer = heads.find_head(model, head)
    if getattr(model, "preprocessor", None) is not None:
        raise ValueError(
            f"Model '{model.name}' has a preprocessor; LP-FT computes the head's "
            "features from the model's own inputs. Build the Task with "
            "`preprocessor=None` and pass preprocessed inputs (e.g. tokenize "
            "once with the preprocessor)."
        )
    return layer


@dataclasses.dataclass
class LPFTResult:
    """What `lp_ft` did.

    Attributes:
        head: the path of the linear head.
        lp_history: the `History` of the linear probe (stage 1), or None.
        ft_history: the `History` of fine-tuning (stage 2), or None.
        adapter_report: the `AdapterReport` when stage 2 trained an adapter.
        lp_l2: the L2 strength used by the linear probe, or None.
        lp_head_weights: `[kernel, bias]` (NumPy) of the head after the
            linear probe (`[kernel]` without bias), or None.
        head_norm_initial: the head norm before stage 1.
        head_norm_after_lp: the head norm after stage 1 (None without it).
        head_norm_final: the head norm at the end.
    """

    head: str
    lp_history: object
    ft_history: object
    adapter_report: object
    lp_l2: float | None
    lp_head_weights: list | None
    head_norm_initial: float
    head_norm_after_lp: float | None
    head_norm_final: float

    def __str__(self):
        lines = [f"LP-FT on head '{self.head}'"]
        lines.append(f"  head norm: initial {self.head_norm_initial:.3f}")
        if self.lp_history is not None:
            loss = self.lp_history.history["loss"][-1]
            lines.append(
                f"  linear probe: {len(self.lp_history.epoch)} epochs, l2 "
                f"{self.lp_l2:.2e}, loss {loss:.4f}, head norm "
                f"{self.head_norm_after_lp:.3f}"
            )
        if self.ft_history is not None:
            logs = self.ft_history.history
            line = f"  fine-tuning: {len(self.ft_history.epoch)} epochs"
            if "loss" in logs:
                line += f", loss {logs['loss'][-1]:.4f}"
            if "feature_change" in logs:
                line += f", feature change {logs['feature_change'][-1]:.3f}"
            lines.append(line + f", head norm {self.head_norm_final:.3f}")
        return "\n".join(lines)


def lp_ft(
    model,
    train_data,
    *,
    finetune="full",
    head=None,
    targets=None,
    probe_first: bool = True,
    epochs: int = 1,
    batch_size: int = 32,
    optimizer=None,
    loss=None,
    metrics=None,
    validation_data=None,
    callbacks=None,
    jit_compile=True,
    probe=None,
    probe_size: int = 64,
    lp_l2=None,
    lp_epochs: int = 100,
    lp_learning_rate: float = 0.05,
    seed: int | None = None,
    verbose=0,
) -> LPFTResult:
    """Linear probing, then fine-tuning from the probed head (LP-FT, LP-LoRA).

    Stage 1 (`probe_first=True`) is `linear_probe`: the head is fitted on
    frozen features and copied into the model. Stage 2 fine-tunes the model
    with `model.fit`, starting from that head:

    - `finetune="full"`: every trainable weight of the model;
    - `finetune=ka.LoRA(rank=8)` (any adapter): the adapter on `targets`
      (default `ka.attention("query", "value")`, as in the paper) plus the
      head, via `ka.enable_adapter`; the adapter stays on the model
      afterwards (`ka.merge_adapters` folds it in);
    - `finetune=None`: no stage 2 (linear probing alone, "LP").

    With `probe_first=False` stage 1 is skipped, which gives the FT and LoRA
    baselines with the same tracking. Stage 2 logs `head_norm` and
    `feature_change` (on `probe`) per epoch, see `HeadNormCallback`.

    Args:
        model: a built functional Keras model or KerasHub `Task` (e.g.
            `BertTextClassifier(..., preprocessor=None)`) whose output is
            logits computed by a `Dense` head. It must not have adapters.
        train_data: `(x, y)` with integer labels `y`, or a `tf.data.Dataset`
            of `(x, y)` batches (used as is in stage 2: batch and shuffle it
            yourself).
        finetune: `"full"`, an adapter configuration, or None.
        head: the head: a `Dense` layer, its name, or None for the layer that
            computes the model's output (a KerasHub classifier's `logits`).
        targets: where the adapter goes (see `ka.enable_adapter`); only with
            an adapter.
        probe_first: bool; whether to run stage 1.
        epochs: int >= 1, stage-2 epochs.
        batch_size: int >= 1, stage-2 batch size (array inputs).
        optimizer: stage-2 optimizer; default Adam with learning rate 1e-5
            for `"full"` and 5e-4 for an adapter (the paper's ranges).
        loss: stage-2 loss; default sparse categorical cross-entropy on
            logits.
        metrics: stage-2 metrics; default `["accuracy"]`.
        validation_data: `(x, y)`; chooses `lp_l2` among several in stage 1,
            and is passed to the stage-2 `fit`.
        callbacks: extra stage-2 callbacks.
        jit_compile: passed to `compile` for stage 2.
        probe: inputs on which `feature_change` is measured; default the
            first `probe_size` training examples (array inputs only).
        probe_size: int >= 0; 0 disables feature-change tracking.
        lp_l2: `l2` of `linear_probe`: a float, None, or a sequence to choose
            from on `validation_data`.
        lp_epochs: `epochs` of `linear_probe`.
        lp_learning_rate: `learning_rate` of `linear_probe`.
        seed: optional int >= 0, the seed of the stage-2 shuffling of array
            inputs for a KerasHub `Task` (whose `fit` does not shuffle
            arrays; other models shuffle with `fit(shuffle=True)`).
        verbose: passed to both `fit` calls.

    Returns:
        An `LPFTResult` with both histories and the head norms.

    Raises:
        ValueError: on a bad argument, a model with adapters or a
            preprocessor, labels out of range, or a head that cannot be
            found.

    Example:

    ```python
    result = ka.workflows.lp_ft(
        classifier, (train_x, train_y),
        finetune=ka.LoRA(rank=8, alpha=8), epochs=3,
    )
    print(result)
    result.ft_history.history["feature_change"]
    ```

    Reference:
        Tomihari & Sato, "Understanding Linear Probing then Fine-tuning
        Language Models from NTK Perspective", NeurIPS 2024; Kumar et al.,
        "Fine-Tuning can Distort Pretrained Features and Underperform
        Out-of-Distribution", ICLR 2022.
    """
    layer = _check_probe_model(model, head)
    if not (finetune is None or finetune == "full" or isinstance(finetune, Adapter)):
        raise ValueError(
            "`finetune` must be 'full', an adapter configuration such as "
            f"ka.LoRA(rank=8), or None; received {finetune!r}."
        )
    if targets is not None and not isinstance(finetune, Adapter):
        raise ValueError("`targets` is only used when `finetune` is an adapter.")
    if not isinstance(probe_first, bool):
        raise ValueError(f"`probe_first` must be a bool; received {probe_first!r}.")
    if finetune is None and not probe_first:
        raise ValueError("`finetune=None` with `probe_first=False` does nothing.")
    epochs = _validation.check_number("epochs", epochs, low=1, integer=True)
    batch_size = _validation.check_number("batch_size", batch_size, low=1, integer=True)
    probe_size = _validation.check_number("probe_size", probe_size, low=0, integer=True)
    if seed is not None:
        seed = _validation.check_number("seed", seed, low=0, integer=True)
    if callbacks is not None and not isinstance(callbacks, (list, tuple)):
        raise ValueError(f"`callbacks` must be a list; received {callbacks!r}.")
    if adapter_model.adapted_layers(model):
        raise ValueError(
            f"Model '{model.name}' already has adapters; merge them first with "
            "ka.merge_adapters(model)."
        )
    kind, x, y = _check_train_data(train_data)
    num_classes = layer.kernel.shape[-1]
    if kind == "arrays":
        y = _check_labels(y, num_classes)
    if probe is None and probe_size and kind == "arrays":
        probe = _take(x, min(probe_size, _num_examples(x)))
    activation = keras.activations.serialize(layer.activation)
    if (
        finetune is not None
        and loss is None
        and activation not in ("linear", "softmax")
    ):
        raise ValueError(
            f"The head '{layer.name}' has activation {activation!r}; pass a "
            "`loss` that fits it (the default is cross-entropy on logits)."
        )

    initial_norm = head_norm(model, layer)
    lp_history, after_lp, l2, lp_weights = None, None, None, None
    if probe_first:
        lp_history = linear_probe(
            model,
            train_data if kind == "dataset" else (x, y),
            head=layer,
            l2=lp_l2,
            validation_data=validation_data,
            epochs=lp_epochs,
            learning_rate=lp_learning_rate,
            verbose=verbose,
        )
        l2, after_lp = lp_history.l2, head_norm(model, layer)
        lp_weights = [_to_numpy(w).copy() for w in layer.weights]

    ft_history, report = None, None
    if finetune is not None:
        if isinstance(finetune, Adapter):
            report = adapter_model.enable_adapter(
                model,
                finetune,
                targets=targets,
                keep_trainable=lambda candidate: candidate is layer,
            )
            default_rate = 5e-4
        else:
            model.trainable = True
            default_rate = 1e-5
        if loss is None:
            loss = keras.losses.SparseCategoricalCrossentropy(
                from_logits=activation != "softmax"
            )
        model.compile(
            optimizer=optimizer or keras.optimizers.Adam(default_rate),
            loss=loss,
            metrics=["accuracy"] if metrics is None else metrics,
            jit_compile=jit_compile,
        )
        tracker = HeadNormCallback(layer, probe=probe)
        fit_callbacks = [tracker, *(callbacks or [])]
        if kind == "arrays" and not adapter_model.is_task(model):
            ft_history = model.fit(
                x,
                y,
                batch_size=batch_size,
                epochs=epochs,
                shuffle=True,
                validation_data=validation_data,
                callbacks=fit_callbacks,
                verbose=verbose,
            )
        else:
            if kind == "arrays":
                # KerasHub Tasks turn arrays into an unshuffled tf.data
                # pipeline, so the shuffling is done here.
                train_data = _shuffled_dataset(x, y, batch_size, seed)
            ft_history = model.fit(
                train_data,
                epochs=epochs,
                shuffle=False,  # The dataset shuffles itself (or not).
                validation_data=validation_data,
                callbacks=fit_callbacks,
                verbose=verbose,
            )
    return LPFTResult(
        head=layer.path,
        lp_history=lp_history,
        ft_history=ft_history,
        adapter_report=report,
        lp_l2=l2,
        lp_head_weights=lp_weights,
        head_norm_initial=initial_norm,
        head_norm_after_lp=after_lp,
        head_norm_final=head_norm(model, layer),
    )
