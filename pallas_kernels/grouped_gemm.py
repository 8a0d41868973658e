"""Grouped expert GEMM for MoE on Hopper (Pallas Mosaic GPU), with split-weight management.

Rows of `x` are sorted by expert: group g owns `group_sizes[g]` consecutive rows. The weights of the
experts are not one array: local experts and experts fetched from peers live in different buffers
(`weights = (w_0, w_1, ...)`, each `[E_i, K, N]`), and `expert_slot[g] = (buffer, slot)` says where
group g's weight lies. The kernel reads each weight where it lies; nothing is concatenated.

Design (both bf16 and FP8):
  * A per-tile schedule is computed in jnp from `group_sizes` outside the kernel: every M-tile belongs
    to exactly one group and starts at that group's row (tiles are not aligned to multiples of
    block_m, so a group of 8 tokens reads its weight once, not twice when it straddles a boundary).
    Rows past sum(group_sizes) get "zero tiles" that only store zeros.
  * Persistent kernel: one CTA per SM loops over (tile, n-block) work items.
  * Warp specialization: one memory warpgroup issues TMA loads of the x tile and of the weight tile
    (from the buffer the schedule names, chosen by a predicated copy per buffer), `max_concurrent_steps`
    stages deep; `num_compute_wgs` compute warpgroups each own block_n / num_compute_wgs columns and run
    wgmma. Stage slots are handed back through "free" barriers.
  * Epilogue: the tile is written to SMEM and stored with TMA in a ladder of power-of-two row counts, so
    only the tile's valid rows are written (tiles of neighbouring groups overlap in rows).
The simpler non-warp-specialized path (`warp_specialized=False`) uses `plgpu.emit_pipeline` in one
warpgroup; it stays selectable as a fallback.

Modules: this one holds the bf16 kernel and the public API (every name below is importable from here:
`from pallas_kernels import grouped_gemm as gg; gg.grouped_gemm_fp8(...)`); `grouped_gemm_fp8.py` the FP8
kernel, activation quantization and the FP8 reference; `grouped_gemm_swiglu.py` the experts' gate/up with
SwiGLU (and the next quantization) in that kernel's epilogue; `grouped_gemm_tiles.py` the tile configs,
presets, the tile schedule and rows quantized by tile; `grouped_gemm_common.py` the jnp reference, input validation and the kernel pieces both
kernels share.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _mosaic
from pallas_kernels.grouped_gemm_common import (epilogue, epilogue_cols, kernel_call, pad_rows, reference,
                                                tile_fields, validate_inputs, warp_specialized)
from pallas_kernels.grouped_gemm_fp8 import (bf16_x_config, choose_k_splits, dequantize_weight, dequantized_activations,
                                             fp8_matmul_split_k, fp8_to_f32, grouped_gemm_fp8,
                                             quantize_activations, reference_fp8)
from pallas_kernels.grouped_gemm_swiglu import grouped_gemm_fp8_swiglu, reference_fp8_swiglu
from pallas_kernels.grouped_gemm_tiles import (DECODE_CONFIG, FP8_BLOCK, FP8_DECODE_CONFIG,
                                               FP8_PREFILL_CONFIG, FP8_PREFILL_OVERLAP_CONFIG,
                                               FP8_SWIGLU_DECODE_CONFIG, FP8_SWIGLU_PREFILL_CONFIG,
                                               PREFILL_CONFIG, PREFILL_M_SPLIT_CONFIG, GroupedGemmConfig,
                                               TileQuantizedRows, default_config, default_swiglu_config,
                                               is_prefill, max_tiles, padded_rows, tile_schedule)

__all__ = [
    "DECODE_CONFIG", "FP8_BLOCK", "FP8_DECODE_CONFIG", "FP8_PREFILL_CONFIG", "FP8_PREFILL_OVERLAP_CONFIG",
    "FP8_SWIGLU_DECODE_CONFIG", "FP8_SWIGLU_PREFILL_CONFIG", "PREFILL_CONFIG", "PREFILL_M_SPLIT_CONFIG",
    "GroupedGemmConfig", "TileQuantizedRows", "bf16_x_config", "choose_k_splits", "default_config", "default_swiglu_config", "dequantize_weight",
    "dequantized_activations", "fp8_matmul_split_k", "fp8_to_f32", "grouped_gemm", "grouped_gemm_fp8",
    "grouped_gemm_fp8_swiglu", "is_prefill", "max_tiles", "quantize_activations", "reference", "reference_fp8", "reference_fp8_swiglu",
    "tile_schedule",
]


# ---------------------------------------------------------------------------------------------
# bf16 kernel.
# ---------------------------------------------------------------------------------------------


def _bf16_ws_body(sched_ref, x_ref, *refs, cfg, num_buffers, t_max, k, n, out_dtype):
  w_refs, out_ref = refs[:num_buffers], refs[num_buffers]
  bm, bn, bk, steps, nwg = (cfg.block_m, cfg.block_n, cfg.block_k, cfg.max_concurrent_steps,
                            cfg.num_compute_wgs)
  num_k, n_blocks, wg_m, wg_n = k // bk, n // bn, cfg.wg_m, cfg.wg_n
  dtype = x_ref.dtype

  @functools.partial(
      pl.run_scoped,
      a_smem=plgpu.SMEM((steps, bm, bk), dtype, transforms=_mosaic.smem_transforms(bk, dtype)),
      b_smem=plgpu.SMEM((steps, bk, bn), dtype, transforms=_mosaic.smem_transforms(bn, dtype)),
      o_smem=plgpu.SMEM((nwg, wg_m, epilogue_cols(wg_n, out_dtype)), out_dtype),
      full=plgpu.Barrier(num_arrivals=2, num_barriers=steps),
      free=plgpu.Barrier(num_arrivals=nwg, num_barriers=steps),
      collective_axes="wg",
  )
  def _scope(a_smem, b_smem, o_smem, full, free):
    def issue(t, fields, j, kk, slot):
      _, buf, wslot, load_row, *_ = fields
      plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(load_row, bm), pl.ds(kk * bk, bk)],
                              a_smem.at[slot], full.at[slot])
      for b, w_ref in enumerate(w_refs):
        @pl.when(buf == b)
        def _():
          plgpu.copy_gmem_to_smem(w_ref.at[wslot, pl.ds(kk * bk, bk), pl.ds(j * bn, bn)],
                                  b_smem.at[slot], full.at[slot])

    def accumulate(fields, j, nk, carry, row0, col0):
      def mm(acc_ref):
        def step(kk, _):
          slot = lax.rem(carry + kk, steps)
          plgpu.barrier_wait(full.at[slot])
          a_tile, b_tile = a_smem.at[slot], b_smem.at[slot]
          if wg_m != bm:
            a_tile = a_tile.at[pl.ds(row0, wg_m)]
          if wg_n != bn:
            b_tile = b_tile.at[:, pl.ds(col0, wg_n)]
          plgpu.wgmma(acc_ref, a_tile, b_tile)
          plgpu.wgmma_wait(0)
          plgpu.barrier_arrive(free.at[slot])
        lax.fori_loop(0, nk, step, None)
        return acc_ref[...]

      return pl.run_scoped(mm, plgpu.ACC((wg_m, wg_n), jnp.float32))

    warp_specialized(sched_ref, out_ref, o_smem, cfg=cfg, t_max=t_max, n_blocks=n_blocks, num_k=num_k,
                     issue=issue, free=free, accumulate=accumulate)


def _bf16_simple_body(sched_ref, x_ref, *refs, cfg, num_buffers, t_max, k, n, out_dtype):
  """One warpgroup, `plgpu.emit_pipeline` per weight buffer: the fallback path."""
  w_refs, out_ref = refs[:num_buffers], refs[num_buffers]
  bm, bn, bk, steps = cfg.block_m, cfg.block_n, cfg.block_k, cfg.max_concurrent_steps
  num_k, n_blocks = k // bk, n // bn
  dtype = x_ref.dtype

  @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((bm, epilogue_cols(bn, out_dtype)), out_dtype))
  def _scope(o_smem):
    num_tiles = sched_ref[t_max, 0]

    @plgpu.nd_loop((num_tiles, n_blocks), collective_axes="sm")
    def _loop(info):
      t, j = info.index
      is_mm, buf, wslot, load_row, smem_off, n_valid, *_ = tile_fields(sched_ref, t)

      def mm(acc_ref):
        for b, w_ref in enumerate(w_refs):
          @pl.when((is_mm != 0) & (buf == b))
          def _():
            plgpu.emit_pipeline(
                lambda _, a_smem, b_smem: plgpu.wgmma(acc_ref, a_smem, b_smem),
                grid=(num_k,),
                in_specs=[
                    plgpu.BlockSpec((bm, bk), lambda kk: (0, kk), delay_release=1,
                                    transforms=_mosaic.smem_transforms(bk, dtype)),
                    plgpu.BlockSpec((bk, bn), lambda kk: (kk, 0), delay_release=1,
                                    transforms=_mosaic.smem_transforms(bn, dtype)),
                ],
                max_concurrent_steps=steps,
            )(x_ref.at[pl.ds(load_row, bm)], w_ref.at[wslot, :, pl.ds(j * bn, bn)])
        return acc_ref[...]

      acc = pl.run_scoped(mm, plgpu.ACC((bm, bn), jnp.float32))
      epilogue(acc, o_smem, out_ref, load_row=load_row, smem_off=smem_off, n_valid=n_valid,
                row0=0, col=j * bn, cfg=cfg)

    plgpu.wait_smem_to_gmem(0)


def grouped_gemm(x, group_sizes, weights: Sequence[jax.Array], expert_slot, *,
                 config: GroupedGemmConfig | None = None, out_dtype=None, interpret: bool = False):
  """Grouped bf16 GEMM: out[r] = x[r] @ weights[b][s] with (b, s) = expert_slot[group of row r].

  Args:
    x: [M, K] bf16, rows sorted by group.
    group_sizes: [G] int32, rows per group in order; sum <= M, rows past the sum are output as 0.
    weights: tuple of [E_i, K, N] bf16 buffers (e.g. local experts, experts fetched from peers).
    expert_slot: [G, 2] int32, group -> (buffer index, slot in that buffer). Out-of-range values are
      clamped (never an out-of-bounds read).
    config: tiles; None picks DECODE_CONFIG or PREFILL_CONFIG from M / G.
  Returns:
    [M, N] in out_dtype (default x.dtype), f32 accumulation.
  """
  weights = tuple(weights)
  k, n = validate_inputs(x, group_sizes, weights, expert_slot, w_kn_axes=(1, 2), what="weight")
  if x.dtype != jnp.bfloat16 or weights[0].dtype != jnp.bfloat16:
    raise ValueError(f"x and weights must be bfloat16, got {x.dtype} and {weights[0].dtype}")
  m = x.shape[0]
  cfg = config or default_config(m, group_sizes.shape[0], n)
  if cfg.fp8_overlap_promotion:
    raise ValueError("fp8_overlap_promotion is for grouped_gemm_fp8, not the bf16 kernel")
  if k % cfg.block_k or n % cfg.block_n:
    raise ValueError(f"K={k} must divide by block_k={cfg.block_k} and N={n} by block_n={cfg.block_n}")
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  m_pad = padded_rows(m, cfg.block_m)
  x_p = pad_rows(x, m_pad)
  sched = tile_schedule(group_sizes, expert_slot, m=m, m_pad=m_pad, block_m=cfg.block_m,
                        buffer_sizes=tuple(w.shape[0] for w in weights))
  body = _bf16_ws_body if cfg.warp_specialized else _bf16_simple_body
  body = functools.partial(body, cfg=cfg, num_buffers=len(weights), k=k, n=n, out_dtype=out_dtype,
                           t_max=sched.shape[0] - 1)
  call = kernel_call(body, jax.ShapeDtypeStruct((m_pad, n), out_dtype), cfg=cfg,
                      interpret=interpret,
                      num_threads=cfg.num_compute_wgs + 1 if cfg.warp_specialized else None)
  return call(sched, x_p, *weights)[:m]
