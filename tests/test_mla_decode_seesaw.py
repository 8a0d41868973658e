"""The decode kernel's seesaw order (`DecodeConfig(seesaw=True)`, `pallas_kernels/mla_decode_seesaw.py`) against
the f32 reference: interpret mode on CPU, natively on a GPU (R1 shapes added)."""

import numpy as np
import pytest

from pallas_kernels import mla_decode as md
from tests.test_mla_decode import ON_GPU, _lowered_for_cuda, check, h100_sms  # noqa: F401 (a fixture)

# Interpret-mode widths: a latent of 192 (padded to 256) so that both warpgroups' output halves hold real columns
# (the tiny model's 32 would leave warpgroup 1's half all padding), rope 16; and a softmax scale that spreads
# the scores (std ~5): the running maximum moves by whole units, so a missed rescale shows.
LATENT, ROPE, SPREAD = 192, 16, 0.35


def test_seesaw_unequal_lengths_splits_mtp():
  # 32-token tiles in pairs. Lengths give units of odd and even tile counts (200 in two splits: pages 0-1 and
  # 2-3, the second ending mid-tile after 2.25 tiles: a last pair without its odd tile), a one-page request
  # whose second half is past its length (33: one full pair, masked), a one-tile request (20), an idle row;
  # two new tokens a request.
  check(11, 5, 2, 8, LATENT, ROPE, [200, 33, 0, 20, 130], 4, md.DecodeConfig.deep_ring(num_splits=2, seesaw=True),
        scale=SPREAD)


def test_seesaw_one_query_many_pairs():
  # one split: 7 pages = 14 tiles of unmasked pairs, then the masked last pair (lengths 420 and 449)
  check(12, 2, 1, 16, LATENT, ROPE, [420, 449], 8, md.DecodeConfig.deep_ring(num_splits=1, seesaw=True), scale=SPREAD)


def test_seesaw_balanced_units():
  check(13, 3, 1, 8, LATENT, ROPE, [300, 40, 0], 5, md.DecodeConfig.deep_ring(balanced=True, num_splits=2,
                                                                      min_pages_per_split=1, seesaw=True),
        scale=SPREAD)


def test_seesaw_config_is_checked():
  with pytest.raises(ValueError, match="seesaw"):
    md.DecodeConfig(seesaw=True)  # two tiles in flight: nothing would load during a pair
  with pytest.raises(ValueError, match="seesaw"):
    md.DecodeConfig.deep_ring(seesaw=True, overlap_qk=True)


@pytest.mark.usefixtures("h100_sms")
def test_seesaw_lowers_for_cuda():
  plain = _lowered_for_cuda(md.DecodeConfig.deep_ring(num_splits=2))
  for cfg in (md.DecodeConfig.deep_ring(num_splits=2, seesaw=True),
              md.DecodeConfig.deep_ring(num_splits=2, cluster=True, seesaw=True)):
    lowered = _lowered_for_cuda(cfg)
    assert "mosaic_gpu" in lowered and lowered != plain


@pytest.mark.skipif(not ON_GPU, reason="R1 shapes: GPU only")
@pytest.mark.parametrize("s_q,cluster", [(1, False), (1, True), (2, True)], ids=["sq1", "sq1-cluster", "sq2-cluster"])
def test_r1_shapes_seesaw(s_q, cluster):
  rng = np.random.default_rng(30 + s_q)
  lengths = rng.integers(s_q, 3000, 6).tolist() + [0, 4096]
  check(14, 8, s_q, 128, 512, 64, lengths, 64, md.DecodeConfig.deep_ring(cluster=cluster, seesaw=True),
        scale=192 ** -0.5)


# FlashMLA's layout: whole pages as 64-column tiles with a barrier each, in the seesaw order
# (`DecodeConfig(tiled_pages=True)`, `pallas_kernels/mla_decode_tiled.py`).


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


def test_tiled_pages_config_is_checked():
  with pytest.raises(ValueError, match="tiled_pages"):
    md.DecodeConfig(tiled_pages=True, key_tile=32, max_concurrent_steps=4)
  with pytest.raises(ValueError, match="tiled_pages"):
    md.DecodeConfig(tiled_pages=True, overlap_qk=True)


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
