"""PallasPull: DWDP fetching with the Pallas remote-DMA kernel from each rank's own program. On CPU the peer
buffer is copied to the reader and the kernel runs in GPU interpret mode; the in-place read of a peer GPU's
memory (`peer_view`) is checked on the GPUs (experiments/gpu_check_dwdp.py --fetch=pallas_pull)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwdp_jax.config import TINY
from dwdp_jax.experts import ExpertWeights
from dwdp_jax.model import init_model
from dwdp_jax.parallel.dwdp import DwdpConfig, DwdpGroup
from dwdp_jax.parallel.fetch import PallasPull, fetch_backend
from pallas_kernels import remote_dma as rd

CFG = TINY.replace(num_layers=2, first_k_dense_replace=1)
SMALL = rd.RemoteDmaConfig(num_sms=2, max_in_flight=2)


def _experts(device, e=6, seed=0):
    k = jax.random.split(jax.random.key(seed), 2)
    with jax.default_device(device):
        return ExpertWeights(jax.random.normal(k[0], (e, 64, 64), jnp.float32),
                             jax.random.normal(k[1], (e, 32, 64), jnp.float32))


def test_full_and_subset_fetch_match_the_source():
    src_dev, dst = jax.devices()[1], jax.devices()[0]
    src = _experts(src_dev)
    fetch = PallasPull(SMALL)
    staged = fetch.ready(fetch(src, dst))
    assert staged.w_gate_up.devices() == {dst}
    np.testing.assert_array_equal(np.asarray(staged.w_gate_up), np.asarray(src.w_gate_up))
    np.testing.assert_array_equal(np.asarray(staged.w_down), np.asarray(src.w_down))
    part = fetch.subset(src, dst, [4, 1], offset=2)
    got = np.asarray(part.w_down)
    np.testing.assert_array_equal(got[2:4], np.asarray(src.w_down)[[4, 1]])
    assert not got[[0, 1, 4, 5]].any()  # positions not fetched stay zero
    more = fetch.subset(src, dst, [0], into=part, offset=0)  # an on-demand miss joins the prefetched ones
    np.testing.assert_array_equal(np.asarray(more.w_down)[[0, 2, 3]], np.asarray(src.w_down)[[0, 4, 1]])


def test_dwdp_with_pallas_pull_matches_single_device():
    model = init_model(CFG, dtype=jnp.float32, seed=5)
    devices = jax.devices()[:2]
    group = DwdpGroup(model, devices, None, DwdpConfig(2, 1, True), PallasPull(SMALL))
    ids = np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 6))
    ref = np.asarray(model(jnp.asarray(ids)))
    outs = group.run_parallel(lambda rank, x: np.asarray(rank.forward(jnp.asarray(x))), [ids, ids])
    for logits in outs:
        assert np.abs(logits - ref).max() / np.abs(ref).max() <= 1e-5
    group.close()


def test_factory_names_it():
    assert isinstance(fetch_backend("pallas_pull"), PallasPull)
    with pytest.raises(ValueError, match="pallas_pull"):
        fetch_backend("nvshmem")
