"""Model configuration: a frozen dataclass for DeepSeek-V3/R1, read from an HF `config.json` or a named preset.

Presets:
  * `deepseek-r1`: the real 671B shapes (61 layers, 256 routed experts, FP8 128x128 block-scaled weights).
  * `r1-layers-N`: real layer shapes with N decoder layers (the first dense, the rest MoE), for GPU benchmarks.
  * `tiny`: a few-KB model for CPU tests.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Literal


class ConfigError(ValueError):
    """A config field is missing, invalid or inconsistent; the message names the field."""


@dataclasses.dataclass(frozen=True)
class YarnConfig:
    """YaRN RoPE extension (DeepSeek's `rope_scaling` with type `yarn`)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    truncate: bool = True

    def __post_init__(self):
        if self.factor <= 0:
            raise ConfigError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if self.original_max_position_embeddings <= 0:
            raise ConfigError("rope_scaling.original_max_position_embeddings must be > 0")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V3/R1 hyper-parameters (names follow HF's `DeepseekV3Config` where one exists)."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense MLP of the first `first_k_dense_replace` layers
    moe_intermediate_size: int = 2048  # one routed or shared expert
    num_layers: int = 61
    num_heads: int = 128
    q_lora_rank: int | None = 1536  # None: plain q projection
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 3
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: YarnConfig | None = YarnConfig(
        factor=40.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0
    )
    max_position_embeddings: int = 163840
    tie_word_embeddings: bool = False
    num_mtp_layers: int = 1  # `num_nextn_predict_layers`: MTP modules stored after the decoder layers
    # Weight quantization: None (bf16/fp32 weights) or the FP8 block shape [out, in], e.g. (128, 128).
    weight_block_size: tuple[int, int] | None = (128, 128)
    # Score of experts in groups that lose the group selection: DeepSeek's official code uses -inf;
    # HF transformers and the R1 hub code use 0.0. They differ only when biased scores are <= 0.
    group_mask_fill: Literal["neg_inf", "zero"] = "neg_inf"

    def __post_init__(self):
        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_layers", "num_heads",
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
            "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError(f"q_lora_rank must be a positive integer or None, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if not 0 <= self.first_k_dense_replace <= self.num_layers:
            raise ConfigError(
                f"first_k_dense_replace must be in [0, num_layers={self.num_layers}], got {self.first_k_dense_replace}"
            )
        if self.n_shared_experts < 0 or self.num_mtp_layers < 0:
            raise ConfigError("n_shared_experts and num_mtp_layers must be >= 0")
        if self.n_routed_experts % self.n_group:
            raise ConfigError(
                f"n_routed_experts={self.n_routed_experts} must be divisible by n_group={self.n_group}"
            )
        if self.n_routed_experts // self.n_group < 2:
            raise ConfigError("n_group too large: each expert group needs at least 2 experts (top-2 group score)")
        if self.topk_group > self.n_group:
            raise ConfigError(f"topk_group={self.topk_group} must be <= n_group={self.n_group}")
        if self.topk_group * (self.n_routed_experts // self.n_group) < self.num_experts_per_tok:
            raise ConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts in topk_group={self.topk_group}"
                f" selected groups of {self.n_routed_experts // self.n_group}"
            )
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError("num_experts_per_tok must be <= n_routed_experts")
        if self.weight_block_size is not None:
            if len(self.weight_block_size) != 2 or min(self.weight_block_size) <= 0:
                raise ConfigError(f"weight_block_size must be two positive ints, got {self.weight_block_size!r}")
        if self.group_mask_fill not in ("neg_inf", "zero"):
            raise ConfigError(f"group_mask_fill must be 'neg_inf' or 'zero', got {self.group_mask_fill!r}")
        if self.rms_norm_eps <= 0:
            raise ConfigError("rms_norm_eps must be > 0")

    # Derived sizes.
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times YaRN's mscale^2 when rope scaling is configured (DeepSeek's formula)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling is not None and self.rope_scaling.mscale_all_dim:
            m = yarn_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
            scale *= m * m
        return scale

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def expert_bytes(self, bytes_per_param: float = 1.0) -> float:
        """Bytes of one routed expert (gate, up and down matrices), excluding scales."""
        return 3 * self.hidden_size * self.moe_intermediate_size * bytes_per_param


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# --------------------------------------------------------------------------------------------------------------
# HF config.json
#
# Accepted: any config whose `architectures` names DeepseekV3ForCausalLM (DeepSeek-V3, V3-0324, R1, R1-0528, V3.1,
# Kimi-K2 with model_type "kimi_k2", Moonlight-16B-A3B, tiny random checkpoints), or, without `architectures`,
# model_type "deepseek_v3" (what transformers writes). Everything we do not implement is refused by name, never
# ignored: a checkpoint that loads is computed exactly as its reference code computes it.

ARCHITECTURE = "DeepseekV3ForCausalLM"

# Fields with one supported value (the published V3 family's); another value is a model we do not implement.
_ONLY = {
    "hidden_act": ("silu", "the experts and dense MLPs are SwiGLU"),
    "scoring_func": ("sigmoid", "the router scores experts with a sigmoid (DeepSeek-V2's softmax is not implemented)"),
    "topk_method": ("noaux_tc", "the router is the bias-corrected group-limited top-k ('greedy' and"
                                " 'group_limited_greedy' are DeepSeek-V2's routers, not implemented)"),
    "attention_bias": (False, "the attention projections have no biases"),
    "moe_layer_freq": (1, "every layer from first_k_dense_replace on is a MoE layer"),
    "rope_interleave": (True, "DeepSeek checkpoints rotate interleaved pairs"),
}
# DeepSeek-V3.2's sparse attention (DSA): a lightning indexer choosing index_topk keys per query.
_SPARSE_ATTENTION_FIELDS = ("index_topk", "index_head_dim", "index_n_heads")


def _check_architecture(hf: dict):
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if "DeepseekV32ForCausalLM" in archs or model_type == "deepseek_v32":
        raise ConfigError(
            f"architectures={archs!r} / model_type={model_type!r}: DeepSeek-V3.2's sparse attention (DSA, a"
            " lightning indexer choosing index_topk keys) is not implemented"
        )
    for key in _SPARSE_ATTENTION_FIELDS:
        if key in hf:
            raise ConfigError(
                f"{key}={hf[key]!r}: DeepSeek-V3.2-style sparse attention (index_* fields) is not implemented"
            )
    if archs:
        if ARCHITECTURE not in archs:
            raise ConfigError(f"architectures={archs!r} is not supported: dwdp_jax implements {ARCHITECTURE}")
    elif model_type != "deepseek_v3":
        raise ConfigError(
            f"config.json has no 'architectures' and model_type={model_type!r}: expected architectures"
            f" [{ARCHITECTURE!r}] or model_type 'deepseek_v3'"
        )


def _read_quantization(quant: dict | None) -> tuple[int, int] | None:
    """The FP8 block shape [out, in] of `quantization_config`, or None for unquantized weights.

    Only DeepSeek's FP8 layout is supported: float8_e4m3fn weights with one float32 `weight_scale_inv` per block,
    activations quantized on the fly (scale_fmt 'ue8m0', DeepSeek-V3.1's power-of-two scales, stores the same
    float32 tensors)."""
    if not quant:
        return None
    method = quant.get("quant_method")
    if method == "compressed-tensors":
        raise ConfigError(
            "quantization_config.quant_method='compressed-tensors' is not supported (e.g. Kimi-K2-Thinking's INT4"
            " pack-quantized weights): dwdp_jax loads FP8 block-scaled ('fp8' + weight_block_size) or unquantized"
            " weights"
        )
    if method != "fp8":
        raise ConfigError(
            f"quantization_config.quant_method={method!r} is not supported: only 'fp8' (e4m3 weights with block"
            " scales, weight_block_size) or no quantization_config"
        )
    checks = (("fmt", "e4m3", ("e4m3",)), ("activation_scheme", "dynamic", ("dynamic",)),
              ("scale_fmt", None, (None, "ue8m0")))
    for key, default, allowed in checks:
        value = quant.get(key, default)
        if value not in allowed:
            raise ConfigError(f"quantization_config.{key}={value!r} is not supported (expected one of {allowed})")
    wbs = quant.get("weight_block_size")
    if (not isinstance(wbs, (list, tuple)) or len(wbs) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in wbs)):
        raise ConfigError(
            f"quantization_config.weight_block_size={wbs!r} is not supported: FP8 needs block scales, [out, in]"
            " (per-tensor or per-channel FP8 is not implemented)"
        )
    return int(wbs[0]), int(wbs[1])


