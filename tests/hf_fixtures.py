"""Tiny random DeepSeek-V3 checkpoints written with HF transformers (test-only: imports torch)."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from dwdp_jax.quant import quantize_blocks_np

YARN = {
    "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
    "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0,
}
BASE = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, n_group=2,
    topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
    qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=8, max_position_embeddings=128, routed_scaling_factor=2.5,
    norm_topk_prob=True, rope_parameters=YARN, initializer_range=0.1, tie_word_embeddings=False,
)


def hf_config(**overrides) -> DeepseekV3Config:
    fields = dict(BASE)
    fields.update(overrides)
    return DeepseekV3Config(**fields)


def random_hf_model(cfg: DeepseekV3Config, seed: int = 0) -> DeepseekV3ForCausalLM:
    """HF model with random weights, non-trivial norms and a nonzero correction bias (so routing is not trivial)."""
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn_like(b))
    return model


def save_hf(model: DeepseekV3ForCausalLM, path: str) -> str:
    model.save_pretrained(path)
    return path


def _expand(scale: np.ndarray, shape: tuple, block) -> np.ndarray:
    """Block scales [ceil(out/bo), ceil(in/bi)] -> one per element [out, in] (partial last blocks cut)."""
    return np.repeat(np.repeat(scale, block[0], 0), block[1], 1)[: shape[0], : shape[1]]


QUANTIZE_SKIP = ("embed_tokens", "lm_head", "norm", "mlp.gate.", "shared_head.head")


def quantize_tensors(tensors: dict, block, pow2_scales: bool = False) -> tuple[dict, dict]:
    """The published FP8 layout of float tensors: every 2-D linear weight except QUANTIZE_SKIP as float8_e4m3fn
    [out, in] with a float32 `weight_scale_inv` [ceil(out/bo), ceil(in/bi)] (pow2_scales: powers of two, as
    DeepSeek-V3.1's `scale_fmt: ue8m0`). Returns (tensors to save, {name: dequantized float32 weight})."""
    out, dequantized = {}, {}
    for name, t in tensors.items():
        if not (name.endswith(".weight") and t.ndim == 2 and not any(s in name for s in QUANTIZE_SKIP)):
            out[name] = t
            continue
        w = t.float().numpy()
        value, scale = quantize_blocks_np(w, block)
        if pow2_scales:
            scale = np.exp2(np.ceil(np.log2(scale))).astype(np.float32)
            value = (w / _expand(scale, w.shape, block)).astype(value.dtype)
        out[name] = torch.from_numpy(value.view(np.uint8).copy()).view(torch.float8_e4m3fn)
        out[name[: -len("weight")] + "weight_scale_inv"] = torch.from_numpy(scale)
        dequantized[name] = torch.from_numpy(value.astype(np.float32) * _expand(scale, w.shape, block))
    return out, dequantized


def write_fp8_checkpoint(model: DeepseekV3ForCausalLM, path: str, block=(16, 16)) -> str:
    """Saves `model` in the published FP8 layout: every linear weight of attention, MLPs and experts as
    float8_e4m3fn [out, in] with `weight_scale_inv` [out/bo, in/bi]; embeddings, norms, router, LM head as is.
    Returns the path. The model's own weights are replaced by their dequantized values, so the HF model is the
    exact float reference for the FP8 checkpoint."""
    model.save_pretrained(path)
    weights_path = os.path.join(path, "model.safetensors")
    out, dequantized = quantize_tensors(load_file(weights_path), block)
    save_file(out, weights_path, metadata={"format": "pt"})
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    state = model.state_dict()
    with torch.no_grad():
        for name, value in dequantized.items():
            _assign(model, state, name, value)
    return path


def _assign(model, state, name, value):
    """Copies a per-expert HF checkpoint tensor into the (possibly fused) in-memory parameter."""
    if name in state:
        state[name].copy_(value)
        return
    # transformers 5 fuses experts in memory: mlp.experts.{e}.{gate,up,down}_proj.weight -> gate_up_proj/down_proj
    prefix, rest = name.split(".mlp.experts.")
    e, matrix, _ = rest.split(".")
    e = int(e)
    if matrix == "down_proj":
        state[f"{prefix}.mlp.experts.down_proj"][e].copy_(value)
    else:
        fused = state[f"{prefix}.mlp.experts.gate_up_proj"][e]
        inter = fused.shape[0] // 2
        (fused[:inter] if matrix == "gate_proj" else fused[inter:]).copy_(value)


def hf_logits(model: DeepseekV3ForCausalLM, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


# ------------------------------------------------------------------------------------------------------ families
# Tiny replicas of the published config.json of each DeepseekV3ForCausalLM family: the same field set as the
# published file (values of the real model where they are not sizes), tiny sizes.

_AUTO_MAP = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
             "AutoModel": "modeling_deepseek.DeepseekV3Model",
             "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
_FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [16, 16]}

# DeepSeek-V3 / V3-0324 / R1 / R1-0528 (one field set). Tiny sizes chosen as R1's partial blocks: kv_a_proj_with_mqa
# has kv_lora + rope = 24 rows (R1: 576 = 4.5 blocks), q_lora_rank 24, moe_intermediate 24 (padded to 32).
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": _AUTO_MAP, "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1,
    "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 48, "initializer_range": 0.02,
    "intermediate_size": 40, "kv_lora_rank": 16, "max_position_embeddings": 640, "model_type": "deepseek_v3",
    "moe_intermediate_size": 24, "moe_layer_freq": 1, "n_group": 4, "n_routed_experts": 8, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 4, "num_experts_per_tok": 3, "num_hidden_layers": 2,
    "num_key_value_heads": 4, "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 24,
    "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "quantization_config": _FP8, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 16, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 2, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3", "use_cache": True, "v_head_dim": 12, "vocab_size": 96,
}
FAMILIES = {
    "deepseek-v3": DEEPSEEK_V3,
    # V3.1: power-of-two (UE8M0) block scales, still stored as float32 weight_scale_inv.
    "deepseek-v3.1": dict(DEEPSEEK_V3, num_nextn_predict_layers=1, quantization_config=dict(_FP8, scale_fmt="ue8m0"),
                          transformers_version="4.44.2"),
    # Kimi-K2-Instruct: model_type of its own, one expert group (384 experts), 64 heads, rope theta 50000 with
    # YaRN beta_fast 1, no MTP. Tiny sizes all block multiples (no padding).
    "kimi-k2": {
        "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": _AUTO_MAP, "aux_loss_alpha": 0.001, "bos_token_id": 163584, "eos_token_id": 163585,
        "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02,
        "intermediate_size": 48, "kv_lora_rank": 16, "max_position_embeddings": 512, "model_type": "kimi_k2",
        "moe_intermediate_size": 16, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 12,
        "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 2, "num_experts_per_tok": 4,
        "num_hidden_layers": 2, "num_key_value_heads": 2, "num_nextn_predict_layers": 0, "pretraining_tp": 1,
        "q_lora_rank": 32, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "quantization_config": _FP8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 16, "type": "yarn"},
        "rope_theta": 50000.0, "routed_scaling_factor": 2.827, "scoring_func": "sigmoid", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 1, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
        "transformers_version": "4.48.3", "use_cache": True, "v_head_dim": 16, "vocab_size": 96,
    },
    # Moonlight-16B-A3B: bf16, no q compression, no rope scaling, one expert group, 2 shared experts.
    "moonlight": {
        "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": _AUTO_MAP, "aux_loss_alpha": 0.001, "bos_token_id": 163584, "eos_token_id": 163585,
        "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02,
        "intermediate_size": 44, "kv_lora_rank": 16, "max_position_embeddings": 8192, "model_type": "deepseek_v3",
        "moe_intermediate_size": 12, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 8,
        "n_shared_experts": 2, "norm_topk_prob": True, "num_attention_heads": 4, "num_experts_per_tok": 3,
        "num_hidden_layers": 2, "num_key_value_heads": 4, "pretraining_tp": 1, "q_lora_rank": None,
        "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "rope_theta": 50000.0, "routed_scaling_factor": 2.446, "scoring_func": "sigmoid", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 1, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
        "transformers_version": "4.46.3", "use_cache": True, "v_head_dim": 8, "vocab_size": 96,
    },
    # Tiny random FP8 checkpoints as projects use in CI: DeepSeek's 128x128 blocks on dimensions that are not
    # multiples of 128 (hidden 192 = 1.5 blocks; moe_intermediate 96 < one block, padded to 128).
    "tiny-random-fp8": dict(
        DEEPSEEK_V3, hidden_size=192, intermediate_size=160, moe_intermediate_size=96, num_attention_heads=2,
        num_key_value_heads=2, q_lora_rank=40, kv_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, n_group=2, topk_group=1, num_experts_per_tok=2, num_nextn_predict_layers=0,
        quantization_config=dict(_FP8, weight_block_size=[128, 128]),
    ),
}
_HF_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "n_shared_experts", "n_routed_experts", "routed_scaling_factor",
    "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "n_group", "topk_group",
    "num_experts_per_tok", "first_k_dense_replace", "norm_topk_prob", "hidden_act", "max_position_embeddings",
    "rms_norm_eps", "tie_word_embeddings", "attention_bias",
)


