"""Every DeepSeek-V3-architecture checkpoint family we serve, as tiny replicas of its published checkpoint
(`hf_fixtures.FAMILIES`: the published config.json's field set, tiny sizes, FP8 or bf16): logits match HF
transformers through `load_model` and through `dwdp-convert` + `load_model(OUT_DIR)`, a DWDP rank restores its
own experts; what we do not implement is refused by name (DeepSeek-V3.2's sparse attention, INT4
compressed-tensors, other quantization methods and routers).

Needs 2 host devices for the per-rank restore (XLA_FLAGS=--xla_force_host_platform_device_count=8 is set here
too, which takes effect when this module is the first to start JAX).
"""

import json
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from dwdp_jax import checkpoint, quant  # noqa: E402
from dwdp_jax import config as C  # noqa: E402
from dwdp_jax.experts import fp8_expert_dims  # noqa: E402

torch = pytest.importorskip("torch")
from dwdp_jax import load_model  # noqa: E402
from tests import convert_util  # noqa: E402
from tests import hf_fixtures as hf  # noqa: E402

FAMILIES = sorted(hf.FAMILIES)


_cli, _flat = convert_util.run_convert_cli, convert_util.flat_params
_assert_same_params, _logits = convert_util.assert_same_params, convert_util.logits_of


# ------------------------------------------------------------------------------------------------- accepted


@pytest.mark.parametrize("name", FAMILIES)
def test_family_loads_converts_restores_and_matches_hf(tmp_path, name):
    published = hf.FAMILIES[name]
    path, reference = hf.write_family_checkpoint(name, str(tmp_path / "hf"), seed=len(name))
    cfg = C.from_hf_json(path)
    quant_cfg = published.get("quantization_config")
    assert cfg.weight_block_size == (tuple(quant_cfg["weight_block_size"]) if quant_cfg else None)
    assert (cfg.n_routed_experts, cfg.n_group, cfg.q_lora_rank) == (
        published["n_routed_experts"], published["n_group"], published["q_lora_rank"])

    direct = load_model(path, dtype=jnp.float32)
    experts = direct.layers[1].mlp.experts
    if quant_cfg:  # FP8 kept, zero-padded to whole blocks
        hidden_pad, inter_pad = fp8_expert_dims(cfg.hidden_size, cfg.moe_intermediate_size, cfg.weight_block_size)
        assert experts.w_gate_up.dtype == jnp.float8_e4m3fn
        assert experts.w_gate_up.shape == (cfg.n_routed_experts, 2 * inter_pad, hidden_pad)
    assert len(direct.mtp) == (1 if name == "deepseek-v3" else 0)  # R1's layout carries its MTP module

    out = tmp_path / "out"
    assert _cli(f"--input={path}", f"--output={out}", "--group_size=2", "--verify") == 0
    converted = load_model(str(out), dtype=jnp.float32)
    _assert_same_params(converted, direct)

    ids = np.random.RandomState(1).randint(0, published["vocab_size"], (2, 20))  # 20 > YaRN's original 16
    got, via_convert = _logits([direct, converted], ids)
    ref = hf.hf_logits(reference, ids)
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-4
    np.testing.assert_array_equal(via_convert, got)

    # DWDP rank 1 restores only its own experts, straight onto its device (without MTP, as the launcher does).
    device = jax.devices()[1]
    expert_ids, n_local = checkpoint.rank_experts(str(out), 1)
    rank = load_model(str(out), dtype=jnp.float32, expert_ids=expert_ids, n_local_experts=n_local, device=device,
                      with_mtp=False)
    for layer in range(cfg.first_k_dense_replace, cfg.num_layers):
        got_e, ref_e = rank.layers[layer].mlp.experts, direct.layers[layer].mlp.experts
        for param in checkpoint.EXPERT_PARAMS:
            if getattr(ref_e, param) is not None:
                np.testing.assert_array_equal(np.asarray(getattr(got_e, param)[...]).view(np.uint8),
                                              np.asarray(getattr(ref_e, param)[...])[expert_ids(layer)].view(np.uint8))
    assert {d for leaf in jax.tree.leaves(nnx.split(rank)[1]) for d in leaf.devices()} == {device}


def test_partial_blocks_bf16_policy_matches_the_dequantizing_loader(tmp_path):
    """128x128 blocks on hidden 192 / moe_intermediate 96: the bf16 policy dequantizes partial blocks exactly."""
    path, _ = hf.write_family_checkpoint("tiny-random-fp8", str(tmp_path / "hf"))
    out = tmp_path / "out"
    assert _cli(f"--input={path}", f"--output={out}", "--dtype_policy=bf16", "--group_size=2", "--verify") == 0
    _assert_same_params(load_model(str(out), dtype=jnp.bfloat16),
                        load_model(path, dtype=jnp.bfloat16, dequantize=True))


def _full_size(name: str, **sizes) -> dict:
    return dict(hf.FAMILIES[name], **sizes)


R1_SIZES = dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
                num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_group=8,
                topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3, vocab_size=129280,
                max_position_embeddings=163840,
                quantization_config=dict(hf.FAMILIES["deepseek-v3"]["quantization_config"], weight_block_size=[128, 128]))


