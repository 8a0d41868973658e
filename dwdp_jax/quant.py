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
    """src [R, C] -> a [C, R] copy of src.T (into `out` when given: a [C, R] array of src's dtype with contiguous
    rows, any row stride). alloc(shape, dtype): where the result (when `out` is None) and temporaries come from.

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
    if w == 1 or cols % w or not src.flags.c_contiguous or out.strides[1] != out.itemsize:
        _tiled_transpose(out_bits, src_bits)
        return out
    wide = alloc((cols // w, rows), np.uint64)
    _tiled_transpose(wide, src_bits.view(np.uint64))
    # wide[k, i] holds src[i, w*k : w*k + w]; out rows w*k .. w*k + w - 1 as one [w, rows] slice per k
    step = out_bits.strides[0]
    grouped = np.lib.stride_tricks.as_strided(out_bits, (cols // w, w, rows), (w * step, step, out_bits.itemsize))
    grouped[...] = wide.view(bits).reshape(cols // w, rows, w).transpose(0, 2, 1)
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


def dequantize_np(value, scale, block: tuple[int, int], dtype, transpose: bool = False,
                  out: np.ndarray | None = None, alloc=np.empty) -> np.ndarray:
    """FP8 [R, C] (float8_e4m3fn) with block scales [ceil(R/bo), ceil(C/bi)] -> dtype [R, C], or its transpose
    [C, R] (into `out` when given: contiguous rows, any row stride). Bit-exact with `(value.astype(float32) *
    expanded scale).astype(dtype)`, partial last blocks included. `value` and `scale` may also be lists of
    matrices [R_k, C] and their scales: the result is that of their concatenation along R (each block grid
    starting at its own first row), e.g. an expert's gate and up projections into one [in, 2 * out] array.
    alloc(shape, dtype): where the result (when `out` is None) and the temporaries come from.

    Vectorized through tables instead of ml_dtypes' per-element casts (~0.08 G elements/s): for each block the 256
    possible results `dtype(f32(v) * scale)` are tabulated, and every element is one `np.take` of (its block's
    table offset + its byte): ~0.9 G elements/s on one core, ~0.65 transposed (numpy releases the GIL: threads
    scale). Transposed, the bytes move as uint64 (`_tiled_transpose`) and are read from there in groups of 8
    rows, without the byte-wise de-interleave of `transpose_np`."""
    dtype = np.dtype(dtype)
    values = [v.view(np.uint8) for v in (value if isinstance(value, (list, tuple)) else [value])]
    scales = list(scale) if isinstance(scale, (list, tuple)) else [scale]
    bo, bi = block
    cols = values[0].shape[1]
    for v, s in zip(values, scales, strict=True):
        if v.shape[1] != cols or s.shape != (-(-v.shape[0] // bo), -(-cols // bi)):
            raise ValueError(f"scale shape {s.shape} does not match {v.shape} in blocks of {block}")
    # Block row of every stacked row, and the tables' scales [block rows, block columns] in the output's layout.
    block_of = np.concatenate([np.arange(v.shape[0]) // bo + sum(len(p) for p in scales[:k])
                               for k, v in enumerate(values)])
    scale_rc = np.concatenate(scales, axis=0)
    rows = len(block_of)
    group = 1  # output rows per leading index of `grouped` [rows // group, group, cols]
    if transpose:  # dequantize(v).T == dequantize(v.T) with transposed scales and block: move bytes, not results
        (rows, cols), scale_rc, bo = (cols, rows), scale_rc.T, bi
        if rows % 8 == 0 and bo % 8 == 0 and all(v.flags.c_contiguous for v in values):
            wide = alloc((rows // 8, cols), np.uint64)  # wide[k, i] holds output rows 8k..8k+7 of column i
            first = 0
            for v in values:
                _tiled_transpose(wide[:, first : first + len(v)], v.view(np.uint64))
                first += len(v)
            grouped, group = wide.view(np.uint8).reshape(rows // 8, cols, 8).transpose(0, 2, 1), 8
        else:
            stacked, first = alloc((rows, cols), np.uint8), 0
            for v in values:
                transpose_np(v, stacked[:, first : first + len(v)], alloc)
                first += len(v)
            grouped = stacked[:, None]
        row_block, col_block = np.arange(rows) // bo, block_of
    else:
        grouped = (values[0] if len(values) == 1 else np.concatenate(values))[:, None]
        row_block, col_block = block_of, np.arange(cols) // bi
    if out is None:
        out = alloc((rows, cols), dtype)
    if out.shape != (rows, cols) or out.dtype != dtype or out.strides[1] != dtype.itemsize:
        raise ValueError(f"out must be a {dtype} array of shape {(rows, cols)} with contiguous rows")
    bits = as_bits(out)
    nc = scale_rc.shape[1]
    # tables[a, b * 256 + byte] = dtype(f32(byte as e4m3) * scale_rc[a, b])
    tables = (_FP8_TO_F32[None, None, :] * scale_rc.astype(np.float32)[:, :, None]).astype(dtype)
    tables = tables.view(bits.dtype).reshape(scale_rc.shape[0], nc * 256)
    offsets = col_block.astype(np.uint16 if nc <= 256 else np.uint32) << 8  # [C]
    step = max(1, min(bo, (1 << 17) // max(1, cols)))  # rows per take: ~128K elements (cache), inside one block row
    step = max(group, step // group * group)
    small, index = alloc((step, cols), offsets.dtype), alloc((step, cols), np.intp)  # reused for every step
    staging = None if out.flags.c_contiguous else alloc((step, cols), bits.dtype)
    r0 = 0
    while r0 < rows:  # steps end at block rows: rows with one row_block
        r1 = min(r0 + step, rows, int(np.searchsorted(row_block, row_block[r0], side="right")))
        n = r1 - r0
        np.add(grouped[r0 // group : r1 // group], offsets, out=small[:n].reshape(n // group, group, cols))
        np.copyto(index[:n], small[:n])
        if staging is None:
            np.take(tables[row_block[r0]], index[:n], out=bits[r0:r1], mode="wrap")
        else:
            np.copyto(bits[r0:r1], np.take(tables[row_block[r0]], index[:n], out=staging[:n], mode="wrap"))
        r0 = r1
    return out
