"""The engine on a GPU with every FP8 kernel in its path (GPU only; interpret mode would take minutes): a small
model whose linears and experts have 128-multiple dims, so that the FP8 linears (split-K at decode, kv_b in
prefill), the FP8 grouped GEMM experts and the MLA kernels all run, against the same model with every FP8 weight
dequantized and einsum attention. The difference is the FP8 activation quantization (e4m3: 3 mantissa bits,
per token per 128 columns), bounded here at 8% of the logits' scale; greedy tokens may differ on near ties."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwdp_jax.config import TINY
from dwdp_jax.engine.runner import Buckets, ModelRunner
from dwdp_jax.engine.scheduler import DecodeItem, PrefillChunk
from dwdp_jax.experts import LocalExecutor
from dwdp_jax.model import init_model, set_fp8_matmul

pytestmark = pytest.mark.skipif(jax.devices()[0].platform != "gpu", reason="FP8 kernels natively: GPU only")

CFG = TINY.replace(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_layers=2, num_heads=2,
                   q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=128,
                   n_routed_experts=16, num_experts_per_tok=4, weight_block_size=(128, 128), vocab_size=512)


def _logits(fp8_kernels: bool):
    model = init_model(CFG, dtype=jnp.bfloat16)
    set_fp8_matmul(model, "pallas" if fp8_kernels else "dequantize")
    runner = ModelRunner(model, 4, 256, buckets=Buckets((4,), (128,)), attention="pallas" if fp8_kernels else
                         "einsum", executor=LocalExecutor(backend="pallas" if fp8_kernels else "jnp"))
    rng = np.random.RandomState(0)
    prompts = [rng.randint(0, CFG.vocab_size, n).astype(np.int32) for n in (100, 37)]
    first = runner.prefill([PrefillChunk(f"r{i}", i, 0, p, True) for i, p in enumerate(prompts)])
    step = runner.decode([DecodeItem(f"r{i}", i, int(rng.randint(CFG.vocab_size)), len(p))
                          for i, p in enumerate(prompts)])
    return np.asarray(first, np.float32), np.asarray(step, np.float32)


def test_fp8_kernel_engine_matches_the_dequantized_reference():
    got, want = _logits(True), _logits(False)
    for g, w in zip(got, want):
        assert np.abs(g - w).max() / np.abs(w).max() <= 0.08
