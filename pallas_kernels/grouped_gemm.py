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

FP8_BLOCK = 128  # DeepSeek-V3 block-scale granularity (weights 128x128, activations 1x128)
_SCHED_COLS = 8  # is_mm, buffer, slot, load_row, smem_off, n_valid, group, pad
_MEMORY_REGISTERS = 40
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


def default_config(m: int, num_groups: int, n: int | None = None,
                   fp8: bool = False) -> GroupedGemmConfig:
  """Decode tiles when groups average <= 64 rows (memory-bound), prefill tiles otherwise; a narrower
  block_n when N does not divide (small test models).

  Only configurations measured on an H200 are defaults (experiments/KERNELS.md). FP8 prefill: the
  128x128 m-split tile's kernel beat the 64x256 decode tile at 9 of 10 prefill shapes by 7-18%
  (kernels-20261123-nvidia-h200-prefill.json, CUPTI kernel times)."""
  prefill = m > 64 * num_groups
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
# References (pure jnp, f32 accumulation).
# ---------------------------------------------------------------------------------------------


def _row_groups(group_sizes, m):
  """Group index of every row (G for rows past the sum), [m]."""
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  return jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right")


def reference(x, group_sizes, weights, expert_slot, *, out_dtype=None):
  """out[r] = x[r] @ weights[buf(g)][slot(g)] for the group g of row r; rows past the sum are 0."""
  m = x.shape[0]
  g_of_row = _row_groups(group_sizes, m)
  valid = g_of_row < group_sizes.shape[0]
  g_of_row = jnp.minimum(g_of_row, group_sizes.shape[0] - 1)
  buf_of_row = expert_slot[g_of_row, 0]
  slot_of_row = expert_slot[g_of_row, 1]
  out = jnp.zeros((m, weights[0].shape[-1]), jnp.float32)
  xf = x.astype(jnp.float32)
  for b, w in enumerate(weights):
    w_rows = w.astype(jnp.float32)[jnp.clip(slot_of_row, 0, w.shape[0] - 1)]  # [m, K, N]
    part = jnp.einsum("mk,mkn->mn", xf, w_rows, precision=lax.Precision.HIGHEST)
    out = jnp.where(((buf_of_row == b) & valid)[:, None], part, out)
  return out.astype(out_dtype or x.dtype)


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
  amax = jnp.max(jnp.abs(xb), axis=-1)
  scale = jnp.maximum(amax, 1e-12) / 448.0  # 448: largest finite e4m3 value
  xq = (xb / scale[..., None]).astype(jnp.float8_e4m3fn).reshape(m, k)
  return xq, scale


def dequantize_weight(w, scale):
  """[E, N, K] e4m3 with [E, N/128, K/128] block scales -> f32 [E, N, K]."""
  s = jnp.repeat(jnp.repeat(scale, FP8_BLOCK, axis=1), FP8_BLOCK, axis=2)
  return fp8_to_f32(w) * s  # not astype: w may have been quantized in the same jit


def reference_fp8(x, group_sizes, weights, scales, expert_slot, *, out_dtype=jnp.bfloat16, x_scale=None):
  """FP8 reference: the activations quantized exactly as the kernel does (same function, same e4m3
  values and scales; or taken as given, e4m3 with `x_scale`, as the kernel takes them), everything
  dequantized to f32 and multiplied in f32. Weights are [E, N, K] (DeepSeek's [out, in] layout). Safe
  under jit on the GPU: the dequantization decodes bits (`fp8_to_f32`), so XLA cannot fold the
  quantization away."""
  xq, xs = quantize_activations(x) if x_scale is None else (x, x_scale)
  xd = (fp8_to_f32(xq).reshape(x.shape[0], -1, FP8_BLOCK) * xs[..., None]).reshape(x.shape)
  wd = tuple(jnp.swapaxes(dequantize_weight(w, s), 1, 2) for w, s in zip(weights, scales))
  return reference(xd, group_sizes, wd, expert_slot, out_dtype=out_dtype)


