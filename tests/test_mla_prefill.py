"""MLA prefill kernel (causal flash attention, cached prefix, per-row lengths) vs its f32 reference: GPU
interpret mode on CPU, natively on a GPU (the same tests, R1 shapes added)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _compat
from pallas_kernels import mla_prefill as mp

ON_GPU = _compat.on_gpu()
INTERPRET = not ON_GPU
MAX_REL_ERR = 1e-2  # bf16 inputs, P and output; f32 accumulation and softmax


def rel_err(out, ref):
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def make_inputs(seed, b, sq, sk, h, dn, dr, dv, q_lens, kv_lens, block_kv):
  """Random q, kv, k_pe (never zeros). Keys past round_up(kv_len, block_kv) are NaN: the kernel must
  never load them; queries past q_len are NaN: their rows must come out 0."""
  k = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(k[0], (b, sq, h, dn + dr), jnp.float32)
  kv = jax.random.normal(k[1], (b, sk, h, dn + dv), jnp.float32)
  k_pe = jax.random.normal(k[2], (b, sk, dr), jnp.float32)
  kv_lens, q_lens = np.asarray(kv_lens), np.asarray(q_lens)
  readable = np.arange(sk)[None, :] < -(-kv_lens[:, None] // block_kv) * block_kv
  kv = jnp.where(readable[:, :, None, None], kv, jnp.nan)
  k_pe = jnp.where(readable[:, :, None], k_pe, jnp.nan)
  q = jnp.where((np.arange(sq)[None, :] < q_lens[:, None])[:, :, None, None], q, jnp.nan)
  bf = lambda x: x.astype(jnp.bfloat16)
  return bf(q), bf(kv), bf(k_pe), jnp.asarray(q_lens, jnp.int32), jnp.asarray(kv_lens, jnp.int32)


def check(seed, b, sq, sk, h, dn, dr, dv, q_lens, kv_lens, config, scale=0.1, separate_rope=False):
  """separate_rope: the rope part passed as `q_pe`, and q's own rope columns NaN (they must not be read)."""
  q, kv, k_pe, ql, kl = make_inputs(seed, b, sq, sk, h, dn, dr, dv, q_lens, kv_lens, config.block_kv)
  if separate_rope:
    run = jax.jit(lambda q, *a: mp.mla_prefill(q.at[..., dn:].set(jnp.nan), *a, softmax_scale=scale,
                                               q_pe=q[..., dn:], config=config, interpret=INTERPRET))
  else:
    run = jax.jit(lambda *a: mp.mla_prefill(*a, softmax_scale=scale, config=config, interpret=INTERPRET))
  out, lse = run(q, kv, k_pe, ql, kl)
  q_clean = jnp.where(jnp.isnan(q), 0, q)
  ref, ref_lse = mp.reference(q_clean, kv, k_pe, ql, kl, softmax_scale=scale)
  out, lse, ref, ref_lse = (np.asarray(x, np.float32) for x in (out, lse, ref, ref_lse))
  assert np.isfinite(out).all(), "NaN or unwritten output"
  live = np.arange(sq)[None, :] < np.asarray(q_lens)[:, None]  # [b, q]
  assert (out[~live] == 0).all(), "rows past q_lens must be 0"
  assert rel_err(out[live], ref[live]) <= MAX_REL_ERR
  live_h = np.broadcast_to(live[:, None], lse.shape)
  np.testing.assert_allclose(lse[live_h], ref_lse[live_h], atol=2e-3, rtol=1e-4)
  assert np.isneginf(lse[~live_h]).all()


SMALL = mp.PrefillConfig(block_kv=64)


def test_tiny_widths_prefix_and_unequal_lengths():
  # The tiny model's widths (nope 16, rope 16, v 16: padded inside); row 0: 37 new tokens after a
  # 50-token prefix (query tiles straddle key tiles), row 1: a fresh prompt of 20, row 2 idle. Padded widths
  # hand the kernel separate padded copies of q_nope and q_pe with or without a separate q_pe (the same kernel
  # path): the separate q_pe at padded widths is test_fewer_key_tiles_than_stages' (4 CTAs here would be 6).
  check(0, 3, 64, 128, 2, 16, 16, 16, [37, 20, 0], [87, 20, 0], SMALL)


@pytest.mark.parametrize("separate_rope", [False, True])
def test_two_query_tiles_partner_drains(separate_rope):
  # 130 queries: the second CTA's warpgroup 1 has no rows (it only releases key tiles), dn != dv; widths
  # that need no padding, so with a separate q_pe the kernel reads q and q_pe where they lie.
  check(1, 1, 160, 192, 1, 64, 64, 128, [130], [180], SMALL, separate_rope=separate_rope)


def test_fewer_key_tiles_than_stages():
  # One key tile (Sk 40, padded to 64) under the default two pipeline stages, as the engine's
  # bucketed steps of a tiny model have: the prologue must not slice a second tile. The rope part passed
  # apart as q_pe at the tiny model's padded widths (q's own rope columns NaN: never read), as the engine does.
  check(3, 2, 24, 40, 2, 16, 16, 16, [24, 9], [40, 9], SMALL, separate_rope=True)


@pytest.mark.skipif(not ON_GPU, reason="R1 shapes: GPU only")
@pytest.mark.parametrize("config", [mp.PrefillConfig(block_kv=128), mp.PrefillConfig(block_kv=64,
                                                                                      max_concurrent_steps=3)])
def test_r1_shapes(config):
  check(2, 3, 1024, 3000, 128, 128, 64, 128, [1024, 700, 1], [3000, 700, 2500], config,
        scale=192 ** -0.5)


@pytest.mark.skipif(not ON_GPU, reason="R1 shapes: GPU only")
def test_r1_shapes_separate_rope():
  check(2, 3, 1024, 3000, 128, 128, 64, 128, [1024, 700, 1], [3000, 700, 2500], mp.DEFAULT_CONFIG,
        scale=192 ** -0.5, separate_rope=True)


def test_bad_inputs_are_named():
  q, kv, k_pe, ql, kl = make_inputs(0, 1, 8, 8, 1, 16, 16, 16, [4], [4], 64)
  with pytest.raises(ValueError, match="bfloat16"):
    mp.mla_prefill(q.astype(jnp.float32), kv, k_pe, ql, kl, softmax_scale=1.0, interpret=True)
  with pytest.raises(ValueError, match="kv_lens"):
    mp.mla_prefill(q, kv, k_pe, ql, kl[None], softmax_scale=1.0, interpret=True)
  with pytest.raises(ValueError, match="disagree"):
    mp.mla_prefill(q, kv[:, :4], k_pe, ql, kl, softmax_scale=1.0, interpret=True)
  with pytest.raises(ValueError, match="q_pe"):
    mp.mla_prefill(q, kv, k_pe, ql, kl, softmax_scale=1.0, q_pe=q[..., :8], interpret=True)
  with pytest.raises(ValueError, match="block_q"):
    mp.PrefillConfig(block_q=128)
  with pytest.raises(ValueError, match="SMEM"):
    mp.mla_prefill(q, kv, k_pe, ql, kl, softmax_scale=1.0, interpret=True,
                   config=mp.PrefillConfig(block_kv=256, max_concurrent_steps=8))
