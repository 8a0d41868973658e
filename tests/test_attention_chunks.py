"""Attention split into query chunks (bounded score memory) equals attention over all queries at once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwdp_jax import model as model_lib
from dwdp_jax.config import TINY
from dwdp_jax.model import LayerKV, init_model, query_chunk


def test_query_chunk_arithmetic():
    per_query = 2 * 4 * 100 * 4  # batch 2, 4 heads, 100 keys, float32
    assert query_chunk(2, 4, 10, 100, score_bytes=10 * per_query) == 10  # all fit
    assert query_chunk(2, 4, 10, 100, score_bytes=9 * per_query) == 8  # largest power of two
    assert query_chunk(2, 4, 10, 100, score_bytes=per_query // 2) == 1  # at least one


def _mla_inputs(cfg, b, s, seed):
    rng = np.random.RandomState(seed)
    x = jnp.asarray(rng.randn(b, s, cfg.hidden_size).astype(np.float32))
    positions = jnp.asarray(np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)))
    return x, positions


@pytest.mark.parametrize("absorbed", [False, True])
def test_chunked_attention_equals_unchunked(monkeypatch, absorbed):
    cfg = TINY
    attn = init_model(cfg, dtype=jnp.float32, seed=2).layers[0].self_attn
    b, s, max_len = 2, 13, 24  # 13 queries: chunks of 4 leave a padded last chunk
    x, positions = _mla_inputs(cfg, b, s, seed=1)
    # Cache mode with earlier tokens already cached (prefill of a second chunk at positions 5..17).
    rng = np.random.RandomState(3)
    cache = LayerKV(jnp.asarray(rng.randn(b, max_len, cfg.kv_lora_rank).astype(np.float32)),
                    jnp.asarray(rng.randn(b, max_len, cfg.qk_rope_head_dim).astype(np.float32)))
    later = positions + 5

    def run():
        no_cache, _ = jax.jit(lambda x, p: attn(x, p, None, absorbed))(x, positions)
        cached, kv = jax.jit(lambda x, p, c: attn(x, p, c, absorbed))(x, later, cache)
        return np.asarray(no_cache), np.asarray(cached), np.asarray(kv.latent)

    whole = run()
    per_query = b * cfg.num_heads * max_len * 4
    assert query_chunk(b, cfg.num_heads, s, max_len) == s  # the default budget: no chunking here
    monkeypatch.setattr(model_lib, "ATTENTION_SCORE_BYTES", 4 * per_query)  # chunks of 4 queries
    assert query_chunk(b, cfg.num_heads, s, max_len) == 4
    chunked = run()
    for a, c in zip(whole, chunked):
        assert np.isfinite(c).all()
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-5)
