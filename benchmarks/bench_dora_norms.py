"""DoRA's column norms: without and with the `d_in x d_out` matrix `V`.

`ka.DoRA` computes `||W + s A B||_c` per training step as
`sqrt(||W||^2_c + 2 s colsum((A^T W) * B) + s^2 colsum(B * (A^T A) B))`
(`DoRA.column_norms`), which needs no `d_in x d_out` temporary. This script
times it against building `V = W + s A B` and taking its column norms (what
PEFT does), both compiled (`jax.jit` or `tf.function(jit_compile=True)`; the fastest
of 30 interleaved runs),
and reports both errors against float64 NumPy, for a few layer shapes.

Usage:

    KERAS_BACKEND=jax python benchmarks/bench_dora_norms.py
"""

import time

import keras
import numpy as np
from keras import ops

import keras_adapters as ka
from keras_adapters.kernels import KernelView

SHAPES = {
    # name: (kernel shape, einsum equation or None)
    "MiniLM query 384x(12x32)": ((384, 12, 32), "abc,cde->abde"),
    "MiniLM FFN 384x1536": ((384, 1536), None),
    "Gemma-2B query (8x2048x256)": ((8, 2048, 256), "btd,ndh->btnh"),
    "4096x4096": ((4096, 4096), None),
}
RANK, REPEATS = 8, 30


class _Kernel(KernelView):
    """A kernel view over a fixed tensor (what `FloatKernel` gives DoRA)."""

    def __init__(self, shape, equation, value):
        super().__init__(shape, equation)
        self.value = value

    def dense(self):
        return self.value


def _compile(fn):
    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(fn)
    import tensorflow as tf

    return tf.function(fn, jit_compile=True)


def main():
    adapter = ka.DoRA(rank=RANK, alpha=2 * RANK)
    rng = np.random.default_rng(0)
    print(f"backend={keras.backend.backend()} rank={RANK}")
    print(
        f"{'layer':<30}{'identity ms':>12}{'with V ms':>11}{'ratio':>7}"
        f"{'rel err identity':>18}{'rel err with V':>16}"
    )
    for name, (shape, equation) in SHAPES.items():
        w = rng.normal(scale=0.02, size=shape).astype("float32")
        view = KernelView(shape, equation)
        a = rng.uniform(-1, 1, size=(view.d_in, RANK)).astype("float32") / np.sqrt(
            view.d_in
        )
        b = rng.normal(scale=0.01, size=(RANK, view.d_out)).astype("float32")

        def identity(w, a, b, shape=shape, equation=equation):
            kernel = _Kernel(shape, equation, w)
            return adapter.column_norms({"lora_a": a, "lora_b": b}, kernel)

        def with_v(w, a, b, view=view):
            v = view.to_matrix(w) + ops.matmul(a, b) * adapter.scale
            return ops.sqrt(ops.sum(ops.square(v), axis=0))

        matrix = np.asarray(w, "float64")
        if equation is not None:
            matrix = matrix.transpose(view.perm).reshape(view.d_in, view.d_out)
        exact = np.linalg.norm(
            matrix + adapter.scale * (a @ b).astype("float64"), axis=0
        )
        args = [ops.convert_to_tensor(t) for t in (w, a, b)]
        compiled = [_compile(fn) for fn in (identity, with_v)]
        errors = []
        for fn in compiled:
            result = np.asarray(ops.convert_to_numpy(fn(*args)), "float64")
            errors.append(np.max(np.abs(result - exact) / exact))
        times = [[], []]
        for _ in range(REPEATS):  # interleaved, so that load hits both alike
            for fn, spent in zip(compiled, times, strict=True):
                start = time.perf_counter()
                ops.convert_to_numpy(fn(*args))
                spent.append(time.perf_counter() - start)
        # The minimum: the least disturbed run on a shared machine.
        row = [(min(t) * 1e3, e) for t, e in zip(times, errors, strict=True)]
        (t1, e1), (t2, e2) = row
        print(f"{name:<30}{t1:>12.3f}{t2:>11.3f}{t1 / t2:>7.2f}{e1:>18.1e}{e2:>16.1e}")


if __name__ == "__main__":
    main()
