"""DeepSeek-V3 router: sigmoid scores, bias-corrected group-limited top-k, routed scaling.

Logits to float32 accuracy (HF computes them in fp32; the official code in bf16, where near-ties can flip), but
on bf16 tensor cores (`router_logits`): a full-fp32 matmul took 0.7 ms a layer at 8K tokens on an H100, 11% of
the MoE layer's non-GEMM time; scores, selection and weights in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dwdp_jax.config import ModelConfig


def _bf16_parts(a: jnp.ndarray) -> list[jnp.ndarray]:
    """a as bf16 terms whose f32 sum is a to ~16 mantissa bits: [a] if a is bf16, else [head, remainder]."""
    if a.dtype == jnp.bfloat16:
        return [a]
    head = a.astype(jnp.bfloat16)
    return [head, (a.astype(jnp.float32) - head.astype(jnp.float32)).astype(jnp.bfloat16)]


def router_logits(x_td: jnp.ndarray, router_de: jnp.ndarray) -> jnp.ndarray:
    """x_td @ router_de as float32 [tokens, experts] from bf16 products accumulated in f32 ("bf16_3x"): each
    operand split into a bf16 head and remainder, and the product of the two remainders dropped. A bf16
    operand is its own head, so with bf16 activations and a bf16 checkpoint's router weight this is one
    exact-product pass; with an f32 weight, two. Relative error against the f32 product: about 2^-16 of
    sum |x| |w| (plus f32 summation order), where a bf16 matmul would give 2^-8."""
    xs, ws = _bf16_parts(x_td), _bf16_parts(router_de)
    # remainder terms first (the smaller numbers), then head x head
    terms = [(xs[i], ws[j]) for i in range(len(xs)) for j in range(len(ws)) if i + j == 1]
    logits = jnp.dot(xs[0], ws[0], preferred_element_type=jnp.float32)
    if terms:
        small = sum(jnp.dot(a, b, preferred_element_type=jnp.float32) for a, b in terms)
        logits = small + logits
    return logits


def route(x_td: jnp.ndarray, router_de: jnp.ndarray, bias_e: jnp.ndarray, cfg: ModelConfig):
    """Chooses experts for each token.

    x_td: [tokens, hidden]; router_de: [hidden, n_routed_experts]; bias_e: [n_routed_experts]
    (`e_score_correction_bias`, used for selection only).
    Returns (expert_ids [tokens, top_k] int32, weights [tokens, top_k] float32); the weights are the unbiased
    sigmoid scores of the chosen experts, normalized over the top-k when `norm_topk_prob`, times
    `routed_scaling_factor`.
    """
    logits = router_logits(x_td, router_de)
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
