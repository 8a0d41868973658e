"""MLA decode over whole pages loaded as 64-column tiles (`DecodeConfig(tiled_pages=True)`): FlashMLA's layout.

The plain kernel (`mla_decode`) keeps two whole pages in flight and one in compute. Two pages in compute at once
(the seesaw order, `mla_decode_seesaw`: one warpgroup's S on the tensor cores while the other runs its softmax)
leave no SMEM for a third page, and narrower key tiles are no way out (32 keys make S bound by SMEM reads of Q:
WORKSPACE Finding 35). So, as FlashMLA does, a page [64, 576] arrives as nine [64, 64] column tiles, each with
its own barrier, into two page slots: even pages in slot 0 (their S computed by warpgroup 0), odd pages in slot 1
(warpgroup 1). A tile is refilled for page i + 2 as soon as its last reader is done:
  * latent tiles 0-3 (V's columns 0-255) after warpgroup 0's P V, tiles 4-7 after warpgroup 1's;
  * the rope tile (Q's and K's last 64 columns; not part of V) once the partner has read the P it holds (below);
and S of a page runs tile by tile in the order the tiles are loaded (0-3, rope, 4-7: about the order they are
freed), each wgmma waiting only for its own tile, so the next page's S starts while its other tiles land.

A page's rope tile, once its S is done, holds that page's P for the partner warpgroup: P_a in slot 0's rope
tile, P_b in slot 1's (same shape and swizzle), released by the partner after it has read P instead of after S.
So neither a P buffer nor Q's rope part in registers is needed (the first form of this kernel, measured 2.85x
slower, held Q's rope in 16 more registers a thread and P_a in 8 KB of its own: Finding 36). Each warpgroup's O
is four [64, 64] f32 accumulators (one per V tile: a V half is four separate SMEM tiles, not one [64, 256]
operand), and the partner's P is loaded into registers before its four wgmmas. Every SMEM tile is its own
allocation, indexed statically (slot = the page's parity): a TMA cannot write a 64-column slice of a [64, 576]
tiled buffer (Mosaic GPU: "async_copy needs the SMEM reference to be contiguous"), and a wgmma operand taken
out of a stacked buffer by a static index fails Mosaic GPU's lowering (jax 0.11.2).

SMEM (R1's 512 + 64): Q 9 x 8 KB, two pages of 9 x 8 KB, the seesaw's row vectors 1 KB: 217 KB beside Mosaic's
reduction scratch.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _compat, _mosaic, mla_decode_seesaw

TILE = 64  # columns of a tile; also the keys of a page and the query rows of a CTA


def smem_bytes(d: int, itemsize: int = 2) -> int:
  """SMEM of one CTA (1 KB-aligned allocations; barriers and Mosaic's reduction scratch aside) for width d."""
  tiles = d // TILE
  return 3 * tiles * TILE * TILE * itemsize + 1024  # Q's tiles, two pages, the row vectors


def _load_order(num_latent: int, num_rope: int):
  """Tiles in the order they are loaded and multiplied, about the order their last readers free them: warpgroup
  0's latent half, the rope tiles, warpgroup 1's half."""
  half = num_latent // 2
  return tuple(range(half)) + tuple(range(num_latent, num_latent + num_rope)) + tuple(range(half, num_latent))


def run_unit(q_ref, pages_ref, table_ref, o_ref, lse_ref, *, b, first, steps, unmasked, mask, tile, unit, wg,
             dl, scale_log2, interpret, cluster):
  """One CTA's work unit: pages first .. first + steps - 1 of request b for query row tile `tile`, written as
  unit `unit`'s partial. Called inside the decode kernel's body (three warpgroups; `wg` the warpgroup axis);
  `mask(s, i)` hides the keys of the unit's page i that a row must not see."""
  rows, d, dtype = TILE, q_ref.shape[-1], q_ref.dtype
  nl, nr = dl // TILE, (d - dl) // TILE
  nt, half = nl + nr, nl // 2  # tiles a page; latent tiles a warpgroup owns (its V half, its output columns)
  order = _load_order(nl, nr)
  multicast = {"collective_axes": "tile"} if cluster else {}

  def scoped(q_tiles, k_tiles, stats_smem, q_bar, full, free, sync):
    # q_tiles: nt [64, 64] tiles of Q (latent, then rope); k_tiles[slot][c]: tile c of the page in `slot`
    barrier = lambda bars, slot, c: bars.at[slot * nt + c]

    @pl.when(wg == 2)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")
      for c in order:
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(tile * rows, rows), pl.ds(c * TILE, TILE)], q_tiles[c], q_bar)

      def load_page(i, slot):
        page = table_ref[b, first + i]
        for c in order:
          @pl.when(i >= 2)
          def _():
            plgpu.barrier_wait(barrier(free, slot, c))  # page i - 2's tile c has been read for the last time

          plgpu.copy_gmem_to_smem(pages_ref.at[page, :, pl.ds(c * TILE, TILE)], k_tiles[slot][c],
                                  barrier(full, slot, c), **multicast)

      @pl.loop(0, _mosaic.cdiv(steps, 2))
      def _(j):
        load_page(2 * j, 0)

        @pl.when(2 * j + 1 < steps)
        def _():
          load_page(2 * j + 1, 1)

      # The last page of each slot is released too: observe it, so every barrier ends balanced (clustered, this
      # keeps each CTA alive until its partners' last arrivals on its barriers).
      for slot in range(2):
        @pl.when(steps > slot)
        def _():
          for c in range(nt):
            plgpu.barrier_wait(barrier(free, slot, c))

    def scores(i, slot):
      """S of page i (in `slot`) tile by tile, each wgmma after its tile's barrier. Releases the rope tiles but
      the first, which next holds the page's P until the partner has read it."""
      if interpret:
        s = 0.0
        for c in order:
          plgpu.barrier_wait(barrier(full, slot, c))
          q = q_tiles[c][...]
          s = s + jnp.dot(q.astype(jnp.float32), k_tiles[slot][c][...].astype(jnp.float32).T)
      else:
        def qk(acc_ref):
          for c in order:
            plgpu.barrier_wait(barrier(full, slot, c))
            plgpu.wgmma(acc_ref, q_tiles[c], _compat.transpose_ref(k_tiles[slot][c], (1, 0)))
          return acc_ref[...]
        s = pl.run_scoped(qk, plgpu.ACC((rows, TILE), jnp.float32))
      for c in range(nl + 1, nt):
        plgpu.barrier_arrive(barrier(free, slot, c))
      return s

    def pv(o, p, i, slot, which, waited):
      """O's column tiles of warpgroup `which` += P V over page i's tiles `which` * half ...; then releases them."""
      tiles = range(which * half, (which + 1) * half)
      if not waited:
        for c in tiles:
          plgpu.barrier_wait(barrier(full, slot, c))
      if not waited:  # the partner's P, in the page's rope tile: into registers once for the four wgmmas
        if not interpret:
          p = plgpu.load(p, (), layout=plgpu.Layout.WGMMA)
        plgpu.barrier_arrive(barrier(free, slot, nl))  # read: the tile may be refilled
      if interpret:
        o = tuple(acc + jnp.dot(p.astype(jnp.float32), k_tiles[slot][c][...].astype(jnp.float32))
                  for acc, c in zip(o, tiles))
      else:
        def body(acc_refs):
          for acc_ref, c in zip(acc_refs, tiles):
            plgpu.wgmma(acc_ref, p, k_tiles[slot][c])
        o = pl.run_state(body)(tuple(plgpu.ACC.init(acc) for acc in o))
      for c in tiles:
        plgpu.barrier_arrive(barrier(free, slot, c))
      return o

    def store(which, o, l, m):
      """The warpgroup's output tiles (o / l, bf16) through Q's latent tiles (no longer read) to o_ref; with m,
      the rows' log-sum-exp (natural log; m, l in the log2 domain)."""
      l_safe = jnp.where(l > 0, l, 1.0)
      tiles = range(which * half, (which + 1) * half)
      for acc, c in zip(o, tiles):
        q_tiles[c][...] = (acc / _mosaic.bcast_rows(l_safe, acc.shape)).astype(dtype)
      if m is not None:
        stats_smem.at[2][...] = _mosaic.natural_lse(m, l)
      plgpu.commit_smem()
      for c in tiles:
        plgpu.copy_smem_to_gmem(q_tiles[c], o_ref.at[unit, pl.ds(tile * rows, rows), pl.ds(c * TILE, TILE)])
      if m is not None:
        plgpu.copy_smem_to_gmem(stats_smem.at[2], lse_ref.at[unit, pl.ds(tile * rows, rows)])
      plgpu.wait_smem_to_gmem(0)

    zeros = lambda: tuple(_mosaic.wgmma_tile(jnp.zeros((rows, TILE), jnp.float32), interpret) for _ in range(half))
    unit_kit = mla_decode_seesaw.SeesawUnit(
        interpret=interpret, steps=steps, unmasked=unmasked, scale_log2=scale_log2,
        p_smem=(k_tiles[0][nl], k_tiles[1][nl]), stats_smem=stats_smem, bars=tuple(sync.at[i] for i in range(6)),
        scores=lambda i, parity: scores(i, parity), mask=mask, pv=pv, zeros=zeros, store=store)
    for w, run in enumerate((mla_decode_seesaw.warpgroup0, mla_decode_seesaw.warpgroup1)):
      @pl.when(wg == w)
      def _():
        plgpu.set_max_registers(232, action="increase")
        plgpu.barrier_wait(q_bar)
        run(unit_kit, rows)

  tile_smem = lambda: plgpu.SMEM((TILE, TILE), dtype, transforms=_mosaic.smem_transforms(TILE, dtype))
  pl.run_scoped(
      scoped,
      tuple(tile_smem() for _ in range(nt)),
      tuple(tuple(tile_smem() for _ in range(nt)) for _ in range(2)),
      plgpu.SMEM((3, rows), jnp.float32),  # m_a, m_b (then the partner's row sum, the total) and lse
      plgpu.Barrier(num_arrivals=nt),
      plgpu.Barrier(num_arrivals=1, num_barriers=2 * nt),
      (plgpu.ClusterBarrier(collective_axes=("tile",), num_arrivals=1, num_barriers=2 * nt) if cluster
       else plgpu.Barrier(num_arrivals=1, num_barriers=2 * nt)),
      plgpu.Barrier(num_arrivals=1, num_barriers=6),  # the seesaw's hand-overs
      collective_axes="wg",
  )
