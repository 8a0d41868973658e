"""Tile configurations and the tile schedule of the grouped GEMM (`grouped_gemm.py`, `grouped_gemm_fp8.py`).

`GroupedGemmConfig` (tile sizes per CTA, warpgroup split, pipeline depth) and its measured presets;
`default_config` picks one from the shape. `tile_schedule` maps every M-tile to one group's rows, in jnp,
outside the kernel; `padded_rows` is the row count the kernels pad x to.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

FP8_BLOCK = 128  # DeepSeek-V3 block-scale granularity (weights 128x128, activations 1x128)
_SCHED_COLS = 8  # is_mm, buffer, slot, load_row, smem_off, n_valid, group, pad
# fp8_overlap_promotion: registers per thread for the main accumulator and the two partials; the
# rest of the 232 a compute warpgroup gets (2 compute warpgroups) holds scales, addresses, counters.
_OVERLAP_MAX_ACC_REGISTERS = 192


@dataclasses.dataclass(frozen=True)
class GroupedGemmConfig:
  """Tile sizes of the grouped GEMM (per CTA).

  The CTA tile (block_m, block_n) is split evenly over `num_compute_wgs` compute warpgroups along
  `wg_split` ("n": each owns block_m x block_n/2; "m": each owns block_m/2 x block_n).

  `fp8_overlap_promotion` (FP8 only): two partial accumulators in ping-pong, so that the promotion
  of k step i (CUDA cores) overlaps the wgmma of step i + 1 (tensor core). The main accumulator and
  both partials, 3 x wg_m x wg_n / 128 f32 registers per thread, must fit in the compute
  warpgroup's 232: at most 64 x 128 per warpgroup (192 registers).

  (`fp8_pingpong`, the two warpgroups taking turns on the tensor cores, measured 5-11% slower at every prefill
  shape on an H100 and was removed in session 17: KERNELS.md, git a214c4a has it.)
  """
  block_m: int = 128
  block_n: int = 256
  block_k: int = 64
  max_concurrent_steps: int = 3
  num_compute_wgs: int = 2
  warp_specialized: bool = True
  wg_split: str = "n"
  num_sms: int | None = None  # persistent CTAs; None: the device's SM count (2 in interpret mode)
  fp8_overlap_promotion: bool = False

  def __post_init__(self):
    if self.block_m % 64 or not 64 <= self.block_m <= 256:
      raise ValueError(f"block_m must be 64, 128, 192 or 256, got {self.block_m}")
    if self.num_compute_wgs not in (1, 2):
      raise ValueError(f"num_compute_wgs must be 1 or 2, got {self.num_compute_wgs}")
    if not self.warp_specialized and self.num_compute_wgs != 1:
      raise ValueError("the non-warp-specialized path has one compute warpgroup")
    if self.wg_split not in ("m", "n"):
      raise ValueError(f"wg_split must be 'm' or 'n', got {self.wg_split!r}")
    if self.wg_m % 64 or self.wg_m * self.num_compute_wgs != self.block_m and self.wg_split == "m":
      raise ValueError(f"block_m / num_compute_wgs must be a multiple of 64, got {self.wg_m}")
    wg_n = self.wg_n
    if self.block_n % self.num_compute_wgs or wg_n % 64 or wg_n > 256:
      raise ValueError(f"the warpgroup's N ({wg_n}) must be a multiple of 64 and <= 256")
    if self.block_k % 32:
      raise ValueError(f"block_k must be a multiple of 32, got {self.block_k}")
    if self.max_concurrent_steps < 2:
      raise ValueError("max_concurrent_steps must be >= 2")
    if self.fp8_overlap_promotion:
      if self.block_k != FP8_BLOCK or not self.warp_specialized:
        raise ValueError("fp8_overlap_promotion is for the FP8 kernel: block_k must be 128 and "
                         "warp_specialized True")
      if 3 * self.wg_m * self.wg_n // 128 > _OVERLAP_MAX_ACC_REGISTERS:
        raise ValueError(
            f"fp8_overlap_promotion keeps 3 f32 tiles of {self.wg_m}x{self.wg_n} per warpgroup "
            f"({3 * self.wg_m * self.wg_n // 128} registers per thread, at most "
            f"{_OVERLAP_MAX_ACC_REGISTERS} of 232): use at most 64x128 per warpgroup")

  @property
  def wg_m(self) -> int:
    return self.block_m // self.num_compute_wgs if self.wg_split == "m" else self.block_m

  @property
  def wg_n(self) -> int:
    return self.block_n // self.num_compute_wgs if self.wg_split == "n" else self.block_n

  def wg_origin(self, wg):
    """(row, column) of warpgroup wg's sub-tile inside the CTA tile."""
    if self.num_compute_wgs == 1:
      return 0, 0
    return (wg * self.wg_m, 0) if self.wg_split == "m" else (0, wg * self.wg_n)