# ---------------------------------------------------------------------------------------------
# Schedule: tile -> (group, rows), computed in jnp outside the kernel.
# ---------------------------------------------------------------------------------------------


def _max_tiles(m, num_groups, block_m):
  # sum_g cdiv(size_g + 7, block_m) + cdiv(zero rows + 7, block_m) <= M / block_m + 2 (G + 1)
  return pl.cdiv(m, block_m) + 2 * num_groups + 2


def _round_up(v, r):
  return (v + r - 1) // r * r


def tile_schedule(group_sizes, expert_slot, *, m, m_pad, block_m, buffer_sizes):
  """int32 [T+1, 8]; row t < T: (is_mm, buffer, slot, load_row, smem_off, n_valid, group, 0);
  row T: (number of tiles in use, 0, ...).

  Tile t loads rows [load_row, load_row + block_m) (load_row a multiple of 8: Mosaic GPU's TMA into
  tiled SMEM needs it) and stores its rows [smem_off, smem_off + n_valid) to the output rows
  load_row + smem_off + [0, n_valid). A group's tiles start at its first row rounded down to 8, so a
  decode group of <= block_m - 7 rows is one tile and its weight is read once. Mm tiles come first,
  then zero tiles covering the rows past sum(group_sizes), then unused rows."""
  num_groups = group_sizes.shape[0]
  t_max = _max_tiles(m, num_groups, block_m)
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
  g = jnp.minimum(jnp.searchsorted(tile_end, t, side="right"), num_groups - 1).astype(jnp.int32)
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
  sched = jnp.stack([is_mm.astype(jnp.int32), buf, slot, load_row, smem_off, n_valid, g,
                     jnp.zeros_like(t)], axis=1)
  header = jnp.zeros((1, _SCHED_COLS), jnp.int32).at[0, 0].set(n_mm + n_zero)
  return jnp.concatenate([sched, header], axis=0)


# ---------------------------------------------------------------------------------------------
# Kernel pieces shared by the bf16 and FP8 kernels.
# ---------------------------------------------------------------------------------------------


def _tile_fields(sched_ref, t):
  is_mm, buf, slot, load_row, smem_off, n_valid, g = (sched_ref[t, c] for c in range(7))
  return is_mm, buf, slot, pl.multiple_of(load_row, 8), smem_off, n_valid, g


def _store_rows(o_smem, out_ref, *, row, smem_off, n_valid, block_m):
  """TMA-stores rows [smem_off, smem_off + n_valid) of o_smem to out_ref rows [row, row + n_valid),
  as a ladder of power-of-two row counts (TMA boxes are static)."""
  done = jnp.int32(0)
  p = block_m
  while p >= 1:
    take = n_valid & p
    off = smem_off + done

    @pl.when(take != 0)
    def _():
      plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(off, p)], out_ref.at[pl.ds(row + done, p)])

    done = done + take
    p //= 2


def _epilogue_cols(wg_n, out_dtype):
  """Columns per epilogue chunk: the whole warpgroup tile for 16-bit outputs; 64 for f32 outputs so
  that the output staging buffer never outgrows the bf16 one (the pipeline stages keep the SMEM)."""
  return wg_n if jnp.dtype(out_dtype).itemsize <= 2 else min(wg_n, 64)


