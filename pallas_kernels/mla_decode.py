"""MLA decode attention on Hopper (Pallas Mosaic GPU): the weight-absorbed form over a paged latent cache.

In the absorbed form (DeepSeek-V2/V3), every head's query lives in the latent space: q = (q_nope @ W_uk) || q_pe,
width D = kv_lora_rank + rope_dim (512 + 64 for R1), and every head reads the same cached row
c = latent || k_pe of each token. Scores are q . c, and the output, still in latent space, is softmax @ latent
(the first kv_lora_rank columns of the same row): the value is a prefix of the key, so the cache is read once
for all heads and for both products.

Cache layout (the engine's paged cache): `pages [num_pages, page_size, D]`; request b's token t lies in
`pages[block_table[b, t // page_size], t % page_size]`; `lengths[b]` tokens are cached, the s_q new ones
included. Query t of s_q sits at position lengths[b] - s_q + t and attends cached positions <= it.

Kernel design (FlashMLA's division of work, our code):
  * A CTA owns 64 query rows of one request (rows = (query token, head) pairs) and one work unit: a range of
    the request's pages (`mla_schedule`: the same number of splits per request, or units of equal size over
    the batch). The grid is (row tiles, units), row tiles fastest, so the CTAs that read the same pages run
    together and the second read hits L2.
  * Three warpgroups. The memory warpgroup loads Q once and then one page per step (one TMA of
    [page_size, D]) into a two-stage ring, looking each page up in the block table.
  * Compute warpgroup 0 computes S = Q K^T (wgmma, K = D), the online softmax, writes P (bf16) and the
    row rescale factors to SMEM for its partner, and accumulates O[:, :kv_lora/2] += P V with P in
    registers. Compute warpgroup 1 accumulates O[:, kv_lora/2:] from P in SMEM. Each owns a [64, 256] f32
    accumulator: the whole [64, 512] would not fit one warpgroup's registers. While warpgroup 0 runs the
    softmax of page i + 1 on the CUDA cores, warpgroup 1's P V of page i keeps the tensor cores busy.
  * Split-KV: each unit writes its normalized partial O (bf16) and its log-sum-exp; `mla_combine` (one
    kernel; `combine` is its jnp form) or `mla_schedule.combine_units` (balanced units) merges a request's
    units in f32 (one split per request skips it). Empty units (short requests) write lse = -inf. Uniform
    splits are computed in the kernel from the lengths; balanced units come as a schedule array.
With 128 heads this is compute-bound on an H200 (2 x 128 x (576 + 512) FLOP per cached token against 1152
bytes, ~240 FLOP/byte), so the speed to compare with is max(FLOPs / peak, bytes / HBM rate), not HBM alone.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _compat, _mosaic, mla_combine, mla_schedule

PAGE_SIZE = 64  # tokens per cache page: the S tile's width and the P V product's K
BLOCK_ROWS = 64  # query rows per CTA (the wgmma M of one warpgroup)
SMEM_BYTES = 227 * 1024  # Hopper's shared memory per CTA
MAX_CLUSTER = 8  # CTAs per cluster that every Hopper launch supports (the portable limit)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """`num_splits`: KV splits per request (None: enough CTAs to fill the GPU, at least `min_pages_per_split`
  pages each). `max_concurrent_steps`: pages in flight (SMEM: Q + this many pages must fit).
  `balanced`: share the pages of the whole batch in units of about equal size (`mla_schedule.
  balanced_schedule`: about one CTA per SM per row tile, or `num_splits` x B units when given) instead of the
  same number of splits per request; for batches of unequal lengths.
  `cluster`: the row tiles of a work unit (2 for R1's 128 heads, 4 with two MTP queries) run as one CTA
  cluster, and each page is TMA-multicast into all of them: read from HBM once per unit. Unclustered, each
  row tile's CTA loads the page itself and only the L2 can share it, which fails when the tiles drift apart
  (two waves of CTAs, KERNELS.md). GPU only: interpret mode runs the unclustered kernel (the Mosaic GPU
  interpreter has no cluster barriers); the clustered one is checked by lowering it for CUDA.
  `combine`: how uniform splits are merged: "kernel" (`mla_combine`: one pass, one launch) or "xla"
  (`combine`, five XLA kernels: the reference, kept for comparison); None: the kernel on a GPU, XLA's in
  interpret mode (the interpreter runs the kernel slowly; `tests/test_mla_combine.py` checks it there).
  `combine_columns`: columns a CTA of the merge kernel owns (`mla_combine.combine_splits`' `columns`).
  Measured and removed (sessions 16-17; KERNELS.md items 5, 7, 8, 9; git fc7f8d1 and 8993d36 hold them): the
  next page's Q K^T issued before this page's softmax (1.3-1.5x slower), half-page key tiles four in flight (1.3x
  slower: S bound by SMEM reads of Q), the seesaw order on half-page tiles (1.25x slower than whole pages),
  FlashMLA's layout of whole pages as 64-column tiles in the seesaw order (2.2-2.85x slower; ptxas spills 2.6 KB
  a thread)."""
  num_splits: int | None = None
  min_pages_per_split: int = 4
  max_concurrent_steps: int = 2
  balanced: bool = False
  cluster: bool = False
  combine: str | None = None
  combine_columns: int = mla_combine.COLUMNS

  def __post_init__(self):
    if self.combine not in (None, "kernel", "xla"):
      raise ValueError(f"combine must be 'kernel' or 'xla', got {self.combine!r}")
    if self.num_splits is not None and self.num_splits < 1:
      raise ValueError(f"num_splits must be >= 1, got {self.num_splits}")
    if self.min_pages_per_split < 1:
      raise ValueError(f"min_pages_per_split must be >= 1, got {self.min_pages_per_split}")
    mla_combine.check_columns(self.combine_columns, "combine_columns")
    if self.max_concurrent_steps < 2:
      raise ValueError(f"max_concurrent_steps must be >= 2, got {self.max_concurrent_steps}")


def padded_widths(kv_lora_rank: int, rope_dim: int) -> tuple[int, int]:
  """(latent, rope) widths the kernel works in: the latent a multiple of 128 (each compute warpgroup owns
  half of it, on 64-column SMEM tiles), the rope part a multiple of 64. R1's 512 + 64 need no padding; a
  cache allocated at these widths is used without a copy."""
  return -(-kv_lora_rank // 128) * 128, -(-rope_dim // 64) * 64


def choose_num_splits(batch: int, row_tiles: int, max_pages: int, num_sms: int,
                      min_pages_per_split: int = 4) -> int:
  """Splits per request so that batch x row_tiles x splits CTAs about fill `num_sms` SMs (one CTA per SM:
  the SMEM holds one), each split at least `min_pages_per_split` pages (a split re-reads Q: fewer pages
  would spend more on Q than on the cache)."""
  want = max(1, round(num_sms / (batch * row_tiles)))
  return max(1, min(want, -(-max_pages // min_pages_per_split)))


# ---------------------------------------------------------------------------------------------
# Reference (pure jnp, f32).
# ---------------------------------------------------------------------------------------------


def reference(q, pages, block_table, lengths, *, kv_lora_rank, softmax_scale):
  """Same contract as `mla_decode` (returns (out, lse)), computed by gathering every request's pages and
  attending in f32. Rows of requests with length 0 are 0 (lse -inf)."""
  b, s_q, h, d = q.shape
  keys = pages[block_table].reshape(b, -1, d).astype(jnp.float32)  # [b, max_pages * page, d]
  key = jnp.arange(keys.shape[1])
  keys = jnp.where((key[None, :] < lengths[:, None])[..., None], keys, 0.0)  # pages past the length
  s = jnp.einsum("bthd,bkd->bthk", q.astype(jnp.float32), keys,
                 precision=lax.Precision.HIGHEST) * softmax_scale
  pos = lengths[:, None] - s_q + jnp.arange(s_q)[None, :]  # [b, t]
  mask = (key[None, None, :] <= pos[:, :, None]) & (key[None, None, :] < lengths[:, None, None])
  s = jnp.where(mask[:, :, None, :], s, -jnp.inf)
  mx = jnp.max(s, axis=-1, keepdims=True)
  mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
  p = jnp.exp(s - mx)
  tot = p.sum(-1, keepdims=True)
  out = jnp.einsum("bthk,bkc->bthc", p, keys[..., :kv_lora_rank], precision=lax.Precision.HIGHEST)
  out = out / jnp.where(tot > 0, tot, 1.0)
  lse = jnp.where(tot[..., 0] > 0, jnp.log(jnp.where(tot[..., 0] > 0, tot[..., 0], 1.0)) + mx[..., 0],
                  -jnp.inf)
  return out.astype(q.dtype), lse


def combine(o_parts, lse_parts):
  """Merges split-KV partials: o_parts [B, S, R, C] (each normalized over its split), lse_parts [B, S, R]
  (natural log, -inf for an empty split) -> (out [B, R, C] f32, lse [B, R])."""
  if o_parts.shape[1] == 1:
    return o_parts[:, 0].astype(jnp.float32), lse_parts[:, 0]
  mx = jnp.max(lse_parts, axis=1, keepdims=True)
  mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
  w = jnp.exp(lse_parts - mx)  # [B, S, R]; an empty split weighs 0
  tot = w.sum(1)
  # A weighted sum in f32 (one reduction fusion), not an einsum: XLA would make a matmul of it, in TF32 by
  # default on a GPU (weights rounded to 10 bits) or emulated f32 at HIGHEST precision (several passes).
  out = jnp.sum(w[..., None] * o_parts.astype(jnp.float32), axis=1)
  out = out / jnp.where(tot > 0, tot, 1.0)[..., None]
  lse = jnp.where(tot > 0, jnp.log(jnp.where(tot > 0, tot, 1.0)) + mx[:, 0], -jnp.inf)
  return out, lse


# ---------------------------------------------------------------------------------------------
# Kernel.
# ---------------------------------------------------------------------------------------------


def _decode_kernel(q_ref, pages_ref, table_ref, lens_ref, *refs, s_q, heads, dl, scale_log2, steps_in_flight,
                   interpret, cluster, num_splits):
  tile, unit = lax.axis_index("tile"), lax.axis_index("unit")
  wg = lax.axis_index("wg")
  rows, page, d = BLOCK_ROWS, PAGE_SIZE, q_ref.shape[-1]
  half = dl // 2
  dtype = q_ref.dtype

  if num_splits is None:  # a schedule array (`mla_schedule.balanced_schedule`)
    sched_ref, o_ref, lse_ref = refs
    b, first, steps = sched_ref[unit, 0], sched_ref[unit, 1], sched_ref[unit, 2]
  else:
    o_ref, lse_ref = refs
    b, first, steps = mla_schedule.uniform_unit(lens_ref, unit, num_splits, page)
  length = lens_ref[b]
  # The unit's pages, none wholly past the request's length (a step is a page).
  steps = jnp.clip(_mosaic.cdiv(length - first * page, page), 0, steps)
  # Pages whose every key is visible to every row of the tile need no mask: keys <= the smallest
  # position in the tile, lengths[b] - s_q + (first row's query token).
  min_pos = length - s_q + lax.div(tile * rows, heads)
  unmasked = jnp.clip(lax.div(min_pos + 1, page) - first, 0, steps)

  def masked_scores(s, i):
    """Keys past a row's position (and past the cache) -> -inf. s [rows, page]."""
    key0 = (first + i) * page
    if interpret:
      r = lax.broadcasted_iota(jnp.int32, s.shape, 0)
      k = lax.broadcasted_iota(jnp.int32, s.shape, 1)
    else:
      r = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
      k = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
    pos = length - s_q + lax.div(r + tile * rows, heads)
    limit = jnp.minimum(pos, length - 1)
    return jnp.where(k + key0 <= limit, s, -jnp.inf)

  def scoped(qa_smem, qb_smem, qr_smem, k_smem, p_smem, stats_smem, q_bar, full, free, sync):
    # Q in three buffers (latent halves, rope) so that each compute warpgroup can stage its output half in
    # a whole, contiguous buffer (a TMA store needs one) once Q is no longer read.
    alpha_smem, l_smem, lse_smem = stats_smem.at[0], stats_smem.at[1], stats_smem.at[2]
    p_ready, p_free, final = sync.at[0], sync.at[1], sync.at[2]
    q_parts = ((qa_smem, 0, half), (qb_smem, half, half), (qr_smem, dl, d - dl))

    @pl.when(wg == 2)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")
      for smem, col, width in q_parts:
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(tile * rows, rows), pl.ds(col, width)], smem, q_bar)

      @pl.loop(0, steps)
      def _(i):
        slot = lax.rem(i, steps_in_flight)

        @pl.when(i >= steps_in_flight)
        def _():
          plgpu.barrier_wait(free.at[slot])

        # clustered: every row tile's CTA issues the same copy and each loads its share of the tile, multicast
        # to all of them; `free` is then a cluster barrier, so no CTA overwrites a slot a partner still reads
        plgpu.copy_gmem_to_smem(pages_ref.at[table_ref[b, first + i]], k_smem.at[slot], full.at[slot],
                                **({"collective_axes": "tile"} if cluster else {}))

      # Observe the last releases too, so every barrier ends balanced (the interpreter checks it); clustered,
      # this also keeps each CTA alive until its partners' last arrivals on its barriers.
      for j in range(steps_in_flight):
        i = steps - steps_in_flight + j

        @pl.when(i >= 0)
        def _():
          plgpu.barrier_wait(free.at[lax.rem(i, steps_in_flight)])

    def scores(slot):
      """S = Q K^T over the three column ranges of Q: [rows, page] f32."""
      parts = [(smem, k_smem.at[slot, :, pl.ds(col, width)]) for smem, col, width in q_parts]
      if interpret:
        f = lambda r: r[...].astype(jnp.float32)
        return sum(jnp.dot(f(q), f(k).T) for q, k in parts)

      def qk(acc_ref):
        for q, k in parts:
          plgpu.wgmma(acc_ref, q, _compat.transpose_ref(k, (1, 0)))
        return acc_ref[...]
      return pl.run_scoped(qk, plgpu.ACC((rows, page), jnp.float32))

    def pv(o, p, v_ref):
      """o + p @ v; p a [rows, page] bf16 value (registers) or SMEM ref."""
      if interpret:
        p_val = p if p is not p_smem else p_smem[...]
        return o + jnp.dot(p_val.astype(jnp.float32), v_ref[...].astype(jnp.float32))

      def body(acc_ref):
        plgpu.wgmma(acc_ref, p, v_ref)
      return pl.run_state(body)(plgpu.ACC.init(o))

    def softmax(s, i, m, l, mask):
      """The online softmax of page i's scores s [rows, page] (f32, unscaled): (p bf16, alpha, m, l)."""
      s = s * scale_log2
      if mask:
        s = masked_scores(s, i)
      m_new = jnp.maximum(m, s.max(axis=1))
      m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row with nothing visible yet: p = 0
      alpha = jnp.exp2(m - m_use)
      p = jnp.exp2(s - _mosaic.bcast_rows(m_use, s.shape))
      return p.astype(dtype), alpha, m_new, l * alpha + p.sum(axis=1)

    def hand_over(i, p16, alpha):
      """P and the rescale factors of page i into SMEM for the partner warpgroup."""
      @pl.when(i > 0)
      def _():
        plgpu.barrier_wait(p_free)  # the partner has finished reading the last P

      p_smem[...] = p16
      alpha_smem[...] = alpha
      plgpu.commit_smem()
      plgpu.barrier_arrive(p_ready)

    def step(i, carry, mask):
      """Page i: S, softmax, P to the partner, O[:, :half] += P V (S waited for before the softmax)."""
      o, m, l = carry
      slot = lax.rem(i, steps_in_flight)
      plgpu.barrier_wait(full.at[slot])
      p16, alpha, m, l = softmax(scores(slot), i, m, l, mask)
      hand_over(i, p16, alpha)
      o = pv(o * _mosaic.bcast_rows(alpha, o.shape), p16, k_smem.at[slot, :, pl.ds(0, half)])
      plgpu.barrier_arrive(free.at[slot])
      return o, m, l

    def store(which, o, l, m):
      """Output half `which` of the unit's partial (o / l, bf16, staged in Q's SMEM: Q must no longer be read)
      and, with m given, the rows' log-sum-exp (natural log; m, l in the log2 domain)."""
      buf = (qa_smem, qb_smem)[which]
      l_safe = jnp.where(l > 0, l, 1.0)
      buf[...] = (o / _mosaic.bcast_rows(l_safe, o.shape)).astype(dtype)
      if m is not None:
        lse_smem[...] = _mosaic.natural_lse(m, l)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(buf, o_ref.at[unit, pl.ds(tile * rows, rows), pl.ds(which * half, half)])
      if m is not None:
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[unit, pl.ds(tile * rows, rows)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 0)
    def _softmax_wg():
      plgpu.set_max_registers(232, action="increase")
      plgpu.barrier_wait(q_bar)
      o = _mosaic.wgmma_tile(jnp.zeros((rows, half), jnp.float32), interpret)
      m = _mosaic.wgmma_rows(jnp.full((rows,), -jnp.inf, jnp.float32), interpret)
      l = _mosaic.wgmma_rows(jnp.zeros((rows,), jnp.float32), interpret)
      carry = lax.fori_loop(0, unmasked, functools.partial(step, mask=False), (o, m, l))
      o, m, l = lax.fori_loop(unmasked, steps, functools.partial(step, mask=True), carry)

      @pl.when(steps > 0)
      def _():
        plgpu.barrier_wait(p_free)  # balances p_free's phases (one per step)

      l_smem[...] = l
      plgpu.barrier_arrive(final)
      store(0, o, l, m)  # warpgroup 1 does not read Q

    @pl.when(wg == 1)
    def _partner_wg():
      plgpu.set_max_registers(232, action="increase")

      def step(i, o):
        slot = lax.rem(i, steps_in_flight)
        plgpu.barrier_wait(full.at[slot])
        plgpu.barrier_wait(p_ready)
        alpha = _mosaic.load_wgmma_rows(alpha_smem, interpret)
        o = o * _mosaic.bcast_rows(alpha, o.shape)
        o = pv(o, p_smem, k_smem.at[slot, :, pl.ds(half, half)])
        plgpu.barrier_arrive(p_free)
        plgpu.barrier_arrive(free.at[slot])
        return o

      o = lax.fori_loop(0, steps, step, _mosaic.wgmma_tile(jnp.zeros((rows, half), jnp.float32), interpret))
      plgpu.barrier_wait(final)  # warpgroup 0 is done with Q's SMEM and has written l
      store(1, o, _mosaic.load_wgmma_rows(l_smem, interpret), None)

  swizzled = functools.partial(_mosaic.smem_transforms, page, dtype)
  pl.run_scoped(
      scoped,
      plgpu.SMEM((rows, half), dtype, transforms=swizzled()),
      plgpu.SMEM((rows, half), dtype, transforms=swizzled()),
      plgpu.SMEM((rows, d - dl), dtype, transforms=swizzled()),
      plgpu.SMEM((steps_in_flight, page, d), dtype, transforms=swizzled()),
      plgpu.SMEM((rows, page), dtype, transforms=swizzled()),  # P, warpgroup 0's for its partner
      plgpu.SMEM((3, rows), jnp.float32),  # alpha, l, lse: one 1 KB allocation (each is 1 KB-aligned)
      plgpu.Barrier(num_arrivals=3),
      plgpu.Barrier(num_arrivals=1, num_barriers=steps_in_flight),
      (plgpu.ClusterBarrier(collective_axes=("tile",), num_arrivals=2, num_barriers=steps_in_flight) if cluster
       else plgpu.Barrier(num_arrivals=2, num_barriers=steps_in_flight)),
      plgpu.Barrier(num_arrivals=1, num_barriers=3),  # p_ready, p_free, final
      collective_axes="wg",
  )


