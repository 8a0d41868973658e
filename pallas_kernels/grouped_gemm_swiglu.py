"""The routed experts' gate/up projection with SwiGLU, and optionally the down projection's activation
quantization, in the FP8 grouped GEMM's epilogue.

A tile of `grouped_gemm_fp8_swiglu` accumulates its I-columns of gate and of up (two f32 accumulators, each
promoted per 128-wide K block as `grouped_gemm_fp8` does) and stores silu(gate) * up: the [M, 2I] intermediate
never reaches HBM. With `quantize_output` the tile also quantizes its rows per 128 columns to e4m3 (the rule of
`quantize_activations`) and stores their scales by tile (`TileQuantizedRows`), which the down projection's
grouped GEMM over the same groups reads as they are: no pass over the activations between the two GEMMs.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_gemm_fp8 import FP8_BLOCK, grouped_fp8, reference_fp8
from pallas_kernels.grouped_gemm_tiles import GroupedGemmConfig, TileQuantizedRows, default_swiglu_config


def grouped_gemm_fp8_swiglu(x, group_sizes, weights: Sequence[jax.Array], scales: Sequence[jax.Array],
                            expert_slot, *, config: GroupedGemmConfig | None = None, out_dtype=jnp.bfloat16,
                            quantize_output: bool = False, interpret: bool = False, x_scale=None):
  """silu(x @ gate.T) * (x @ up.T) per group.

  Arguments as `grouped_gemm_fp8`, except that weights are [E_i, 2I, K] e4m3 with the gate rows first
  (DeepSeek's gate_proj and up_proj stacked, `ExpertWeights.w_gate_up`) and scales [E_i, 2I/128, K/128].
  config: None picks `default_swiglu_config`; fp8_overlap_promotion is not supported (registers); with
  quantize_output a warpgroup must own 128 columns (one scale block).
  Returns [M, I] out_dtype, or with quantize_output `TileQuantizedRows` ([M, I] e4m3 and the tiles' row
  scales), for `grouped_gemm_fp8` with the same group_sizes, expert_slot, buffer sizes and block_m."""
  weights, scales = tuple(weights), tuple(scales)
  n2 = weights[0].shape[1]
  if n2 % (2 * FP8_BLOCK):
    raise ValueError(f"the gate/up weight's rows (2I = {n2}) must divide by 256: gate and up blocks of 128")
  rows = x.values if isinstance(x, TileQuantizedRows) else x
  cfg = config or default_swiglu_config(rows.shape[0], group_sizes.shape[0], n2 // 2)
  if cfg.fp8_overlap_promotion:
    raise ValueError("SwiGLU holds two accumulators: fp8_overlap_promotion does not fit the registers")
  return grouped_fp8(x, group_sizes, weights, scales, expert_slot, config=cfg, out_dtype=out_dtype,
                     interpret=interpret, x_scale=x_scale, swiglu=True, quantize_out=quantize_output)


def reference_fp8_swiglu(x, group_sizes, weights, scales, expert_slot, *, out_dtype=jnp.bfloat16,
                         x_scale=None):
  """`grouped_gemm_fp8_swiglu`'s reference: `reference_fp8` of the [E, 2I, K] gate/up weights in f32, then
  silu(gate) * up in f32."""
  h = reference_fp8(x, group_sizes, weights, scales, expert_slot, out_dtype=jnp.float32, x_scale=x_scale)
  gate, up = jnp.split(h, 2, axis=-1)
  return (jax.nn.silu(gate) * up).astype(out_dtype)
