"""A file written under one backend loads under the other (DESIGN 4.6)."""

import os
import subprocess
import sys

import keras
import numpy as np
from cases import ADAPTERS
from cases import MODELS
from cases import predict

import keras_adapters as ka

CROSS_MODELS = ("bert", "gemma")


def test_files_load_under_the_other_backend(tmp_path):
    for adapter_id in ADAPTERS:
        for model_id in CROSS_MODELS:
            name = f"{adapter_id}-{model_id}"
            case = MODELS[model_id]
            model = case.build(0)
            model.save_weights(str(tmp_path / f"{name}.base.weights.h5"))
            ka.enable_adapter(model, ADAPTERS[adapter_id](), targets=case.targets)
            # Move the adapters away from their identity initialization.
            rng = np.random.default_rng(0)
            for variable in ka.adapter_variables(model):
                noise = rng.normal(scale=0.1, size=variable.shape)
                variable.assign(keras.ops.convert_to_numpy(variable) + noise)
            ka.save_adapter_weights(model, str(tmp_path / f"{name}.adapter.h5"))
            model.save(str(tmp_path / f"{name}.keras"))
            np.savez(tmp_path / f"{name}.npz", outputs=predict(model, case.x))
    other = "tensorflow" if keras.backend.backend() == "jax" else "jax"
    script = os.path.join(os.path.dirname(__file__), "cross_backend_check.py")
    result = subprocess.run(
        [sys.executable, script, str(tmp_path)],
        env={**os.environ, "KERAS_BACKEND": other},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.count("adapter file") == len(ADAPTERS) * len(CROSS_MODELS)
