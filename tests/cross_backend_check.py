"""Adapter files and `.keras` files across Keras backends, both directions.

`matrix.CrossBackendMatrix` runs this under TensorFlow from the JAX test
session, so one TensorFlow start-up covers both directions:

    KERAS_BACKEND=tensorflow python cross_backend_check.py \
        --check JAX_DIR --write TF_DIR --methods lora,hut [--import MODULE ...]

`--check` loads the files JAX wrote into TensorFlow models; `--write` writes
the same cases under TensorFlow for the test to load into JAX models. A
directory holds, per case `<method>-<model>`: `.base.weights.h5` (Keras
weights of the base model), `.adapter.h5` (the adapter file), `.keras` (the
adapted model) and `.npz` (the expected outputs). The `--import` modules
register methods defined outside the library. Exits non-zero on a mismatch.
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
from keras_adapters.adapters.base import ADAPTER_METHODS  # noqa: E402
from keras_adapters.kernels import adapts_kind  # noqa: E402

# Gemma's EinsumDense projections (3-D kernels); ViT's Conv2D, Embedding and
# attention; the tied ReversibleEmbedding and causal Conv1D of "tied_lm";
# Mixtral's stacked experts (for the methods that adapt them). (BERT's
# projections are EinsumDense layers like Gemma's: the file format does not
# depend on the equation, and each case costs a model build, a `.keras` round
# trip and a compiled predict on both backends.)
MODEL_IDS = ("gemma", "vit", "tied_lm", "mixtral")


def cases(methods):
    """`[(method, model id)]`: a model whose case needs a layer kind runs for
    the methods that adapt it (Mixtral's experts)."""
    return [
        (method, model_id)
        for method in methods
        for model_id in MODEL_IDS
        if MODELS[model_id].requires_kind is None
        or adapts_kind(
            ADAPTER_METHODS[method].layer_kinds, MODELS[model_id].requires_kind
        )
    ]


def write(directory, methods):
    """Writes every (method, model) case, its adapters moved off identity."""
    os.makedirs(directory, exist_ok=True)
    for method, model_id in cases(methods):
        name = os.path.join(directory, f"{method}-{model_id}")
        case = MODELS[model_id]
        model = case.build(0)
        model.save_weights(f"{name}.base.weights.h5")
        adapter = ADAPTER_METHODS[method].example()
        ka.enable_adapter(model, adapter, targets=case.targets)
        rng = np.random.default_rng(0)
        for variable in ka.adapter_variables(model):
            value = keras.ops.convert_to_numpy(variable)
            variable.assign(value + rng.normal(scale=0.1, size=variable.shape))
        ka.save_adapter_weights(model, f"{name}.adapter.h5")
        model.save(f"{name}.keras")
        np.savez(f"{name}.npz", outputs=predict(model, case.x))


def check(directory):
    """Loads every case in `directory`; returns the names that differ."""
    names = sorted(
        f[: -len(".npz")] for f in os.listdir(directory) if f.endswith(".npz")
    )
    assert names, f"no cases found in {directory}"
    failures = []
    for name in names:
        path = os.path.join(directory, name)
        case = MODELS[name.split("-")[1]]
        expected = np.load(f"{path}.npz")["outputs"]
        model = case.build(3)
        model.load_weights(f"{path}.base.weights.h5")
        ka.load_adapter_weights(model, f"{path}.adapter.h5")
        from_file = max_relative_difference(predict(model, case.x), expected)
        loaded = keras.saving.load_model(f"{path}.keras")
        from_keras = max_relative_difference(predict(loaded, case.x), expected)
        print(f"{name}: adapter file {from_file:.2e}, .keras {from_keras:.2e}")
        if not (from_file <= 1e-5 and from_keras <= 1e-5):
            failures.append(name)
    return failures


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", required=True)
    parser.add_argument("--write", required=True)
    parser.add_argument("--methods", required=True)
    parser.add_argument("--import", dest="modules", action="append", default=[])
    args = parser.parse_args()
    for module in args.modules:
        importlib.import_module(module)
    failures = check(args.check)
    if failures:
        sys.exit(f"FAILED: {failures}")
    write(args.write, args.methods.split(","))
