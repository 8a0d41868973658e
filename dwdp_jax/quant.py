"""FP8 e4m3 weights with DeepSeek's block scales, and the matmul helper every linear layer uses.

A quantized weight is stored as `value` (float8_e4m3fn) and `scale` (float32, one per block). In the HF layout
a weight is [out, in] with `weight_scale_inv` [ceil(out/bo), ceil(in/bi)]; dwdp_jax stores weights as
[..., in, out] (x @ w), so scales are [..., ceil(in/bi), ceil(out/bo)]. Dequantized weight = value * scale,
each scale covering its block.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np

FP8 = jnp.float8_e4m3fn
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448


def expand_scale(scale: jnp.ndarray, shape: tuple[int, ...], block: tuple[int, int]) -> jnp.ndarray:
    """Broadcasts block scales [..., ceil(K/bk), ceil(N/bn)] to a full [..., K, N] array."""
    k, n = shape[-2], shape[-1]
    full = jnp.repeat(jnp.repeat(scale, block[0], axis=-2), block[1], axis=-1)
    return full[..., :k, :n]


def dequantize(value: jnp.ndarray, scale: jnp.ndarray, block: tuple[int, int], dtype=jnp.float32) -> jnp.ndarray:
    """FP8 [..., K, N] with block scales -> dtype [..., K, N]."""
    return (value.astype(jnp.float32) * expand_scale(scale, value.shape, block)).astype(dtype)


def quantize_blocks_np(w: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Quantizes w [..., K, N] (float) to FP8 with one float32 scale per block (max-abs scaling, numpy).

    Returns (value float8_e4m3fn [..., K, N], scale float32 [..., ceil(K/bk), ceil(N/bn)]).
    """
    w = np.asarray(w, dtype=np.float32)
    k, n = w.shape[-2:]
    bk, bn = block
    nk, nn = -(-k // bk), -(-n // bn)
    padded = np.zeros(w.shape[:-2] + (nk * bk, nn * bn), np.float32)
    padded[..., :k, :n] = w
    blocks = padded.reshape(w.shape[:-2] + (nk, bk, nn, bn))
    amax = np.abs(blocks).max(axis=(-3, -1))
    scale = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
    q = blocks / scale[..., :, None, :, None]
    value = q.reshape(padded.shape)[..., :k, :n].astype(ml_dtypes.float8_e4m3fn)
    return value, scale
