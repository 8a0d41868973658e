"""The decode kernel in FlashMLA's layout (`DecodeConfig(tiled_pages=True)`: `pallas_kernels/mla_decode_tiled.py`,
the seesaw order of `mla_decode_seesaw.py`) against the f32 reference: interpret mode on CPU, natively on a GPU
(R1 shapes added)."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import mla_decode as md
from pallas_kernels import mla_decode_tiled
from tests.test_mla_decode import ON_GPU, _lowered_for_cuda, check, h100_sms  # noqa: F401 (a fixture)

# Interpret-mode widths: a latent of 192 (padded to 256) so that both warpgroups' output halves hold real columns
# (the tiny model's 32 would leave warpgroup 1's half all padding), rope 16; and a softmax scale that spreads
# the scores (std ~5): the running maximum moves by whole units, so a missed rescale shows.
LATENT, ROPE, SPREAD = 192, 16, 0.35


def test_tiled_pages_unequal_lengths_splits_mtp():
  # Units of odd and even page counts (a last pair without b), a one-page request (33: masked), a request
  # shorter than a page (20), an idle row, two splits a request, two new tokens a request.
  check(21, 5, 2, 8, LATENT, ROPE, [300, 33, 0, 20, 130], 5, md.DecodeConfig(num_splits=2, tiled_pages=True),
        scale=SPREAD)


def test_tiled_pages_one_query_many_pairs():
  # one split of 7 and 8 pages: slots reused three times (each tile refilled after its last reader)
  check(22, 2, 1, 16, LATENT, ROPE, [420, 512], 8, md.DecodeConfig(num_splits=1, tiled_pages=True), scale=SPREAD)


def test_tiled_pages_balanced_units_tiny_widths():
  # the tiny model's latent (32, padded to 128: one tile a warpgroup) and the balanced schedule
  check(23, 3, 1, 8, 32, 16, [300, 40, 0], 5, md.DecodeConfig(balanced=True, num_splits=2, min_pages_per_split=1,
                                                               tiled_pages=True), scale=SPREAD)


def test_tiled_pages_smem_is_checked():
  # R1's 512 + 64 fit (27 tiles of 8 KB and the row vectors); a rope of 128 would need 30 (240 KB)
  assert mla_decode_tiled.smem_bytes(576) + 1024 <= md.SMEM_BYTES
  with pytest.raises(ValueError, match="SMEM"):
    md.mla_decode(jnp.zeros((1, 1, 64, 640), jnp.bfloat16), jnp.zeros((2, 64, 640), jnp.bfloat16),
                  jnp.zeros((1, 1), jnp.int32), jnp.ones((1,), jnp.int32), kv_lora_rank=512, softmax_scale=1.0,
                  config=md.DecodeConfig(tiled_pages=True), interpret=True)


@pytest.mark.usefixtures("h100_sms")
def test_tiled_pages_lower_for_cuda():
  plain = _lowered_for_cuda(md.DecodeConfig(num_splits=2))
  for cfg in (md.DecodeConfig(num_splits=2, tiled_pages=True),
              md.DecodeConfig(num_splits=2, cluster=True, tiled_pages=True)):
    lowered = _lowered_for_cuda(cfg)
    assert "mosaic_gpu" in lowered and lowered != plain


@pytest.mark.skipif(not ON_GPU, reason="R1 shapes: GPU only")
@pytest.mark.parametrize("s_q,cluster", [(1, False), (1, True), (2, True)], ids=["sq1", "sq1-cluster", "sq2-cluster"])
def test_r1_shapes_tiled_pages(s_q, cluster):
  rng = np.random.default_rng(40 + s_q)
  lengths = rng.integers(s_q, 3000, 6).tolist() + [0, 4096]
  check(24, 8, s_q, 128, 512, 64, lengths, 64, md.DecodeConfig(cluster=cluster, tiled_pages=True),
        scale=192 ** -0.5)