def _epilogue(acc, o_smem, out_ref, *, load_row, smem_off, n_valid, row0, col, cfg):
  """Stores the warpgroup's sub-tile (rows row0 + [0, wg_m) of the CTA tile) where valid, in
  column chunks of o_smem's width."""
  lo = jnp.maximum(smem_off, row0)
  cnt = jnp.maximum(jnp.minimum(smem_off + n_valid, row0 + cfg.wg_m) - lo, 0)
  epi_n = o_smem.shape[-1]
  for c in range(acc.shape[1] // epi_n):
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # o_smem's last stores have read it
    o_smem[...] = acc[:, c * epi_n:(c + 1) * epi_n].astype(o_smem.dtype)
    plgpu.commit_smem()
    _store_rows(o_smem, out_ref.at[:, pl.ds(col + c * epi_n, epi_n)], row=load_row + lo,
                smem_off=lo - row0, n_valid=cnt, block_m=cfg.wg_m)


def _memory_loop(sched_ref, num_tiles, n_blocks, num_k, steps, issue_copies, free):
  """The memory warpgroup: for every work item and k step, wait for a free stage, issue its TMAs."""
  plgpu.set_max_registers(_MEMORY_REGISTERS, action="decrease")

  @plgpu.nd_loop((num_tiles, n_blocks), collective_axes="sm", init_carry=jnp.int32(0))
  def _loop(info, carry):
    t, j = info.index
    fields = _tile_fields(sched_ref, t)
    nk = jnp.where(fields[0] != 0, num_k, 0)

    def step(k, _):
      s = carry + k
      slot = lax.rem(s, steps)

      @pl.when(s >= steps)
      def _():
        plgpu.barrier_wait(free.at[slot])

      issue_copies(fields, j, k, slot)

    lax.fori_loop(0, nk, step, None)
    return carry + nk

  # Wait for the compute warpgroups to release the last stages: leaves every barrier balanced.
  total = _loop
  for i in range(steps):
    s = total - steps + i

    @pl.when(s >= 0)
    def _():
      plgpu.barrier_wait(free.at[lax.rem(s, steps)])


def _kernel_call(body, out_shape, *, cfg, interpret, num_threads):
  num_sms = cfg.num_sms or (2 if interpret else _compat.num_sms())
  kwargs = {}
  if num_threads is not None:
    kwargs = dict(num_threads=num_threads, thread_name="wg")
  return plgpu.kernel(
      body,
      out_type=out_shape,
      grid=(num_sms,),
      grid_names=("sm",),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=_compat.InterpretGPUParams() if interpret else None,
      **kwargs,
  )


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
      o_smem=plgpu.SMEM((nwg, wg_m, _epilogue_cols(wg_n, out_dtype)), out_dtype),
      full=plgpu.Barrier(num_arrivals=2, num_barriers=steps),
      free=plgpu.Barrier(num_arrivals=nwg, num_barriers=steps),
      collective_axes="wg",
  )
  def _scope(a_smem, b_smem, o_smem, full, free):
    wg = lax.axis_index("wg")
    num_tiles = sched_ref[t_max, 0]

    def issue(fields, j, kk, slot):
      _, buf, wslot, load_row, *_ = fields
      plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(load_row, bm), pl.ds(kk * bk, bk)],
                              a_smem.at[slot], full.at[slot])
      for b, w_ref in enumerate(w_refs):
        @pl.when(buf == b)
        def _():
          plgpu.copy_gmem_to_smem(w_ref.at[wslot, pl.ds(kk * bk, bk), pl.ds(j * bn, bn)],
                                  b_smem.at[slot], full.at[slot])

    @pl.when(wg == nwg)
    def _memory():
      _memory_loop(sched_ref, num_tiles, n_blocks, num_k, steps, issue, free)

    @pl.when(wg < nwg)
    def _compute():
      plgpu.set_max_registers(
          int(min(256, (512 - _MEMORY_REGISTERS) / nwg) // 8 * 8), action="increase")

      @plgpu.nd_loop((num_tiles, n_blocks), collective_axes="sm", init_carry=jnp.int32(0))
      def _loop(info, carry):
        t, j = info.index
        is_mm, _, _, load_row, smem_off, n_valid, _ = _tile_fields(sched_ref, t)
        nk = jnp.where(is_mm != 0, num_k, 0)
        row0, col0 = cfg.wg_origin(wg)

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

        acc = pl.run_scoped(mm, plgpu.ACC((wg_m, wg_n), jnp.float32))
        _epilogue(acc, o_smem.at[wg], out_ref, load_row=load_row, smem_off=smem_off,
                  n_valid=n_valid, row0=row0, col=j * bn + col0, cfg=cfg)
        return carry + nk

      plgpu.wait_smem_to_gmem(0)


def _bf16_simple_body(sched_ref, x_ref, *refs, cfg, num_buffers, t_max, k, n, out_dtype):
  """One warpgroup, `plgpu.emit_pipeline` per weight buffer: the fallback path."""
  w_refs, out_ref = refs[:num_buffers], refs[num_buffers]
  bm, bn, bk, steps = cfg.block_m, cfg.block_n, cfg.block_k, cfg.max_concurrent_steps
  num_k, n_blocks = k // bk, n // bn
  dtype = x_ref.dtype

  @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((bm, _epilogue_cols(bn, out_dtype)), out_dtype))
  def _scope(o_smem):
    num_tiles = sched_ref[t_max, 0]

    @plgpu.nd_loop((num_tiles, n_blocks), collective_axes="sm")
    def _loop(info):
      t, j = info.index
      is_mm, buf, wslot, load_row, smem_off, n_valid, _ = _tile_fields(sched_ref, t)

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
      _epilogue(acc, o_smem, out_ref, load_row=load_row, smem_off=smem_off, n_valid=n_valid,
                row0=0, col=j * bn, cfg=cfg)

    plgpu.wait_smem_to_gmem(0)


def _validate(x, group_sizes, weights, expert_slot, *, w_kn_axes, what):
  if x.ndim != 2:
    raise ValueError(f"x must be [M, K], got {x.shape}")
  if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"group_sizes must be an int [G] array, got {group_sizes.dtype}{group_sizes.shape}")
  g = group_sizes.shape[0]
  if expert_slot.shape != (g, 2) or not jnp.issubdtype(expert_slot.dtype, jnp.integer):
    raise ValueError(f"expert_slot must be int [G={g}, 2], got {expert_slot.dtype}{expert_slot.shape}")
  if not isinstance(weights, (tuple, list)) or not weights:
    raise ValueError("weights must be a non-empty tuple of [E_i, ...] buffers")
  kn = {(w.shape[w_kn_axes[0]], w.shape[w_kn_axes[1]]) for w in weights}
  dtypes = {w.dtype for w in weights}
  if len(kn) != 1 or len(dtypes) != 1 or any(w.ndim != 3 for w in weights):
    raise ValueError(f"all {what} buffers must be 3-D with the same K, N and dtype, got "
                     f"{[(w.shape, str(w.dtype)) for w in weights]}")
  (k, n), = kn
  if k != x.shape[1]:
    raise ValueError(f"K mismatch: x has {x.shape[1]}, weights have {k}")
  return k, n


