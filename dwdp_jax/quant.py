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


# --------------------------------------------------------------------------------------------------------------
# Host-side (numpy) helpers of the checkpoint loader and converter: fast enough to keep up with a disk.

UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}  # unsigned integer of each itemsize
_FP8_TO_F32 = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)  # every e4m3 value


def transpose_np(src: np.ndarray, out: np.ndarray | None = None, alloc=np.empty) -> np.ndarray:
    """src [R, C] -> a C-contiguous [C, R] copy of src.T (into `out` when given, any C-contiguous [C, R] view of
    src's dtype). alloc(shape, dtype): where the result (when `out` is None) and temporaries come from.

    numpy's strided copy moves one element per step (~0.15 GB/s for 1-byte elements, less for ml_dtypes' float8
    and bfloat16, whose copies go through generic per-element functions); this moves the bytes as unsigned
    integers, in groups of 8 // itemsize adjacent columns as one uint64 through cache-sized tiles, then
    de-interleaves each group: ~1 G elements/s for FP8 and bf16 on one core."""
    rows, cols = src.shape
    if out is None:
        out = alloc((cols, rows), src.dtype)
    bits = UINT.get(src.itemsize)
    if bits is None:
        _tiled_transpose(out, src)
        return out
    src_bits, out_bits = src.view(bits), out.view(bits)
    w = 8 // src.itemsize
    if w == 1 or cols % w or not src.flags.c_contiguous or not out.flags.c_contiguous:
        _tiled_transpose(out_bits, src_bits)
        return out
    wide = alloc((cols // w, rows), np.uint64)
    _tiled_transpose(wide, src_bits.view(np.uint64))
    # wide[k, i] holds src[i, w*k : w*k + w]
    out_bits.reshape(cols // w, w, rows)[...] = wide.view(bits).reshape(cols // w, rows, w).transpose(0, 2, 1)
    return out


def as_bits(array: np.ndarray) -> np.ndarray:
    """The same memory as unsigned integers of the same width: numpy copies them with its fast built-in loops
    (assignments between ml_dtypes arrays go element by element through generic functions)."""
    return array.view(UINT[array.itemsize])


def _tiled_transpose(dst: np.ndarray, src: np.ndarray, tile: int = 128):
    rows, cols = src.shape
    for i in range(0, rows, tile):
        for j in range(0, cols, tile):
            dst[j : j + tile, i : i + tile] = src[i : i + tile, j : j + tile].T


def dequantize_np(value: np.ndarray, scale: np.ndarray, block: tuple[int, int], dtype, transpose: bool = False,
                  out: np.ndarray | None = None, alloc=np.empty) -> np.ndarray:
    """FP8 [R, C] (float8_e4m3fn) with block scales [ceil(R/bo), ceil(C/bi)] -> dtype [R, C], or its transpose
    [C, R] (into `out` when given, C-contiguous). Bit-exact with `(value.astype(float32) * expanded
    scale).astype(dtype)`, partial last blocks included. alloc(shape, dtype): where the result (when `out` is
    None) and the temporaries come from.

    Vectorized through tables instead of ml_dtypes' per-element casts (~0.08 G elements/s): for each block the 256
    possible results `dtype(f32(v) * scale)` are tabulated, and every element is one `np.take` of (its block's
    table offset + its byte): ~0.4 G elements/s on one core (numpy releases the GIL: threads scale)."""
    dtype = np.dtype(dtype)
    rows, cols = value.shape
    bo, bi = block
    if scale.shape != (-(-rows // bo), -(-cols // bi)):
        raise ValueError(f"scale shape {scale.shape} does not match {value.shape} in blocks of {block}")
    u8 = value.view(np.uint8)
    if transpose:  # dequantize(v).T == dequantize(v.T) with transposed scales and block: move bytes, not results
        u8, scale, (bo, bi), (rows, cols) = transpose_np(u8, alloc=alloc), scale.T, (bi, bo), (cols, rows)
    if out is None:
        out = alloc((rows, cols), dtype)
    if out.shape != (rows, cols) or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {dtype} array of shape {(rows, cols)}")
    bits = as_bits(out)
    nc = scale.shape[1]
    # tables[a, b * 256 + byte] = dtype(f32(byte as e4m3) * scale[a, b])
    tables = (_FP8_TO_F32[None, None, :] * scale.astype(np.float32)[:, :, None]).astype(dtype)
    tables = tables.view(bits.dtype).reshape(scale.shape[0], nc * 256)
    offsets = (np.arange(cols) // bi).astype(np.uint16 if nc <= 256 else np.uint32) << 8  # [C]
    step = max(1, min(bo, (1 << 18) // max(1, cols)))  # rows per take: ~256K elements, inside one block row
    small, index = alloc((step, cols), offsets.dtype), alloc((step, cols), np.intp)  # reused for every step
    r0 = 0
    while r0 < rows:
        r1 = min(r0 + step, rows, (r0 // bo + 1) * bo)
        n = r1 - r0
        np.add(u8[r0:r1], offsets, out=small[:n])
        np.copyto(index[:n], small[:n])
        np.take(tables[r0 // bo], index[:n], out=bits[r0:r1], mode="wrap")
        r0 = r1
    return out