@pytest.mark.parametrize("name, sizes, expected", [
    ("deepseek-v3", R1_SIZES, dict(n_routed_experts=256, n_group=8, num_mtp_layers=1, routed_scaling_factor=2.5)),
    ("kimi-k2", dict(R1_SIZES, num_attention_heads=64, num_key_value_heads=64, n_routed_experts=384, n_group=1,
                     topk_group=1, first_k_dense_replace=1, vocab_size=163840, max_position_embeddings=131072),
     dict(n_routed_experts=384, n_group=1, num_heads=64, num_mtp_layers=0, rope_theta=50000.0)),
    ("moonlight", dict(hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408, num_hidden_layers=27,
                       num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, qk_nope_head_dim=128,
                       qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, num_experts_per_tok=6,
                       vocab_size=163840),
     dict(q_lora_rank=None, weight_block_size=None, n_shared_experts=2, rope_scaling=None)),
])
def test_full_size_published_configs_parse(name, sizes, expected):
    cfg = C.from_hf_dict(_full_size(name, **sizes))
    for field, value in expected.items():
        assert getattr(cfg, field) == value, field
    if cfg.weight_block_size:  # R1 and Kimi-K2: experts are whole 128x128 blocks, nothing padded
        assert fp8_expert_dims(cfg.hidden_size, cfg.moe_intermediate_size, cfg.weight_block_size) == (7168, 2048)


# ------------------------------------------------------------------------------------------------- refused

