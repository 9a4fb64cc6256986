"""keras_adapters: parameter-efficient fine-tuning for Keras 3 and KerasHub.

Importing the package also gives every KerasHub `Backbone` and `Task` the
methods `enable_adapter`, `merge_adapters`, `save_adapter_weights`,
`load_adapter_weights`, `set_active_adapters`, `disable_adapters`,
`delete_adapter` and `combine_adapters`, and the properties `adapter_names`
and `active_adapters` (never replacing a KerasHub attribute of the same
name).
"""

from keras_adapters import calibration
from keras_adapters import distribution
from keras_adapters import interop
from keras_adapters import optimizers
from keras_adapters import quantization
from keras_adapters import workflows
from keras_adapters.adaptable import AdaptableLayers
from keras_adapters.adaptable import adaptable_layers
from keras_adapters.adapters import GOFT
from keras_adapters.adapters import HUT
from keras_adapters.adapters import QGOFT
from keras_adapters.adapters import Adapter
from keras_adapters.adapters import DoRA
from keras_adapters.adapters import LoRA
from keras_adapters.adapters import SoftOrthogonality
from keras_adapters.adapters import register_adapter
from keras_adapters.export import ExportReport
from keras_adapters.export import ExportVerificationError
from keras_adapters.export import export_saved_model
from keras_adapters.finetuning import FineTuningReport
from keras_adapters.finetuning import attention_full
from keras_adapters.merge import merge_adapters
from keras_adapters.model import AdapterReport
from keras_adapters.model import active_adapters
from keras_adapters.model import adapted_layers
from keras_adapters.model import adapter_names
from keras_adapters.model import adapter_variables
from keras_adapters.model import combine_adapters
from keras_adapters.model import delete_adapter
from keras_adapters.model import disable_adapters
from keras_adapters.model import enable_adapter
from keras_adapters.model import set_active_adapters
from keras_adapters.optimizers import role
from keras_adapters.per_example import PerExampleModel
from keras_adapters.per_example import per_example_adapters
from keras_adapters.saving import load_adapter_weights
from keras_adapters.saving import read_adapter_spec
from keras_adapters.saving import save_adapter_weights
from keras_adapters.targeting import attention
from keras_adapters.targeting import experts
from keras_adapters.targeting import mlp

__version__ = "0.1.0"

__all__ = [
    "AdaptableLayers",
    "Adapter",
    "AdapterReport",
    "DoRA",
    "FineTuningReport",
    "PerExampleModel",
    "ExportReport",
    "ExportVerificationError",
    "GOFT",
    "HUT",
    "LoRA",
    "QGOFT",
    "SoftOrthogonality",
    "active_adapters",
    "adaptable_layers",
    "adapted_layers",
    "adapter_names",
    "adapter_variables",
    "attention",
    "attention_full",
    "calibration",
    "combine_adapters",
    "delete_adapter",
    "disable_adapters",
    "distribution",
    "enable_adapter",
    "experts",
    "export_saved_model",
    "interop",
    "load_adapter_weights",
    "merge_adapters",
    "mlp",
    "optimizers",
    "per_example_adapters",
    "quantization",
    "read_adapter_spec",
    "register_adapter",
    "role",
    "save_adapter_weights",
    "set_active_adapters",
    "workflows",
]

_MODEL_METHODS = {
    "enable_adapter": enable_adapter,
    "merge_adapters": merge_adapters,
    "save_adapter_weights": save_adapter_weights,
    "load_adapter_weights": load_adapter_weights,
    "set_active_adapters": set_active_adapters,
    "disable_adapters": disable_adapters,
    "delete_adapter": delete_adapter,
    "combine_adapters": combine_adapters,
    "adapter_names": property(adapter_names, doc=adapter_names.__doc__),
    "active_adapters": property(active_adapters, doc=active_adapters.__doc__),
}


def _install_keras_hub_methods():
    try:
        import keras_hub
    except ImportError:
        return
    for cls in (keras_hub.models.Backbone, keras_hub.models.Task):
        for name, function in _MODEL_METHODS.items():
            if not hasattr(cls, name):
                setattr(cls, name, function)


_install_keras_hub_methods()
