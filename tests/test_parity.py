"""Logits parity with HF transformers' DeepseekV3ForCausalLM (float32) on tiny random checkpoints."""

import numpy as np
import jax.numpy as jnp
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import dwdp_jax  # noqa: E402
from tests import hf_fixtures as hf  # noqa: E402

CONFIGS = {
    "qlora-yarn-2groups": {},
    "plain-q-no-yarn-4groups": dict(q_lora_rank=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                    n_group=4, topk_group=2, n_routed_experts=8, num_experts_per_tok=3),
    "yarn-attention-factor-1group": dict(n_group=1, topk_group=1, rope_parameters=dict(hf.YARN, mscale=0.707)),
    "all-moe-unnormalized-topk": dict(first_k_dense_replace=0, norm_topk_prob=False, n_shared_experts=2,
                                      num_experts_per_tok=4, n_routed_experts=16, n_group=4, topk_group=3),
}


def _rel_err(ours, ref):
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_hf(tmp_path, name):
    model = hf.random_hf_model(hf.hf_config(**CONFIGS[name]), seed=len(name))
    path = hf.save_hf(model, str(tmp_path / name))
    ids = np.random.RandomState(1).randint(0, model.config.vocab_size, (2, 20))  # 20 > YaRN's original 16
    ours = np.asarray(dwdp_jax.load_model(path, dtype=jnp.float32)(jnp.asarray(ids)))
    assert _rel_err(ours, hf.hf_logits(model, ids)) <= 1e-4


def test_fp8_checkpoint_matches_dequantized_hf(tmp_path):
    model = hf.random_hf_model(hf.hf_config(), seed=7)
    path = hf.write_fp8_checkpoint(model, str(tmp_path / "fp8"), block=(16, 16))
    ids = np.random.RandomState(2).randint(0, model.config.vocab_size, (2, 12))
    ref = hf.hf_logits(model, ids)
    fp8_model = dwdp_jax.load_model(path, dtype=jnp.float32)
    assert fp8_model.layers[1].mlp.experts.w_gate_up.dtype == jnp.float8_e4m3fn  # kept FP8 with scales
    assert _rel_err(np.asarray(fp8_model(jnp.asarray(ids))), ref) <= 1e-4
    dequantized = dwdp_jax.load_model(path, dtype=jnp.float32, dequantize=True)
    assert dequantized.layers[1].mlp.experts.w_gate_up.dtype == jnp.float32
    assert _rel_err(np.asarray(dequantized(jnp.asarray(ids))), ref) <= 1e-4


def test_routing_matches_hf_router():
    torch = pytest.importorskip("torch")
    from dwdp_jax.routing import route

    model = hf.random_hf_model(hf.hf_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4))
    gate = model.model.layers[1].mlp.gate
    x = np.random.RandomState(3).randn(64, 32).astype(np.float32)
    with torch.no_grad():
        _, w_ref, ids_ref = gate(torch.tensor(x))
    ours_cfg = dwdp_jax.config.from_hf_dict(model.config.to_dict())
    ids, w = route(jnp.asarray(x), jnp.asarray(gate.weight.detach().numpy().T),
                   jnp.asarray(gate.e_score_correction_bias.numpy()), ours_cfg)
    order_ref = np.argsort(ids_ref.numpy(), axis=1)
    order = np.argsort(np.asarray(ids), axis=1)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(ids), order, 1),
                                  np.take_along_axis(ids_ref.numpy(), order_ref, 1))
    np.testing.assert_allclose(np.take_along_axis(np.asarray(w), order, 1),
                               np.take_along_axis(w_ref.numpy(), order_ref, 1), rtol=1e-5)