# Memory-bound decode (a few tokens per expert): the smallest wgmma M, wide N, deep pipeline.
DECODE_CONFIG = GroupedGemmConfig(block_m=64, block_n=256, block_k=64, max_concurrent_steps=4)
# Compute-bound prefill: 128x256 CTA tile, two consumer warpgroups of 128x128.
PREFILL_CONFIG = GroupedGemmConfig(block_m=128, block_n=256, block_k=64, max_concurrent_steps=3)
# Compute-bound, the CUTLASS "cooperative" shape: each warpgroup owns 64x256.
PREFILL_M_SPLIT_CONFIG = GroupedGemmConfig(block_m=128, block_n=256, block_k=64,
                                           max_concurrent_steps=3, wg_split="m")
# FP8: block_k is one 128-wide scale block and a warpgroup's N lies inside one weight scale block;
# a warpgroup owns 64x128 so that the accumulator and the per-block partial product (64 + 64
# registers per thread) fit.
FP8_DECODE_CONFIG = GroupedGemmConfig(block_m=64, block_n=256, block_k=128, max_concurrent_steps=4)
FP8_PREFILL_CONFIG = GroupedGemmConfig(block_m=128, block_n=128, block_k=128,
                                       max_concurrent_steps=4, wg_split="m")
# FP8_PREFILL_CONFIG with the promotion of k step i overlapping the wgmma of step i + 1 (two
# partial accumulators per warpgroup: 64 + 2 x 64 registers per thread). Needs K / 128 even.
FP8_PREFILL_OVERLAP_CONFIG = dataclasses.replace(FP8_PREFILL_CONFIG, fp8_overlap_promotion=True)


# FP8 gate/up with SwiGLU in the epilogue (`grouped_gemm_fp8_swiglu`): a tile reads gate and up rows, so
# block_n counts output columns and each stage holds 2 x block_n weight rows. Every warpgroup owns 128 output
# columns (one scale block of the quantized output) and holds two accumulators and the partial (192 registers
# per thread). Decode: 64 x 128 outputs (256 weight rows a stage, as FP8_DECODE_CONFIG) and one compute
# warpgroup (a weight stream: the tensor cores idle either way); prefill: FP8_PREFILL_CONFIG's 128 x 128
# with 3 stages (4 do not fit the SMEM).
FP8_SWIGLU_DECODE_CONFIG = dataclasses.replace(FP8_DECODE_CONFIG, block_n=128, num_compute_wgs=1)
FP8_SWIGLU_PREFILL_CONFIG = dataclasses.replace(FP8_PREFILL_CONFIG, max_concurrent_steps=3)


def is_prefill(m: int, num_groups: int) -> bool:
  """The regime of M rows in `num_groups` groups: prefill (compute-bound) when groups average more than 64 rows,
  else decode (a weight stream). Picks the tiles (`default_config`) and where the FP8 kernel quantizes."""
  return m > 64 * num_groups


def default_swiglu_config(m: int, num_groups: int, n_out: int) -> GroupedGemmConfig:
  """`grouped_gemm_fp8_swiglu`'s tiles for M rows in `num_groups` groups and n_out (= I) output columns,
  by the same decode/prefill rule as `default_config`."""
  del n_out  # every I of the DeepSeek-V3 family divides by 128
  return FP8_SWIGLU_PREFILL_CONFIG if is_prefill(m, num_groups) else FP8_SWIGLU_DECODE_CONFIG


