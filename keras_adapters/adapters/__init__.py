"""Adapter methods, one file each, on the shared base in `base.py`."""

from keras_adapters.adapters.base import Adapter
from keras_adapters.adapters.base import register_adapter
from keras_adapters.adapters.lora import LoRA

__all__ = ["Adapter", "LoRA", "register_adapter"]