_REDUCTION_SCRATCH_BYTES = 1024  # Mosaic's cross-warp reduction scratch (its default, 2 KB, would not fit)


def _smem_bytes(d, steps_in_flight, itemsize=2):
  """SMEM of one CTA as Mosaic GPU lays it out (every allocation 1 KB-aligned), barriers aside."""
  align = lambda n: -(-n // 1024) * 1024
  q = BLOCK_ROWS * d * itemsize
  return (q + align(steps_in_flight * PAGE_SIZE * d * itemsize) + align(BLOCK_ROWS * PAGE_SIZE * itemsize)
          + align(3 * BLOCK_ROWS * 4) + _REDUCTION_SCRATCH_BYTES)


def _validate(q, pages, block_table, lengths, kv_lora_rank):
  if q.ndim != 4:
    raise ValueError(f"q must be [batch, s_q, heads, kv_lora_rank + rope_dim], got {q.shape}")
  b, _, _, d = q.shape
  if pages.ndim != 3 or pages.shape[1] != PAGE_SIZE or pages.shape[2] != d:
    raise ValueError(f"pages must be [num_pages, {PAGE_SIZE}, {d}] (q's width), got {pages.shape}")
  if q.dtype != jnp.bfloat16 or pages.dtype != jnp.bfloat16:
    raise ValueError(f"q and pages must be bfloat16, got {q.dtype} and {pages.dtype}")
  if block_table.ndim != 2 or block_table.shape[0] != b or not jnp.issubdtype(block_table.dtype,
                                                                                 jnp.integer):
    raise ValueError(f"block_table must be int [{b}, max_pages], got {block_table.dtype}{block_table.shape}")
  if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths must be int [{b}], got {lengths.dtype}{lengths.shape}")
  if not 0 < kv_lora_rank < d:
    raise ValueError(f"kv_lora_rank {kv_lora_rank} must lie inside the width {d}")


def _pad_last(x, parts):
  """Pads the last axis, split into (width, padded width) parts, each part to its padded width."""
  if all(w == p for w, p in parts):
    return x
  pieces, start = [], 0
  for w, p in parts:
    piece = x[..., start:start + w]
    pieces.append(jnp.pad(piece, [(0, 0)] * (x.ndim - 1) + [(0, p - w)]))
    start += w
  return jnp.concatenate(pieces, axis=-1)


def mla_decode(q, pages, block_table, lengths, *, kv_lora_rank: int, softmax_scale: float,
               config: DecodeConfig | None = None, interpret: bool = False):
  """Absorbed MLA attention of s_q new tokens per request over a paged latent cache.

  Args:
    q: [B, s_q, H, D] bf16, D = kv_lora_rank + rope_dim: (q_nope @ W_uk) || rotated q_pe per head.
    pages: [num_pages, 64, D] bf16: latent || rotated k_pe of each cached token (`PAGE_SIZE` tokens a page).
    block_table: [B, max_pages] int32, request -> its pages in order (entries past a request's length
      are never read).
    lengths: [B] int32, tokens cached per request including the s_q new ones (>= s_q), or 0 for an idle
      batch row (its output is 0); at most max_pages * 64 (traced, so not checked here: a longer length reads
      block-table entries past the row, which hangs the interpreter and reads stray pages on a GPU).
    kv_lora_rank: the latent width; the value of a token is the first kv_lora_rank entries of its row.
    softmax_scale: multiplies q . k before the softmax.
    config: `DecodeConfig`; None picks the splits from B and the device's SM count.
  Returns:
    (out [B, s_q, H, kv_lora_rank] bf16: attention output in latent space (apply W_uv next),
     lse [B, s_q, H] f32: natural-log normalizer of each row's softmax, for merging with other parts).
  Latent widths that are not multiples of 128 (and rope widths not multiples of 64) are zero-padded
  here, a copy of the cache: allocate caches at `padded_widths` to avoid it.
  """
  _validate(q, pages, block_table, lengths, kv_lora_rank)
  cfg = config or DecodeConfig()
  b, s_q, h, d = q.shape
  dl, dr = padded_widths(kv_lora_rank, d - kv_lora_rank)
  parts = ((kv_lora_rank, dl), (d - kv_lora_rank, dr))
  q_p, pages_p = _pad_last(q, parts), _pad_last(pages, parts)
  dp = dl + dr
  smem = _smem_bytes(dp, cfg.max_concurrent_steps)
  if smem > SMEM_BYTES:
    raise ValueError(f"width {dp} with {cfg} needs {smem} bytes of SMEM (> {SMEM_BYTES})")
  r = s_q * h
  r_pad = -(-r // BLOCK_ROWS) * BLOCK_ROWS
  q_rows = q_p.reshape(b, r, dp)
  if r_pad != r:
    q_rows = jnp.pad(q_rows, ((0, 0), (0, r_pad - r), (0, 0)))
  tiles = r_pad // BLOCK_ROWS
  num_sms = 2 if interpret else _compat.num_sms()
  lengths = lengths.astype(jnp.int32)
  if cfg.balanced:
    target = cfg.num_splits * b if cfg.num_splits else max(1, num_sms // tiles)
    sched, unit_request = mla_schedule.balanced_schedule(lengths, target, cfg.min_pages_per_split, PAGE_SIZE)
    units, sched_args, splits = sched.shape[0], (sched,), None
  else:  # the kernel computes `mla_schedule.uniform_schedule`'s units itself
    splits = cfg.num_splits or choose_num_splits(b, tiles, block_table.shape[1], num_sms,
                                                 cfg.min_pages_per_split)
    units, sched_args = b * splits, ()
  cluster = cfg.cluster and tiles > 1 and not interpret
  if cluster and tiles > MAX_CLUSTER:
    raise ValueError(f"cluster=True needs at most {MAX_CLUSTER} row tiles of {BLOCK_ROWS} (s_q x heads <= "
                     f"{MAX_CLUSTER * BLOCK_ROWS}), got {tiles}")
  body = functools.partial(_decode_kernel, s_q=s_q, heads=h, dl=dl, scale_log2=softmax_scale * _mosaic.LOG2E,
                           steps_in_flight=cfg.max_concurrent_steps, interpret=interpret, cluster=cluster,
                           num_splits=splits)
  # Unclustered, the grid is (row tiles, units) with row tiles fastest: the CTAs reading the same pages are
  # launched together. Clustered, a unit's row tiles are one cluster.
  grid = dict(grid=(units,), grid_names=("unit",), cluster=(tiles,), cluster_names=("tile",)) if cluster else \
      dict(grid=(tiles, units), grid_names=("tile", "unit"))
  o_parts, lse_parts = plgpu.kernel(
      body,
      out_type=(jax.ShapeDtypeStruct((units, r_pad, dl), q.dtype),
                jax.ShapeDtypeStruct((units, r_pad), jnp.float32)),
      **grid,
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True,
                                           reduction_scratch_bytes=_REDUCTION_SCRATCH_BYTES),
      interpret=_compat.InterpretGPUParams() if interpret else None,
  )(q_rows, pages_p, block_table.astype(jnp.int32), lengths, *sched_args)
  if cfg.balanced:
    out, lse = mla_schedule.combine_units(o_parts, lse_parts, unit_request, b)
  elif splits > 1 and (cfg.combine or ("xla" if interpret else "kernel")) == "kernel":
    out, lse = mla_combine.combine_splits(o_parts, lse_parts, num_splits=splits, columns=cfg.combine_columns,
                                          interpret=interpret)
  else:
    out, lse = combine(o_parts.reshape(b, splits, r_pad, dl), lse_parts.reshape(b, splits, r_pad))
  out = out[:, :r, :kv_lora_rank].reshape(b, s_q, h, kv_lora_rank).astype(q.dtype)
  return out, lse[:, :r].reshape(b, s_q, h)
