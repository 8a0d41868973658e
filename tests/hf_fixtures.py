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


def write_fp8_checkpoint(model: DeepseekV3ForCausalLM, path: str, block=(16, 16)) -> str:
    """Saves `model` in the published FP8 layout: every linear weight of attention, MLPs and experts as
    float8_e4m3fn [out, in] with `weight_scale_inv` [out/bo, in/bi]; embeddings, norms, router, LM head as is.
    Returns the path. The model's own weights are replaced by their dequantized values, so the HF model is the
    exact float reference for the FP8 checkpoint."""
    model.save_pretrained(path)
    weights_path = os.path.join(path, "model.safetensors")
    tensors = load_file(weights_path)
    out = {}
    skip = ("embed_tokens", "lm_head", "norm", "mlp.gate.")
    for name, t in tensors.items():
        if name.endswith(".weight") and t.ndim == 2 and not any(s in name for s in skip):
            value, scale = quantize_blocks_np(t.float().numpy(), block)
            out[name] = torch.from_numpy(value.view(np.uint8).copy()).view(torch.float8_e4m3fn)
            out[name[: -len("weight")] + "weight_scale_inv"] = torch.from_numpy(scale)
        else:
            out[name] = t
    save_file(out, weights_path, metadata={"format": "pt"})
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    dequantized = {}
    for name, t in out.items():
        if t.dtype == torch.float8_e4m3fn:
            scale = out[name[: -len("weight")] + "weight_scale_inv"]
            full = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[: t.shape[0], : t.shape[1]]
            dequantized[name] = t.float() * full
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
