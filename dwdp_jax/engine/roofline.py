"""Roofline accounting for the engine benchmark: model FLOPs of prefill and the bytes a decode step must read.

Pure functions of a `ModelConfig`; they mirror the parameters of `dwdp_jax.model` (a test compares
`model_bytes` with the arrays of `init_model`):
  * every linear layer inside a decoder layer (MLA projections, dense MLP, shared experts) and every routed
    expert is FP8 with float32 block scales when `cfg.weight_block_size` is set, else in the model dtype;
  * the embedding and the LM head are in the model dtype; norms, the router and its bias are float32.

FLOPs count 2 per multiply-add of a weight with a token ("model FLOPs": each token's latent is up-projected
by kv_b once, as in a full forward, even where the engine's expanded form re-projects cached positions), plus
the attention core: a query at position p attends p + 1 keys with qk_head_dim-wide scores and
v_head_dim-wide values per head. `Flops.fp8` holds what runs on FP8 tensor cores (the routed experts on the
Pallas FP8 grouped GEMM), `Flops.bf16` the rest (the FP8 linears are dequantized and run in bf16; the
float32 router, 0.3% of an R1 MoE layer's FLOPs, is counted with them).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from dwdp_jax.config import ModelConfig

F32_BYTES = 4
FP8_BYTES = 1


@dataclasses.dataclass(frozen=True)
class Weight:
    """One stored weight matrix [rows, cols] of `itemsize`-byte elements, or FP8 with one float32 scale per
    (block[0] x block[1]) block of the stored layout when `block` is set. Used as y = x @ w (or w's transpose
    for the FP8 experts' [out, in] layout): rows * cols multiply-adds per token."""

    name: str
    rows: int
    cols: int
    itemsize: int
    block: tuple[int, int] | None = None

    def __post_init__(self):
        if min(self.rows, self.cols, self.itemsize) < 1:
            raise ValueError(f"weight {self.name!r} needs positive rows, cols and itemsize, got {self}")

    @property
    def params(self) -> int:
        return self.rows * self.cols

    @property
    def nbytes(self) -> int:
        """Stored bytes, block scales included."""
        if self.block is None:
            return self.params * self.itemsize
        scales = math.ceil(self.rows / self.block[0]) * math.ceil(self.cols / self.block[1])
        return self.params * FP8_BYTES + scales * F32_BYTES

    def flops(self, tokens: int) -> int:
        return 2 * tokens * self.params


@dataclasses.dataclass(frozen=True)
class Flops:
    """FLOPs split by the tensor-core dtype they run in."""

    bf16: int = 0
    fp8: int = 0

    @property
    def total(self) -> int:
        return self.bf16 + self.fp8

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.bf16 + other.bf16, self.fp8 + other.fp8)

    def ideal_time_s(self, bf16_peak_flops: float, fp8_peak_flops: float) -> float:
        """Time at the peaks: each FLOP at the measured peak of the dtype it runs in (FLOP/s)."""
        if bf16_peak_flops <= 0 or fp8_peak_flops <= 0:
            raise ValueError(f"peaks must be positive, got bf16={bf16_peak_flops}, fp8={fp8_peak_flops}")
        return self.bf16 / bf16_peak_flops + self.fp8 / fp8_peak_flops

    def mixed_peak_flops(self, bf16_peak_flops: float, fp8_peak_flops: float) -> float:
        """The FLOP-weighted peak of this mix: total / ideal time."""
        return self.total / self.ideal_time_s(bf16_peak_flops, fp8_peak_flops)


# ---------------------------------------------------------------------------------------------------------------
# Weights


def _linear(cfg: ModelConfig, name: str, d_in: int, d_out: int, itemsize: int) -> Weight:
    """A `model.Linear` inside a decoder layer: stored [in, out], or FP8 [out, in] (the checkpoint's layout)
    when the config is quantized."""
    if cfg.weight_block_size is None:
        return Weight(name, d_in, d_out, itemsize)
    return Weight(name, d_out, d_in, itemsize, cfg.weight_block_size)


def attention_weights(cfg: ModelConfig, itemsize: int) -> list[Weight]:
    """MLA projections of one layer (q_proj or q_a/q_b, kv_a, kv_b, o)."""
    d, h = cfg.hidden_size, cfg.num_heads
    if cfg.q_lora_rank is None:
        out = [_linear(cfg, "q_proj", d, h * cfg.qk_head_dim, itemsize)]
    else:
        out = [_linear(cfg, "q_a_proj", d, cfg.q_lora_rank, itemsize),
               _linear(cfg, "q_b_proj", cfg.q_lora_rank, h * cfg.qk_head_dim, itemsize)]
    return out + [
        _linear(cfg, "kv_a_proj_with_mqa", d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, itemsize),
        _linear(cfg, "kv_b_proj", cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), itemsize),
        _linear(cfg, "o_proj", h * cfg.v_head_dim, d, itemsize),
    ]


