"""XLA flags for the tests and the scripts they start in other processes.

Imported before Keras (XLA reads `$XLA_FLAGS` when the backend starts). No
Keras, JAX or TensorFlow import here.
"""

import os

# Cheaper XLA compilation for the tests' tiny models: compiling, not running,
# is what most tests spend their time on, and these flags halve it on both
# backends (measured on 2 cores: `fit` of a tiny Gemma and BERT, 44 s -> 23 s
# on JAX, 78-96 s -> 34-54 s on TensorFlow) with the same losses to 1e-7.
# They only turn off LLVM optimizations of the generated CPU code.
FAST_COMPILE = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
)


def add(*flags):
    """Appends `flags` to `$XLA_FLAGS`, except those already set there (a
    value the environment gives wins)."""
    current = os.environ.get("XLA_FLAGS", "").split()
    names = " ".join(current)
    current += [f for f in flags if f.split("=")[0] not in names]
    os.environ["XLA_FLAGS"] = " ".join(current)