V3 = hf.FAMILIES["deepseek-v3"]
COMPRESSED_TENSORS_INT4 = {  # Kimi-K2-Thinking's quantization_config
    "config_groups": {"group_0": {"input_activations": None, "output_activations": None, "targets": ["Linear"],
                                  "weights": {"actorder": None, "block_structure": None, "dynamic": False,
                                              "group_size": 32, "num_bits": 4, "observer": "minmax",
                                              "observer_kwargs": {}, "strategy": "group", "symmetric": True,
                                              "type": "int"}}},
    "format": "pack-quantized", "ignore": ["lm_head"], "kv_cache_scheme": None,
    "quant_method": "compressed-tensors", "quantization_status": "compressed",
}
REFUSED = {
    "deepseek-v3.2": (dict(architectures=["DeepseekV32ForCausalLM"], model_type="deepseek_v32", index_head_dim=128,
                           index_n_heads=64, index_topk=2048), "DeepSeek-V3.2"),
    "index-fields": (dict(index_topk=2048), "index_topk=2048"),
    "kimi-k2-thinking-int4": (dict(model_type="kimi_k2", quantization_config=COMPRESSED_TENSORS_INT4),
                              "quant_method='compressed-tensors'"),
    "awq": (dict(quantization_config={"quant_method": "awq", "bits": 4}), "quant_method='awq'"),
    "fp8-per-tensor": (dict(quantization_config={"quant_method": "fp8", "activation_scheme": "dynamic"}),
                       "weight_block_size=None"),
    "fp8-static-activations": (dict(quantization_config=dict(V3["quantization_config"], activation_scheme="static")),
                               "activation_scheme='static'"),
    "fp8-e5m2": (dict(quantization_config=dict(V3["quantization_config"], fmt="e5m2")), "fmt='e5m2'"),
    "greedy-router": (dict(topk_method="group_limited_greedy"), "topk_method='group_limited_greedy'"),
    "softmax-router": (dict(scoring_func="softmax"), "scoring_func='softmax'"),
    "moe-every-other-layer": (dict(moe_layer_freq=2), "moe_layer_freq=2"),
    "deepseek-v2": (dict(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2"), "DeepseekV2ForCausalLM"),
    "unknown-model-type": (dict(architectures=None, model_type="mixtral"), "model_type='mixtral'"),
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_unsupported_configs_are_refused_by_name(kind):
    changes, message = REFUSED[kind]
    with pytest.raises(C.ConfigError) as info:
        C.from_hf_dict(dict(V3, **changes))
    assert message in str(info.value)


@pytest.mark.parametrize("kind", ["deepseek-v3.2", "kimi-k2-thinking-int4"])
def test_loader_and_converter_refuse_by_name(tmp_path, capsys, kind):
    src = tmp_path / "hf"
    path, _ = hf.write_family_checkpoint("kimi-k2", str(src))
    changes, message = REFUSED[kind]
    (src / "config.json").write_text(json.dumps(dict(hf.FAMILIES["kimi-k2"], **changes)))
    with pytest.raises(C.ConfigError) as info:
        load_model(path)
    assert message in str(info.value)
    out = tmp_path / "out"
    assert _cli(f"--input={path}", f"--output={out}") == 1
    assert message in capsys.readouterr().err and not os.path.exists(out)


# ------------------------------------------------------------------------------------------------- numpy helpers


@pytest.mark.parametrize("shapes, block", [
    ([(576, 300)], (128, 128)), ([(24, 48)], (16, 16)), ([(5, 3)], (128, 128)), ([(70, 100)], (32, 16)),
    ([(256, 384)], (128, 128)), ([(100, 72)], (24, 8)),  # whole groups of 8 columns: the grouped transpose
    ([(256, 384), (256, 384)], (128, 128)), ([(100, 72), (36, 72)], (24, 8)), ([(5, 3), (7, 3)], (4, 2)),
])
def test_numpy_dequantization_is_bit_exact(shapes, block):
    """The converter's table dequantization equals value * scale in float32 rounded once, for every e4m3 byte
    (NaN and subnormals included), partial last blocks, both output dtypes, transposed or not, into a slice of a
    wider array or not; a list of matrices (an expert's gate and up) gives the result of their concatenation."""
    rng = np.random.default_rng(0)
    values, scales, wants = [], [], {}
    for shape in shapes:
        value = rng.integers(0, 256, shape, dtype=np.uint8)
        n = min(256, value.size)
        value.reshape(-1)[:n] = np.arange(n)  # every byte (where there is room)
        values.append(value.view(ml_dtypes.float8_e4m3fn))
        scales.append(rng.uniform(1e-4, 1e-1, (-(-shape[0] // block[0]), -(-shape[1] // block[1]))).astype(np.float32))
        full = np.repeat(np.repeat(scales[-1], block[0], 0), block[1], 1)[: shape[0], : shape[1]]
        for dtype in (ml_dtypes.bfloat16, np.float32):
            wants.setdefault(dtype, []).append((values[-1].astype(np.float32) * full).astype(dtype))
    value, scale = (values, scales) if len(shapes) > 1 else (values[0], scales[0])
    for dtype, bits in ((ml_dtypes.bfloat16, np.uint16), (np.float32, np.uint32)):
        want = np.concatenate(wants[dtype])
        got = quant.dequantize_np(value, scale, block, dtype)
        np.testing.assert_array_equal(got.view(bits), want.view(bits))
        got_t = quant.dequantize_np(value, scale, block, dtype, transpose=True)
        np.testing.assert_array_equal(got_t.view(bits), np.ascontiguousarray(want.T).view(bits))
        wide = np.zeros((want.shape[1], want.shape[0] + 5), dtype)
        quant.dequantize_np(value, scale, block, dtype, transpose=True, out=wide[:, 2 : 2 + want.shape[0]])
        np.testing.assert_array_equal(wide[:, 2 : 2 + want.shape[0]].view(bits),
                                      np.ascontiguousarray(want.T).view(bits))
        assert not wide[:, :2].view(bits).any() and not wide[:, 2 + want.shape[0] :].view(bits).any()
    for dtype in (np.uint8, np.uint16, np.float32, ml_dtypes.bfloat16):
        a = rng.integers(0, 200, shapes[0]).astype(dtype)
        np.testing.assert_array_equal(quant.transpose_np(a), a.T)
        wide = np.zeros((a.shape[1], a.shape[0] + 3), dtype)
        quant.transpose_np(a, wide[:, 1 : 1 + a.shape[0]])
        np.testing.assert_array_equal(wide[:, 1 : 1 + a.shape[0]], a.T)
        assert not wide[:, 0].any() and not wide[:, 1 + a.shape[0] :].any()


def test_padded_fp8_experts_keep_the_kernel_tiles_aligned():
    """hidden 192 / moe_intermediate 96 with 128x128 blocks: the experts are stored as [E, 256, 256] and
    [E, 256, 128] with zero padding; the jnp path is exact, and the Pallas path (its kernels in interpret mode,
    which refuse dims that are not whole 128-blocks) quantizes the activations to e4m3 (~4% error on random data;
    a wrong padding or slice would be O(1)) and drops the padded columns."""
    from dwdp_jax.experts import LocalExecutor, dense_reference
    from dwdp_jax.model import RoutedExperts

    experts = RoutedExperts(8, 192, 96, rngs=nnx.Rngs(0), dtype=jnp.float32, block=(128, 128)).weights()
    assert experts.w_gate_up.shape == (8, 256, 256) and experts.w_down.shape == (8, 256, 128)
    assert experts.s_gate_up.shape == (8, 2, 2) and experts.s_down.shape == (8, 2, 1)
    w_down = np.asarray(experts.w_down, np.float32)
    assert not w_down[:, 192:].any() and not w_down[:, :, 96:].any() and w_down[:, :192, :96].any()
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(12, 192), jnp.float32)
    ids = jnp.asarray(rng.randint(0, 8, (12, 2)), jnp.int32)
    weights = jnp.asarray(rng.rand(12, 2), jnp.float32)
    ref = np.asarray(dense_reference(x, ids, weights, experts))
    # under jit, as the model calls them (one compile each, not one per op of an eager call)
    run = lambda backend: jax.jit(LocalExecutor(backend=backend))(x, ids, weights, experts)  # noqa: E731
    jnp_path = np.asarray(run("jnp"))
    pallas_path = np.asarray(run("pallas_interpret"), np.float32)
    assert jnp_path.shape == pallas_path.shape == (12, 192)
    assert np.abs(jnp_path - ref).max() / np.abs(ref).max() <= 1e-5
    assert np.linalg.norm(pallas_path - ref) / np.linalg.norm(ref) <= 6e-2