def default_config(m: int, num_groups: int, n: int | None = None,
                   fp8: bool = False) -> GroupedGemmConfig:
  """Decode tiles when groups average <= 64 rows (memory-bound), prefill tiles otherwise; a narrower
  block_n when N does not divide (small test models).

  Only configurations measured on an H200 are defaults (experiments/KERNELS.md). FP8 prefill: the
  128x128 m-split tile's kernel beat the 64x256 decode tile at 9 of 10 prefill shapes by 7-18%
  (kernels-20261123-nvidia-h200-prefill.json, CUPTI kernel times)."""
  prefill = is_prefill(m, num_groups)
  if fp8:
    cfg = FP8_PREFILL_CONFIG if prefill else FP8_DECODE_CONFIG
  else:
    cfg = PREFILL_CONFIG if prefill else DECODE_CONFIG
  if n is not None and n % cfg.block_n:
    if n % 128 == 0:
      cfg = dataclasses.replace(cfg, block_n=128)
    elif not fp8 and n % 64 == 0:
      cfg = dataclasses.replace(cfg, block_n=64, num_compute_wgs=1)
  return cfg


# ---------------------------------------------------------------------------------------------
# Schedule: tile -> (group, rows), computed in jnp outside the kernel.
# ---------------------------------------------------------------------------------------------


def max_tiles(m: int, num_groups: int, block_m: int) -> int:
  """T, the schedule's tile rows for M rows in `num_groups` groups (`tile_schedule` returns [T + 1, 8])."""
  # sum_g cdiv(size_g + 7, block_m) + cdiv(zero rows + 7, block_m) <= M / block_m + 2 (G + 1)
  return pl.cdiv(m, block_m) + 2 * num_groups + 2


def _round_up(v, r):
  return (v + r - 1) // r * r


