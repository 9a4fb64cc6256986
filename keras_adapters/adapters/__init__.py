"""Adapter methods, one file each, on the shared base in `base.py`."""

from keras_adapters.adapters.base import Adapter
from keras_adapters.adapters.base import register_adapter
from keras_adapters.adapters.dora import DoRA
from keras_adapters.adapters.hut import HUT
from keras_adapters.adapters.lora import LoRA
from keras_adapters.adapters.qgoft import GOFT
from keras_adapters.adapters.qgoft import QGOFT
from keras_adapters.adapters.qgoft import SoftOrthogonality

__all__ = [
    "Adapter",
    "DoRA",
    "GOFT",
    "HUT",
    "LoRA",
    "QGOFT",
    "SoftOrthogonality",
    "register_adapter",
]