def _read_rope(hf: dict) -> tuple[float, YarnConfig | None]:
    """Reads RoPE from `rope_scaling` (published checkpoints) or `rope_parameters` (transformers 5)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling")
    theta = float(hf.get("rope_theta", 10000.0))
    if not params:
        return theta, None
    theta = float(params.get("rope_theta", theta))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise ConfigError(f"rope_scaling.type={kind!r} is not supported (only 'yarn' or none)")
    if params.get("attention_factor") is not None:
        raise ConfigError("rope_scaling.attention_factor is not supported (DeepSeek derives it from mscale)")
    factor = params.get("factor")
    original = params.get("original_max_position_embeddings")
    if factor is None or original is None:
        raise ConfigError("rope_scaling of type yarn needs 'factor' and 'original_max_position_embeddings'")
    return theta, YarnConfig(
        factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=float(params.get("mscale") or 1.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        truncate=bool(params.get("truncate", True)),
    )


def from_hf_dict(hf: dict, **overrides: Any) -> ModelConfig:
    """Builds a ModelConfig from the dict of an HF `config.json` of the DeepSeek-V3 architecture.

    Raises ConfigError naming the field for anything not implemented (see the comment above)."""
    _check_architecture(hf)
    for key, (expected, why) in _ONLY.items():
        if key in hf and hf[key] is not None and hf[key] != expected:
            raise ConfigError(f"{key}={hf[key]!r} is not supported (expected {expected!r}: {why})")
    num_kv = hf.get("num_key_value_heads")
    if num_kv is not None and num_kv != hf.get("num_attention_heads"):
        raise ConfigError(
            f"num_key_value_heads={num_kv!r} must equal num_attention_heads={hf.get('num_attention_heads')!r} for MLA"
        )
    required = [
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
        "n_routed_experts", "num_experts_per_tok",
    ]
    for key in required:
        if hf.get(key) is None:
            raise ConfigError(f"config.json is missing required field {key!r}")
    theta, yarn = _read_rope(hf)
    block = _read_quantization(hf.get("quantization_config"))
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        moe_intermediate_size=hf["moe_intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        n_routed_experts=hf["n_routed_experts"],
        n_shared_experts=hf.get("n_shared_experts") or 0,
        num_experts_per_tok=hf["num_experts_per_tok"],
        n_group=hf.get("n_group") or 1,
        topk_group=hf.get("topk_group") or 1,
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        first_k_dense_replace=hf.get("first_k_dense_replace") or 0,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=yarn,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        num_mtp_layers=hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0,
        weight_block_size=block,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def from_hf_json(path: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """Reads `config.json` (or the directory holding it)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config.json at {path}")
    with open(path) as f:
        return from_hf_dict(json.load(f), **overrides)


# --------------------------------------------------------------------------------------------------------------
# Presets

TINY = ModelConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_layers=3,
    num_heads=4,
    q_lora_rank=48,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=16,
    v_head_dim=16,
    n_routed_experts=16,
    n_shared_experts=1,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    first_k_dense_replace=1,
    rope_scaling=YarnConfig(factor=4.0, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=1.0),
    max_position_embeddings=512,
    num_mtp_layers=1,
    weight_block_size=None,
)

DEEPSEEK_R1 = ModelConfig()


def preset(name: str) -> ModelConfig:
    """Returns a named preset: `deepseek-r1`, `r1-layers-N` or `tiny`."""
    if name == "deepseek-r1":
        return DEEPSEEK_R1
    if name == "tiny":
        return TINY
    match = re.fullmatch(r"r1-layers-(\d+)", name)
    if match:
        n = int(match.group(1))
        if n < 1:
            raise ConfigError("r1-layers-N needs N >= 1")
        return DEEPSEEK_R1.replace(num_layers=n, first_k_dense_replace=1 if n > 1 else 0, num_mtp_layers=0)
    raise ConfigError(f"unknown preset {name!r}: use 'deepseek-r1', 'r1-layers-N' or 'tiny'")
