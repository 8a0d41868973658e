"""What the bf16 and FP8 grouped GEMMs share (`grouped_gemm.py`, `grouped_gemm_fp8.py`).

The jnp reference (f32 accumulation) that both references reduce to; validation of the inputs and
row padding; and the kernel pieces: reading a tile's schedule row, the memory warpgroup's TMA loop,
the epilogue that stores only a tile's valid rows, the roles of the warp-specialized kernels,
and the persistent-kernel launch.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _compat

MEMORY_REGISTERS = 40  # per thread of the memory warpgroup; the compute warpgroups get the rest


# ---------------------------------------------------------------------------------------------
# The reference (pure jnp, f32 accumulation) and the inputs.
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


def validate_inputs(x, group_sizes, weights, expert_slot, *, w_kn_axes, what):
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


def pad_rows(x, rows):
  return x if x.shape[0] >= rows else jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))


# ---------------------------------------------------------------------------------------------
# Kernel pieces shared by the bf16 and FP8 kernels.
# ---------------------------------------------------------------------------------------------


def tile_fields(sched_ref, t):
  """(is_mm, buffer, slot, load_row, smem_off, n_valid, group, k_block) of tile t (`tile_schedule`)."""
  is_mm, buf, slot, load_row, smem_off, n_valid, g, k_block = (sched_ref[t, c] for c in range(8))
  return is_mm, buf, slot, pl.multiple_of(load_row, 8), smem_off, n_valid, g, k_block


def store_rows(o_smem, out_ref, *, row, smem_off, n_valid, block_m):
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


def epilogue_cols(wg_n, out_dtype):
  """Columns per epilogue chunk: the whole warpgroup tile for 16-bit outputs; 64 for f32 outputs so
  that the output staging buffer never outgrows the bf16 one (the pipeline stages keep the SMEM)."""
  return wg_n if jnp.dtype(out_dtype).itemsize <= 2 else min(wg_n, 64)


def wg_valid_rows(smem_off, n_valid, row0, wg_m):
  """(first, count) of the tile's valid rows [smem_off, smem_off + n_valid) that fall in the warpgroup's rows
  [row0, row0 + wg_m), as tile rows."""
  lo = jnp.maximum(smem_off, row0)
  return lo, jnp.maximum(jnp.minimum(smem_off + n_valid, row0 + wg_m) - lo, 0)


def epilogue(acc, o_smem, out_ref, *, load_row, smem_off, n_valid, row0, col, cfg):
  """Stores the warpgroup's sub-tile (rows row0 + [0, wg_m) of the CTA tile) where valid, in
  column chunks of o_smem's width."""
  lo, cnt = wg_valid_rows(smem_off, n_valid, row0, cfg.wg_m)
  epi_n = o_smem.shape[-1]
  for c in range(acc.shape[1] // epi_n):
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # o_smem's last stores have read it
    o_smem[...] = acc[:, c * epi_n:(c + 1) * epi_n].astype(o_smem.dtype)
    plgpu.commit_smem()
    store_rows(o_smem, out_ref.at[:, pl.ds(col + c * epi_n, epi_n)], row=load_row + lo,
                smem_off=lo - row0, n_valid=cnt, block_m=cfg.wg_m)


def memory_loop(sched_ref, num_tiles, n_blocks, num_k, steps, issue_copies, free):
  """The memory warpgroup: for every work item (tile t, n block j) and k step, wait for a free stage, issue
  its TMAs: issue_copies(t, fields, j, k, slot)."""
  plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")

  @plgpu.nd_loop((num_tiles, n_blocks), collective_axes="sm", init_carry=jnp.int32(0))
  def _loop(info, carry):
    t, j = info.index
    fields = tile_fields(sched_ref, t)
    nk = jnp.where(fields[0] != 0, num_k, 0)

    def step(k, _):
      s = carry + k
      slot = lax.rem(s, steps)

      @pl.when(s >= steps)
      def _():
        plgpu.barrier_wait(free.at[slot])

      issue_copies(t, fields, j, k, slot)

    lax.fori_loop(0, nk, step, None)
    return carry + nk

  # Wait for the compute warpgroups to release the last stages: leaves every barrier balanced.
  total = _loop
  for i in range(steps):
    s = total - steps + i

    @pl.when(s >= 0)
    def _():
      plgpu.barrier_wait(free.at[lax.rem(s, steps)])


def warp_specialized(sched_ref, out_ref, o_smem, *, cfg, t_max, n_blocks, num_k, issue, free,
                     accumulate, store=None):
  """The roles of a warp-specialized kernel. Warpgroup `num_compute_wgs` is the memory warpgroup
  (`memory_loop` with `issue`); each compute warpgroup wg loops over the (tile, n block) work items,
  computes its [wg_m, wg_n] f32 accumulator with `accumulate(fields, j, nk, carry, row0, col0)` (fields:
  the tile's schedule row, nk: its k steps, carry: k steps consumed so far, (row0, col0): the
  warpgroup's sub-tile origin) and stores it through its o_smem[wg] (`epilogue`), or with
  `store(acc, t, j, fields, row0, col0, wg)` when given."""
  nwg = cfg.num_compute_wgs
  wg = lax.axis_index("wg")
  num_tiles = sched_ref[t_max, 0]

  @pl.when(wg == nwg)
  def _memory():
    memory_loop(sched_ref, num_tiles, n_blocks, num_k, cfg.max_concurrent_steps, issue, free)

  @pl.when(wg < nwg)
  def _compute():
    plgpu.set_max_registers(
        int(min(256, (512 - MEMORY_REGISTERS) / nwg) // 8 * 8), action="increase")

    @plgpu.nd_loop((num_tiles, n_blocks), collective_axes="sm", init_carry=jnp.int32(0))
    def _loop(info, carry):
      t, j = info.index
      fields = tile_fields(sched_ref, t)
      is_mm, _, _, load_row, smem_off, n_valid, *_ = fields
      nk = jnp.where(is_mm != 0, num_k, 0)
      row0, col0 = cfg.wg_origin(wg)
      acc = accumulate(fields, j, nk, carry, row0, col0)
      if store is not None:
        store(acc, t, j, fields, row0, col0, wg)
      else:
        epilogue(acc, o_smem.at[wg], out_ref, load_row=load_row, smem_off=smem_off,
                 n_valid=n_valid, row0=row0, col=j * cfg.block_n + col0, cfg=cfg)
      return carry + nk

    plgpu.wait_smem_to_gmem(0)


def kernel_call(body, out_shape, *, cfg, interpret, num_threads):
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