def _padded_rows(m, block_m):
  # The last tile loads block_m rows from a multiple of 8: pad x when M < block_m or M % 8 != 0.
  return _round_up(max(m, block_m), 8)


def _pad_rows(x, rows):
  return x if x.shape[0] >= rows else jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))


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
  k, n = _validate(x, group_sizes, weights, expert_slot, w_kn_axes=(1, 2), what="weight")
  if x.dtype != jnp.bfloat16 or weights[0].dtype != jnp.bfloat16:
    raise ValueError(f"x and weights must be bfloat16, got {x.dtype} and {weights[0].dtype}")
  m = x.shape[0]
  cfg = config or default_config(m, group_sizes.shape[0], n)
  if cfg.fp8_overlap_promotion:
    raise ValueError("fp8_overlap_promotion is for grouped_gemm_fp8, not the bf16 kernel")
  if k % cfg.block_k or n % cfg.block_n:
    raise ValueError(f"K={k} must divide by block_k={cfg.block_k} and N={n} by block_n={cfg.block_n}")
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  m_pad = _padded_rows(m, cfg.block_m)
  x_p = _pad_rows(x, m_pad)
  sched = tile_schedule(group_sizes, expert_slot, m=m, m_pad=m_pad, block_m=cfg.block_m,
                        buffer_sizes=tuple(w.shape[0] for w in weights))
  body = _bf16_ws_body if cfg.warp_specialized else _bf16_simple_body
  body = functools.partial(body, cfg=cfg, num_buffers=len(weights), k=k, n=n, out_dtype=out_dtype,
                           t_max=sched.shape[0] - 1)
  call = _kernel_call(body, jax.ShapeDtypeStruct((m_pad, n), out_dtype), cfg=cfg,
                      interpret=interpret,
                      num_threads=cfg.num_compute_wgs + 1 if cfg.warp_specialized else None)
  return call(sched, x_p, *weights)[:m]


