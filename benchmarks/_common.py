"""What the benchmark scripts share: the MiniLM-sized model, data, metadata."""

import datetime
import json
import os
import pathlib
import platform

import keras
import keras_hub
import numpy as np
from _task import BATCH  # noqa: F401 (the benchmarks import it from here)
from _task import BERT
from _task import NUM_CLASSES  # noqa: F401
from _task import SEQ

import keras_adapters as ka

RESULTS = pathlib.Path(__file__).parent / "results"


def build_classifier(seed=0, **overrides):
    """A MiniLM-sized `BertTextClassifier` from config (random weights)."""
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.BertBackbone(**{**BERT, **overrides})
    return keras_hub.models.BertTextClassifier(
        backbone=backbone, num_classes=NUM_CLASSES, preprocessor=None
    )


def make_batch(batch=BATCH, seq=SEQ, seed=0):
    """`(x, y)`: random token ids (no padding) and labels."""
    rng = np.random.default_rng(seed)
    x = {
        "token_ids": rng.integers(1, BERT["vocabulary_size"], (batch, seq)).astype(
            "int32"
        ),
        "segment_ids": np.zeros((batch, seq), "int32"),
        "padding_mask": np.ones((batch, seq), "int32"),
    }
    return x, rng.integers(0, NUM_CLASSES, (batch,)).astype("int32")


def metadata():
    """Date, versions and machine, for the JSON results."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "backend": keras.backend.backend(),
        "versions": {
            "keras": keras.__version__,
            "keras_hub": keras_hub.__version__,
            "keras_adapters": ka.__version__,
            "python": platform.python_version(),
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
        },
    }


def write_json(result, output, name):
    """Writes `result` to `output`, or `results/<name>-<backend>.json`."""
    path = pathlib.Path(output or RESULTS / f"{name}-{keras.backend.backend()}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def parse_jax_config(items):
    """`[(name, value)]` from `NAME=VALUE` strings (`true`/`false` become
    bools, digits ints)."""
    pairs = []
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("jax_"):
            raise ValueError(f"--jax-config takes jax_NAME=VALUE; received {item!r}.")
        lowered = value.lower()
        if lowered in ("true", "false"):
            value = lowered == "true"
        elif value.isdigit():
            value = int(value)
        pairs.append((name, value))
    return pairs


def apply_jax_config(items):
    """Applies `--jax-config` settings (see `parse_jax_config`) to JAX."""
    pairs = parse_jax_config(items)
    if pairs:
        import jax

        for name, value in pairs:
            jax.config.update(name, value)
    return dict(pairs)


def compiled_jax_train_step(model, x, y):
    """The model's JAX train step, lowered and compiled by XLA for `(x, y)`
    (the optimizer must be built: train on one batch first)."""
    import jax

    state = model._get_jax_state(
        trainable_variables=True,
        non_trainable_variables=True,
        optimizer_variables=True,
        metrics_variables=True,
        purge_model_variables=False,
    )
    return jax.jit(model.train_step).lower(state, (x, y, None)).compile()