def tile_schedule(group_sizes, expert_slot, *, m, m_pad, block_m, buffer_sizes, k_blocks=None):
  """int32 [T+1, 8]; row t < T: (is_mm, buffer, slot, load_row, smem_off, n_valid, group, k_block);
  row T: (number of tiles in use, 0, ...). k_blocks: int [G], the first 128-wide K block of the weight
  that each group's tiles read (split-K: groups are K slices of one weight); None: 0 for every group.

  Given numpy arrays (sizes known when tracing: a dense linear, split-K slices) the schedule is computed
  while tracing and returned as numpy, a constant of the program; under jit a traced schedule costs
  several small kernels per call (measured 5 us for one group, 15-27 us for split-K on an H100).

  Tile t loads rows [load_row, load_row + block_m) (load_row a multiple of 8: Mosaic GPU's TMA into
  tiled SMEM needs it) and stores its rows [smem_off, smem_off + n_valid) to the output rows
  load_row + smem_off + [0, n_valid). A group's tiles start at its first row rounded down to 8, so a
  decode group of <= block_m - 7 rows is one tile and its weight is read once. Mm tiles come first,
  then zero tiles covering the rows past sum(group_sizes), then unused rows."""
  if all(isinstance(a, np.ndarray) for a in (group_sizes, expert_slot, np.zeros(0) if k_blocks is None
                                              else k_blocks)):
    with jax.ensure_compile_time_eval():
      return np.asarray(tile_schedule(jnp.asarray(group_sizes), jnp.asarray(expert_slot), m=m, m_pad=m_pad,
                                      block_m=block_m, buffer_sizes=buffer_sizes,
                                      k_blocks=None if k_blocks is None else jnp.asarray(k_blocks)))
  num_groups = group_sizes.shape[0]
  t_max = max_tiles(m, num_groups, block_m)
  sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
  ends = jnp.minimum(jnp.cumsum(sizes), m)  # rows past m are dropped, like ragged_dot
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  sizes = ends - starts
  total = ends[-1]
  first = starts // 8 * 8
  tiles = jnp.where(sizes > 0, (ends - first + block_m - 1) // block_m, 0)
  tile_end = jnp.cumsum(tiles)
  tile_start = tile_end - tiles
  n_mm = tile_end[-1]
  z_first = total // 8 * 8
  n_zero = jnp.where(total < m, (m - z_first + block_m - 1) // block_m, 0)

  t = jnp.arange(t_max, dtype=jnp.int32)
  # compare_all: one [t_max, groups] comparison; the default binary search is a loop (a while on GPUs,
  # which runs on the host and splits the step's CUDA graph)
  g = jnp.minimum(jnp.searchsorted(tile_end, t, side="right", method="compare_all"),
                  num_groups - 1).astype(jnp.int32)
  is_mm = t < n_mm
  zt = t - n_mm
  is_zero = (~is_mm) & (zt < n_zero)
  tile_row = jnp.where(is_mm, first[g] + (t - tile_start[g]) * block_m, z_first + zt * block_m)
  lo = jnp.maximum(tile_row, jnp.where(is_mm, starts[g], total))
  hi = jnp.minimum(tile_row + block_m, jnp.where(is_mm, ends[g], m))
  n_valid = jnp.where(is_mm | is_zero, jnp.maximum(hi - lo, 0), 0)
  load_row = jnp.where(is_mm | is_zero, jnp.minimum(tile_row, m_pad - block_m), 0)
  smem_off = jnp.where(n_valid > 0, lo - load_row, 0)

  num_buffers = len(buffer_sizes)
  buf = jnp.clip(expert_slot[g, 0].astype(jnp.int32), 0, num_buffers - 1)
  slot = jnp.clip(expert_slot[g, 1].astype(jnp.int32), 0,
                  jnp.asarray(buffer_sizes, jnp.int32)[buf] - 1)
  k_block = jnp.zeros_like(t) if k_blocks is None else jnp.where(
      is_mm, jnp.asarray(k_blocks, jnp.int32)[g], 0)
  sched = jnp.stack([is_mm.astype(jnp.int32), buf, slot, load_row, smem_off, n_valid, g, k_block],
                    axis=1)
  header = jnp.zeros((1, _SCHED_COLS), jnp.int32).at[0, 0].set(n_mm + n_zero)
  return jnp.concatenate([sched, header], axis=0)


def padded_rows(m, block_m):
  # The last tile loads block_m rows from a multiple of 8: pad x when M < block_m or M % 8 != 0.
  return _round_up(max(m, block_m), 8)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TileQuantizedRows:
  """Rows quantized per 128 columns to e4m3 by the grouped GEMM that computed them
  (`grouped_gemm_fp8_swiglu(..., quantize_output=True)`), each row's scales stored by its tile.

  values: [M, K] float8_e4m3fn. tile_scales: [T, K/128, block_m] f32 (T = `max_tiles`): row load_row(t) + i of
  tile t (`tile_schedule`) has, in K block kb, the scale tile_scales[t, kb, i] (entries of rows that are not
  tile t's valid rows are unspecified). A grouped GEMM over the same group sizes, expert slots, buffer sizes
  and block_m has the same tiles and reads the scales by tile (`grouped_gemm_fp8`); `row_scales` gives them
  per row, [M, K/128], for references."""
  values: jax.Array
  tile_scales: jax.Array
  block_m: int = dataclasses.field(metadata=dict(static=True))

  def row_scales(self, group_sizes, expert_slot, buffer_sizes) -> jax.Array:
    """[M, K/128] f32: each valid row's scales, gathered from the tile that stored the row (rows past
    sum(group_sizes) come from the schedule's zero tiles)."""
    m = self.values.shape[0]
    m_pad = padded_rows(m, self.block_m)
    sched = jnp.asarray(tile_schedule(group_sizes, expert_slot, m=m, m_pad=m_pad, block_m=self.block_m,
                                      buffer_sizes=buffer_sizes))[:-1]
    i = jnp.arange(self.block_m, dtype=jnp.int32)
    load_row, smem_off, n_valid = sched[:, 3:4], sched[:, 4:5], sched[:, 5:6]
    valid = (i >= smem_off) & (i < smem_off + n_valid)
    dest = jnp.where(valid, load_row + i, m_pad)  # [T, block_m]; m_pad: dropped
    scales = jnp.swapaxes(self.tile_scales, 1, 2)  # [T, block_m, K/128]
    out = jnp.zeros((m_pad, scales.shape[-1]), jnp.float32).at[dest.reshape(-1)].set(
        scales.reshape(-1, scales.shape[-1]), mode="drop")
    return out[:m]

