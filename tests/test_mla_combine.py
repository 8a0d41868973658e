"""The split-KV merge kernel (`mla_combine`) vs its jnp form (`mla_decode.combine`): GPU interpret mode on CPU,
natively on a GPU (the same tests, R1's B=1 shape added)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _compat
from pallas_kernels import mla_combine as mc
from pallas_kernels import mla_decode as md

ON_GPU = _compat.on_gpu()
INTERPRET = not ON_GPU


def partials(seed, b, splits, rows, cols):
  """Random bf16 partials and log-sum-exps over a wide range (never zeros); request 0's split 1 empty, and
  request b-1's first three rows empty in every split (their output must be 0, their lse -inf)."""
  rng = np.random.default_rng(seed)
  o = jnp.asarray(rng.normal(size=(b * splits, rows, cols)), jnp.bfloat16)
  lse = jnp.asarray(rng.normal(size=(b * splits, rows)) * 4, jnp.float32).at[1].set(-jnp.inf)
  lse = lse.at[(b - 1) * splits:, :3].set(-jnp.inf)
  return o, lse


def check(b, splits, rows, cols, seed=0, columns=mc.COLUMNS):
  o, lse = partials(seed, b, splits, rows, cols)
  out, out_lse = jax.jit(lambda o, l: mc.combine_splits(o, l, num_splits=splits, columns=columns,
                                                        interpret=INTERPRET))(o, lse)
  ref, ref_lse = md.combine(o.reshape(b, splits, rows, cols), lse.reshape(b, splits, rows))
  assert out.dtype == jnp.bfloat16 and out.shape == (b, rows, cols)
  out = np.asarray(out, np.float32)
  # f32 sums, one bf16 rounding of the result: within half a bf16 unit of the largest |value|
  np.testing.assert_allclose(out, ref, rtol=2 ** -8, atol=2 ** -8)
  np.testing.assert_allclose(out_lse, ref_lse, rtol=1e-5, atol=1e-5)
  assert (out[b - 1, :3] == 0).all() and np.isneginf(np.asarray(out_lse)[b - 1, :3]).all()


def test_two_requests_row_and_column_tiles():
  check(b=2, splits=5, rows=2 * mc.ROWS, cols=2 * mc.COLUMNS)  # 8 CTAs, every split in its own ring slot


def test_more_splits_than_ring_slots(monkeypatch):
  monkeypatch.setattr(mc, "STAGES", 3)  # 7 splits through 3 slots: each slot refilled twice
  check(b=1, splits=7, rows=mc.ROWS, cols=2 * mc.COLUMNS, seed=1)


def test_narrow_column_tiles():
  check(b=1, splits=7, rows=mc.ROWS, cols=3 * 16, seed=4, columns=16)  # three 16-column tiles (32-byte TMA rows)


def test_wide_column_tiles_take_fewer_ring_slots(monkeypatch):
  monkeypatch.setattr(mc, "STAGES", 4)  # 64 columns: the ring holds 4 x 32 / 64 = 2 tiles, refilled thrice
  assert mc.ring_stages(7, 64) == 2
  check(b=1, splits=7, rows=mc.ROWS, cols=64, seed=5, columns=64)


@pytest.mark.skipif(not ON_GPU, reason="R1 shapes: GPU only")
@pytest.mark.parametrize("columns", [16, 32, 64])
def test_r1_b1_32k_shape(columns):
  check(b=1, splits=66, rows=128, cols=512, seed=2, columns=columns)  # B=1 at 32K: 66 splits of 128 x 512


@pytest.mark.parametrize("columns", [16, 32, 64])
def test_lowers_for_cuda_at_r1_shape(columns):
  """The kernel's lowering for CUDA (Mosaic GPU's, which runs on this machine too) at B=1's 66 splits: more
  splits than ring slots, so the deepest ring and its refills."""
  from jax import export

  assert 66 > mc.ring_stages(66, columns)
  args = (jax.ShapeDtypeStruct((66, 128, 512), jnp.bfloat16), jax.ShapeDtypeStruct((66, 128), jnp.float32))
  fn = jax.jit(lambda o, l: mc.combine_splits(o, l, num_splits=66, columns=columns))
  assert "mosaic_gpu" in export.export(fn, platforms=["cuda"])(*args).mlir_module()


def test_bad_shapes_are_named():
  o, lse = partials(0, 1, 2, mc.ROWS, mc.COLUMNS)
  with pytest.raises(ValueError, match="must be \\[B \\* 3, R, C\\]"):
    mc.combine_splits(o, lse, num_splits=3)
  with pytest.raises(ValueError, match="multiples of 64 and 32"):
    mc.combine_splits(o[:, :40], lse[:, :40], num_splits=2)
  with pytest.raises(ValueError, match="float32"):
    mc.combine_splits(o, lse.astype(jnp.bfloat16), num_splits=2)
  with pytest.raises(ValueError, match="columns must be a positive multiple of 16, got 24"):
    mc.combine_splits(o, lse, num_splits=2, columns=24)


def test_decode_merges_its_splits_with_the_kernel():
  """mla_decode's uniform splits merged by the kernel (the GPU default; interpret mode defaults to XLA's
  combine), against the f32 reference: three splits of a 5-page request, the last one partly empty."""
  from tests.test_mla_decode import check as check_decode

  check_decode(3, 1, 1, 16, 32, 16, [300], 5, md.DecodeConfig(num_splits=3, min_pages_per_split=1,
                                                              combine="kernel"))



def test_the_deepest_ring_fits_a_ctas_shared_memory():
  """STAGES slots of partial tiles, the most splits' log-sum-exps, the output tile and the barriers fit one CTA's
  SMEM (that the deepest ring lowers, with Mosaic GPU's at most 32 barriers a group:
  `test_lowers_for_cuda_at_r1_shape`)."""
  for columns in (16, 32, 64, 128):
    stages = mc.ring_stages(mc.MAX_SPLITS, columns)
    assert mc.smem_bytes(stages, mc.MAX_SPLITS, columns) + 1024 <= mc.SMEM_BYTES, columns


def test_too_many_splits_are_refused():
  o, lse = partials(0, 1, mc.MAX_SPLITS + 1, mc.ROWS, mc.COLUMNS)
  with pytest.raises(ValueError, match="num_splits 257 > 256"):
    mc.combine_splits(o, lse, num_splits=mc.MAX_SPLITS + 1)