# ---------------------------------------------------------------------------------------------
# FP8 kernel (DeepSeek-V3 block scales).
# ---------------------------------------------------------------------------------------------


def _fp8_ws_body(sched_ref, x_ref, xs_ref, ws_ref, *refs, cfg, num_buffers, t_max, k, n,
                 out_dtype, interpret):
  w_refs, out_ref = refs[:num_buffers], refs[num_buffers]
  bm, bn, bk, steps, nwg = (cfg.block_m, cfg.block_n, cfg.block_k, cfg.max_concurrent_steps,
                            cfg.num_compute_wgs)
  num_k, n_blocks, wg_m, wg_n = k // bk, n // bn, cfg.wg_m, cfg.wg_n
  dtype = x_ref.dtype

  @functools.partial(
      pl.run_scoped,
      a_smem=plgpu.SMEM((steps, bm, bk), dtype, transforms=_mosaic.smem_transforms(bk, dtype)),
      b_smem=plgpu.SMEM((steps, bn, bk), dtype, transforms=_mosaic.smem_transforms(bk, dtype)),
      s_smem=plgpu.SMEM((steps, bm), jnp.float32),
      o_smem=plgpu.SMEM((nwg, wg_m, _epilogue_cols(wg_n, out_dtype)), out_dtype),
      full=plgpu.Barrier(num_arrivals=3, num_barriers=steps),
      free=plgpu.Barrier(num_arrivals=nwg, num_barriers=steps),
      collective_axes="wg",
  )
  def _scope(a_smem, b_smem, s_smem, o_smem, full, free):
    wg = lax.axis_index("wg")
    num_tiles = sched_ref[t_max, 0]

    def issue(fields, j, kk, slot):
      _, buf, wslot, load_row, *_ = fields
      plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(load_row, bm), pl.ds(kk * bk, bk)],
                              a_smem.at[slot], full.at[slot])
      plgpu.copy_gmem_to_smem(xs_ref.at[kk, pl.ds(load_row, bm)], s_smem.at[slot], full.at[slot])
      for b, w_ref in enumerate(w_refs):
        @pl.when(buf == b)
        def _():
          plgpu.copy_gmem_to_smem(w_ref.at[wslot, pl.ds(j * bn, bn), pl.ds(kk * bk, bk)],
                                  b_smem.at[slot], full.at[slot])

    @pl.when(wg == nwg)
    def _memory():
      _memory_loop(sched_ref, num_tiles, n_blocks, num_k, steps, issue, free)

    @pl.when(wg < nwg)
    def _compute():
      plgpu.set_max_registers(
          int(min(256, (512 - _MEMORY_REGISTERS) / nwg) // 8 * 8), action="increase")

      @plgpu.nd_loop((num_tiles, n_blocks), collective_axes="sm", init_carry=jnp.int32(0))
      def _loop(info, carry):
        t, j = info.index
        is_mm, _, _, load_row, smem_off, n_valid, g = _tile_fields(sched_ref, t)
        nk = jnp.where(is_mm != 0, num_k, 0)
        row0, col0 = cfg.wg_origin(wg)
        nb = (j * bn + col0) // FP8_BLOCK

        def stage(kk):
          """SMEM stage of k step kk and this warpgroup's views: a [wg_m, 128] e4m3,
          b [wg_n, 128] e4m3 (K-major), row scales [wg_m] f32."""
          slot = lax.rem(carry + kk, steps)
          a_tile, b_tile, s_tile = a_smem.at[slot], b_smem.at[slot], s_smem.at[slot]
          if wg_m != bm:
            a_tile, s_tile = a_tile.at[pl.ds(row0, wg_m)], s_tile.at[pl.ds(row0, wg_m)]
          if wg_n != bn:
            b_tile = b_tile.at[pl.ds(col0, wg_n)]
          return slot, a_tile, b_tile, s_tile

        def dot_interpret(a_tile, b_tile):
          # Interpret-mode wgmma ignores transposed operands: the same product with jnp.dot.
          return jnp.dot(a_tile[...].astype(jnp.float32), b_tile[...].astype(jnp.float32).T)

        def scale(s_tile, kk, valid=True):
          """x_scale[row] * w_scale[g, n block, kk], [wg_m] f32; 0 where valid is False."""
          row_scale = s_tile[...] * ws_ref[g, nb, kk]
          if valid is not True:
            # A select, not a product: an unused stage may hold NaN. Explicit broadcast: the
            # warpgroup lowering has no implicit one.
            row_scale = jnp.where(jnp.broadcast_to(valid, row_scale.shape), row_scale, 0.0)
          return row_scale

        def promote(acc, part, row_scale):
          return acc + part * lax.broadcast_in_dim(row_scale, part.shape, [0])

        def step(kk, acc):
          slot, a_tile, b_tile, s_tile = stage(kk)
          plgpu.barrier_wait(full.at[slot])
          if interpret:
            part = dot_interpret(a_tile, b_tile)
          else:
            def mm(tmp_ref):
              plgpu.wgmma(tmp_ref, a_tile, _compat.transpose_ref(b_tile, (1, 0)))
              return tmp_ref[...]
            part = pl.run_scoped(mm, plgpu.ACC((wg_m, wg_n), jnp.float32))
          row_scale = scale(s_tile, kk)
          plgpu.barrier_arrive(free.at[slot])
          return promote(acc, part, row_scale)

        acc0 = jnp.zeros((wg_m, wg_n), jnp.float32)
        if not interpret:
          acc0 = plgpu.layout_cast(acc0, plgpu.Layout.WGMMA)
        if cfg.fp8_overlap_promotion:
          acc = _fp8_overlap_pipeline(nk, acc0, stage=stage, scale=scale, promote=promote,
                                      dot_interpret=dot_interpret, full=full, free=free,
                                      interpret=interpret)
        else:
          acc = lax.fori_loop(0, nk, step, acc0)
        _epilogue(acc, o_smem.at[wg], out_ref, load_row=load_row, smem_off=smem_off,
                  n_valid=n_valid, row0=row0, col=j * bn + col0, cfg=cfg)
        return carry + nk

      plgpu.wait_smem_to_gmem(0)


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
                     out_dtype=jnp.bfloat16, interpret: bool = False, x_scale=None):
  """Grouped FP8 GEMM with DeepSeek-V3 block scales.

  Args:
    x: [M, K] bf16 (or f32) activations sorted by group; quantized here per token per 128 columns
      to e4m3 (`quantize_activations`). Or, with `x_scale` [M, K/128] f32, activations already quantized
      (e4m3, e.g. quantized once per token and then gathered into expert order): used as they are.
    group_sizes, expert_slot: as in `grouped_gemm`.
    weights: tuple of [E_i, N, K] float8_e4m3fn buffers: DeepSeek's checkpoint layout ([out, in]).
      Hopper's FP8 wgmma reads B only K-major, so this layout is what the tensor cores consume.
    scales: tuple of [E_i, N/128, K/128] f32 block scales (the checkpoint's `weight_scale_inv`):
      dequantized weight = w * scale per 128x128 block.
    config: None picks FP8_DECODE_CONFIG; FP8_PREFILL_OVERLAP_CONFIG (fp8_overlap_promotion)
      overlaps each k step's promotion with the next step's wgmma and needs K/128 even.
  Returns:
    [M, N] out_dtype; per 128-wide K block the fp8 partial product is promoted into an f32
    accumulator with the activation row scale times the weight block scale.
  """
  weights, scales = tuple(weights), tuple(scales)
  n, k = _validate(x, group_sizes, weights, expert_slot, w_kn_axes=(2, 1), what="FP8 weight")[::-1]
  if weights[0].dtype != jnp.float8_e4m3fn:
    raise ValueError(f"weights must be float8_e4m3fn, got {weights[0].dtype}")
  if len(scales) != len(weights) or any(
      s.shape != (w.shape[0], n // FP8_BLOCK, k // FP8_BLOCK) for s, w in zip(scales, weights)):
    raise ValueError("scales must be one [E_i, N/128, K/128] array per weight buffer, got "
                     f"{[s.shape for s in scales]}")
  cfg = config or default_config(x.shape[0], group_sizes.shape[0], n, fp8=True)
  if cfg.block_k != FP8_BLOCK or FP8_BLOCK % cfg.wg_n:
    raise ValueError("FP8 needs block_k == 128 and a warpgroup N (64 or 128) inside one scale block")
  if not cfg.warp_specialized:
    raise ValueError("the FP8 kernel is warp specialized only")
  if k % FP8_BLOCK or n % FP8_BLOCK or n % cfg.block_n:
    raise ValueError(f"K={k} and N={n} must divide by 128, and N by block_n={cfg.block_n}")
  if cfg.fp8_overlap_promotion and (k // FP8_BLOCK) % 2:
    raise ValueError(f"fp8_overlap_promotion alternates two partials per pair of k steps: K/128 "
                     f"must be even, got K={k}")
  m = x.shape[0]
  m_pad = _padded_rows(m, cfg.block_m)
  if x_scale is None:
    xq, xs = quantize_activations(x)
  else:
    if x.dtype != jnp.float8_e4m3fn or x_scale.shape != (m, k // FP8_BLOCK):
      raise ValueError(f"pre-quantized activations must be e4m3 [M, K] with x_scale [M, K/128] f32, got "
                       f"{x.dtype}{x.shape} and {x_scale.shape}")
    xq, xs = x, x_scale.astype(jnp.float32)
  xq = _pad_rows(xq, m_pad)
  # [K/128, M'] so that a tile's row scales of one K block are one contiguous TMA box.
  xs_t = jnp.pad(xs.T, ((0, 0), (0, m_pad - m)))
  sched = tile_schedule(group_sizes, expert_slot, m=m, m_pad=m_pad, block_m=cfg.block_m,
                        buffer_sizes=tuple(w.shape[0] for w in weights))
  # Per-group weight scales (a few KB per group): the kernel reads one scalar per k step.
  buf = jnp.clip(expert_slot[:, 0], 0, len(weights) - 1)
  ws_g = jnp.zeros((group_sizes.shape[0], n // FP8_BLOCK, k // FP8_BLOCK), jnp.float32)
  for b, s in enumerate(scales):
    ws_g = jnp.where((buf == b)[:, None, None], s[jnp.clip(expert_slot[:, 1], 0, s.shape[0] - 1)],
                     ws_g)
  out_dtype = jnp.dtype(out_dtype)
  body = functools.partial(_fp8_ws_body, cfg=cfg, num_buffers=len(weights), k=k, n=n,
                           out_dtype=out_dtype, t_max=sched.shape[0] - 1, interpret=interpret)
  call = _kernel_call(body, jax.ShapeDtypeStruct((m_pad, n), out_dtype), cfg=cfg,
                      interpret=interpret, num_threads=cfg.num_compute_wgs + 1)
  return call(sched, xq, xs_t, ws_g, *weights)[:m]
