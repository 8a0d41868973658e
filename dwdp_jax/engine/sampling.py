"""Token sampling from logits: greedy, or temperature with optional top-k and top-p (nucleus) filtering.

Order of operations (as in vLLM): divide by the temperature, keep the top_k largest logits, then keep the
smallest prefix of those (by descending probability, renormalized over the top-k set) whose probability mass
reaches top_p, and draw from what is left. Ties rank the lower token id first, for greedy as well.

Two entry points, both jit-able and vectorized over the batch:
  * `sample(logits, SamplingParams, key)`: one setting for the batch, static (hashable) under jit, and
    cheap: greedy is an argmax, top-k without top-p sorts only k candidates.
  * `sample_per_row(logits, temperature, top_k, top_p, key)`: one setting per row, as arrays [B]; sorts
    the whole vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature == 0: greedy. top_k == 0: no top-k filter. top_p == 1: no nucleus filter."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")


def _top_p_filter(sorted_logits: jax.Array, top_p: jax.Array | float) -> jax.Array:
    """Masks to -inf the tail of each row of descending `sorted_logits` [B, K] beyond mass top_p ([B, 1])."""
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # the top token has 0 < top_p: always kept
    return jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)


def sample(logits_bv: jax.Array, params: SamplingParams, key: jax.Array) -> jax.Array:
    """Samples one token per row. logits_bv: [B, V] (any float dtype). Returns int32 [B].

    Under jit pass `params` as a static argument: `jax.jit(sample, static_argnames="params")`.
    """
    logits = logits_bv.astype(jnp.float32)
    if params.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / params.temperature
    vocab = logits.shape[-1]
    if params.top_k > 0 and params.top_k < vocab:
        cand_logits, cand_ids = jax.lax.top_k(scaled, params.top_k)  # [B, k], descending
    elif params.top_p < 1:
        cand_ids = jnp.argsort(-scaled, axis=-1, stable=True)  # [B, V]
        cand_logits = jnp.take_along_axis(scaled, cand_ids, axis=-1)
    else:
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    if params.top_p < 1:
        cand_logits = _top_p_filter(cand_logits, params.top_p)
    choice = jax.random.categorical(key, cand_logits, axis=-1)  # [B]
    return jnp.take_along_axis(cand_ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def sample_per_row(
    logits_bv: jax.Array, temperature_b: jax.Array, top_k_b: jax.Array, top_p_b: jax.Array, key: jax.Array
) -> jax.Array:
    """Samples row b with (temperature_b[b], top_k_b[b], top_p_b[b]) (same meaning as `SamplingParams`).

    logits_bv: [B, V]; temperature_b, top_p_b: float [B]; top_k_b: int [B]. Returns int32 [B].
    """
    logits = logits_bv.astype(jnp.float32)
    vocab = logits.shape[-1]
    temperature = jnp.asarray(temperature_b, jnp.float32)
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    order = jnp.argsort(-scaled, axis=-1, stable=True)  # [B, V]
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    top_k = jnp.asarray(top_k_b, jnp.int32)
    k = jnp.where(top_k > 0, top_k, vocab)[:, None]
    sorted_logits = jnp.where(jnp.arange(vocab)[None, :] < k, sorted_logits, -jnp.inf)
    sorted_logits = _top_p_filter(sorted_logits, jnp.asarray(top_p_b, jnp.float32)[:, None])
    choice = jax.random.categorical(key, sorted_logits, axis=-1)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def stack_params(params: Sequence[SamplingParams]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row arrays for `sample_per_row`: (temperature float32 [B], top_k int32 [B], top_p float32 [B])."""
    return (
        np.array([p.temperature for p in params], dtype=np.float32),
        np.array([p.top_k for p in params], dtype=np.int32),
        np.array([p.top_p for p in params], dtype=np.float32),
    )