def mlp_weights(cfg: ModelConfig, d_inter: int, itemsize: int, prefix: str) -> list[Weight]:
    """SwiGLU MLP (dense layer or shared experts): gate, up, down."""
    d = cfg.hidden_size
    return [_linear(cfg, f"{prefix}.gate_proj", d, d_inter, itemsize),
            _linear(cfg, f"{prefix}.up_proj", d, d_inter, itemsize),
            _linear(cfg, f"{prefix}.down_proj", d_inter, d, itemsize)]


def moe_nonrouted_weights(cfg: ModelConfig, itemsize: int) -> list[Weight]:
    """What every token of a MoE layer reads besides its routed experts: the router (float32) and the
    shared experts."""
    out = [Weight("router", cfg.hidden_size, cfg.n_routed_experts, F32_BYTES)]
    if cfg.n_shared_experts:
        out += mlp_weights(cfg, cfg.moe_intermediate_size * cfg.n_shared_experts, itemsize, "shared")
    return out


def routed_expert_weights(cfg: ModelConfig, itemsize: int) -> list[Weight]:
    """One routed expert in the stored layout: FP8 [2*inter, hidden] and [hidden, inter] (the checkpoint's
    [out, in]); unquantized [hidden, 2*inter] and [inter, hidden]."""
    d, i = cfg.hidden_size, cfg.moe_intermediate_size
    if cfg.weight_block_size is None:
        return [Weight("expert.gate_up", d, 2 * i, itemsize), Weight("expert.down", i, d, itemsize)]
    return [Weight("expert.gate_up", 2 * i, d, itemsize, cfg.weight_block_size),
            Weight("expert.down", d, i, itemsize, cfg.weight_block_size)]


def routed_expert_bytes(cfg: ModelConfig, itemsize: int) -> int:
    """Bytes of one routed expert, scales included."""
    return sum(w.nbytes for w in routed_expert_weights(cfg, itemsize))


def layer_weights(cfg: ModelConfig, layer: int, itemsize: int) -> list[Weight]:
    """Matrices every token of decoder layer `layer` reads (routed experts and norms excluded)."""
    if not 0 <= layer < cfg.num_layers:
        raise ValueError(f"layer {layer} outside [0, num_layers={cfg.num_layers})")
    ffn = (moe_nonrouted_weights(cfg, itemsize) if cfg.is_moe_layer(layer)
           else mlp_weights(cfg, cfg.intermediate_size, itemsize, "mlp"))
    return attention_weights(cfg, itemsize) + ffn


def layer_small_bytes(cfg: ModelConfig, layer: int) -> int:
    """Norm weights (float32) of a layer, plus the router bias of a MoE layer."""
    q_norm = cfg.q_lora_rank or 0
    n = 2 * cfg.hidden_size + q_norm + cfg.kv_lora_rank
    if cfg.is_moe_layer(layer):
        n += cfg.n_routed_experts
    return n * F32_BYTES


def lm_head_weight(cfg: ModelConfig, itemsize: int) -> Weight:
    return Weight("lm_head", cfg.hidden_size, cfg.vocab_size, itemsize)


def model_bytes(cfg: ModelConfig, itemsize: int) -> int:
    """Bytes of the decoder's parameters (embedding, layers with all routed experts, final norm, LM head);
    MTP modules excluded. itemsize: bytes of the model dtype."""
    total = cfg.vocab_size * cfg.hidden_size * itemsize  # embedding
    for layer in range(cfg.num_layers):
        total += sum(w.nbytes for w in layer_weights(cfg, layer, itemsize)) + layer_small_bytes(cfg, layer)
        if cfg.is_moe_layer(layer):
            total += cfg.n_routed_experts * routed_expert_bytes(cfg, itemsize)
    return total + cfg.hidden_size * F32_BYTES + lm_head_weight(cfg, itemsize).nbytes


# ---------------------------------------------------------------------------------------------------------------
# Prefill FLOPs


def fp8_kernel_applies(w: Weight) -> bool:
    """Whether an FP8 linear layer runs on the FP8 GEMM (`model.Linear.fp8_kernel_applies`: 128x128 blocks,
    both dims multiples of 128); the others are dequantized to bf16, and so is kv_b, which MLA applies as
    a dequantized weight in both forms (up-projecting the cached latents, or absorbed into q and the output)."""
    return (w.block == (128, 128) and w.rows % 128 == 0 and w.cols % 128 == 0
            and not w.name.endswith("kv_b_proj"))


