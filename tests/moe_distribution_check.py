"""Stacked expert adapters on several JAX devices, run in a fresh process by
`tests/test_moe.py`.

Usage:

    KERAS_BACKEND=jax python tests/moe_distribution_check.py OUTPUT.json

With 4 virtual host devices on a ("batch", "model") mesh, Mixtral's expert
weights sharded over the experts (`("model", None, None)`): trains LoRA on
every expert weight on one device and under `ModelParallel`, merges, and
writes the losses, the adapter variables' shardings and the merge error to
OUTPUT.json; the assertions live in the test.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import xla_flags  # noqa: E402

xla_flags.add("--xla_force_host_platform_device_count=4", *xla_flags.FAST_COMPILE)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from cases import BATCH  # noqa: E402
from cases import MODELS  # noqa: E402

import keras_adapters as ka  # noqa: E402

CASE = MODELS["mixtral"]
EXPERT_WEIGHTS = r".*/experts/expert_feedforward_\w+_dense"


def train():
    model = CASE.build(0, dropout=0.0)
    ka.enable_adapter(model, ka.LoRA(rank=2, alpha=4), targets=ka.experts())
    model.compile(
        optimizer=keras.optimizers.Adam(3e-2), loss=CASE.loss, jit_compile=True
    )
    history = model.fit(CASE.x, CASE.y, batch_size=BATCH, epochs=4, verbose=0)
    return model, history.history["loss"]


def main(output):
    single, single_losses = train()
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((2, 2), ("batch", "model"), devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[EXPERT_WEIGHTS] = ("model", None, None)
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
    with distribution.scope():
        multi, multi_losses = train()
        layouts = {
            v.path: list(v.value.sharding.spec)
            + [None] * (len(v.shape) - len(v.value.sharding.spec))
            for v in ka.adapter_variables(multi)
        }
        before = np.asarray(multi(CASE.x, training=False))
        ka.merge_adapters(multi)
        after = np.asarray(multi(CASE.x, training=False))
    results = {
        "devices": len(devices),
        "single": single_losses,
        "multi": multi_losses,
        "layouts": layouts,
        "merged_difference": float(
            np.max(np.abs(after - before)) / np.max(np.abs(before))
        ),
    }
    with open(output, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
