"""Finding a classifier's linear head and the features that feed it.

The LP-FT workflow, the head-norm callback and temperature merging all need
the same two things from a model: its linear head (the `Dense` layer that
computes the logits) and the head's input features as a function of the
model's inputs. For a KerasHub `Task` such as `BertTextClassifier` the head
is the layer named `logits` and the features are the pooled output after the
(inference-time identity) dropout; for a plain functional model they are
found the same way, from the functional graph.
"""

import keras

from keras_adapters import _keras_internals as internals
from keras_adapters import layers as adapter_layers
from keras_adapters.model import check_model


def _output_layer(model):
    """The layer whose output is the model's single output, or None."""
    try:
        outputs = model.outputs
    except AttributeError:
        return None
    if not outputs or len(outputs) != 1:
        return None
    for layer in reversed(model.layers):
        try:
            output = layer.output
        except (AttributeError, ValueError):
            continue
        if output is outputs[0]:
            return layer
    return None


def find_head(model, head=None):
    """Returns the linear head of a classifier: the `Dense` layer giving logits.

    Args:
        model: a built Keras model or KerasHub `Task`.
        head: the head: a `Dense` layer of `model`, its name, or `None` to
            use the layer that computes the model's (single) output, e.g. a
            `BertTextClassifier`'s `logits` layer.

    Returns:
        The `keras.layers.Dense` layer.

    Raises:
        ValueError: if `model` is not a built Keras model, `head` names no
            layer (or several), or the head is not a `Dense` layer with a
            2-D kernel.

    Example:

    ```python
    head = ka.workflows.find_head(classifier)  # BertTextClassifier
    head.name  # "logits"
    ```
    """
    check_model(model)
    everything = [layer for layer, _ in internals.layers_with_parents(model)]
    if head is None:
        layer = _output_layer(model)
        if layer is None:
            raise ValueError(
                f"Cannot tell the head of model '{model.name}': it is not a "
                "functional model with a single output computed by one layer. "
                "Pass `head=` the name of the Dense layer that computes the "
                "logits."
            )
    elif isinstance(head, str):
        hits = [layer for layer in everything if layer.name == head]
        if len(hits) != 1:
            names = sorted(
                layer.name
                for layer in everything
                if isinstance(layer, keras.layers.Dense)
            )
            found = "no layer" if not hits else f"{len(hits)} layers"
            raise ValueError(
                f"`head`={head!r} names {found} of model '{model.name}'; give the "
                f"name of exactly one Dense layer. Dense layers: {names}."
            )
        layer = hits[0]
    elif isinstance(head, keras.layers.Layer):
        if all(layer is not head for layer in everything):
            raise ValueError(
                f"`head` layer '{head.name}' is not a layer of model '{model.name}'."
            )
        layer = head
    else:
        raise ValueError(
            "`head` must be None, a layer name (str) or a Dense layer of the "
            f"model; received {head!r}."
        )
    if not isinstance(layer, keras.layers.Dense) or len(layer.kernel.shape) != 2:
        raise ValueError(
            f"The head '{layer.name}' of model '{model.name}' is a "
            f"{type(layer).__name__}; a linear head must be a keras.layers.Dense "
            "layer with a 2-D kernel. Pass `head=` the name of the Dense layer "
            "that computes the logits."
        )
    if adapter_layers.is_adapted(layer):
        raise ValueError(
            f"The head '{layer.path}' carries an adapter; merge it first with "
            "ka.merge_adapters(model)."
        )
    return layer


def feature_extractor(model, head=None):
    """A model mapping `model`'s inputs to the input features of its head.

    The returned functional model shares its layers (and weights) with
    `model`, so it always computes the current features, adapters included.
    Call it (or its `predict`) in inference mode: dropout before the head is
    then the identity.

    Args:
        model: a built functional Keras model or KerasHub `Task`.
        head: the head, as for `find_head`.

    Returns:
        A `keras.Model` from `model.input` to the head's input.

    Raises:
        ValueError: if the head cannot be found, the model is not functional,
            or the head is called more than once in the model.

    Example:

    ```python
    features = ka.workflows.feature_extractor(classifier)
    pooled = features.predict(token_dicts)  # (batch, hidden_dim)
    ```
    """
    layer = find_head(model, head)
    try:
        inputs = model.input
    except (AttributeError, ValueError):
        # A Sequential model has `inputs` but no `input`.
        inputs = getattr(model, "inputs", None)
        if isinstance(inputs, list) and len(inputs) == 1:
            inputs = inputs[0]
    if inputs is None:
        raise ValueError(
            f"Model '{model.name}' ({type(model).__name__}) has no functional "
            "graph, so the input features of its head cannot be extracted. Use a "
            "functional model or a KerasHub Task."
        )
    try:
        head_input = layer.input
    except (AttributeError, ValueError) as error:
        raise ValueError(
            f"Cannot find the input of head '{layer.name}' in model "
            f"'{model.name}': {error}"
        ) from None
    try:
        return keras.Model(inputs, head_input, name=f"{model.name}_features")
    except ValueError as error:
        raise ValueError(
            f"The input of head '{layer.name}' is not computed from the inputs of "
            f"model '{model.name}': {error}"
        ) from None
