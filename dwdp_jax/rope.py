"""Rotary position embedding with DeepSeek's YaRN extension, in the interleaved-pairs layout of the checkpoints.

DeepSeek rotates consecutive pairs (x[2i], x[2i+1]) by angle pos * inv_freq[i] (the official code's complex
form). HF transformers de-interleaves first; attention scores agree, but a cached rope key differs in layout,
so everything in dwdp_jax (including the KV cache) keeps the interleaved layout.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from dwdp_jax.config import ModelConfig, yarn_mscale


def inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
    """[rope_dim // 2] float32 inverse frequencies, YaRN-corrected when `cfg.rope_scaling` is set.

    YaRN is applied whenever it is configured (as HF does); DeepSeek's official code applies it only when the
    serving length exceeds the original length, which holds for every published R1 serving setup.
    """
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    inv_freq = (1.0 / pos_freqs).astype(np.float32)
    yarn = cfg.rope_scaling
    if yarn is None:
        return inv_freq

    def correction_dim(rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1 keeps the original frequency, 0 interpolates it by 1/factor
    interpolated = inv_freq / yarn.factor
    return (interpolated * (1 - extrapolation) + inv_freq * extrapolation).astype(np.float32)


def cos_sin(cfg: ModelConfig, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin of shape positions.shape + [rope_dim // 2], float32, including YaRN's cos/sin scale."""
    inv_freq = jnp.asarray(inverse_frequencies(cfg))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    scale = 1.0
    yarn = cfg.rope_scaling
    if yarn is not None and yarn.mscale and yarn.mscale_all_dim:
        scale = yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates interleaved pairs of the last axis.

    x: [..., seq, heads, rope_dim]; cos, sin: [..., seq, rope_dim // 2]. Computed in float32, returned in x.dtype.
    """
    xf = x.astype(jnp.float32)
    even, odd = xf[..., 0::2], xf[..., 1::2]
    c, s = cos[..., None, :], sin[..., None, :]
    rotated = jnp.stack([even * c - odd * s, odd * c + even * s], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)
