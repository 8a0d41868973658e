"""DeepSeek-V3 router: sigmoid scores, bias-corrected group-limited top-k, routed scaling.

Computed in float32 (HF computes router logits in fp32; the official code in bf16, where near-ties can flip).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dwdp_jax.config import ModelConfig


def route(x_td: jnp.ndarray, router_de: jnp.ndarray, bias_e: jnp.ndarray, cfg: ModelConfig):
    """Chooses experts for each token.

    x_td: [tokens, hidden]; router_de: [hidden, n_routed_experts]; bias_e: [n_routed_experts]
    (`e_score_correction_bias`, used for selection only).
    Returns (expert_ids [tokens, top_k] int32, weights [tokens, top_k] float32); the weights are the unbiased
    sigmoid scores of the chosen experts, normalized over the top-k when `norm_topk_prob`, times
    `routed_scaling_factor`.
    """
    logits = jnp.dot(x_td.astype(jnp.float32), router_de.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    scores = jax.nn.sigmoid(logits)
    biased = scores + bias_e.astype(jnp.float32)
    t, e = biased.shape
    g = cfg.n_group
    grouped = biased.reshape(t, g, e // g)
    group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [t, g]: sum of each group's top-2 biased scores
    _, top_groups = jax.lax.top_k(group_scores, cfg.topk_group)
    group_keep = jnp.zeros((t, g), bool).at[jnp.arange(t)[:, None], top_groups].set(True)
    expert_keep = jnp.repeat(group_keep, e // g, axis=1)
    fill = -jnp.inf if cfg.group_mask_fill == "neg_inf" else 0.0
    masked = jnp.where(expert_keep, biased, fill)
    _, expert_ids = jax.lax.top_k(masked, cfg.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, expert_ids, axis=1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return expert_ids.astype(jnp.int32), weights * cfg.routed_scaling_factor


def expert_histogram(expert_ids: jnp.ndarray, n_experts: int) -> jnp.ndarray:
    """Tokens routed to each expert: expert_ids [tokens, top_k] -> [n_experts] int32."""
    return jnp.zeros((n_experts,), jnp.int32).at[expert_ids.reshape(-1)].add(1)
