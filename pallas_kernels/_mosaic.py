"""Small Mosaic GPU helpers shared by the kernels."""

import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

LOG2E = 1.4426950408889634  # log2(e): softmax exponents in base 2


def smem_transforms(minor: int, dtype):
  """Tiling + swizzle for an SMEM tile whose minor dimension is `minor` elements of `dtype` (the widest
  swizzle that divides it), as TMA and wgmma read it."""
  bits = jnp.dtype(dtype).itemsize * 8
  swizzle = plgpu.find_swizzle(minor * bits)
  return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def cdiv(a, b: int):
  """ceil(a / b) for a traced int32 scalar a and a static b."""
  return lax.div(a + (b - 1), b)


def wgmma_rows(x, interpret: bool):
  """A [64] value as one value per row of a wgmma accumulator (interpret mode: unchanged)."""
  return x if interpret else plgpu.layout_cast(x, plgpu.Layout.WGMMA.reduce(1))


def wgmma_tile(x, interpret: bool):
  """A [64, n] value in a wgmma accumulator's register layout (interpret mode: unchanged)."""
  return x if interpret else plgpu.layout_cast(x, plgpu.Layout.WGMMA)


def load_wgmma_rows(ref, interpret: bool):
  """A [64] SMEM vector as one value per accumulator row."""
  if interpret:
    return ref[...]
  return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(1))  # (ref, ()): 0.10.2 has no ref-only form


def natural_lse(m, l):
  """Rows' log-sum-exp (natural log) from an online softmax kept in the log2 domain: running maximum m and
  sum l of 2^(s - m), [rows] f32; -inf for a row that saw no key (l = 0)."""
  return jnp.where(l > 0, (m + jnp.log2(jnp.where(l > 0, l, 1.0))) / LOG2E, -jnp.inf)


def bcast_rows(v, shape):
  """One value per row [rows] broadcast over a [rows, n] tile."""
  return lax.broadcast_in_dim(v, shape, [0])
