"""Paged latent cache: the host page table, and MLA over pages (einsum and Pallas backends) against the
model's causal forward (tiny model, CPU; the kernels in Mosaic GPU interpret mode)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dwdp_jax.config import TINY
from dwdp_jax.engine import paged_cache
from dwdp_jax.engine.paged_cache import OutOfPages, PagedCacheSpec, PageTable
from dwdp_jax.model import MLA
from dwdp_jax.paged_attention import PagedAttention, PagedKV

PAGE = paged_cache.PAGE_SIZE


def spec(num_pages=6, num_slots=3, max_len=300, dtype=jnp.bfloat16):
    return PagedCacheSpec.for_model(TINY, num_pages, num_slots, max_len, dtype)


def test_page_table_grows_releases_and_refuses():
    table = PageTable(spec())
    table.ensure(0, 1)
    table.ensure(1, PAGE + 1)
    assert table.pages_of(0) == [0] and table.pages_of(1) == [1, 2]
    table.ensure(0, PAGE)  # still one page
    assert table.num_free == 3
    with pytest.raises(OutOfPages, match="needs 4 more pages"):
        table.ensure(2, 4 * PAGE)
    assert table.num_free == 3  # a refused request takes nothing
    with pytest.raises(ValueError, match="max_len"):
        table.ensure(2, 301)
    table.release(1)
    table.ensure(2, 3 * PAGE)
    assert table.pages_of(2) == [1, 2, 3]  # lowest free pages first
    block = table.block_table([2, -1, 0], num_pages=4)
    assert block.tolist() == [[1, 2, 3, 6], [6, 6, 6, 6], [0, 6, 6, 6]]
    s = spec()
    assert (s.latent_width, s.rope_width, s.width) == (128, 64, 192)  # tiny's 32 + 16, padded
    assert s.total_bytes == TINY.num_layers * 7 * PAGE * 192 * 2


def _mla(dtype, seed=0, cfg=TINY):
    return MLA(cfg, rngs=nnx.Rngs(seed), dtype=dtype, block=None)


def _paged_step(mla, pages, table: PageTable, slots, x, starts, q_lens, absorbed, backend):
    """One step through `mla` on pages: rows left-aligned, row i at positions starts[i] + [0, q_lens[i])."""
    b, s = x.shape[:2]
    for slot, start, n in zip(slots, starts, q_lens):
        if slot >= 0:
            table.ensure(slot, start + n)
    positions = np.zeros((b, s), np.int32)
    for i, (start, n) in enumerate(zip(starts, q_lens)):
        positions[i, :n] = start + np.arange(n)
    kv = PagedKV(pages, jnp.asarray(table.block_table(slots)), jnp.asarray(np.add(starts, q_lens), jnp.int32),
                 jnp.asarray(q_lens, jnp.int32), latent_width=table.spec.latent_width, backend=backend,
                 interpret=jax.devices()[0].platform != "gpu")
    out, kv = _step(mla, x, jnp.asarray(positions), kv, absorbed)
    return out, kv.pages


@nnx.jit(static_argnums=4)
def _step(mla, x, positions, kv, absorbed):
    """The layer's step under jit, as the engine runs it (one compile, not one per op of an eager call)."""
    return mla(x, positions, kv, absorbed)


# f32 on a GPU multiplies in TF32 by default (both paths, in different orders): a looser bound there.
F32_TOL = 5e-4 if jax.devices()[0].platform == "gpu" else 1e-5


