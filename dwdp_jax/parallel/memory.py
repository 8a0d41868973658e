"""Memory per device of a DWDP group: replicated weights, the rank's own experts and the prefetch staging."""

from __future__ import annotations

from dwdp_jax.config import ModelConfig


def memory_per_device(cfg: ModelConfig, group_size: int, prefetch_depth: int = 1,
                      weight_bytes: float = 1.0) -> dict[str, float]:
    """Bytes per device under DWDP with a contiguous split (the largest rank's share).

    weight_bytes: bytes per parameter of the linear weights (FP8: 1, bf16: 2; block scales, 4/128^2 per
    parameter, are ignored). Embedding and LM head are bf16, routers f32; with FP8 weights every layer also
    holds kv_b dequantized to bf16 for decode (`model.with_absorbed_kv_b`, which the runners apply). Staging
    holds `prefetch_depth` layers' remote experts.
    """
    d, e, h = cfg.hidden_size, cfg.n_routed_experts, cfg.num_heads
    if cfg.q_lora_rank:
        q = d * cfg.q_lora_rank + cfg.q_lora_rank * h * cfg.qk_head_dim
    else:
        q = d * h * cfg.qk_head_dim
    kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    attn = q + kv + h * cfg.v_head_dim * d
    dense_mlp = 3 * d * cfg.intermediate_size
    shared = 3 * d * cfg.moe_intermediate_size * cfg.n_shared_experts
    kv_b_bf16 = cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim) * 2 if weight_bytes < 2 else 0
    replicated = (
        (cfg.num_layers * attn + cfg.first_k_dense_replace * dense_mlp + cfg.num_moe_layers * shared) * weight_bytes
        + cfg.num_layers * kv_b_bf16
        + cfg.num_moe_layers * d * e * 4
        + 2 * cfg.vocab_size * d * 2
    )
    one_expert = cfg.expert_bytes(weight_bytes)
    local = -(-e // group_size)
    experts = cfg.num_moe_layers * local * one_expert
    staging = prefetch_depth * (e - local) * one_expert
    return dict(replicated_bytes=replicated, local_expert_bytes=experts, staging_bytes=staging,
                total_bytes=replicated + experts + staging)
