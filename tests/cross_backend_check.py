"""Loads files written under one Keras backend into models on this one.

Run by `test_cross_backend.py` in a subprocess with the other backend:
`KERAS_BACKEND=... python cross_backend_check.py DIR [--import MODULE ...]`
(the modules register adapter methods defined outside the library). `DIR`
holds, per case,
`<case>.base.weights.h5` (Keras weights of the base model), `<case>.adapter.h5`
(the adapter file), `<case>.keras` (the adapted model) and `<case>.npz`
(inputs and expected outputs). Exits non-zero on any mismatch.
"""

import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from cases import MODELS  # noqa: E402
from cases import max_relative_difference  # noqa: E402
from cases import predict  # noqa: E402

import keras_adapters as ka  # noqa: E402


def main(directory):
    failures = []
    names = sorted(
        f[: -len(".npz")] for f in os.listdir(directory) if f.endswith(".npz")
    )
    for name in names:
        model_id = name.split("-")[1]
        data = np.load(os.path.join(directory, f"{name}.npz"))
        case = MODELS[model_id]
        model = case.build(3)
        model.load_weights(os.path.join(directory, f"{name}.base.weights.h5"))
        ka.load_adapter_weights(model, os.path.join(directory, f"{name}.adapter.h5"))
        from_file = max_relative_difference(predict(model, case.x), data["outputs"])
        loaded = keras.saving.load_model(os.path.join(directory, f"{name}.keras"))
        from_keras = max_relative_difference(predict(loaded, case.x), data["outputs"])
        print(f"{name}: adapter file {from_file:.2e}, .keras {from_keras:.2e}")
        if not (from_file <= 1e-5 and from_keras <= 1e-5):
            failures.append(name)
    if not names or failures:
        print(f"FAILED: {failures or 'no cases found'}")
        return 1
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--import", dest="modules", action="append", default=[])
    args = parser.parse_args()
    for module in args.modules:
        importlib.import_module(module)
    sys.exit(main(args.directory))
