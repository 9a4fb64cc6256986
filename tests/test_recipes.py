"""The speed recipes of docs/performance.md keep training sound (issue 19).

`jax_threefry_partitionable=False` (the JAX recipe the demo and benchmarks
apply on CPU) draws dropout masks with a cheaper lowering of the same
threefry generator: masks keep their rate, and training with dropout in the
backbone and the adapter still learns. JAX only: it is a JAX setting.
"""

import keras
import numpy as np
import pytest
from cases import BATCH
from cases import MODELS

import keras_adapters as ka

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="a JAX configuration recipe"
)


@pytest.fixture
def nonpartitionable_threefry():
    import jax

    previous = jax.config.jax_threefry_partitionable
    jax.config.update("jax_threefry_partitionable", False)
    yield
    jax.config.update("jax_threefry_partitionable", previous)


def test_dropout_masks_keep_their_rate(nonpartitionable_threefry):
    rate, shape = 0.1, (64, 1024)
    seed = keras.random.SeedGenerator(3)
    draws = [
        np.asarray(keras.random.dropout(keras.ops.ones(shape), rate, seed=seed))
        for _ in range(2)
    ]
    n = np.prod(shape)
    sigma = np.sqrt(rate * (1 - rate) / n)
    for draw in draws:
        kept = draw != 0
        # Kept entries are scaled by 1 / (1 - rate); the kept fraction is
        # within 5 standard deviations of 1 - rate.
        np.testing.assert_allclose(draw[kept], 1 / (1 - rate), rtol=1e-6)
        assert abs(kept.mean() - (1 - rate)) < 5 * sigma, kept.mean()
    # The seed generator advances: a fresh mask, not the same one again.
    assert (draws[0] != draws[1]).mean() > 0.1


def test_lora_training_with_dropout_learns(nonpartitionable_threefry):
    case = MODELS["bert"]
    model = case.build(0, dropout=0.1)
    ka.enable_adapter(
        model, ka.LoRA(rank=2, alpha=4, dropout=0.1), targets=case.targets
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2), loss=case.loss, jit_compile=True
    )
    history = model.fit(case.x, case.y, batch_size=BATCH, epochs=case.epochs, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.01, losses
    assert min(losses[-3:]) < min(losses[:3]), losses
