"""Roofline accounting against hand-computed numbers of the tiny config, and against the model's own arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from dwdp_jax.config import TINY, preset
from dwdp_jax.engine import roofline
from dwdp_jax.model import init_model

# TINY: hidden 64, dense inter 128, expert inter 32, 3 layers (1 dense + 2 MoE), 4 heads, q_lora 48,
# kv_lora 32, nope/rope/v head dims 16/16/16, 16 routed experts, top-4, 1 shared expert, vocab 256, no FP8.
ATTN_PARAMS = 64 * 48 + 48 * 4 * 32 + 64 * (32 + 16) + 32 * 4 * (16 + 16) + 4 * 16 * 64  # = 20480
DENSE_PARAMS = 3 * 64 * 128  # = 24576
ROUTER_PARAMS, SHARED_PARAMS, EXPERT_PARAMS = 64 * 16, 3 * 64 * 32, 3 * 64 * 32


def test_hand_counts_are_what_the_constants_say():
    assert (ATTN_PARAMS, DENSE_PARAMS, ROUTER_PARAMS, SHARED_PARAMS) == (20480, 24576, 1024, 6144)


def test_token_matmul_flops():
    dense = 2 * (ATTN_PARAMS + DENSE_PARAMS) + 2 * 2 * (ATTN_PARAMS + ROUTER_PARAMS + SHARED_PARAMS)
    routed = 2 * 2 * 4 * EXPERT_PARAMS  # 2 MoE layers x top-4
    assert (dense, routed) == (200704, 98304)
    assert roofline.token_matmul_flops(TINY, routed_fp8=True) == roofline.Flops(bf16=200704, fp8=98304)
    assert roofline.token_matmul_flops(TINY, routed_fp8=False) == roofline.Flops(bf16=299008, fp8=0)


def test_attention_core_is_causal():
    per_pair = 3 * 2 * 4 * (32 + 16)  # layers x 2 x heads x (qk_head_dim + v_head_dim) = 1152
    assert roofline.attention_core_flops(TINY, 0, 8) == per_pair * 36  # 1 + 2 + ... + 8 keys
    assert roofline.attention_core_flops(TINY, 8, 4) == per_pair * (9 + 10 + 11 + 12)
    with pytest.raises(ValueError, match="length >= 1"):
        roofline.attention_core_flops(TINY, 0, 0)


def test_prefill_flops_of_two_chunks():
    """A first chunk of 8 tokens and a second of 4 after 8 cached ones: each row's LM head once."""
    got = roofline.prefill_flops(TINY, [(0, 8), (8, 4)], routed_fp8=True)
    head = 2 * 64 * 256
    assert got.fp8 == 98304 * 12
    assert got.bf16 == 200704 * 12 + 1152 * (36 + 42) + 2 * head == 2563840
    unsplit = roofline.prefill_flops(TINY, [(0, 8), (8, 4)], routed_fp8=False)
    assert unsplit.fp8 == 0 and unsplit.total == got.total


def test_mixed_peak():
    f = roofline.Flops(bf16=300, fp8=100)
    assert f.ideal_time_s(100.0, 200.0) == pytest.approx(3.5)
    assert f.mixed_peak_flops(100.0, 200.0) == pytest.approx(400 / 3.5)
    with pytest.raises(ValueError, match="positive"):
        f.ideal_time_s(0.0, 1.0)


def test_decode_bytes_by_hand():
    b = roofline.decode_bytes(TINY, batch=2, context_tokens=20, distinct_experts=[5, 8], itemsize=2)
    assert b.embedding == 2 * 64 * 2
    assert b.attention == 3 * ATTN_PARAMS * 2 == 122880
    assert b.dense_mlp == DENSE_PARAMS * 2
    assert b.moe_nonrouted == 2 * (ROUTER_PARAMS * 4 + SHARED_PARAMS * 2)  # router in float32
    assert b.small == 4 * ((2 * 64 + 48 + 32) + 2 * (2 * 64 + 48 + 32 + 16))  # norms, + bias in MoE layers
    assert b.routed_experts == 13 * EXPERT_PARAMS * 2
    assert b.kv_cache == 20 * 3 * (32 + 16) * 2
    assert b.lm_head == 64 * 4 + 64 * 256 * 2
    assert b.total == 406208 and b.as_dict()["total"] == b.total


def test_decode_bytes_rejects_bad_expert_counts():
    with pytest.raises(ValueError, match="distinct_experts has 1 entries"):
        roofline.decode_bytes(TINY, 2, 20, [5])
    with pytest.raises(ValueError, match="outside"):
        roofline.decode_bytes(TINY, 1, 20, [5, 1])  # one token selects at most top-k = 4 experts
    with pytest.raises(ValueError, match="context_tokens >= batch"):
        roofline.decode_bytes(TINY, 4, 2, [1, 1])


def test_r1_fp8_expert_bytes():
    cfg = preset("r1-layers-4")
    scales = (4096 // 128) * (7168 // 128) + (7168 // 128) * (2048 // 128)
    assert roofline.routed_expert_bytes(cfg, 2) == 3 * 7168 * 2048 + 4 * scales == 44050944


def _state_bytes(model) -> int:
    _, state = nnx.split(model)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))


@pytest.mark.parametrize("block", [None, (16, 16)])
def test_model_bytes_match_init_model(block):
    """The accounting mirrors the model's parameters: bf16 weights, or FP8 linears and experts with scales."""
    cfg = TINY.replace(num_mtp_layers=0, weight_block_size=block)
    model = nnx.eval_shape(lambda: init_model(cfg, dtype=jnp.bfloat16))
    assert roofline.model_bytes(cfg, 2) == _state_bytes(model)