def reference_config(published: dict, **overrides) -> DeepseekV3Config:
    """The transformers config of the model a published config.json describes (the parity reference; its
    random init uses a larger std than the published one so that tiny models are not near-constant)."""
    fields = {k: published[k] for k in _HF_FIELDS if k in published}
    rope = dict(published.get("rope_scaling") or {"type": "default"})
    rope["rope_type"] = rope.pop("type")
    rope["rope_theta"] = float(published.get("rope_theta", 10000.0))
    fields.update(rope_parameters=rope, initializer_range=0.1, num_mtp_layers=0)
    fields.update(overrides)
    return DeepseekV3Config(**fields)


def write_family_checkpoint(name: str, path: str, seed: int = 0) -> tuple[str, DeepseekV3ForCausalLM]:
    """Writes a tiny checkpoint of family `name` in its published layout: the published config.json (FAMILIES);
    FP8 weights with float32 block scales, or bf16; two shards with an index; an MTP module after the decoder
    layers when num_nextn_predict_layers > 0 and the family is 'deepseek-v3' (R1's layer 61: a decoder layer plus
    enorm, hnorm, FP8 eh_proj, shared_head and its copy of the embedding).

    Returns (path, reference): the HF float32 model holding exactly the checkpoint's (dequantized) weights."""
    published = FAMILIES[name]
    layers = published["num_hidden_layers"]
    mtp = name == "deepseek-v3" and published.get("num_nextn_predict_layers", 0) > 0
    full = random_hf_model(reference_config(published, num_hidden_layers=layers + mtp), seed)
    os.makedirs(path)
    tensors = {n: t.contiguous() for n, t in full.state_dict().items()}
    tensors = _per_expert(tensors)
    if mtp:
        g = torch.Generator().manual_seed(seed)
        d = published["hidden_size"]
        prefix = f"model.layers.{layers}."
        tensors.update({
            prefix + "enorm.weight": 1 + 0.1 * torch.randn(d, generator=g),
            prefix + "hnorm.weight": 1 + 0.1 * torch.randn(d, generator=g),
            prefix + "eh_proj.weight": 0.1 * torch.randn(d, 2 * d, generator=g),
            prefix + "shared_head.norm.weight": 1 + 0.1 * torch.randn(d, generator=g),
            prefix + "shared_head.head.weight": 0.1 * torch.randn(published["vocab_size"], d, generator=g),
            prefix + "embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
        })
    quant = published.get("quantization_config")
    if quant:
        tensors, dequantized = quantize_tensors(tensors, quant["weight_block_size"], quant.get("scale_fmt") == "ue8m0")
    else:
        tensors = {n: t.to(torch.bfloat16) if t.is_floating_point() and "e_score" not in n else t
                   for n, t in tensors.items()}
        dequantized = {n: t.float() for n, t in tensors.items() if t.dtype == torch.bfloat16}
    state = full.state_dict()
    with torch.no_grad():
        for n, value in dequantized.items():
            if not n.startswith(f"model.layers.{layers}."):
                _assign(full, state, n, value)
    reference = DeepseekV3ForCausalLM(reference_config(published)).eval()
    reference.load_state_dict({n: t for n, t in full.state_dict().items() if not n.startswith(f"model.layers.{layers}.")})
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, os.path.join(path, shard), metadata={"format": "pt"})
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(published, f, indent=2)
    return path, reference


def _per_expert(state: dict) -> dict:
    """transformers' in-memory fused experts (gate_up_proj [E, 2I, H], down_proj [E, H, I]) as the checkpoint's
    per-expert tensors (mlp.experts.{e}.{gate,up,down}_proj.weight)."""
    out = {}
    for name, t in state.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = t[e, :inter].contiguous()
                out[f"{prefix}{e}.up_proj.weight"] = t[e, inter:].contiguous()
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e].contiguous()
        else:
            out[name] = t
    return out
