"""MLA decode kernel (absorbed, paged latent cache, split-KV) vs its f32 reference: GPU interpret mode on
CPU, natively on a GPU (the same tests, R1 shapes added)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _compat
from pallas_kernels import mla_decode as md
from pallas_kernels import mla_schedule

ON_GPU = _compat.on_gpu()
INTERPRET = not ON_GPU
# bf16 inputs and output, f32 accumulation; split partials are stored in bf16 before the f32 combine.
MAX_REL_ERR = 1e-2


def rel_err(out, ref):
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def make_inputs(seed, b, s_q, h, kv_lora, rope, lengths, max_pages):
  """Random queries and pages (never zeros); every request's pages scattered over a shuffled pool.
  Pages no request owns are NaN: reading one would show. (Positions past a request's length inside its
  last page are read and weighted 0, so they must be finite, as a cache's stale entries are.)"""
  keys = jax.random.split(jax.random.key(seed), 2)
  d = kv_lora + rope
  num_pages = b * max_pages + 3
  q = jax.random.normal(keys[0], (b, s_q, h, d), jnp.float32).astype(jnp.bfloat16)
  pages = jax.random.normal(keys[1], (num_pages, md.PAGE_SIZE, d), jnp.float32)
  perm = np.random.default_rng(seed).permutation(num_pages)
  table = perm[: b * max_pages].reshape(b, max_pages)
  owned = np.zeros((num_pages,), bool)
  for i, n in enumerate(lengths):
    owned[table[i, : -(-n // md.PAGE_SIZE)]] = True
  pages = jnp.where(jnp.asarray(owned)[:, None, None], pages, jnp.nan).astype(jnp.bfloat16)
  return q, pages, jnp.asarray(table, jnp.int32), jnp.asarray(lengths, jnp.int32)


def check(seed, b, s_q, h, kv_lora, rope, lengths, max_pages, config, scale=0.1):
  q, pages, table, lens = make_inputs(seed, b, s_q, h, kv_lora, rope, lengths, max_pages)
  run = jax.jit(lambda *a: md.mla_decode(*a, kv_lora_rank=kv_lora, softmax_scale=scale, config=config,
                                        interpret=INTERPRET))
  out, lse = run(q, pages, table, lens)
  ref, ref_lse = md.reference(q, pages, table, lens, kv_lora_rank=kv_lora, softmax_scale=scale)
  out, lse, ref_lse = (np.asarray(x, np.float32) for x in (out, lse, ref_lse))
  live = np.asarray(lens) > 0
  assert np.isfinite(out).all(), "NaN or unwritten output"
  assert (out[~live] == 0).all(), "idle rows (length 0) must be 0"
  assert rel_err(out[live], ref[live]) <= MAX_REL_ERR
  np.testing.assert_allclose(lse[live], ref_lse[live], atol=2e-3, rtol=1e-4)
  assert np.isneginf(lse[~live]).all()


def test_unequal_lengths_mtp_splits_tiny_widths():
  # One kernel call (interpret mode is slow) covering: the tiny config's widths (latent 32, rope 16: padded
  # inside); two new tokens per request (MTP: the second query sees one key more than the first); 40 heads,
  # so 80 rows over two tiles whose rows mix both tokens; lengths that are not page multiples; an idle row;
  # two splits, the second empty for the one-page request.
  check(0, 3, 2, 40, 32, 16, [2, 130, 0], 3, md.DecodeConfig(num_splits=2, min_pages_per_split=1))


def test_balanced_schedule_unequal_lengths():
  # One interpret-mode call: units of about equal pages over the batch (8 pages, a share of 2: the long request in
  # three units, the last one shorter, the short ones in one each, the idle row in none, three units empty),
  # merged per request by combine_units. Few units: the interpreter compiles each unit's grid cell.
  check(1, 4, 1, 8, 32, 16, [70, 300, 0, 5], 5, md.DecodeConfig(balanced=True, num_splits=1, min_pages_per_split=1))


def _covered(sched, lengths):
  """{request: sorted pages its units read} from a schedule [U, 3]."""
  pages = {}
  for b, first, steps in np.asarray(sched).tolist():
    pages.setdefault(b, []).extend(range(first, first + steps))
  return {b: sorted(p) for b, p in pages.items() if p}


@pytest.mark.parametrize("lengths", [[4096] * 8, [256, 8192, 1, 0, 3000, 64, 65, 12000], [32768]])
def test_schedules_cover_every_page_once(lengths):
  lens = jnp.asarray(lengths, jnp.int32)
  need = {b: list(range(-(-n // md.PAGE_SIZE))) for b, n in enumerate(lengths) if n > 0}
  sched, req = mla_schedule.uniform_schedule(lens, 3, md.PAGE_SIZE)
  assert _covered(sched, lengths) == need and sched.shape == (3 * len(lengths), 3)
  sched, req = mla_schedule.balanced_schedule(lens, 66, 4, md.PAGE_SIZE)
  assert _covered(sched, lengths) == need and sched.shape == (66 + len(lengths), 3)
  sched, req = np.asarray(sched), np.asarray(req)
  used = req < len(lengths)
  assert (sched[~used, 2] == 0).all() and (sched[used, 0] == req[used]).all()
  total = sum(need_pages := [len(p) for p in need.values()])
  share = max(4, -(-total // 66))
  assert sched[:, 2].max() <= max(1.5 * share, min(max(need_pages), 2 * share))  # no unit much above the share


@pytest.mark.parametrize("splits", [1, 3, 66])
def test_in_kernel_uniform_units_match_the_schedule(splits):
  """The decode kernel's own unit arithmetic (`uniform_unit`, on scalars) gives `uniform_schedule`'s rows."""
  lens = jnp.asarray([256, 8192, 1, 0, 3000, 64, 65, 32768], jnp.int32)
  want, _ = mla_schedule.uniform_schedule(lens, splits, md.PAGE_SIZE)
  got = [mla_schedule.uniform_unit(lens, jnp.int32(u), splits, md.PAGE_SIZE) for u in range(lens.shape[0] * splits)]
  np.testing.assert_array_equal(np.asarray([[int(x) for x in row] for row in got]), np.asarray(want))


def test_balanced_schedule_has_no_loop():
  # straight-line array ops: a binary-search loop would be a host-driven while on GPUs
  text = str(jax.make_jaxpr(lambda n: mla_schedule.balanced_schedule(n, 66, 4, md.PAGE_SIZE))(
      jnp.ones((8,), jnp.int32)))
  assert "while[" not in text and "scan[" not in text, text


def test_combine_units_matches_combine():
  rng = np.random.default_rng(4)
  o = jnp.asarray(rng.normal(size=(3, 2, 5, 4)), jnp.float32)  # [b, splits, rows, c]
  lse = jnp.asarray(rng.normal(size=(3, 2, 5)), jnp.float32).at[1, 1].set(-jnp.inf)
  want, want_lse = md.combine(o, lse)
  req = jnp.asarray([0, 0, 1, 1, 2, 2, 3], jnp.int32)  # a trailing unit of no request (3 = B)
  o_u = jnp.concatenate([o.reshape(6, 5, 4), jnp.full((1, 5, 4), 7.0)])
  lse_u = jnp.concatenate([lse.reshape(6, 5), jnp.full((1, 5), -jnp.inf)])
  got, got_lse = mla_schedule.combine_units(o_u, lse_u, req, 3)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got_lse, want_lse, rtol=1e-6)
  got, got_lse = mla_schedule.combine_units(o_u, lse_u, jnp.asarray([0, 0, 3, 3, 2, 2, 3], jnp.int32), 3)
  assert (np.asarray(got[1]) == 0).all() and np.isneginf(np.asarray(got_lse[1])).all()  # no units: 0, -inf


@pytest.mark.skipif(not ON_GPU, reason="R1 shapes: GPU only")
@pytest.mark.parametrize("s_q,balanced,cluster", [(1, False, False), (2, False, False), (1, True, False),
                                                  (1, False, True), (2, False, True), (1, True, True)],
                         ids=["sq1", "sq2", "sq1-balanced", "sq1-cluster", "sq2-cluster", "sq1-balanced-cluster"])
def test_r1_shapes(s_q, balanced, cluster):
  rng = np.random.default_rng(s_q)
  lengths = rng.integers(s_q, 3000, 6).tolist() + [0, 4096]
  check(2, 8, s_q, 128, 512, 64, lengths, 64, md.DecodeConfig(balanced=balanced, cluster=cluster),
        scale=192 ** -0.5)


@pytest.mark.skipif(not ON_GPU, reason="R1 shapes under load: GPU only")
@pytest.mark.parametrize("b,length", [(64, 4096), (1, 32768)], ids=["b64-4k", "b1-32k"])
def test_r1_shapes_under_load(b, length):
  # The benchmark's headline points, every CTA of the GPU busy at once (B=64: one unit a request, 128 CTAs;
  # B=1: 66 clustered splits and the combine). A hand-over race passed the B=8 tests above but gave the
  # removed tiled layout 3e-2 errors here (session 17): the engine's kernel is checked where it runs.
  check(3, b, 1, 128, 512, 64, [length - 3] * b, length // md.PAGE_SIZE, md.DecodeConfig(cluster=True),
        scale=192 ** -0.5)


def _lowered_for_cuda(config, s_q=1):
  """The decode call at R1 shapes, lowered for CUDA (Mosaic GPU's lowering runs on this machine too; an H100's
  132 SMs stand in for the device's count). Splits are given, so the SM count changes nothing here."""
  from jax import export

  b, h, d = 4, 128, 576
  args = (jax.ShapeDtypeStruct((b, s_q, h, d), jnp.bfloat16), jax.ShapeDtypeStruct((b * 16, md.PAGE_SIZE, d),
                                                                                   jnp.bfloat16),
          jax.ShapeDtypeStruct((b, 16), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32))
  fn = jax.jit(lambda *a: md.mla_decode(*a, kv_lora_rank=512, softmax_scale=0.1, config=config))
  return export.export(fn, platforms=["cuda"])(*args).mlir_module()


@pytest.fixture
def h100_sms(monkeypatch):
  monkeypatch.setattr(_compat, "num_sms", lambda: 132)


@pytest.mark.usefixtures("h100_sms")
@pytest.mark.parametrize("s_q", [1, 2])
def test_clustered_kernel_lowers_for_cuda(s_q):
  """The clustered variant (a unit's row tiles as one CTA cluster, pages multicast) cannot run in the
  interpreter: its lowering for CUDA must succeed and give a kernel other than the unclustered one."""
  plain = _lowered_for_cuda(md.DecodeConfig(num_splits=2), s_q)
  clustered = _lowered_for_cuda(md.DecodeConfig(num_splits=2, cluster=True), s_q)
  assert "mosaic_gpu" in clustered and clustered != plain


@pytest.mark.usefixtures("h100_sms")
def test_cluster_size_is_checked():
  with pytest.raises(ValueError, match="at most 8 row tiles"):
    _lowered_for_cuda(md.DecodeConfig(num_splits=2, cluster=True), s_q=5)  # 640 rows: 10 tiles


def test_combine_matches_one_split():
  """combine() of per-split partials equals attention over the whole row (pure jnp)."""
  rng = np.random.default_rng(3)
  s = jnp.asarray(rng.normal(size=(2, 3, 5, 12)), jnp.float32)  # [b, splits, rows, keys]
  v = jnp.asarray(rng.normal(size=(2, 3, 12, 4)), jnp.float32)
  s = s.at[1, 2].set(-jnp.inf)  # an empty split
  lse_p = jax.nn.logsumexp(s, axis=-1)
  hi = jax.lax.Precision.HIGHEST
  o_p = jnp.einsum("bsrk,bskc->bsrc", jnp.exp(s - jnp.where(jnp.isfinite(lse_p), lse_p, 0)[..., None]), v,
                   precision=hi)
  out, lse = md.combine(o_p, lse_p)
  full = jax.nn.softmax(jnp.moveaxis(s, 1, 2).reshape(2, 5, 36), -1)
  ref = jnp.einsum("brk,bkc->brc", full, v.reshape(2, 36, 4), precision=hi)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(lse, jax.nn.logsumexp(jnp.moveaxis(s, 1, 2).reshape(2, 5, 36), -1), rtol=1e-5)


def test_choose_num_splits():
  assert md.choose_num_splits(64, 2, 64, 132) == 1  # B=64: 128 CTAs already fill 132 SMs
  assert md.choose_num_splits(1, 2, 512, 132) == 66  # B=1, 32K: one CTA per SM
  assert md.choose_num_splits(1, 2, 64, 132) == 16  # B=1, 4K: at least 4 pages a split


def test_bad_inputs_are_named():
  q, pages, table, lens = make_inputs(0, 2, 1, 4, 32, 16, [3, 5], 1)
  kw = dict(kv_lora_rank=32, softmax_scale=1.0, interpret=True)
  with pytest.raises(ValueError, match="pages must be"):
    md.mla_decode(q, pages[:, :32], table, lens, **kw)
  with pytest.raises(ValueError, match="lengths must be"):
    md.mla_decode(q, pages, table, lens[:1], **kw)
  with pytest.raises(ValueError, match="bfloat16"):
    md.mla_decode(q.astype(jnp.float32), pages, table, lens, **kw)
  with pytest.raises(ValueError, match="kv_lora_rank"):
    md.mla_decode(q, pages, table, lens, kv_lora_rank=48, softmax_scale=1.0, interpret=True)


def test_smem_is_checked():
  with pytest.raises(ValueError, match="SMEM"):  # Q and three whole pages do not fit at R1's width
    md.mla_decode(jnp.zeros((1, 1, 64, 576), jnp.bfloat16), jnp.zeros((2, 64, 576), jnp.bfloat16),
                  jnp.zeros((1, 1), jnp.int32), jnp.ones((1,), jnp.int32), kv_lora_rank=512, softmax_scale=1.0,
                  config=md.DecodeConfig(max_concurrent_steps=3), interpret=True)


@pytest.mark.parametrize("kwargs,message", [
    (dict(combine="cuda"), "combine must be 'kernel' or 'xla'"),
    (dict(num_splits=0), "num_splits must be >= 1"),
    (dict(min_pages_per_split=0), "min_pages_per_split must be >= 1"),
    (dict(max_concurrent_steps=1), "max_concurrent_steps must be >= 2"),
    (dict(combine_columns=24), "combine_columns must be a positive multiple of 16, got 24"),
])
def test_bad_configs_are_named(kwargs, message):
  with pytest.raises(ValueError, match=message):
    md.DecodeConfig(**kwargs)
