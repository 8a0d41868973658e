"""Cost model of one DeepSeek-R1 decoder layer on one GPU: FLOPs, bytes, and time from a hardware profile.

Times are rooflines, `max(FLOPs / (rate * eff), bytes / (HBM bandwidth * eff))`, one per operation, summed.
The efficiency factors (`Efficiency`) are the calibration knobs. The defaults describe an optimized serving
stack (fused attention, FP8 GEMMs): they are guesses, used for GB200 NVL72. Our own JAX implementation on H200
is `validate.OURS_H200` (`CostModel(..., dense_matmul_dtype="bf16")`), calibrated on our measured step times.

Modelling choices (all per GPU, per layer):
  * attention: the MLA projections as GEMMs over the step's new tokens; prefill chunks (more than one new
    token) run plain multi-head attention over the cached context plus the causal triangle of the chunk, and
    re-expand the cached latent of earlier chunks through `kv_b`; decode tokens (one new token) run the
    absorbed form and read `context` latent rows of `kv_lora_rank + qk_rope_head_dim` from HBM. An unfused
    attention (ours: XLA einsums and a softmax) also writes and reads the fp32 scores [heads, new tokens,
    context + new tokens] `Efficiency.score_passes` times.
  * routing is uniform: each of the `tokens * top_k` (token, expert) pairs goes to an expert drawn at random,
    so T tokens touch `E * (1 - (1 - k/E)^T)` distinct experts (the weights a grouped GEMM must read).
  * DWDP fetch: a rank holds E/G routed experts per MoE layer and pulls the others it prefetches from its G-1
    peers; DEP all-to-all: each token's top-k rows leave the rank, of which (G-1)/G go to other ranks.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dwdp_jax.config import ModelConfig
from dwdp_jax.sim.hardware import Hardware

# Bytes per weight element, block scales included: FP8 with one fp32 scale per 128x128 block (R1's checkpoint),
# NVFP4 with one FP8 scale per 16 elements (the paper's shipped format).
BYTES_PER_PARAM = {"bf16": 2.0, "fp8": 1.0 + 4.0 / (128 * 128), "nvfp4": 0.5 + 1.0 / 16}


# --------------------------------------------------------------------------------------------------------------
# Parameter counts and FLOPs (pure arithmetic).

def mla_params(cfg: ModelConfig) -> int:
    """Weights of the MLA projections of one layer (q, kv_a, kv_b, o)."""
    h, nh = cfg.hidden_size, cfg.num_heads
    if cfg.q_lora_rank:
        q = h * cfg.q_lora_rank + cfg.q_lora_rank * nh * cfg.qk_head_dim
    else:
        q = h * nh * cfg.qk_head_dim
    kv_a = h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    kv_b = cfg.kv_lora_rank * nh * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    o = nh * cfg.v_head_dim * h
    return q + kv_a + kv_b + o


def expert_params(cfg: ModelConfig) -> int:
    """One routed or shared expert: gate, up and down matrices."""
    return 3 * cfg.hidden_size * cfg.moe_intermediate_size


def expert_flops(cfg: ModelConfig, tokens: float) -> float:
    """FLOPs of one expert applied to `tokens` tokens (three matmuls, 2 FLOPs per multiply-add)."""
    return 2.0 * expert_params(cfg) * tokens


def mla_core_flops(cfg: ModelConfig, new_tokens: np.ndarray, context: np.ndarray,
                   row_len: np.ndarray | None = None) -> np.ndarray:
    """Attention-core FLOPs (scores and weighted values) per request; [n] -> [n].

    Prefill chunks: multi-head attention, each new token attending to `context` cached tokens and the causal
    part of its chunk, or (`row_len` given: an engine that attends over whole cache rows, masked) to `row_len`
    positions. Decode (one new token): the absorbed form over the latent cache.
    """
    n = np.asarray(new_tokens, dtype=np.float64)
    c = np.asarray(context, dtype=np.float64)
    nh = cfg.num_heads
    keys = n * c + n * (n + 1) / 2 if row_len is None else n * np.asarray(row_len, dtype=np.float64)
    mha = 2.0 * nh * (cfg.qk_head_dim + cfg.v_head_dim) * keys
    absorbed = 2.0 * nh * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim) * keys
    return np.where(n == 1, absorbed, mha)


def expected_experts_touched(cfg: ModelConfig, tokens: float) -> float:
    """Distinct routed experts hit by `tokens` tokens under uniform routing."""
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    return e * (1.0 - (1.0 - k / e) ** max(tokens, 0.0))


def dwdp_fetch_bytes(cfg: ModelConfig, group_size: int, experts_fetched: float, expert_format: str = "fp8") -> float:
    """Bytes a DWDP rank pulls for one MoE layer: the remote share (G-1)/G of the experts it fetches."""
    return (group_size - 1) / group_size * experts_fetched * expert_params(cfg) * BYTES_PER_PARAM[expert_format]


def dep_a2a_bytes(cfg: ModelConfig, tokens: float, group_size: int, bytes_per_elem: float = 2.0,
                  per_rank: bool = False) -> float:
    """Bytes one rank sends in one DEP all-to-all (dispatch or combine), remote share (G-1)/G: top-k rows per
    token, or (`per_rank`) one row per token and rank holding any of its experts, as all-to-all kernels that
    send a token once per destination (and combine its experts there) do."""
    rows = ranks_touched(cfg, group_size) if per_rank else cfg.num_experts_per_tok
    return tokens * rows * cfg.hidden_size * bytes_per_elem * (group_size - 1) / group_size


def ranks_touched(cfg: ModelConfig, group_size: int) -> float:
    """Distinct ranks holding a token's top-k experts, experts split evenly, routing uniform:
    G * (1 - C(E - E/G, k) / C(E, k))."""
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    miss = 1.0
    for i in range(k):  # P(none of the k experts on a given rank)
        miss *= (e - e / group_size - i) / (e - i)
    return group_size * (1.0 - max(miss, 0.0))


def replicated_params(cfg: ModelConfig) -> int:
    """Weights every rank holds under DWDP or DEP: all but the routed experts (MTP modules left out)."""
    dense_mlp = 3 * cfg.hidden_size * cfg.intermediate_size
    moe_local = cfg.n_shared_experts * expert_params(cfg) + cfg.n_routed_experts * cfg.hidden_size
    return (
        cfg.num_layers * mla_params(cfg)
        + cfg.first_k_dense_replace * dense_mlp
        + cfg.num_moe_layers * moe_local
        + 2 * cfg.vocab_size * cfg.hidden_size
    )


def weight_memory_gb(cfg: ModelConfig, group_size: int, staging_layers: int, expert_format: str = "fp8",
                     dense_format: str = "fp8", prefetch_per_peer: int | None = None) -> float:
    """Per-GPU weight memory: replicated weights, local experts per MoE layer, `staging_layers` fetch buffers.
    Local experts: E/G, or with the paper's layout E - (G-1) p for `prefetch_per_peer` = p (staging (G-1) p)."""
    expert_b = expert_params(cfg) * BYTES_PER_PARAM[expert_format]
    if prefetch_per_peer is None:
        local_experts = cfg.n_routed_experts / group_size
        staging = staging_layers * dwdp_fetch_bytes(cfg, group_size, cfg.n_routed_experts, expert_format)
    else:
        local_experts = cfg.n_routed_experts - (group_size - 1) * prefetch_per_peer
        staging = staging_layers * (group_size - 1) * prefetch_per_peer * expert_b
    local = cfg.num_moe_layers * local_experts * expert_b
    return (replicated_params(cfg) * BYTES_PER_PARAM[dense_format] + local + staging) / 1e9


