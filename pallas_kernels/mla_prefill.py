"""MLA prefill attention on Hopper (Pallas Mosaic GPU): causal flash attention of new tokens against
[cached prefix + the new tokens], in MLA's expanded form, with per-row lengths.

Expanded form (DeepSeek-V2/V3 prefill): per head, q = q_nope || q_pe (128 + 64 for R1), k = k_nope || k_pe with
k_pe shared by all heads (MQA-like), v of its own width (128). The kernel takes the tensors as the model makes
them, so nothing is concatenated or broadcast in HBM:
  q    [B, Sq, H, Dn + Dr]   q_b_proj's output with q_pe rotated;
  kv   [B, Sk, H, Dn + Dv]   kv_b_proj's output for every key (the cached prefix's latents and the new ones):
                             k_nope || v per head;
  k_pe [B, Sk, Dr]           the rotated rope key, one per token.
Scores are q_nope . k_nope + q_pe . k_pe: two wgmmas into one accumulator.

Lengths: row b has q_lens[b] new tokens at the start of its Sq queries and kv_lens[b] keys (the prefix of
kv_lens - q_lens cached tokens, then the new ones). Query i sits at position kv_lens - q_lens + i and attends
keys <= it. Work is skipped by length: key tiles past a query tile's last position are never loaded, query
tiles past q_lens do nothing but write zeros, so padding costs no FLOPs beyond tile granularity.

The prefix is up-projected through kv_b before the call (one GEMM, as SGLang and TensorRT-LLM do for MLA
prefill): for a chunk of C new tokens against P cached ones, the expanded form costs P x H x 256 x 512 x 2 FLOPs
of up-projection plus C x P x H x 640 of attention, the absorbed form C x P x H x 2176; the expanded form is
cheaper from about 170 new tokens per chunk on (R1 shapes), and `mla_decode` serves shorter query counts.

Kernel design (FlashAttention-3's, written for these shapes): a CTA owns 2 x block_q queries of one
(row, head); two compute warpgroups of block_q queries each and a memory warpgroup that streams k_nope, k_pe
and v tiles through a ring of `max_concurrent_steps` stages with TMA. The compute warpgroups take turns on the
tensor cores (a schedule barrier), so one's softmax runs while the other's matmuls do. Causal masking is
applied only on the key tiles that straddle a query tile's diagonal.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _compat, _mosaic

SMEM_BYTES = 227 * 1024  # Hopper's shared memory per CTA
_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
  """block_q: queries per compute warpgroup (a CTA owns 2 x block_q); block_kv: keys per pipeline step."""
  block_q: int = 64
  block_kv: int = 128
  max_concurrent_steps: int = 2

  def __post_init__(self):
    if self.block_q != 64:
      raise ValueError(f"block_q must be 64 (one wgmma M per warpgroup), got {self.block_q}")
    if self.block_kv % 64 or not 64 <= self.block_kv <= 256:
      raise ValueError(f"block_kv must be 64, 128, 192 or 256, got {self.block_kv}")
    if self.max_concurrent_steps < 2:
      raise ValueError(f"max_concurrent_steps must be >= 2, got {self.max_concurrent_steps}")


DEFAULT_CONFIG = PrefillConfig()


def smem_bytes(cfg: PrefillConfig, dn: int, dr: int, dv: int) -> int:
  """SMEM of one CTA: the two warpgroups' queries, the key/value ring, the output tile (shared with
  q_nope when dn == dv) and the log-sum-exp rows."""
  q = 2 * cfg.block_q * (dn + dr)
  ring = cfg.max_concurrent_steps * cfg.block_kv * (dn + dr + dv)
  out = 0 if dn == dv else 2 * cfg.block_q * dv
  return 2 * (q + ring + out) + 2 * cfg.block_q * 4


# ---------------------------------------------------------------------------------------------
# Reference (pure jnp, f32).
# ---------------------------------------------------------------------------------------------


def reference(q, kv, k_pe, q_lens, kv_lens, *, softmax_scale):
  """Same contract as `mla_prefill`: (out [B, Sq, H, Dv] in q.dtype, lse [B, H, Sq] f32). Rows past
  q_lens are 0 (lse -inf)."""
  dr = k_pe.shape[-1]
  dn = q.shape[-1] - dr
  f32 = jnp.float32
  q, kv, k_pe = q.astype(f32), kv.astype(f32), k_pe.astype(f32)
  key = jnp.arange(kv.shape[1])
  key_ok = key[None, :] < kv_lens[:, None]  # [b, k]
  kv = jnp.where(key_ok[:, :, None, None], kv, 0.0)
  k_pe = jnp.where(key_ok[:, :, None], k_pe, 0.0)
  hi = lax.Precision.HIGHEST
  s = (jnp.einsum("bqhn,bkhn->bhqk", q[..., :dn], kv[..., :dn], precision=hi)
       + jnp.einsum("bqhr,bkr->bhqk", q[..., dn:], k_pe, precision=hi)) * softmax_scale
  qi = jnp.arange(q.shape[1])
  pos = (kv_lens - q_lens)[:, None] + qi[None, :]  # [b, q]
  q_ok = qi[None, :] < q_lens[:, None]
  mask = (key[None, None, :] <= pos[:, :, None]) & key_ok[:, None, :] & q_ok[:, :, None]
  s = jnp.where(mask[:, None], s, -jnp.inf)
  mx = jnp.max(s, axis=-1, keepdims=True)
  mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
  p = jnp.exp(s - mx)
  tot = p.sum(-1)
  out = jnp.einsum("bhqk,bkhv->bqhv", p, kv[..., dn:], precision=hi)
  out = out / jnp.moveaxis(jnp.where(tot > 0, tot, 1.0), 1, 2)[..., None]
  lse = jnp.where(tot > 0, jnp.log(jnp.where(tot > 0, tot, 1.0)) + mx[..., 0], -jnp.inf)
  return out.astype(q.dtype if q.dtype != f32 else f32), lse


# ---------------------------------------------------------------------------------------------
# Kernel.
# ---------------------------------------------------------------------------------------------


def _prefill_kernel(qn_ref, qp_ref, kv_ref, kpe_ref, qlen_ref, kvlen_ref, out_ref, lse_ref, *, cfg, dn, dr,
                    dv, qp_col, scale_log2, interpret):
  """qn_ref's columns [0, dn) hold q_nope, qp_ref's [qp_col, qp_col + dr) the rotated q_pe (the same array
  when q comes concatenated)."""
  h, qt, b = lax.axis_index("heads"), lax.axis_index("q_tile"), lax.axis_index("b")
  wg = lax.axis_index("wg")
  bq, bkv, stages = cfg.block_q, cfg.block_kv, cfg.max_concurrent_steps
  dtype = qn_ref.dtype
  q_len, kv_len = qlen_ref[b], kvlen_ref[b]
  offset = kv_len - q_len  # position of query 0

  def steps_of(w):
    """Key tiles that warpgroup w's queries need: keys [0, last position + 1)."""
    q0 = qt * 2 * bq + w * bq
    keys = offset + jnp.minimum(q0 + bq, q_len)
    return jnp.where(q0 < q_len, _mosaic.cdiv(keys, bkv), 0)

  cta_steps = jnp.maximum(steps_of(0), steps_of(1))

  def scoped(qn_smem, qp_smem, kn_smem, kp_smem, v_smem, o_smem, lse_smem, q_bar, k_bar, v_bar,
             k_free, v_free, schedule):
    o_smem = qn_smem if o_smem is None else o_smem

    def schedule_turn():
      plgpu.barrier_arrive(schedule)
      plgpu.barrier_wait(schedule)

    @pl.when(wg == 2)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")

      def issue_k(j, slot):
        keys = pl.ds(j * bkv, bkv)
        plgpu.copy_gmem_to_smem(kv_ref.at[b, keys, h, pl.ds(0, dn)], kn_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(kpe_ref.at[b, keys], kp_smem.at[slot], k_bar.at[slot])

      def issue_v(j, slot):
        plgpu.copy_gmem_to_smem(kv_ref.at[b, pl.ds(j * bkv, bkv), h, pl.ds(dn, dv)], v_smem.at[slot],
                                v_bar.at[slot])

      # the prologue's tiles are static slices: none past the padded key length (a single key tile
      # with two stages, say), whose bounds are checked when the kernel is traced
      for i in range(min(stages, kv_ref.shape[1] // bkv)):
        @pl.when(i < cta_steps)
        def _():
          issue_k(i, i)
          issue_v(i, i)

      @pl.loop(0, cta_steps - stages)
      def _(i):
        j, slot = i + stages, lax.rem(i, stages)
        plgpu.barrier_wait(k_free.at[slot])
        issue_k(j, slot)
        plgpu.barrier_wait(v_free.at[slot])
        issue_v(j, slot)

      for i in range(stages):  # observe the last releases: every barrier ends balanced
        j = cta_steps - stages + i

        @pl.when(j >= 0)
        def _():
          plgpu.barrier_wait(k_free.at[lax.rem(j, stages)])
          plgpu.barrier_wait(v_free.at[lax.rem(j, stages)])

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      q0 = qt * 2 * bq + wg * bq
      my_steps = jnp.where(wg == 0, steps_of(0), steps_of(1))
      # Key tiles entirely at or below the first query's position need no mask.
      unmasked = jnp.clip(lax.div(offset + q0 + 1, bkv), 0, my_steps)
      rows = pl.ds(q0, bq)
      plgpu.copy_gmem_to_smem(qn_ref.at[b, rows, h, pl.ds(0, dn)], qn_smem.at[wg], q_bar.at[wg])
      plgpu.copy_gmem_to_smem(qp_ref.at[b, rows, h, pl.ds(qp_col, dr)], qp_smem.at[wg], q_bar.at[wg])
      plgpu.barrier_wait(q_bar.at[wg])

      def layout(x, which):
        return x if interpret else plgpu.layout_cast(x, which)

      def iota(shape, dim):
        if interpret:
          return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

      def scores(slot):
        qn, qp, kn, kp = qn_smem.at[wg], qp_smem.at[wg], kn_smem.at[slot], kp_smem.at[slot]
        if interpret:
          f = lambda r: r[...].astype(jnp.float32)
          s = jnp.dot(f(qn), f(kn).T) + jnp.dot(f(qp), f(kp).T)
          schedule_turn()
          return s

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, qn, _compat.transpose_ref(kn, (1, 0)))
          plgpu.wgmma(acc_ref, qp, _compat.transpose_ref(kp, (1, 0)))
          schedule_turn()
          return acc_ref[...]
        return pl.run_scoped(qk, plgpu.ACC((bq, bkv), jnp.float32))

      def pv(acc, p16, slot, j):
        def wait_next_keys():
          @pl.when(j + 1 < my_steps)
          def _():
            plgpu.barrier_wait(k_bar.at[lax.rem(j + 1, stages)])

        if interpret:
          acc = acc + jnp.dot(p16.astype(jnp.float32), v_smem.at[slot][...].astype(jnp.float32))
          wait_next_keys()
          return acc

        def body(acc_ref):
          plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
          wait_next_keys()
        return pl.run_state(body)(plgpu.ACC.init(acc))

      def step(j, carry, mask):
        acc, m, l = carry
        slot = lax.rem(j, stages)
        s = scores(slot)
        plgpu.barrier_arrive(k_free.at[slot])
        s = s * scale_log2
        if mask:
          keep = iota(s.shape, 1) + j * bkv <= iota(s.shape, 0) + (offset + q0)
          s = jnp.where(keep, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        l = l * alpha + p.sum(axis=1)
        p16 = p.astype(dtype)
        plgpu.barrier_arrive(schedule)  # softmax done: the partner may take the tensor cores
        plgpu.barrier_wait(v_bar.at[slot])
        plgpu.barrier_wait(schedule)
        acc = pv(acc, p16, slot, j)
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_new, l

      def drain(j, _):
        """Key tiles the partner needs and this warpgroup does not: release them in step."""
        slot = lax.rem(j, stages)
        plgpu.barrier_wait(k_bar.at[slot])
        plgpu.barrier_arrive(k_free.at[slot])
        schedule_turn()
        plgpu.barrier_wait(v_bar.at[slot])
        plgpu.barrier_arrive(v_free.at[slot])
        schedule_turn()

      acc = layout(jnp.zeros((bq, dv), jnp.float32), plgpu.Layout.WGMMA)
      m = layout(jnp.full((bq,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
      l = layout(jnp.zeros((bq,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))

      @pl.when(my_steps > 0)
      def _():
        plgpu.barrier_wait(k_bar.at[0])

      pl.when(wg == 1)(schedule_turn)
      carry = lax.fori_loop(0, unmasked, lambda j, c: step(j, c, False), (acc, m, l))
      acc, m, l = lax.fori_loop(unmasked, my_steps, lambda j, c: step(j, c, True), carry)
      lax.fori_loop(my_steps, cta_steps, drain, None)
      pl.when(wg == 0)(schedule_turn)

      valid = (iota((bq, dv), 0) + q0 < q_len) & (lax.broadcast_in_dim(l, (bq, dv), [0]) > 0)
      out = acc / lax.broadcast_in_dim(jnp.where(l > 0, l, 1.0), (bq, dv), [0])
      o_smem.at[wg][...] = jnp.where(valid, out, 0.0).astype(dtype)
      # Rows past q_len get -inf in the wrapper (a row-vector iota is not a layout we rely on).
      lse_smem.at[wg][...] = jnp.where(l > 0, (m + jnp.log2(jnp.where(l > 0, l, 1.0))) / _LOG2E,
                                       -jnp.inf)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem.at[wg], out_ref.at[b, rows, h])
      plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, rows])
      plgpu.wait_smem_to_gmem(0)

  t = lambda minor: _mosaic.smem_transforms(minor, dtype)
  pl.run_scoped(
      scoped,
      plgpu.SMEM((2, bq, dn), dtype, transforms=t(dn)),
      plgpu.SMEM((2, bq, dr), dtype, transforms=t(dr)),
      plgpu.SMEM((stages, bkv, dn), dtype, transforms=t(dn)),
      plgpu.SMEM((stages, bkv, dr), dtype, transforms=t(dr)),
      plgpu.SMEM((stages, bkv, dv), dtype, transforms=t(dv)),
      None if dn == dv else plgpu.SMEM((2, bq, dv), dtype, transforms=t(dv)),
      plgpu.SMEM((2, bq), jnp.float32),
      plgpu.Barrier(num_arrivals=2, num_barriers=2),
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      plgpu.Barrier(num_arrivals=1, num_barriers=stages),
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      plgpu.Barrier(num_arrivals=2),
      collective_axes="wg",
  )


def _validate(q, kv, k_pe, q_lens, kv_lens, q_pe):
  if q_pe is not None and (q_pe.shape != (*q.shape[:3], k_pe.shape[-1]) or q_pe.dtype != q.dtype):
    raise ValueError(f"q_pe must be [B, Sq, H, Dr] = {(*q.shape[:3], k_pe.shape[-1])} of q's dtype, got "
                     f"{q_pe.dtype}{q_pe.shape}")
  if q.ndim != 4 or kv.ndim != 4 or k_pe.ndim != 3:
    raise ValueError(f"q [B, Sq, H, Dn + Dr], kv [B, Sk, H, Dn + Dv] and k_pe [B, Sk, Dr] expected, got "
                     f"{q.shape}, {kv.shape}, {k_pe.shape}")
  b, _, h, dq = q.shape
  if kv.shape[0] != b or kv.shape[2] != h or k_pe.shape[:2] != kv.shape[:2]:
    raise ValueError(f"batch, heads and key counts disagree: q {q.shape}, kv {kv.shape}, k_pe {k_pe.shape}")
  dr = k_pe.shape[-1]
  if not 0 < dr < dq or kv.shape[-1] <= dq - dr:
    raise ValueError(f"widths do not split into nope/rope/v: q {dq}, kv {kv.shape[-1]}, k_pe {dr}")
  if {q.dtype, kv.dtype, k_pe.dtype} != {jnp.dtype(jnp.bfloat16)}:
    raise ValueError(f"q, kv and k_pe must be bfloat16, got {q.dtype}, {kv.dtype}, {k_pe.dtype}")
  for name, lens in (("q_lens", q_lens), ("kv_lens", kv_lens)):
    if lens.shape != (b,) or not jnp.issubdtype(lens.dtype, jnp.integer):
      raise ValueError(f"{name} must be int [{b}], got {lens.dtype}{lens.shape}")


def _pad_axis(x, axis, size):
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def _round_up(v, r):
  return -(-v // r) * r


def mla_prefill(q, kv, k_pe, q_lens, kv_lens, *, softmax_scale: float, q_pe=None,
                config: PrefillConfig | None = None, interpret: bool = False):
  """Causal MLA attention of each row's new tokens against its cached prefix and themselves.

  Args:
    q: [B, Sq, H, Dn + Dr] bf16, q_nope || rotated q_pe; row b's new tokens are its first q_lens[b].
    kv: [B, Sk, H, Dn + Dv] bf16, k_nope || v of every key (prefix, then the new tokens).
    k_pe: [B, Sk, Dr] bf16, rotated rope key of every key.
    q_lens, kv_lens: [B] int32, 0 <= q_lens <= kv_lens <= Sk, q_lens <= Sq. Keys in
      [kv_lens, round_up(kv_lens, block_kv)) are read with weight 0: they must be finite.
    softmax_scale: multiplies q . k.
    q_pe: optional [B, Sq, H, Dr] bf16, the rotated rope part, read instead of q's last Dr columns: q can then
      be the query projection's output as it is (its rope columns unrotated), with no concatenated copy.
  Returns:
    (out [B, Sq, H, Dv] bf16, rows past q_lens 0; lse [B, H, Sq] f32 natural-log normalizers, -inf
     past q_lens), for merging with attention over other key sets.
  Widths that are not multiples of 64 are zero-padded here (a copy: only small test models need it);
  Sq is padded to 2 x block_q and Sk to block_kv the same way, so bucket shapes to avoid copies.
  """
  _validate(q, kv, k_pe, q_lens, kv_lens, q_pe)
  cfg = config or DEFAULT_CONFIG
  b, sq, h, dq = q.shape
  sk, dr = k_pe.shape[1], k_pe.shape[-1]
  dn, dv = dq - dr, kv.shape[-1] - (dq - dr)
  dn_p, dr_p, dv_p = _round_up(dn, 64), _round_up(dr, 64), _round_up(dv, 64)
  # q_nope from q's first columns; q_pe from q_pe if given, else from q's columns [dn, dn + dr)
  q_n, q_p, qp_col = q, (q if q_pe is None else q_pe), (dn if q_pe is None else 0)
  if (dn_p, dr_p) != (dn, dr):  # small test widths: padded copies of each part
    q_n, q_p, qp_col = _pad_axis(q[..., :dn], 3, dn_p), _pad_axis(q_p[..., qp_col:qp_col + dr], 3, dr_p), 0
  if (dn_p, dv_p) != (dn, dv):
    kv = jnp.concatenate([_pad_axis(kv[..., :dn], 3, dn_p), _pad_axis(kv[..., dn:], 3, dv_p)], -1)
  k_pe = _pad_axis(k_pe, 2, dr_p)
  if smem_bytes(cfg, dn_p, dr_p, dv_p) > SMEM_BYTES:
    raise ValueError(f"{cfg} needs {smem_bytes(cfg, dn_p, dr_p, dv_p)} bytes of SMEM for widths "
                     f"{dn_p}/{dr_p}/{dv_p} (> {SMEM_BYTES}): lower block_kv or max_concurrent_steps")
  sq_p, sk_p = _round_up(sq, 2 * cfg.block_q), _round_up(sk, cfg.block_kv)
  same = q_p is q_n
  q_n, kv, k_pe = _pad_axis(q_n, 1, sq_p), _pad_axis(kv, 1, sk_p), _pad_axis(k_pe, 1, sk_p)
  q_p = q_n if same else _pad_axis(q_p, 1, sq_p)
  body = lambda *refs: _prefill_kernel(*refs, cfg=cfg, dn=dn_p, dr=dr_p, dv=dv_p, qp_col=qp_col,
                                        scale_log2=softmax_scale * _LOG2E, interpret=interpret)
  out, lse = plgpu.kernel(
      body,
      out_type=(jax.ShapeDtypeStruct((b, sq_p, h, dv_p), q_n.dtype),
                jax.ShapeDtypeStruct((b, h, sq_p), jnp.float32)),
      grid=(h, sq_p // (2 * cfg.block_q), b),
      grid_names=("heads", "q_tile", "b"),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=_compat.InterpretGPUParams() if interpret else None,
  )(q_n, q_p, kv, k_pe, q_lens.astype(jnp.int32), kv_lens.astype(jnp.int32))
  q_ok = jnp.arange(sq)[None, None, :] < q_lens[:, None, None]
  return out[:, :sq, :, :dv], jnp.where(q_ok, lse[:, :, :sq], -jnp.inf)
