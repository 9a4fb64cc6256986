"""LoRA on a small vision transformer's convolution and attention.

A KerasHub `ViTImageClassifier` built from a config (no download) is first
trained in full on one synthetic task, then adapted with LoRA to another:

1. task A, "pretraining": 16 x 16 images with one white square in one of the
   four quadrants; the label is the quadrant. The whole model trains.
2. task B: a red and a green square in two different quadrants; the label is
   the red square's quadrant. The pretrained model has never needed colour.
3. `ka.adaptable_layers` lists the layer kinds of the model (a `Conv2D` patch
   embedding, an `Embedding` of positions, `EinsumDense` attention
   projections, `Dense` MLP layers) and which methods adapt each.
4. LoRA (rank 4) on the patch convolution and on the attention query and value
   projections; everything else is frozen but the classification head.
   `fit(jit_compile=True)` on task B.
5. `ka.merge_adapters` folds the adapters into the kernels; the predictions do
   not change.

Run from the repository root, with `KERAS_BACKEND=jax` or
`KERAS_BACKEND=tensorflow`:

```shell
python examples/vision_lora.py          # about a minute on a CPU
python examples/vision_lora.py --quick  # smoke run
```
"""

# First, before TensorFlow, Keras and JAX load: drop TensorFlow's start-up
# noise from stderr, and nothing else (see _quiet_start.py).
import _quiet_start

_quiet_start.hide_tensorflow_noise()

import argparse

import keras
import keras_hub
import numpy as np

import keras_adapters as ka

SIZE = 16
QUADRANTS = [(0, 0), (0, 8), (8, 0), (8, 8)]


def images(n, task, rng):
    """`(x, y)`: `n` images for task "A" (a white square) or "B" (a red and a
    green square; the label is the red one's quadrant)."""
    x = rng.normal(0.0, 0.1, size=(n, SIZE, SIZE, 3)).astype("float32")
    y = rng.integers(0, 4, n)
    for i, label in enumerate(y):
        top, left = QUADRANTS[label]
        dy, dx = rng.integers(0, 4, 2)
        if task == "A":
            x[i, top + dy : top + dy + 4, left + dx : left + dx + 4, :] += 1.0
            continue
        other = rng.choice([q for q in range(4) if q != label])
        x[i, top + dy : top + dy + 4, left + dx : left + dx + 4, 0] += 1.0
        top, left = QUADRANTS[other]
        x[i, top + dy : top + dy + 4, left + dx : left + dx + 4, 1] += 1.0
    return x, y


def accuracy(model, x, y):
    logits = model.predict(x, batch_size=256, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == y))


def main(quick):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    n = 256 if quick else 2048
    epochs = 1 if quick else 8
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(SIZE, SIZE, 3),
        patch_size=4,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
    )
    model = keras_hub.models.ViTImageClassifier(
        backbone=backbone, num_classes=4, preprocessor=None
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    # 1. Task A, the whole model.
    x_a, y_a = images(n, "A", rng)
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss=loss, jit_compile=True)
    model.fit(x_a, y_a, batch_size=64, epochs=epochs, verbose=0)
    x_test_a, y_test_a = images(512, "A", rng)
    accuracy_a = accuracy(model, x_test_a, y_test_a)
    print(f"task A after full training: accuracy {accuracy_a:.3f}")

    # 2. Task B on the task-A model, before adapting.
    x_b, y_b = images(n, "B", rng)
    x_test_b, y_test_b = images(512, "B", rng)
    print(f"task B before LoRA: accuracy {accuracy(model, x_test_b, y_test_b):.3f}")

    # 3. What the model has to adapt.
    print(ka.adaptable_layers(model))

    # 4. LoRA on the patch convolution and the attention query/value.
    report = model.enable_adapter(
        ka.LoRA(rank=4, alpha=8),
        targets=["patch_embedding", ka.attention("query", "value")],
    )
    print(report)
    model.compile(optimizer=keras.optimizers.Adam(5e-3), loss=loss, jit_compile=True)
    model.fit(x_b, y_b, batch_size=64, epochs=epochs, verbose=0)
    adapted = accuracy(model, x_test_b, y_test_b)
    print(f"task B after LoRA: accuracy {adapted:.3f}")

    # 5. Merge: plain layers, the same predictions.
    before = model.predict(x_test_b, batch_size=256, verbose=0)
    ka.merge_adapters(model)
    after = model.predict(x_test_b, batch_size=256, verbose=0)
    difference = float(np.max(np.abs(after - before)) / np.max(np.abs(before)))
    print(
        f"merged: {len(ka.adapted_layers(model))} adapted layers left, "
        f"max relative difference {difference:.1e}, "
        f"accuracy {accuracy(model, x_test_b, y_test_b):.3f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    main(parser.parse_args().quick)