@pytest.mark.parametrize("backend,dtype,tol", [("einsum", jnp.float32, F32_TOL), ("pallas", jnp.bfloat16, 3e-2)])
def test_paged_mla_matches_causal_forward(backend, dtype, tol):
    """Prefill two rows of unequal length in two chunks (the second against a cached prefix that spans a
    page boundary), then decode one token each; every output equals the causal self-attention over the
    whole sequence. A padding row rides along. The Pallas backend (slow in interpret mode) runs the
    second chunk and the decode step on pages the einsum path wrote in the first, with 2 heads (tiny's 4 doubled
    the interpreted kernels' CTAs; 2 still checks each head's own columns)."""
    mla = _mla(dtype, cfg=TINY if backend == "einsum" else dataclasses.replace(TINY, num_heads=2))
    sp = spec(num_pages=6, max_len=160, dtype=dtype)
    table = PageTable(sp)
    pages = paged_cache.allocate(sp)[0]
    lengths = [70, 9]
    total = [n + 1 for n in lengths]
    x = jax.random.normal(jax.random.key(1), (2, max(total), TINY.hidden_size), jnp.float32).astype(dtype)
    ref, _ = nnx.jit(lambda m, x, p: m(x, p))(mla, x, jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2]))
    # (causal over each whole row)
    first = [40, 5]
    got = np.zeros(ref.shape, np.float32)

    def run(starts, q_lens, absorbed, width, step_backend):
        nonlocal pages
        rows = 3 if step_backend == "einsum" else 2
        xs = np.zeros((rows, width, TINY.hidden_size), np.float32)
        for i, (st, n) in enumerate(zip(starts[:2], q_lens[:2])):
            xs[i, :n] = np.asarray(x[i, st: st + n], np.float32)
        out, pages = _paged_step(mla, pages, table, [0, 1, -1][:rows], jnp.asarray(xs, dtype), starts[:rows],
                                 q_lens[:rows], absorbed, step_backend)
        for i, (st, n) in enumerate(zip(starts[:2], q_lens[:2])):
            got[i, st: st + n] = np.asarray(out[i, :n], np.float32)

    run([0, 0, 0], first + [0], False, 48, "einsum")
    run(first + [0], [lengths[0] - first[0], lengths[1] - first[1], 0], False, 32, backend)
    run(lengths + [0], [1, 1, 0], True, 1, backend)
    ref = np.asarray(ref, np.float32)
    for i, n in enumerate(total):
        err = np.abs(got[i, :n] - ref[i, :n]).max() / np.abs(ref[i, :n]).max()
        assert err <= tol, (backend, i, err)


def test_decode_cluster_reaches_the_decode_kernel(monkeypatch):
    """`PagedAttention(decode_cluster=True)`, the default, hands `DecodeConfig(cluster=True)` to the Pallas decode
    kernel for one query per row and the unclustered form for two (MTP; measured slower clustered). The clustered
    form runs on GPUs only: here the call is intercepted and answered by the reference."""
    from pallas_kernels import mla_decode

    seen = []

    def decode(q, pages, block_table, lengths, *, kv_lora_rank, softmax_scale, config=None, interpret=False):
        seen.append(config)
        return mla_decode.reference(q, pages, block_table, lengths, kv_lora_rank=kv_lora_rank,
                                    softmax_scale=softmax_scale)

    monkeypatch.setattr(mla_decode, "mla_decode", decode)
    mla = _mla(jnp.bfloat16)
    sp = spec(num_pages=4, max_len=64, dtype=jnp.bfloat16)
    table = PageTable(sp)
    pages = paged_cache.allocate(sp)[0]
    table.ensure(0, 6)
    x = jax.random.normal(jax.random.key(2), (1, 2, TINY.hidden_size), jnp.float32).astype(jnp.bfloat16)
    assert PagedAttention(sp.latent_width).decode_cluster
    for cluster, queries in ((False, 1), (True, 1), (True, 2)):
        attention = PagedAttention(sp.latent_width, "pallas", interpret=True, decode_cluster=cluster)
        kv = attention.layer(pages, jnp.asarray(table.block_table([0])), jnp.asarray([4 + queries], jnp.int32),
                             jnp.asarray([queries], jnp.int32))
        _step(mla, x[:, :queries], jnp.asarray([[4, 5][:queries]], jnp.int32), kv, True)  # each call traced anew
    assert [c.cluster for c in seen] == [False, True, False]
