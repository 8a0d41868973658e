"""The seesaw order of the MLA decode kernel's two compute warpgroups (FlashMLA's), as a protocol over key tiles
whose layout the caller owns (`mla_decode_tiled`, `DecodeConfig(tiled_pages=True)`).

In the plain order (`mla_decode`), compute warpgroup 0 carries every key tile's critical path: S = Q K^T over
576 columns, the softmax, then its half of P V, while warpgroup 1 only does the other half of P V; the tensor
cores idle through each softmax. In the seesaw, the key tiles go in pairs (a = even, b = odd) and each
warpgroup computes S of one of them, so one warpgroup's S runs on the tensor cores while the other one's
softmax runs on the CUDA cores:

  warpgroup 0 (its output columns)                warpgroup 1 (the other columns)
  S_a = Q K_a^T                                   S_b = Q K_b^T
  m_a = max(m, rowmax S_a), P_a  --m_a, P_a-->    m_b = max(m_a, rowmax S_b), P_b
  O = O * 2^(m - m_a) + P_a V_a                   O = O * 2^(m - m_a) + P_a V_a
                                 <--m_b, P_b--    O = O * 2^(m_a - m_b) + P_b V_b
  O = O * 2^(m_a - m_b) + P_b V_b

Each warpgroup derives the other's rescale factor from the published maxima (the same ops on the same values:
bitwise equal), keeps the row sums of its own P (both relative to the running maximum m_b), and the two sums
are added at the end. A unit with an odd number of tiles ends on a pair without b. SMEM here: two P buffers
(P_a, P_b) and three row vectors (m_a, m_b; at the end the partner's row sum, the total and the log-sum-exp).
Two tiles are in compute at once, so the caller's ring must let the next pair load during this one. (On a ring
of half-page tiles, four in flight, this order measured 1.25x slower than the plain kernel on whole pages:
WORKSPACE Finding 35; that ring was removed.)

Barriers (one arrival each): a_ready (P_a and m_a published), b_ready (P_b and m_b published), a_free /
b_free (the reader is done with that P buffer), l_ready (warpgroup 1's row sum written, its last read of Q
done), final (the total row sum written, warpgroup 0 done with Q).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _mosaic


@dataclasses.dataclass(frozen=True)
class SeesawUnit:
  """One work unit as a decode kernel sets it up: its tile counts, the hand-over SMEM and barriers, and the
  kernel's access to its key tiles (closures over the unit; the ring's layout stays the kernel's business).
    steps / unmasked: key tiles of the unit, and how many leading ones need no mask (traced int32);
    p_smem (P_a, P_b): two [rows, kt] bf16 SMEM buffers; stats_smem [3, rows] f32;
    bars: (a_ready, b_ready, a_free, b_free, l_ready, final), one arrival each;
    scores(i, parity) -> S [rows, kt] f32 (unscaled) of the unit's tile i, waiting for the tile's keys itself
      (parity: i % 2, static: the pair's a or b);
    mask(s, i) -> s with the keys invisible to each row at -inf;
    pv(o, p, i, parity, wg, waited) -> o + p @ V_wg(tile i) (wg's output columns), waiting for the tile's
      values unless this warpgroup already did (`waited`: it computed S of tile i, and p is its own P, a value;
      otherwise p is the partner's, its SMEM ref on the GPU), then releasing what it read of the tile;
    zeros() -> a warpgroup's O, all 0 (an array or a tuple of them);
    store(wg, o, l, m): writes the warpgroup's output columns (o / l) and, with m given, the rows'
      log-sum-exp (m, l in the log2 domain)."""
  interpret: bool
  steps: Any
  unmasked: Any
  scale_log2: float
  p_smem: tuple
  stats_smem: Any
  bars: tuple
  scores: Callable
  mask: Callable
  pv: Callable
  zeros: Callable
  store: Callable


def rescaled(s, m_old, m_new):
  """(2^(s - m_new) per row, 2^(m_old - m_new)): P and the old terms' factor; a row with nothing visible yet
  (m_new = -inf) gets P = 0. s [rows, kt] scaled scores, m_* [rows] (log2 domain)."""
  m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  alpha = jnp.exp2(m_old - m_use)
  if s is None:
    return None, alpha
  return jnp.exp2(s - _mosaic.bcast_rows(m_use, s.shape)), alpha


def scale_rows(o, alpha):
  """Each row of O (an array or a tuple of column tiles) times its factor."""
  return jax.tree.map(lambda x: x * _mosaic.bcast_rows(alpha, x.shape), o)


def _scaled_scores(u: SeesawUnit, tile, parity, mask):
  s = u.scores(tile, parity) * u.scale_log2
  return u.mask(s, tile) if mask else s


def _publish(u: SeesawUnit, which, pair, p16, m_new):
  """P and the new maxima into SMEM buffer `which` (0: a, 1: b) once its reader is done with the last pair's."""
  ready, free = u.bars[which], u.bars[2 + which]

  @pl.when(pair > 0)
  def _():
    plgpu.barrier_wait(free)

  u.p_smem[which][...] = p16
  u.stats_smem.at[which][...] = m_new
  plgpu.commit_smem()
  plgpu.barrier_arrive(ready)


def _partner_p(u: SeesawUnit, which):
  """The partner's P in SMEM as wgmma's left operand (interpret mode: its value)."""
  return u.p_smem[which][...] if u.interpret else u.p_smem[which]


def _pair_wg0(pair, carry, *, u: SeesawUnit, mask, has_b):
  """Warpgroup 0's part of pair `pair` (tiles 2 pair, 2 pair + 1): carry (its O columns, m, its row sum)."""
  o, m, l = carry
  a = 2 * pair
  s = _scaled_scores(u, a, 0, mask)
  m_a = jnp.maximum(m, s.max(axis=1))
  p, alpha_a = rescaled(s, m, m_a)
  # P's row sums now, so that its f32 values are dead before the P V products (registers: O holds 128 a thread)
  l = l * alpha_a + p.sum(axis=1)
  p16 = p.astype(u.p_smem[0].dtype)
  _publish(u, 0, pair, p16, m_a)
  o = u.pv(scale_rows(o, alpha_a), p16, a, 0, 0, True)
  if not has_b:
    return o, m_a, l
  plgpu.barrier_wait(u.bars[1])  # b_ready
  m_b = _mosaic.load_wgmma_rows(u.stats_smem.at[1], u.interpret)
  _, alpha_b = rescaled(None, m_a, m_b)
  o = u.pv(scale_rows(o, alpha_b), _partner_p(u, 1), a + 1, 1, 0, False)
  plgpu.barrier_arrive(u.bars[3])  # b_free
  return o, m_b, l * alpha_b


def _pair_wg1(pair, carry, *, u: SeesawUnit, mask, has_b):
  """Warpgroup 1's part of pair `pair`: carry (its O columns, m, its row sum)."""
  o, m, l = carry
  a = 2 * pair
  if has_b:
    s = _scaled_scores(u, a + 1, 1, mask)
  plgpu.barrier_wait(u.bars[0])  # a_ready
  m_a = _mosaic.load_wgmma_rows(u.stats_smem.at[0], u.interpret)
  _, alpha_a = rescaled(None, m, m_a)
  if has_b:  # the softmax first: warpgroup 0 waits for it
    m_b = jnp.maximum(m_a, s.max(axis=1))
    p, alpha_b = rescaled(s, m_a, m_b)
    p_sum = p.sum(axis=1)  # now: P's f32 values are dead before the P V products
    p16 = p.astype(u.p_smem[1].dtype)
    _publish(u, 1, pair, p16, m_b)
  o = u.pv(scale_rows(o, alpha_a), _partner_p(u, 0), a, 0, 1, False)
  plgpu.barrier_arrive(u.bars[2])  # a_free
  l = l * alpha_a
  if not has_b:
    return o, m_a, l
  o = u.pv(scale_rows(o, alpha_b), p16, a + 1, 1, 1, True)
  return o, m_b, l * alpha_b + p_sum


def _pairs(u: SeesawUnit, pair_fn, carry):
  """Runs pair_fn over the unit's pairs: unmasked full pairs, masked full pairs, then a last tile alone."""
  pairs = lax.div(u.steps, 2)
  clean = jnp.minimum(lax.div(u.unmasked, 2), pairs)
  carry = lax.fori_loop(0, clean, functools.partial(pair_fn, u=u, mask=False, has_b=True), carry)
  carry = lax.fori_loop(clean, pairs, functools.partial(pair_fn, u=u, mask=True, has_b=True), carry)
  return lax.fori_loop(pairs, pairs + lax.rem(u.steps, 2),
                       functools.partial(pair_fn, u=u, mask=True, has_b=False), carry)


def _start(u: SeesawUnit, rows):
  m = _mosaic.wgmma_rows(jnp.full((rows,), -jnp.inf, jnp.float32), u.interpret)
  return u.zeros(), m, _mosaic.wgmma_rows(jnp.zeros((rows,), jnp.float32), u.interpret)


def warpgroup0(u: SeesawUnit, rows: int):
  o, m, l = _pairs(u, _pair_wg0, _start(u, rows))
  a_free, l_ready, final = u.bars[2], u.bars[4], u.bars[5]

  @pl.when(u.steps > 0)
  def _():
    plgpu.barrier_wait(a_free)  # balances a_free's phases (one per pair)

  plgpu.barrier_wait(l_ready)
  l = l + _mosaic.load_wgmma_rows(u.stats_smem.at[0], u.interpret)
  u.stats_smem.at[1][...] = l
  plgpu.commit_smem()
  plgpu.barrier_arrive(final)
  u.store(0, o, l, m)


def warpgroup1(u: SeesawUnit, rows: int):
  o, _, l = _pairs(u, _pair_wg1, _start(u, rows))
  b_free, l_ready, final = u.bars[3], u.bars[4], u.bars[5]

  @pl.when(u.steps > 1)
  def _():
    plgpu.barrier_wait(b_free)  # balances b_free's phases (one per full pair)

  u.stats_smem.at[0][...] = l  # m_a's slot: warpgroup 0 writes it no more
  plgpu.commit_smem()
  plgpu.barrier_arrive(l_ready)
  plgpu.barrier_wait(final)
  u.store(1, o, _mosaic.load_wgmma_rows(u.stats_smem.at[1], u.interpret), None)
