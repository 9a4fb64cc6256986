"""Argument checks shared by every public entry point.

Each check raises `ValueError` with a message that names the argument, what
it accepts and the value received, and returns the value in a plain Python
form (NumPy scalars become `int`/`float`/`bool`). Numbers must be finite:
NaN and infinities are refused everywhere.
"""

import math
import numbers

import keras
import numpy as np


def _received(name, allowed, value):
    return ValueError(f"`{name}` must be {allowed}; received {value!r}.")


def check_number(
    name: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    integer: bool = False,
    allowed: str | None = None,
):
    """Returns `value` as a finite `int` (if `integer`) or `float` in range.

    Python and NumPy integers and floats are accepted; `bool`, NaN, infinities
    and values outside `[low, high]` (bounds exclusive as asked) are not.

    Args:
        name: the argument's name, for the message.
        value: the value to check.
        low, high: optional bounds.
        low_inclusive, high_inclusive: whether the bounds are allowed.
        integer: require an integer (an integral float is refused too).
        allowed: how the message describes the accepted values; derived from
            the other arguments by default.

    Returns:
        `int(value)` for an integer, `float(value)` otherwise.

    Raises:
        ValueError: naming `name`, the accepted values and `value`.

    Example:

    >>> check_number("rank", np.int64(8), low=1, integer=True)
    8
    """
    if allowed is None:
        allowed = _describe(low, high, low_inclusive, high_inclusive, integer)
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, kind):
        raise _received(name, allowed, value)
    # Integers stay integers (a config keeps `alpha=16` as written).
    value = int(value) if isinstance(value, numbers.Integral) else float(value)
    if not math.isfinite(value):
        raise _received(name, allowed, value)
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise _received(name, allowed, value)
    if high is not None and (value > high or (value == high and not high_inclusive)):
        raise _received(name, allowed, value)
    return value


def _describe(low, high, low_inclusive, high_inclusive, integer):
    kind = "an int" if integer else "a finite number"
    if low is None and high is None:
        return kind
    if high is None:
        if low == 0 and not low_inclusive:
            return "a positive int" if integer else "a finite number > 0"
        return f"{kind} {'>=' if low_inclusive else '>'} {low}"
    if low is None:
        return f"{kind} {'<=' if high_inclusive else '<'} {high}"
    left = "[" if low_inclusive else "("
    right = "]" if high_inclusive else ")"
    return f"{kind} in {left}{low}, {high}{right}"


def check_positive_int(name: str, value) -> int:
    """`check_number(name, value, low=1, integer=True)`: "a positive int"."""
    return check_number(name, value, low=1, integer=True, allowed="a positive int")


def check_optional_number(name: str, value, **kwargs):
    """`None`, or `check_number(name, value, **kwargs)`."""
    return None if value is None else check_number(name, value, **kwargs)


def check_bool(name: str, value) -> bool:
    """Returns `value` as a `bool`; Python and NumPy booleans only."""
    if not isinstance(value, (bool, np.bool_)):
        raise _received(name, "a bool (True or False)", value)
    return bool(value)


def check_choice(name: str, value, choices):
    """Returns `value` if it is one of `choices`."""
    choices = tuple(choices)
    if not isinstance(value, (str, type(None), int)) or value not in choices:
        raise _received(name, f"one of {choices!r}", value)
    return value


def check_name(name: str, value) -> str:
    """Returns `value` if it is a non-empty Python identifier string.

    Adapter names become parts of variable names (`lora_a.<name>`), so they
    follow identifier rules.
    """
    if not isinstance(value, str) or not value.isidentifier():
        raise _received(name, "a non-empty identifier string such as 'news'", value)
    return value


def check_finite_array(name: str, value) -> np.ndarray:
    """Returns `value` as a NumPy array of finite numbers."""
    array = np.asarray(value)
    if array.dtype.kind not in "iuf" or not np.all(np.isfinite(array)):
        raise ValueError(
            f"`{name}` must be an array of finite numbers; received an array of "
            f"dtype {array.dtype} with shape {array.shape}"
            + (" containing NaN or inf." if array.dtype.kind == "f" else ".")
        )
    return array


def check_model(model):
    """Raises unless `model` is a built `keras.Model`."""
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"Expected a Keras model, received {type(model).__name__}: {model!r}."
        )
    if not model.built:
        raise ValueError(
            f"Model '{model.name}' is not built; call it on data or call build() first."
        )
