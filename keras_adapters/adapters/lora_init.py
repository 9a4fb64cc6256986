"""Data-driven LoRA initializations: PiSSA, OLoRA and LoftQ.

Each function takes the base kernel's 2-D view `W` `(d_in, d_out)` (the
matrix `x W` multiplies; PyTorch's `weight` transposed) as a NumPy array and
returns initial factors `A0` `(d_in, r)` and `B0` `(r, d_out)` such that
`s A0 B0` is the part of `W` the adapter starts from (`s` the LoRA scale).
They run once per layer, on the host, in float64.

- `pissa`: the top-`r` singular triplets, `sqrt(S / s)` on each side
  (Meng et al. 2024; PEFT's `pissa_init`): `s A0 B0 = U_r S_r V_r^T`.
- `pissa` with `iterations`: the same from a randomized SVD (Halko et al.
  2011, as `torch.svd_lowrank` with `q = r`, which PEFT's `pissa_niter_[n]`
  uses), for wide layers.
- `olora`: the QR decomposition of `W^T` (PyTorch's `weight`):
  `W^T = Q R`, `B0 = Q_r^T`, `A0 = R_r^T`, not divided by `s`, as PEFT's
  `olora_init` (Büyükakyüz 2024): `s A0 B0 = s (Q_r R_r)^T`.
- `loftq`: alternately quantizes `W - s A B` and refits `s A B` to the
  quantization residual by a truncated SVD (Li et al. 2023; PEFT's
  `loftq_init`), with any quantize-dequantize function.
"""

import numpy as np

DATA_INITS = ("pissa", "olora", "loftq")


def _check_matrix(matrix, rank):
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"Expected a 2-D matrix; received shape {matrix.shape}.")
    if not 1 <= rank <= min(matrix.shape):
        raise ValueError(
            f"rank {rank} must be in [1, min{matrix.shape}] = [1, {min(matrix.shape)}]."
        )
    if not np.all(np.isfinite(matrix)):
        raise ValueError("The kernel holds NaN or infinite values.")
    return matrix


def randomized_svd(matrix, rank, iterations, seed=0):
    """The top-`rank` singular triplets by a randomized range finder.

    Halko, Martinsson and Tropp (2011), Algorithm 4.4 (subspace iteration
    with re-orthonormalization), with `q = rank` columns and no
    oversampling, as `torch.svd_lowrank(matrix, q=rank, niter=iterations)`.
    Deterministic for a given `seed`.

    Returns:
        `(U_r, S_r, Vt_r)`, float64.
    """
    matrix = _check_matrix(matrix, rank)
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(matrix @ rng.standard_normal((matrix.shape[1], rank)))
    for _ in range(iterations):
        z, _ = np.linalg.qr(matrix.T @ q)
        q, _ = np.linalg.qr(matrix @ z)
    u, s, vt = np.linalg.svd(q.T @ matrix, full_matrices=False)
    return q @ u, s, vt


def truncated_svd(matrix, rank):
    """`(U_r, S_r, Vt_r)`: the top-`rank` singular triplets, float64."""
    matrix = _check_matrix(matrix, rank)
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], s[:rank], vt[:rank]


def pissa(matrix, rank, scale, iterations=None):
    """PiSSA's initial factors: `s A0 B0` = the best rank-`r` approximation.

    Args:
        matrix: `(d_in, d_out)` base matrix.
        rank: the LoRA rank `r`.
        scale: the LoRA scale `s` (the singular values are divided by it,
            as in PEFT, so that `s A0 B0` is the truncated SVD).
        iterations: None for an exact SVD; an int for a randomized SVD with
            that many subspace iterations (PEFT's `pissa_niter_[n]`).

    Returns:
        `(A0, B0)` float64, `(d_in, r)` and `(r, d_out)`.
    """
    if iterations is None:
        u, s, vt = truncated_svd(matrix, rank)
    else:
        u, s, vt = randomized_svd(matrix, rank, iterations)
    root = np.sqrt(s / scale)
    return u * root[None, :], root[:, None] * vt


def olora(matrix, rank, scale):
    """OLoRA's initial factors, from the QR decomposition of `W^T`.

    PEFT computes `Q, R = qr(weight)` with `weight = W^T` `(d_out, d_in)`,
    sets `lora_B = Q_r`, `lora_A = R_r` and subtracts `s lora_B lora_A`; in
    this layout `B0 = Q_r^T`, `A0 = R_r^T`, and `s A0 B0 = s (Q_r R_r)^T`.
    The factors are not divided by `s` (PEFT's convention).

    Returns:
        `(A0, B0)` float64, `(d_in, r)` and `(r, d_out)`.
    """
    del scale  # the start `s A0 B0` depends on it; the factors do not
    matrix = _check_matrix(matrix, rank)
    q, r = np.linalg.qr(matrix.T)
    return r[:rank].T.copy(), q[:, :rank].T.copy()


def loftq(matrix, rank, scale, quantize, iterations=1):
    """LoftQ: a quantized base `Q` and factors with `Q + s A0 B0 ~ W`.

    Alternates `Q = quantize(W - s A0 B0)` (starting from `A0 B0 = 0`) and
    `s A0 B0 = ` the truncated SVD of `W - Q`, `iterations` times, as PEFT's
    `loftq_init` (whose factors are not divided by `s`; here they are, so
    the adapter starts at the LoftQ fit for any `alpha`).

    Args:
        matrix: `(d_in, d_out)` float base matrix.
        rank: the LoRA rank.
        scale: the LoRA scale.
        quantize: `(d_in, d_out)` float64 -> the dequantized values of its
            quantization, same shape (the quantizer the layer will use).
        iterations: positive int.

    Returns:
        `(Q, A0, B0, errors)`: `Q` the dequantized base to store (the last
        quantization), the factors, and the relative Frobenius errors
        `||W - Q_i - s A_i B_i|| / ||W||` after each iteration; `errors[0]`
        is preceded by the error of quantization alone, `||W - quantize(W)||
        / ||W||`, so `errors` has `iterations + 1` entries.
    """
    matrix = _check_matrix(matrix, rank)
    norm = max(float(np.linalg.norm(matrix)), 1e-30)
    residual = matrix
    errors = []
    for _ in range(iterations):
        dequantized = np.asarray(quantize(residual), dtype=np.float64)
        if not errors:
            errors.append(float(np.linalg.norm(matrix - dequantized)) / norm)
        a0, b0 = pissa(matrix - dequantized, rank, scale)
        residual = matrix - scale * (a0 @ b0)
        errors.append(float(np.linalg.norm(residual - dequantized)) / norm)
    return dequantized, a0, b0, errors
