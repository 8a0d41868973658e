"""Small Mosaic GPU helpers shared by the kernels."""

import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu


def smem_transforms(minor: int, dtype):
  """Tiling + swizzle for an SMEM tile whose minor dimension is `minor` elements of `dtype` (the widest
  swizzle that divides it), as TMA and wgmma read it."""
  bits = jnp.dtype(dtype).itemsize * 8
  swizzle = plgpu.find_swizzle(minor * bits)
  return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def cdiv(a, b: int):
  """ceil(a / b) for a traced int32 scalar a and a static b."""
  return lax.div(a + (b - 1), b)
