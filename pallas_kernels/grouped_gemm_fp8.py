"""Grouped FP8 GEMM with DeepSeek-V3 block scales, and the FP8 pieces around it (jnp).

Activations are quantized per token per 128 columns to e4m3 (`quantize_activations`), weights carry one f32
scale per 128x128 block; the kernel promotes each 128-wide K block's FP8 partial product into an f32
accumulator with the row scale times the block scale, optionally overlapping the promotion of one k step with
the next step's wgmma (`GroupedGemmConfig.fp8_overlap_promotion`). The schedule, memory warpgroup and epilogue
are the bf16 kernel's (`grouped_gemm_common.py`); `fp8_to_f32` decodes e4m3 bits for references that XLA
cannot fold away.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _compat, _mosaic
from pallas_kernels.grouped_gemm_common import (epilogue_cols, kernel_call, pad_rows, reference, store_rows,
                                                validate_inputs, warp_specialized, wg_valid_rows)
from pallas_kernels.grouped_gemm_tiles import (FP8_BLOCK, GroupedGemmConfig, TileQuantizedRows, default_config,
                                               max_tiles, padded_rows, tile_schedule)


# ---------------------------------------------------------------------------------------------
# Activation quantization and the FP8 reference (pure jnp, f32 accumulation).
# ---------------------------------------------------------------------------------------------


E4M3_MAX = 448.0  # the largest finite e4m3fn value

# The f32 value of each of the 256 e4m3fn bit patterns (0x7F and 0xFF are NaN).
_E4M3_VALUES = np.arange(256, dtype=np.uint8).view(jnp.float8_e4m3fn).astype(np.float32)


def fp8_to_f32(v):
  """e4m3fn -> f32 by decoding the bit pattern (a 256-entry table), not with `astype`.

  Why not `v.astype(f32)`: under `jax.jit`, XLA:GPU's simplify-fp-conversions pass (on by default,
  `--xla_allow_excess_precision`) rewrites any chain of float converts, so when the quantization
  `a.astype(e4m3)` and the up-cast are in one program, `convert(convert(a, f8), f32)` becomes `a`:
  the FP8 rounding silently disappears (openxla/xla#41605; XLA:CPU keeps it). A jitted reference
  then compares the kernel against unquantized activations: on the H200 test_grouped_gemm_fp8 saw
  exactly the e4m3 rounding error, 0.0257. A bitcast to uint8 is not a float convert, so the
  rounding survives on every backend; the table lookup is exact."""
  bits = lax.bitcast_convert_type(v.astype(jnp.float8_e4m3fn), jnp.uint8).astype(jnp.int32)
  return jnp.take(jnp.asarray(_E4M3_VALUES), bits, mode="clip")


def quantize_activations(x):
  """Per-token, per-128-column e4m3 quantization. Returns (x_q [M, K] e4m3, scale [M, K/128] f32).

  To emulate FP8 in jnp, dequantize x_q with `fp8_to_f32`, not `astype` (see there)."""
  m, k = x.shape
  xb = x.astype(jnp.float32).reshape(m, k // FP8_BLOCK, FP8_BLOCK)
  scale = _e4m3_scale(jnp.max(jnp.abs(xb), axis=-1))
  xq = (xb / scale[..., None]).astype(jnp.float8_e4m3fn).reshape(m, k)
  return xq, scale


def _e4m3_scale(amax):
  """The scale that maps a block whose largest magnitude is amax onto e4m3's range (at least 1e-12 / 448)."""
  return jnp.maximum(amax, 1e-12) / E4M3_MAX


def _quantize_rows(a):
  """`quantize_activations`' rule inside a kernel: a [rows, 128] f32 (one scale block per row) -> (e4m3 values,
  row scales [rows] f32). Written with the ops the Mosaic GPU warpgroup lowering has (no abs, explicit
  broadcast)."""
  scale = _e4m3_scale(jnp.max(jnp.maximum(a, -a), axis=1))
  return (a / lax.broadcast_in_dim(scale, a.shape, [0])).astype(jnp.float8_e4m3fn), scale


def dequantize_weight(w, scale):
  """[E, N, K] e4m3 with [E, N/128, K/128] block scales -> f32 [E, N, K]."""
  s = jnp.repeat(jnp.repeat(scale, FP8_BLOCK, axis=1), FP8_BLOCK, axis=2)
  return fp8_to_f32(w) * s  # not astype: w may have been quantized in the same jit


def dequantized_activations(x, x_scale=None):
  """The f32 values the FP8 kernels multiply for activations x [M, K]: quantized per token per 128 columns
  (`quantize_activations`), or taken as given (e4m3 with `x_scale` [M, K/128]), then dequantized."""
  xq, xs = quantize_activations(x) if x_scale is None else (x, x_scale)
  return (fp8_to_f32(xq).reshape(x.shape[0], -1, FP8_BLOCK) * xs[..., None]).reshape(x.shape)


def reference_fp8(x, group_sizes, weights, scales, expert_slot, *, out_dtype=jnp.bfloat16, x_scale=None):
  """FP8 reference: the activations quantized exactly as the kernel does (same function, same e4m3
  values and scales; or taken as given, e4m3 with `x_scale`, as the kernel takes them), everything
  dequantized to f32 and multiplied in f32. Weights are [E, N, K] (DeepSeek's [out, in] layout). Safe
  under jit on the GPU: the dequantization decodes bits (`fp8_to_f32`), so XLA cannot fold the
  quantization away."""
  xd = dequantized_activations(x, x_scale)
  wd = tuple(jnp.swapaxes(dequantize_weight(w, s), 1, 2) for w, s in zip(weights, scales))
  return reference(xd, group_sizes, wd, expert_slot, out_dtype=out_dtype)


# ---------------------------------------------------------------------------------------------
# FP8 kernel (DeepSeek-V3 block scales).
# ---------------------------------------------------------------------------------------------

_LOG2E = 1.4426950408889634


def _fp8_ws_body(sched_ref, x_ref, *refs, cfg, num_buffers, t_max, k, n,
                 out_dtype, interpret, swiglu=False, tile_scales_in=False, quantize_out=False, quantize_x=False):
  """swiglu: n is the output width I and the weights hold 2I rows (gate rows [0, I), up rows [I, 2I));
  each tile accumulates its gate and up columns and stores silu(gate) * up.
  tile_scales_in: xs_ref is [T, K/128, block_m], the row scales of tile t's rows (`TileQuantizedRows`),
  instead of [K/128, M'].
  quantize_out: the output is quantized per row per 128 columns to e4m3 (out_ref), with the scales of tile t
  in the extra output [T, n/128, block_m] (every row of the tile, valid or not: no other tile writes there).
  quantize_x: x_ref holds bf16 activations and no row-scale input follows it; each compute warpgroup quantizes
  its [wg_m, 128] rows of every k stage itself (`quantize_activations`' rule) into its own e4m3 SMEM tile, which
  the wgmma reads (the decode regime: a few rows, so the re-quantization per n block is cheap beside the
  weight stream, and no XLA pass runs before the kernel)."""
  xs_ref, refs = (None, refs) if quantize_x else (refs[0], refs[1:])
  w_refs, s_refs = refs[:num_buffers], refs[num_buffers:2 * num_buffers]
  out_ref = refs[2 * num_buffers]
  ts_out_ref = refs[2 * num_buffers + 1] if quantize_out else None
  bm, bn, bk, steps, nwg = (cfg.block_m, cfg.block_n, cfg.block_k, cfg.max_concurrent_steps,
                            cfg.num_compute_wgs)
  num_k, n_blocks, wg_m, wg_n = k // bk, n // bn, cfg.wg_m, cfg.wg_n
  halves = 2 if swiglu else 1  # weight row blocks per tile: (gate, up) or the one
  x_dtype, w_dtype = x_ref.dtype, jnp.float8_e4m3fn
  extra = {}
  if quantize_out:
    extra["sc_smem"] = plgpu.SMEM((nwg, wg_m), jnp.float32)
  if quantize_x:
    extra["aq_smem"] = plgpu.SMEM((nwg, wg_m, bk), w_dtype, transforms=_mosaic.smem_transforms(bk, w_dtype))
  else:
    extra["s_smem"] = plgpu.SMEM((steps, bm), jnp.float32)

  @functools.partial(
      pl.run_scoped,
      a_smem=plgpu.SMEM((steps, bm, bk), x_dtype, transforms=_mosaic.smem_transforms(bk, x_dtype)),
      b_smem=plgpu.SMEM((steps * halves, bn, bk), w_dtype, transforms=_mosaic.smem_transforms(bk, w_dtype)),
      o_smem=plgpu.SMEM((nwg, wg_m, wg_n if quantize_out else epilogue_cols(wg_n, out_dtype)), out_dtype),
      full=plgpu.Barrier(num_arrivals=(1 if quantize_x else 2) + halves, num_barriers=steps),
      free=plgpu.Barrier(num_arrivals=nwg, num_barriers=steps),
      collective_axes="wg",
      **extra,
  )
  def _scope(a_smem, b_smem, o_smem, full, free, s_smem=None, sc_smem=None, aq_smem=None):
    def issue(t, fields, j, kk, slot):
      _, buf, wslot, load_row, *_, k_block = fields
      plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(load_row, bm), pl.ds(kk * bk, bk)],
                              a_smem.at[slot], full.at[slot])
      if not quantize_x:
        row_scales = xs_ref.at[t, kk] if tile_scales_in else xs_ref.at[kk, pl.ds(load_row, bm)]
        plgpu.copy_gmem_to_smem(row_scales, s_smem.at[slot], full.at[slot])
      for b, w_ref in enumerate(w_refs):
        @pl.when(buf == b)
        def _():
          # split-K: the tile's K slice of the weight starts at block k_block (x holds only the slice)
          for h in range(halves):
            plgpu.copy_gmem_to_smem(
                w_ref.at[wslot, pl.ds(h * n + j * bn, bn), pl.ds((kk + k_block) * bk, bk)],
                b_smem.at[slot * halves + h], full.at[slot])

    def accumulate(fields, j, nk, carry, row0, col0):
      _, buf, wslot, *_, k_block = fields

      def weight_scale(kk, h=0):
        """The block scale of the tile's weight (buffer buf, slot wslot) at the n block of row block h
        (gate or up) and k block kk + k_block, read in place from that buffer's scales (each buffer's
        read stays in its bounds)."""
        nb = (h * n + j * bn + col0) // FP8_BLOCK
        if num_buffers == 1:
          return s_refs[0][wslot, nb, kk + k_block]
        out = jnp.float32(0.0)
        for b, s_ref in enumerate(s_refs):
          out = jnp.where(buf == b, s_ref[jnp.minimum(wslot, s_ref.shape[0] - 1), nb, kk + k_block], out)
        return out

      def stage(kk, h=0):
        """SMEM stage of k step kk and this warpgroup's views: a [wg_m, 128] e4m3,
        b [wg_n, 128] e4m3 (K-major; row block h: gate 0 or up 1), row scales [wg_m] f32."""
        slot = lax.rem(carry + kk, steps)
        a_tile, b_tile = a_smem.at[slot], b_smem.at[slot * halves + h]
        s_tile = None if quantize_x else s_smem.at[slot]
        if wg_m != bm:
          a_tile = a_tile.at[pl.ds(row0, wg_m)]
          s_tile = None if quantize_x else s_tile.at[pl.ds(row0, wg_m)]
        if wg_n != bn:
          b_tile = b_tile.at[pl.ds(col0, wg_n)]
        return slot, a_tile, b_tile, s_tile

      def dot_interpret(a_tile, b_tile):
        # Interpret-mode wgmma ignores transposed operands: the same product with jnp.dot.
        return jnp.dot(a_tile[...].astype(jnp.float32), b_tile[...].astype(jnp.float32).T)

      def scale(s_tile, kk, valid=True, h=0, x_row_scale=None):
        """x_scale[row] * w_scale[slot, n block, kk + k_block], [wg_m] f32; 0 where valid is False.
        x_scale: read from s_tile, or given (x_row_scale, quantize_x)."""
        row_scale = (s_tile[...] if x_row_scale is None else x_row_scale) * weight_scale(kk, h)
        if valid is not True:
          # A select, not a product: an unused stage may hold NaN. Explicit broadcast: the
          # warpgroup lowering has no implicit one.
          row_scale = jnp.where(jnp.broadcast_to(valid, row_scale.shape), row_scale, 0.0)
        return row_scale

      def quantize_tile(a_tile, aq_tile):
        """The warpgroup's bf16 rows a_tile [wg_m, 128] quantized into aq_tile (e4m3, SMEM); returns their
        scales [wg_m] f32 (`quantize_activations`: max |x| / 448 per row, at least 1e-12 / 448)."""
        a = a_tile[...] if interpret else plgpu.load(a_tile, (), layout=plgpu.Layout.WGMMA)
        aq_tile[...], row_scale = _quantize_rows(a.astype(jnp.float32))
        plgpu.commit_smem()  # the stores reach the async proxy (wgmma) and every thread of the warpgroup
        return row_scale

      def promote(acc, part, row_scale):
        return acc + part * lax.broadcast_in_dim(row_scale, part.shape, [0])

      def step(kk, accs):
        """One k step: per row block h, the FP8 partial product promoted into accs[h]. The
        partials share one wgmma accumulator, one after the other (registers: SwiGLU holds two
        accumulators)."""
        new = []
        x_row_scale = None
        for h, acc in enumerate(accs):
          slot, a_tile, b_tile, s_tile = stage(kk, h)
          if h == 0:
            plgpu.barrier_wait(full.at[slot])
            if quantize_x:
              aq_tile = aq_smem.at[lax.axis_index("wg")]
              x_row_scale = quantize_tile(a_tile, aq_tile)
          if quantize_x:
            a_tile = aq_tile
          if interpret:
            part = dot_interpret(a_tile, b_tile)
          else:
            def mm(tmp_ref):
              plgpu.wgmma(tmp_ref, a_tile, _compat.transpose_ref(b_tile, (1, 0)))
              return tmp_ref[...]  # waits for the wgmma
            part = pl.run_scoped(mm, plgpu.ACC((wg_m, wg_n), jnp.float32))
          row_scale = scale(s_tile, kk, h=h, x_row_scale=x_row_scale)
          if h == halves - 1:
            plgpu.barrier_arrive(free.at[slot])
          new.append(promote(acc, part, row_scale))
        return tuple(new)

      acc0 = jnp.zeros((wg_m, wg_n), jnp.float32)
      if not interpret:
        acc0 = plgpu.layout_cast(acc0, plgpu.Layout.WGMMA)
      if cfg.fp8_overlap_promotion:
        return _fp8_overlap_pipeline(nk, acc0, stage=stage, scale=scale, promote=promote,
                                     dot_interpret=dot_interpret, full=full, free=free,
                                     interpret=interpret)
      accs = lax.fori_loop(0, nk, step, (acc0,) * halves)
      if not swiglu:
        return accs[0]
      gate, up = accs
      # silu(g) = g / (1 + e^-g), with exp2 (what the kernels' exponentials lower to)
      return gate / (1.0 + jnp.exp2(gate * -_LOG2E)) * up

    def store_quantized(acc, t, j, fields, row0, col0, wg):
      """The warpgroup's [wg_m, 128] sub-tile quantized per row (`quantize_activations`' rule): its valid rows
      to out_ref, the row scales of all wg_m rows to ts_out[t, n block, row0:]."""
      *_, load_row, smem_off, n_valid, _, _ = fields
      q, row_scale = _quantize_rows(acc)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last stores have read o_smem and sc_smem
      o_smem.at[wg][...] = q
      sc_smem.at[wg][...] = row_scale
      plgpu.commit_smem()
      col = j * bn + col0
      lo, cnt = wg_valid_rows(smem_off, n_valid, row0, wg_m)
      store_rows(o_smem.at[wg], out_ref.at[:, pl.ds(col, wg_n)], row=load_row + lo, smem_off=lo - row0,
                 n_valid=cnt, block_m=wg_m)
      plgpu.copy_smem_to_gmem(sc_smem.at[wg], ts_out_ref.at[t, col // FP8_BLOCK, pl.ds(row0, wg_m)])

    warp_specialized(sched_ref, out_ref, o_smem, cfg=cfg, t_max=t_max, n_blocks=n_blocks, num_k=num_k,
                     issue=issue, free=free, accumulate=accumulate,
                     store=store_quantized if quantize_out else None)


def _fp8_overlap_pipeline(nk, acc0, *, stage, scale, promote, dot_interpret, full, free,
                          interpret):
  """k loop of one warpgroup with two partial accumulators P0, P1 in ping-pong ([wg_m, wg_n] f32
  each; nk = 0 or an even number of k steps). Step k goes into P[k % 2]:

    issue k:   wait for stage k's TMA, wgmma(P[k % 2] += a_k @ b_k^T) (async, one commit group)
    retire k:  wgmma_wait(1) (every group but the newest, k + 1, is complete: PTX commit groups
               complete in order), read P[k % 2], release stage k, acc += P[k % 2] * scale_k,
               P[k % 2] = 0
    order:     issue 0, issue 1, retire 0, issue 2, retire 1, ..., issue nk-1, retire nk-2,
               retire nk-1 (wgmma_wait(0))

  so the promotion of step k runs on the CUDA cores while the tensor core runs step k + 1. The loop
  runs over pairs (static P0 / P1); its first "retire k - 1" (k = 0) reads the still-zero P1 with
  scale 0 and releases nothing, which avoids a conditional around accumulator operations.
  Interpret mode computes each partial with `jnp.dot` at issue (the interpreter's wgmma ignores
  the transposed B) and carries the partials as values; barriers, scales and order are the same."""
  zeros = acc0  # acc0 is zeros with the accumulator layout

  def run(p_refs):
    def issue(kk, which, parts):
      slot, a_tile, b_tile, _ = stage(kk)
      plgpu.barrier_wait(full.at[slot])
      if interpret:
        return tuple(dot_interpret(a_tile, b_tile) if i == which else p
                     for i, p in enumerate(parts))
      plgpu.wgmma(p_refs[which], a_tile, _compat.transpose_ref(b_tile, (1, 0)))
      return parts

    def retire(kk, which, acc, parts, *, valid=True, wait_n=1):
      kk = jnp.maximum(kk, 0)  # kk = -1 (valid False) reads stage 0's scales, then drops them
      slot, _, _, s_tile = stage(kk)
      row_scale = scale(s_tile, kk, valid)  # read before the stage is released
      if interpret:
        part = parts[which]
        parts = tuple(zeros if i == which else p for i, p in enumerate(parts))
      else:
        # After the wait every wgmma but the newest (step kk + 1) is complete, so step kk's
        # SMEM reads are done. The barrier pins later uses of `part` after the wait.
        part = lax.optimization_barrier(
            plgpu.wgmma_accumulator_load(p_refs[which], wait_n=wait_n))
      if valid is True:
        plgpu.barrier_arrive(free.at[slot])
      else:
        pl.when(valid)(lambda: plgpu.barrier_arrive(free.at[slot]))
      acc = promote(acc, part, row_scale)
      if not interpret:
        acc = lax.optimization_barrier(acc)  # consume part before its registers are zeroed
        p_refs[which][...] = zeros
      return acc, parts

    def pair(i, carry):
      acc, parts = carry
      k0 = 2 * i
      parts = issue(k0, 0, parts)
      acc, parts = retire(k0 - 1, 1, acc, parts, valid=i > 0)
      parts = issue(k0 + 1, 1, parts)
      acc, parts = retire(k0, 0, acc, parts)
      return acc, parts

    parts0 = (zeros, zeros) if interpret else ()
    acc, parts = lax.fori_loop(0, nk // 2, pair, (acc0, parts0))
    acc, _ = retire(nk - 1, 1, acc, parts, valid=nk > 0, wait_n=0)
    return acc

  if interpret:
    return run(())
  return pl.run_scoped(lambda p0, p1: run((p0, p1)), plgpu.ACC(acc0.shape, jnp.float32),
                       plgpu.ACC(acc0.shape, jnp.float32))


def grouped_gemm_fp8(x, group_sizes, weights: Sequence[jax.Array], scales: Sequence[jax.Array],
                     expert_slot, *, config: GroupedGemmConfig | None = None,
                     out_dtype=jnp.bfloat16, interpret: bool = False, x_scale=None,
                     quantize_in_kernel: bool = False):
  """Grouped FP8 GEMM with DeepSeek-V3 block scales.

  Args:
    x: [M, K] bf16 (or f32) activations sorted by group; quantized here per token per 128 columns
      to e4m3 (`quantize_activations`). Or, with `x_scale` [M, K/128] f32, activations already quantized
      (e4m3, e.g. quantized once per token and then gathered into expert order): used as they are. Or
      `TileQuantizedRows` from a grouped GEMM over the same groups (`grouped_gemm_fp8_swiglu`'s quantized
      output): the row scales are read by tile.
    group_sizes, expert_slot: as in `grouped_gemm`.
    weights: tuple of [E_i, N, K] float8_e4m3fn buffers: DeepSeek's checkpoint layout ([out, in]).
      Hopper's FP8 wgmma reads B only K-major, so this layout is what the tensor cores consume.
    scales: tuple of [E_i, N/128, K/128] f32 block scales (the checkpoint's `weight_scale_inv`):
      dequantized weight = w * scale per 128x128 block.
    config: None picks FP8_DECODE_CONFIG; FP8_PREFILL_OVERLAP_CONFIG (fp8_overlap_promotion)
      overlaps each k step's promotion with the next step's wgmma and needs K/128 even.
    quantize_in_kernel: x is bf16 and the kernel quantizes it, per k stage in the compute warpgroups
      (`quantize_activations`' rule, the same e4m3 values): no XLA passes before the kernel. For few rows
      per group (decode): the rows are re-quantized for every n block, cheap beside the weight stream there.
  Returns:
    [M, N] out_dtype; per 128-wide K block the fp8 partial product is promoted into an f32
    accumulator with the activation row scale times the weight block scale.
  """
  return grouped_fp8(x, group_sizes, weights, scales, expert_slot, config=config, out_dtype=out_dtype,
                     interpret=interpret, x_scale=x_scale, quantize_x=quantize_in_kernel)


def grouped_fp8(x, group_sizes, weights, scales, expert_slot, *, config, out_dtype, interpret, x_scale,
                swiglu: bool = False, quantize_out: bool = False, quantize_x: bool = False):
  """`grouped_gemm_fp8`, and with swiglu / quantize_out `grouped_gemm_fp8_swiglu`'s kernel (weights of 2I
  rows, output [M, I]; quantized: `TileQuantizedRows`). Validates, quantizes, calls the kernel."""
  weights, scales = tuple(weights), tuple(scales)
  tiled = isinstance(x, TileQuantizedRows)
  rows = x.values if tiled else x
  n, k = validate_inputs(rows, group_sizes, weights, expert_slot, w_kn_axes=(2, 1), what="FP8 weight")[::-1]
  if weights[0].dtype != jnp.float8_e4m3fn:
    raise ValueError(f"weights must be float8_e4m3fn, got {weights[0].dtype}")
  if len(scales) != len(weights) or any(
      s.shape != (w.shape[0], n // FP8_BLOCK, k // FP8_BLOCK) for s, w in zip(scales, weights)):
    raise ValueError("scales must be one [E_i, N/128, K/128] array per weight buffer, got "
                     f"{[s.shape for s in scales]}")
  n_out = n // 2 if swiglu else n
  m = rows.shape[0]
  cfg = config or default_config(m, group_sizes.shape[0], n, fp8=True)
  if quantize_x and config is None:
    cfg = bf16_x_config(cfg)
  if cfg.block_k != FP8_BLOCK or FP8_BLOCK % cfg.wg_n:
    raise ValueError("FP8 needs block_k == 128 and a warpgroup N (64 or 128) inside one scale block")
  if not cfg.warp_specialized:
    raise ValueError("the FP8 kernel is warp specialized only")
  if k % FP8_BLOCK or n_out % FP8_BLOCK or n_out % cfg.block_n:
    raise ValueError(f"K={k} and the output's N={n_out} must divide by 128, and N by block_n={cfg.block_n}")
  if cfg.fp8_overlap_promotion and (k // FP8_BLOCK) % 2:
    raise ValueError(f"fp8_overlap_promotion alternates two partials per pair of k steps: K/128 "
                     f"must be even, got K={k}")
  if quantize_out and cfg.wg_n != FP8_BLOCK:
    raise ValueError(f"a quantized output needs a warpgroup N of 128 (one scale block), got {cfg.wg_n}")
  tile_scales = None
  if quantize_x:
    if tiled or x_scale is not None or x.dtype != jnp.bfloat16 or cfg.fp8_overlap_promotion:
      raise ValueError("quantize_in_kernel takes bf16 activations, no x_scale, and no fp8_overlap_promotion")
    xq, xs = x, None
  elif tiled:
    want = (max_tiles(m, group_sizes.shape[0], cfg.block_m), k // FP8_BLOCK, cfg.block_m)
    if x_scale is not None or x.block_m != cfg.block_m or x.tile_scales.shape != want:
      raise ValueError(f"TileQuantizedRows must come from tiles of the same block_m ({x.block_m} vs "
                       f"{cfg.block_m}) with tile_scales {want}, got {x.tile_scales.shape}, and no x_scale")
    xq, xs, tile_scales = rows, None, x.tile_scales
  elif x_scale is None:
    xq, xs = quantize_activations(x)
  else:
    if x.dtype != jnp.float8_e4m3fn or x_scale.shape != (m, k // FP8_BLOCK):
      raise ValueError(f"pre-quantized activations must be e4m3 [M, K] with x_scale [M, K/128] f32, got "
                       f"{x.dtype}{x.shape} and {x_scale.shape}")
    xq, xs = x, x_scale.astype(jnp.float32)
  return _fp8_call(xq, xs, group_sizes, expert_slot, weights, scales, cfg=cfg, k=k, n=n_out,
                   out_dtype=out_dtype, interpret=interpret, swiglu=swiglu, tile_scales=tile_scales,
                   quantize_out=quantize_out, quantize_x=quantize_x)


def _fp8_call(xq, xs, group_sizes, expert_slot, weights, scales, *, cfg, k, n, out_dtype, interpret,
              k_blocks=None, swiglu=False, tile_scales=None, quantize_out=False, quantize_x=False):
  """The kernel on quantized rows xq [M, K] e4m3 with row scales xs [M, K/128] (or `tile_scales` [T, K/128,
  block_m]; or, quantize_x, bf16 rows xq that the kernel quantizes, xs None); weights [E_i, N_w, K_w] with block scales [E_i, N_w/128, K_w/128], both read in place by (buffer,
  slot) (K_w >= K: split-K's group g reads the K columns and scales from block k_blocks[g] on). N_w = n, or 2n
  with swiglu. Returns [M, n] out_dtype, or with quantize_out `TileQuantizedRows` of [M, n] e4m3."""
  m = xq.shape[0]
  m_pad = padded_rows(m, cfg.block_m)
  xq = pad_rows(xq, m_pad)
  sched = tile_schedule(group_sizes, expert_slot, m=m, m_pad=m_pad, block_m=cfg.block_m,
                        buffer_sizes=tuple(w.shape[0] for w in weights), k_blocks=k_blocks)
  t_max = sched.shape[0] - 1
  # [K/128, M'] so that a tile's row scales of one K block are one contiguous TMA box.
  if quantize_x:
    row_scales = ()
  elif tile_scales is not None:
    row_scales = (tile_scales,)
  else:
    row_scales = (jnp.pad(xs.T, ((0, 0), (0, m_pad - m))),)
  body = functools.partial(_fp8_ws_body, cfg=cfg, num_buffers=len(weights), k=k, n=n,
                           out_dtype=jnp.dtype(jnp.float8_e4m3fn if quantize_out else out_dtype), t_max=t_max,
                           interpret=interpret, swiglu=swiglu, tile_scales_in=tile_scales is not None,
                           quantize_out=quantize_out, quantize_x=quantize_x)
  if quantize_out:
    out_shape = (jax.ShapeDtypeStruct((m_pad, n), jnp.float8_e4m3fn),
                 jax.ShapeDtypeStruct((t_max, n // FP8_BLOCK, cfg.block_m), jnp.float32))
  else:
    out_shape = jax.ShapeDtypeStruct((m_pad, n), out_dtype)
  call = kernel_call(body, out_shape, cfg=cfg, interpret=interpret, num_threads=cfg.num_compute_wgs + 1)
  out = call(sched, xq, *row_scales, *weights, *(s.astype(jnp.float32) for s in scales))
  if quantize_out:
    return TileQuantizedRows(out[0][:m], out[1], cfg.block_m)
  return out[:m]


def bf16_x_config(cfg: GroupedGemmConfig) -> GroupedGemmConfig:
  """`cfg` for bf16 activations quantized in the kernel: each stage's activation tile doubles (bf16) and every
  compute warpgroup keeps an e4m3 copy, so at most 3 stages fit the SMEM with the decode tile."""
  return dataclasses.replace(cfg, max_concurrent_steps=min(cfg.max_concurrent_steps, 3))


def choose_k_splits(n: int, k: int, num_sms: int, block_n: int, min_k_blocks: int = 2,
                    min_splits: int = 4) -> int:
  """K slices for a matmul of a few rows whose N / block_n output tiles leave SMs idle: the smallest
  divisor S of K/128 with S * (N / block_n) >= num_sms, each slice at least `min_k_blocks` 128-wide
  blocks; 1 when the tiles already fill the SMs, K cannot be cut, or fewer than `min_splits` slices
  would do: two slices did not pay for the pass over the partials (R1's q_b on an H100, 1 and 64 rows:
  15.0 -> 17.8 and 18.0 -> 31.2 us; kernels-20261206-nvidia-h100-x1-fp8-linear-decode-const-sched.json)."""
  n_tiles, k_blocks = -(-n // block_n), k // FP8_BLOCK
  if n_tiles >= num_sms:
    return 1
  best = 1
  for s in range(2, k_blocks // min_k_blocks + 1):
    if k_blocks % s == 0:
      best = s
      if s * n_tiles >= num_sms:
        break
  return best if best >= min_splits else 1


def fp8_matmul_split_k(x, weight, scale, splits: int, *, config: GroupedGemmConfig | None = None,
                       out_dtype=jnp.bfloat16, interpret: bool = False, quantize_in_kernel: bool = False):
  """y = x @ dequant(weight).T for a few rows (decode), with K cut into `splits` slices that run as
  separate tiles (more CTAs stream the weight: a [N, K] weight has only N / block_n output tiles) and
  are summed in f32.

  x: [M, K] bf16/f32, quantized per token per 128 columns as `grouped_gemm_fp8` does; weight: [N, K]
  e4m3 (the checkpoint's [out, in]) with scale [N/128, K/128] f32; splits divides K/128. The slices are
  groups of the grouped GEMM: x's rows re-laid as [splits * M, K / splits] (slice-major), group g's tiles
  read the weight's K columns from block g * K / (128 splits) on, in place. quantize_in_kernel: x (bf16) is
  re-laid and quantized by the kernel (`grouped_gemm_fp8`). Returns [M, N] out_dtype, equal to the one-group
  GEMM up to the f32 summation order of the slices."""
  m, k = x.shape
  n = weight.shape[0]
  if weight.ndim != 2 or weight.shape[1] != k or weight.dtype != jnp.float8_e4m3fn:
    raise ValueError(f"weight must be e4m3 [N, K={k}], got {weight.dtype}{weight.shape}")
  if scale.shape != (n // FP8_BLOCK, k // FP8_BLOCK) or n % FP8_BLOCK or k % FP8_BLOCK:
    raise ValueError(f"N={n} and K={k} must divide by 128 and scale be [N/128, K/128], got {scale.shape}")
  if splits < 1 or (k // FP8_BLOCK) % splits:
    raise ValueError(f"splits={splits} must divide K/128={k // FP8_BLOCK}")
  kb = k // FP8_BLOCK // splits  # 128-wide blocks per slice
  cfg = config or default_config(m, 1, n, fp8=True)
  if quantize_in_kernel and config is None:
    cfg = bf16_x_config(cfg)
  if cfg.block_k != FP8_BLOCK or n % cfg.block_n or (cfg.fp8_overlap_promotion and kb % 2):
    raise ValueError(f"config {cfg} does not fit N={n} and slices of {kb} K blocks")
  if quantize_in_kernel:
    if x.dtype != jnp.bfloat16 or cfg.fp8_overlap_promotion:
      raise ValueError("quantize_in_kernel takes bf16 activations and no fp8_overlap_promotion")
    xq, xs = x, None
  else:
    xq, xs = quantize_activations(x)
    xs = xs.reshape(m, splits, kb).transpose(1, 0, 2).reshape(splits * m, kb)
  xq = xq.reshape(m, splits, kb * FP8_BLOCK).transpose(1, 0, 2).reshape(splits * m, kb * FP8_BLOCK)
  # numpy sizes: the tile schedule is a constant of the program (`tile_schedule`)
  group_sizes = np.full((splits,), m, np.int32)
  y = _fp8_call(xq, xs, group_sizes, np.zeros((splits, 2), np.int32), (weight[None],), (scale[None],), cfg=cfg,
                k=kb * FP8_BLOCK, n=n, out_dtype=jnp.float32, interpret=interpret,
                k_blocks=np.arange(splits, dtype=np.int32) * kb, quantize_x=quantize_in_kernel)
  return y.reshape(splits, m, n).sum(0).astype(out_dtype)
