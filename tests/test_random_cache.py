"""The benchmarks' random cache fill (`experiments/random_cache.py`): every page drawn, in place, chunk by chunk."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments import random_cache


def test_every_page_is_drawn_when_the_chunk_does_not_divide(monkeypatch):
  monkeypatch.setattr(random_cache, "PAGES_PER_FILL", 3)  # 7 pages: chunks at 0, 3 and 4 (the last overlaps)
  shapes = [((7, 4, 5), jnp.bfloat16), ((7, 4, 5), jnp.bfloat16), ((2, 4, 5), jnp.float32)]
  out = random_cache.randomized_pages([jnp.zeros(s, d) for s, d in shapes], jax.random.key(0))
  for (shape, dtype), page in zip(shapes, out):
    assert page.shape == shape and page.dtype == dtype
    values = np.asarray(page, np.float32)
    assert (values != 0).any(axis=(1, 2)).all(), "a page left as it was"
    assert abs(values.std() - 1) < 0.2
  assert not np.array_equal(np.asarray(out[0]), np.asarray(out[1])), "layers must get different values"
