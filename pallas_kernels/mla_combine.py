"""Split-KV merge of the MLA decode kernel's partials in one Mosaic GPU kernel (Hopper).

The decode kernel splits a long request's pages over S CTAs; each writes its output normalized over its pages
(bf16) and its log-sum-exp. Merged, row r of request b is

  out[b, r] = sum_s w[s, r] o[b, s, r] / sum_s w[s, r],   w[s, r] = exp(lse[b, s, r] - max_s lse[b, s, r]),

and its log-sum-exp log(sum_s w[s, r]) + max_s lse. `mla_decode.combine` says the same in jnp; XLA runs it as
five kernels (max, exp + sum, the weighted sum, divide + cast, lse: 10.7 us at B=1, 32K tokens, 66 splits, of
which the weighted sum over 8.6 MB of partials is 4.6 us; WORKSPACE Finding 30). Here it is one pass over the
partials, the maximum over the splits taken first from their log-sum-exps.

Kernel design: a CTA owns 64 rows x `COLUMNS` columns of one request (grid: request, row tile, column tile).
A memory warpgroup first copies every split's log-sum-exps of the row tile ([S, 64] f32, one TMA), then
streams the request's S partial tiles [64, COLUMNS] through a ring of `STAGES` SMEM slots. The compute
warpgroup takes the rows' maximum over the splits first, so each split's weight exp(lse - max) is known when
its tile lands and the merge is one FMA a value with no rescale of the running sum (FlashMLA's combine does
the same); two splits an iteration. Values are f32 throughout (one value per row in wgmma's register layout,
broadcast over the columns, no matmul) and the bf16 tile is written once; column tile 0's CTA writes the rows'
log-sum-exp. At B=1 with R1's 128 heads and 512 latent columns that is 2 x 16 CTAs.

Measured (the online form before session 15, which rescaled the sum at every split and copied each split's
log-sum-exps beside its tile): not the HBM rate. With 16 slots the merge of 66 splits took 10.2 us (H100,
session 14; 0.85 TB/s), of 16 splits 3.8 us, ~0.13 us a split; with 32 slots 10.6 us (H200, session 15; XLA's
five kernels 10.3 us in the same run): not the bytes in flight either. What is left that grows with the
splits is the compute warpgroup's chain per split (barrier, SMEM loads, new maximum, two exponentials,
rescale, release) and the two copies a split: this form has one copy, one exponential and no rescale a split.
Measured (session 16, H100): 8.58 us at 66 splits, 3.52 at 16, against XLA's five kernels 11.07 / 4.64 us in the
same run; the ~5 us predicted was not reached (still ~0.1 us a split beyond a ~2 us base). Session 17 (H100): four
splits a loop step with their four tiles' barriers waited and loads issued before any FMA: 8.83 us at 66 splits,
no gain, so the per-split chain is not what limits it either (reverted; a profile of this kernel is next).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _compat, _mosaic

ROWS = 64  # rows per CTA: the wgmma register layout's M (one value per row broadcast over the columns)
COLUMNS = 32  # columns per CTA: enough CTAs at B=1 (2 x 16 for R1) for the partials' bytes to stream
STAGES = 32  # partial tiles in flight per CTA (32 x 4 KB + their log-sum-exps: `smem_bytes`); a barrier a slot,
# and Mosaic GPU allocates at most 32 barriers in one group (measured no faster than 16, session 15)
MAX_SPLITS = 256  # a row tile's log-sum-exps of every split are one TMA box ([splits, 64] f32, <= 256 a side)
SMEM_BYTES = 227 * 1024  # Hopper's shared memory per CTA


def check_columns(columns: int, name: str = "columns") -> None:
  """Columns a CTA may own: a positive multiple of 16 (bf16 TMA rows of >= 32 bytes, the WGMMA layout's 8)."""
  if columns < 16 or columns % 16:
    raise ValueError(f"{name} must be a positive multiple of 16, got {columns}")


def ring_stages(num_splits: int, columns: int) -> int:
  """Partial tiles in flight: `STAGES`, fewer for wide tiles (the ring holds at most STAGES tiles of `COLUMNS`)
  or few splits."""
  return max(1, min(STAGES, num_splits, STAGES * COLUMNS // columns))


def smem_bytes(stages: int, num_splits: int, columns: int = COLUMNS, itemsize: int = 2) -> int:
  """SMEM of one CTA as Mosaic GPU lays it out (every allocation 1 KB-aligned), barriers aside: the ring of
  partial tiles, every split's log-sum-exps of the row tile, the output tile and its log-sum-exps."""
  align = lambda n: -(-n // 1024) * 1024
  return (align(stages * ROWS * columns * itemsize) + align(num_splits * ROWS * 4)
          + align(ROWS * columns * itemsize) + align(ROWS * 4))


def _combine_kernel(o_ref, lse_ref, out_ref, lse_out_ref, *, num_splits, stages, cols, interpret):
  b, rt, ct = lax.axis_index("b"), lax.axis_index("rt"), lax.axis_index("ct")
  wg = lax.axis_index("wg")
  rows = ROWS
  dtype = o_ref.dtype

  def scoped(o_smem, lse_smem, out_smem, lse_out_smem, lse_bar, full, free):
    @pl.when(wg == 1)
    def _memory():
      # every split's log-sum-exps of this row tile at once ([splits, 64] f32: one copy), then the tiles
      plgpu.copy_gmem_to_smem(lse_ref.at[pl.ds(b * num_splits, num_splits), pl.ds(rt * rows, rows)], lse_smem,
                              lse_bar)

      @pl.loop(0, num_splits)
      def _(s):
        slot = lax.rem(s, stages)

        @pl.when(s >= stages)
        def _():
          plgpu.barrier_wait(free.at[slot])

        plgpu.copy_gmem_to_smem(o_ref.at[b * num_splits + s, pl.ds(rt * rows, rows), pl.ds(ct * cols, cols)],
                                o_smem.at[slot], full.at[slot])

      for j in range(min(stages, num_splits)):  # the last releases, so every barrier ends balanced
        plgpu.barrier_wait(free.at[(num_splits - 1 - j) % stages])

    @pl.when(wg == 0)
    def _compute():
      def split_lse(s):
        return _mosaic.load_wgmma_rows(lse_smem.at[s], interpret)

      def load_tile(slot):
        if interpret:
          return o_smem[slot].astype(jnp.float32)
        return plgpu.load(o_smem.at[slot], (), layout=plgpu.Layout.WGMMA).astype(jnp.float32)

      # The weights first: the maximum over the splits (four running maxima, so the SMEM loads overlap), then
      # exp(lse - max) per split as its tile comes. No rescale of the sum inside the loop: each split is one
      # FMA a value, and two splits an iteration keep two tiles' loads in flight.
      plgpu.barrier_wait(lse_bar)
      maxima = [_mosaic.wgmma_rows(jnp.full((rows,), -jnp.inf, jnp.float32), interpret) for _ in range(4)]
      for s in range(num_splits):
        maxima[s % 4] = jnp.maximum(maxima[s % 4], split_lse(s))
      m = functools.reduce(jnp.maximum, maxima)
      m_use = jnp.where(m == -jnp.inf, 0.0, m)  # no split with keys: every weight 0

      def add_split(s, acc, tot):
        slot = lax.rem(s, stages)
        plgpu.barrier_wait(full.at[slot])
        o = load_tile(slot)
        plgpu.barrier_arrive(free.at[slot])
        w = jnp.exp(split_lse(s) - m_use)
        return acc + o * _mosaic.bcast_rows(w, o.shape), tot + w

      def pair(j, carry):
        acc, tot = add_split(2 * j, *carry)
        return add_split(2 * j + 1, acc, tot)

      acc = _mosaic.wgmma_tile(jnp.zeros((rows, cols), jnp.float32), interpret)
      tot = _mosaic.wgmma_rows(jnp.zeros((rows,), jnp.float32), interpret)
      acc, tot = lax.fori_loop(0, num_splits // 2, pair, (acc, tot))
      if num_splits % 2:
        acc, tot = add_split(num_splits - 1, acc, tot)
      live = tot > 0
      tot_safe = jnp.where(live, tot, 1.0)
      out_smem[...] = (acc / _mosaic.bcast_rows(tot_safe, acc.shape)).astype(dtype)
      lse_out_smem[...] = jnp.where(live, jnp.log(tot_safe) + m, -jnp.inf)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(out_smem, out_ref.at[b, pl.ds(rt * rows, rows), pl.ds(ct * cols, cols)])

      @pl.when(ct == 0)
      def _():
        plgpu.copy_smem_to_gmem(lse_out_smem, lse_out_ref.at[b, pl.ds(rt * rows, rows)])

      plgpu.wait_smem_to_gmem(0)

  pl.run_scoped(
      scoped,
      plgpu.SMEM((stages, rows, cols), dtype, transforms=_mosaic.smem_transforms(cols, dtype)),
      plgpu.SMEM((num_splits, rows), jnp.float32),
      plgpu.SMEM((rows, cols), dtype, transforms=_mosaic.smem_transforms(cols, dtype)),
      plgpu.SMEM((rows,), jnp.float32),
      plgpu.Barrier(num_arrivals=1),  # every split's log-sum-exps
      plgpu.Barrier(num_arrivals=1, num_barriers=stages),  # a partial tile's copy
      plgpu.Barrier(num_arrivals=1, num_barriers=stages),
      collective_axes="wg",
  )


def combine_splits(o_parts, lse_parts, *, num_splits: int, columns: int = COLUMNS, interpret: bool = False):
  """Merges each request's split partials; a CTA merges `columns` columns of 64 rows (a multiple of 16: its
  tiles' rows are columns x 2 bytes in HBM, one TMA row each).

  Args:
    o_parts: [B * num_splits, R, C] bf16, unit b * num_splits + s = split s of request b, normalized over its
      keys; R a multiple of `ROWS`, C of `columns` (the decode kernel's padded rows and latent width).
    lse_parts: [B * num_splits, R] f32, natural-log log-sum-exp of each partial row (-inf: an empty split).
  Returns:
    (out [B, R, C] in o_parts' dtype, lse [B, R] f32); a row whose splits are all empty gets 0 and -inf.
  """
  units, r, c = o_parts.shape
  if units % num_splits or lse_parts.shape != (units, r):
    raise ValueError(f"o_parts {o_parts.shape} and lse_parts {lse_parts.shape} must be [B * {num_splits}, R, C] "
                     f"and [B * {num_splits}, R]")
  check_columns(columns)
  if r % ROWS or c % columns:
    raise ValueError(f"rows {r} and columns {c} must be multiples of {ROWS} and {columns}")
  if lse_parts.dtype != jnp.float32:
    raise ValueError(f"lse_parts must be float32, got {lse_parts.dtype}")
  if num_splits > MAX_SPLITS:
    raise ValueError(f"num_splits {num_splits} > {MAX_SPLITS} (a row tile's log-sum-exps are one TMA box)")
  b = units // num_splits
  body = functools.partial(_combine_kernel, num_splits=num_splits, stages=ring_stages(num_splits, columns),
                           cols=columns, interpret=interpret)
  return plgpu.kernel(
      body,
      out_type=(jax.ShapeDtypeStruct((b, r, c), o_parts.dtype), jax.ShapeDtypeStruct((b, r), jnp.float32)),
      grid=(b, r // ROWS, c // columns),
      grid_names=("b", "rt", "ct"),
      num_threads=2,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=_compat.InterpretGPUParams() if interpret else None,
  )(o_parts, lse_parts)