# --------------------------------------------------------------------------------------------------------------
# Times.

@dataclasses.dataclass(frozen=True)
class Efficiency:
    """Fractions of the profile's achieved rates reached by each kind of operation (calibration knobs)."""

    gemm: float = 0.8  # projections, shared expert, dense MLP, LM head
    grouped_gemm: float = 0.7  # routed experts
    attention: float = 0.5  # attention core, on the bf16 rate
    hbm: float = 0.8  # weight and KV-cache reads
    layer_overhead_s: float = 20e-6  # launches, norms, router, per layer
    score_passes: float = 0.0  # HBM passes over materialized fp32 attention scores (0: fused attention)
    token_overhead_s: float = 0.0  # per token and layer: elementwise passes, quantization, routing gathers

    def __post_init__(self):
        for f in ("gemm", "grouped_gemm", "attention", "hbm"):
            if not 0 < getattr(self, f) <= 1:
                raise ValueError(f"Efficiency.{f} must be in (0, 1]")
        if self.layer_overhead_s < 0 or self.score_passes < 0 or self.token_overhead_s < 0:
            raise ValueError("layer_overhead_s, score_passes and token_overhead_s must be >= 0")


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Seconds per operation of one layer on one GPU of `hw`, for the model `cfg`."""

    cfg: ModelConfig
    hw: Hardware
    eff: Efficiency = Efficiency()
    expert_format: str = "fp8"  # routed experts: 'fp8' (R1 checkpoint) or 'nvfp4' (the paper)
    dense_format: str = "fp8"  # attention projections, shared expert, dense MLP, as stored
    kv_bytes: float = 2.0  # per latent element in the KV cache (bf16)
    dense_matmul_dtype: str | None = None  # the matmul rate of dense weights (None: dense_format; ours: 'bf16',
    #                                        FP8 weights dequantized before a bf16 matmul)

    def __post_init__(self):
        for fmt in (self.expert_format, self.dense_format, self.dense_matmul_dtype or self.dense_format):
            if fmt not in BYTES_PER_PARAM:
                raise ValueError(f"unknown weight format {fmt!r}; use one of {sorted(BYTES_PER_PARAM)}")

    @property
    def dense_tflops(self) -> float:
        return self.hw.matmul_tflops(self.dense_matmul_dtype or self.dense_format)

    def _roofline(self, flops: float, bytes_: float, tflops: float, eff: float) -> float:
        return max(flops / (tflops * 1e12 * eff), bytes_ / (self.hw.hbm_gbps * 1e9 * self.eff.hbm))

    @property
    def expert_bytes(self) -> float:
        return expert_params(self.cfg) * BYTES_PER_PARAM[self.expert_format]

    def attention_s(self, new_tokens: np.ndarray, context: np.ndarray, row_len: np.ndarray | None = None) -> float:
        """MLA of one layer for a rank's step: requests with `new_tokens[i]` new and `context[i]` cached tokens.

        row_len: an engine whose every query reads its whole cache row of `row_len[i]` positions, masked (our
        slot-cache engine: max_seq_len + 1), instead of the `context[i] + new_tokens[i]` that causality needs;
        its prefill re-expands every cached position of the row through kv_b.
        """
        cfg = self.cfg
        n = np.asarray(new_tokens, dtype=np.float64)
        c = np.asarray(context, dtype=np.float64)
        if n.sum() == 0:
            return 0.0
        rows = c + n if row_len is None else np.broadcast_to(np.asarray(row_len, dtype=np.float64), n.shape)
        # Projections over new tokens, plus kv_b re-expanding the cached latent for prefill continuations.
        reexpand = np.where(n > 1, rows - n, 0.0).sum() * cfg.kv_lora_rank * cfg.num_heads * (
            cfg.qk_nope_head_dim + cfg.v_head_dim)
        proj_flops = 2.0 * (mla_params(cfg) * n.sum() + reexpand)
        proj_bytes = mla_params(cfg) * BYTES_PER_PARAM[self.dense_format]
        proj = self._roofline(proj_flops, proj_bytes, self.dense_tflops, self.eff.gemm)
        core_flops = mla_core_flops(cfg, n, c, None if row_len is None else rows).sum()
        kv_bytes = (rows * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * self.kv_bytes).sum()
        core = self._roofline(core_flops, kv_bytes, self.hw.bf16_tflops, self.eff.attention)
        score_bytes = 4.0 * cfg.num_heads * (n * rows).sum() * self.eff.score_passes
        return proj + core + score_bytes / (self.hw.hbm_gbps * 1e9 * self.eff.hbm)

    def dense_mlp_s(self, tokens: float) -> float:
        params = 3 * self.cfg.hidden_size * self.cfg.intermediate_size
        if tokens == 0:
            return 0.0
        return self._roofline(2.0 * params * tokens, params * BYTES_PER_PARAM[self.dense_format],
                              self.dense_tflops, self.eff.gemm)

    def shared_expert_s(self, tokens: float) -> float:
        if tokens == 0 or self.cfg.n_shared_experts == 0:
            return 0.0
        params = self.cfg.n_shared_experts * expert_params(self.cfg)
        return self._roofline(2.0 * params * tokens, params * BYTES_PER_PARAM[self.dense_format],
                              self.dense_tflops, self.eff.gemm)

    def routed_experts_s(self, pairs: float, experts_read: float) -> float:
        """Grouped GEMM over `pairs` (token, expert) rows, reading the weights of `experts_read` experts."""
        if pairs == 0:
            return 0.0
        return self._roofline(expert_flops(self.cfg, pairs), experts_read * self.expert_bytes,
                              self.hw.matmul_tflops(self.expert_format), self.eff.grouped_gemm)

    def head_s(self, sampled: int) -> float:
        """LM head (bf16) for the tokens sampled in a step."""
        if sampled == 0:
            return 0.0
        params = self.cfg.vocab_size * self.cfg.hidden_size
        return self._roofline(2.0 * params * sampled, params * 2.0, self.hw.bf16_tflops, self.eff.gemm)

    def experts_touched(self, tokens: float) -> float:
        return expected_experts_touched(self.cfg, tokens)
