"""A method defined here, in a test file, gets the whole shared matrix.

This is what adding a method to keras_adapters takes: one class on
`ka.Adapter`, registered, and (in the library) one export line. `IA3` below
scales each output of a projection by a learned factor, as (IA)^3 does for
keys, values and feed-forward outputs (Liu et al., "Few-Shot
Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", NeurIPS 2022): `W' = W diag(l)`, `l` initialised to ones.
`docs/writing_a_method.md` walks through it.
"""

from keras import ops
from matrix import SharedMatrix

import keras_adapters as ka


@ka.register_adapter
class IA3(ka.Adapter):
    """Per-output scaling: `x W' = (x W) * l`."""

    method = "ia3"
    variable_axes = {"ia3_scale": ("out",)}

    def get_config(self):
        return {}

    def num_parameters(self, kernel):
        return kernel.d_out

    def build(self, kernel, factory):
        factory("ia3_scale", (kernel.d_out,), "ones")

    def adapted_matrix(self, weights, matrix):
        return matrix * weights["ia3_scale"][None, :]

    def call(self, weights, kernel, inputs, training=None):
        outputs = kernel.project(inputs)
        scale = ops.cast(weights["ia3_scale"], outputs.dtype)
        return kernel.scale_outputs(outputs, scale)

    def reference_matrix(self, values, matrix):
        return matrix * values["ia3_scale"][None, :]


class TestIA3(SharedMatrix):
    methods = ("ia3",)