def token_matmul_flops(cfg: ModelConfig, routed_fp8: bool, linears_fp8: bool = False) -> Flops:
    """Weight-matmul FLOPs of one token through every decoder layer (top-k routed experts per MoE layer),
    LM head and attention core excluded. routed_fp8: the routed experts run on FP8 tensor cores; linears_fp8:
    so do the FP8 linear layers the FP8 GEMM takes (`fp8_kernel_applies`)."""
    bf16, fp8 = 0, 0
    for layer in range(cfg.num_layers):
        for w in layer_weights(cfg, layer, 1):
            if linears_fp8 and fp8_kernel_applies(w):
                fp8 += w.flops(1)
            else:
                bf16 += w.flops(1)
        if cfg.is_moe_layer(layer):
            routed = cfg.num_experts_per_tok * sum(w.flops(1) for w in routed_expert_weights(cfg, 1))
            if routed_fp8:
                fp8 += routed
            else:
                bf16 += routed
    return Flops(bf16, fp8)


def attention_core_flops(cfg: ModelConfig, start: int, length: int) -> int:
    """Scores and values of queries at positions [start, start + length), each attending every position <= its
    own (causal), over all layers: 2 * heads * (qk_head_dim + v_head_dim) per (query, key) pair."""
    if start < 0 or length < 1:
        raise ValueError(f"attention rows need start >= 0 and length >= 1, got start={start}, length={length}")
    pairs = length * start + length * (length + 1) // 2  # sum over p of (p + 1)
    per_pair = 2 * cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return cfg.num_layers * per_pair * pairs


def prefill_flops(cfg: ModelConfig, rows: Sequence[tuple[int, int]], routed_fp8: bool,
                  linears_fp8: bool = False) -> Flops:
    """Model FLOPs of prefill rows, each (start, length): tokens [start, start + length) of one sequence whose
    earlier positions are cached. The LM head runs on each row's last token only (the runner returns
    last-token logits per row and program call), in bf16."""
    per_token = token_matmul_flops(cfg, routed_fp8, linears_fp8)
    head = lm_head_weight(cfg, 1).flops(1)
    total = Flops()
    for start, length in rows:
        core = attention_core_flops(cfg, start, length)
        total += Flops(per_token.bf16 * length + core + head, per_token.fp8 * length)
    return total


# ---------------------------------------------------------------------------------------------------------------
# Decode bytes


@dataclasses.dataclass(frozen=True)
class DecodeBytes:
    """Bytes one decode step must read from HBM (each weight once per step, each cached token once)."""

    embedding: int  # the step's token rows of the embedding table
    attention: int  # MLA projections of every layer
    dense_mlp: int  # MLPs of the dense layers
    moe_nonrouted: int  # routers and shared experts
    small: int  # norms and router biases
    routed_experts: int  # distinct routed experts hit by the step's tokens
    kv_cache: int  # latent + rope key of every attended position, every layer
    lm_head: int  # final norm and LM head

    @property
    def total(self) -> int:
        return sum(dataclasses.astuple(self))

    def as_dict(self) -> dict:
        return dict(dataclasses.asdict(self), total=self.total)


def decode_bytes(cfg: ModelConfig, batch: int, context_tokens: int, distinct_experts: Sequence[int],
                 itemsize: int = 2, cache_itemsize: int = 2) -> DecodeBytes:
    """Bytes that a decode step of `batch` tokens must read.

    context_tokens: cache positions the step's queries attend, summed over its rows (batch * context for
    rows of equal context). distinct_experts: per MoE layer, the number of distinct routed experts the
    step's tokens select (a hit expert is read once, however many tokens chose it). itemsize /
    cache_itemsize: bytes per element of the model dtype / the cache dtype.
    """
    if batch < 1 or context_tokens < batch:
        raise ValueError(f"decode needs batch >= 1 and context_tokens >= batch, got {batch}, {context_tokens}")
    if len(distinct_experts) != cfg.num_moe_layers:
        raise ValueError(f"distinct_experts has {len(distinct_experts)} entries, the config "
                         f"{cfg.num_moe_layers} MoE layers")
    if any(not 0 <= n <= min(cfg.n_routed_experts, batch * cfg.num_experts_per_tok) for n in distinct_experts):
        raise ValueError(f"distinct_experts {list(distinct_experts)} outside [0, min(n_routed_experts, "
                         f"batch * num_experts_per_tok)]")
    attention = dense = nonrouted = small = 0
    for layer in range(cfg.num_layers):
        attention += sum(w.nbytes for w in attention_weights(cfg, itemsize))
        if cfg.is_moe_layer(layer):
            nonrouted += sum(w.nbytes for w in moe_nonrouted_weights(cfg, itemsize))
        else:
            dense += sum(w.nbytes for w in mlp_weights(cfg, cfg.intermediate_size, itemsize, "mlp"))
        small += layer_small_bytes(cfg, layer)
    kv = context_tokens * cfg.num_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cache_itemsize
    return DecodeBytes(
        embedding=batch * cfg.hidden_size * itemsize,
        attention=attention,
        dense_mlp=dense,
        moe_nonrouted=nonrouted,
        small=small,
        routed_experts=sum(distinct_experts) * routed_expert_bytes(cfg, itemsize),
        kv_cache=kv,
        lm_head=cfg.hidden_size * F32_BYTES + lm_head_weight(cfg, itemsize).nbytes,
    )
