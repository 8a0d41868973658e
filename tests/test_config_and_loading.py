"""Config validation, presets, routing variants, checkpoint errors and the MTP module."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwdp_jax import config as C
from dwdp_jax.routing import route, router_logits


def test_presets():
    r1 = C.preset("deepseek-r1")
    assert (r1.num_layers, r1.n_routed_experts, r1.hidden_size, r1.weight_block_size) == (61, 256, 7168, (128, 128))
    assert abs(r1.softmax_scale / 192**-0.5 - 1.874) < 1e-3  # YaRN mscale^2 on 1/sqrt(192)
    small = C.preset("r1-layers-4")
    assert small.num_layers == 4 and small.num_moe_layers == 3 and small.hidden_size == 7168
    assert C.preset("tiny").hidden_size == 64
    with pytest.raises(C.ConfigError, match="unknown preset"):
        C.preset("r2")


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(n_routed_experts=10, n_group=4), "n_group"),
        (dict(topk_group=5, n_group=4), "topk_group"),
        (dict(num_experts_per_tok=9, n_group=4, topk_group=1, n_routed_experts=16), "num_experts_per_tok"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
        (dict(first_k_dense_replace=5, num_layers=3), "first_k_dense_replace"),
        (dict(group_mask_fill="nan"), "group_mask_fill"),
    ],
)
def test_invalid_config_names_the_field(changes, field):
    with pytest.raises(C.ConfigError, match=field):
        C.TINY.replace(**changes)


def _hf_dict(**changes):
    d = {
        "model_type": "deepseek_v3", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
        "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "kv_lora_rank": 16, "q_lora_rank": None, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
    }
    d.update(changes)
    return d


def test_hf_config_reads_rope_scaling_and_rope_parameters():
    old = C.from_hf_dict(_hf_dict())
    new_style = _hf_dict(rope_parameters=dict(_hf_dict()["rope_scaling"], rope_type="yarn", rope_theta=10000.0))
    del new_style["rope_scaling"]
    new = C.from_hf_dict(new_style)
    assert old.rope_scaling == new.rope_scaling and old.rope_scaling.factor == 40
    assert old.weight_block_size == (128, 128) and old.q_lora_rank is None


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(scoring_func="softmax"), "scoring_func"),
        (dict(rope_scaling={"type": "linear", "factor": 2}), "rope_scaling"),
        (dict(vocab_size=None), "vocab_size"),
        (dict(num_key_value_heads=2), "num_key_value_heads"),
        (dict(quantization_config={"quant_method": "fp8", "fmt": "e4m3"}), "weight_block_size"),
    ],
)
def test_bad_hf_config_names_the_field(changes, message):
    with pytest.raises(C.ConfigError, match=message):
        C.from_hf_dict(_hf_dict(**changes))


def _route_numpy(x, router, bias, cfg):
    """Independent numpy implementation of DeepSeek's routing (either group-mask fill)."""
    scores = 1 / (1 + np.exp(-(x @ router)))
    biased = scores + bias
    t, e = biased.shape
    grouped = biased.reshape(t, cfg.n_group, -1)
    gscore = np.sort(grouped, axis=-1)[..., -2:].sum(-1)
    keep = np.zeros_like(gscore, bool)
    np.put_along_axis(keep, np.argsort(-gscore, axis=1)[:, : cfg.topk_group], True, axis=1)
    fill = -np.inf if cfg.group_mask_fill == "neg_inf" else 0.0
    masked = np.where(np.repeat(keep, e // cfg.n_group, axis=1), biased, fill)
    ids = np.argsort(-masked, axis=1, kind="stable")[:, : cfg.num_experts_per_tok]
    return np.sort(ids, axis=1)


@pytest.mark.parametrize("x_dtype, w_dtype", [(jnp.bfloat16, jnp.float32), (jnp.float32, jnp.float32),
                                             (jnp.bfloat16, jnp.bfloat16)])
def test_router_logits_have_float32_accuracy(x_dtype, w_dtype):
    """router_logits (bf16 products, f32 accumulation) against the float64 product: within 2^-15 of
    sum |x| |w| for every dtype mix (exact products when both are bf16), where one bf16 pass errs ~2^-8."""
    rng = np.random.RandomState(1)
    x = jnp.asarray(rng.randn(64, 512), x_dtype)
    w = jnp.asarray(rng.randn(512, 32) * 0.05, w_dtype)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    exact, scale = x64 @ w64, np.abs(x64) @ np.abs(w64)
    err = np.abs(np.asarray(router_logits(x, w), np.float64) - exact) / scale
    assert err.max() < 2.0**-15
    one_pass = jnp.dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    if x_dtype != jnp.bfloat16 or w_dtype != jnp.bfloat16:
        assert (np.abs(np.asarray(one_pass, np.float64) - exact) / scale).max() > 2.0**-12


def test_group_mask_fill_variants():
    cfg = C.TINY.replace(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3)
    rng = np.random.RandomState(0)
    x = rng.randn(256, cfg.hidden_size).astype(np.float32)
    router = rng.randn(cfg.hidden_size, 16).astype(np.float32) * 0.3
    bias = np.full(16, -1.5, np.float32)  # biased scores all < 0: the fill value decides the choice
    results = {}
    for fill in ("neg_inf", "zero"):
        c = cfg.replace(group_mask_fill=fill)
        ids, _ = route(jnp.asarray(x), jnp.asarray(router), jnp.asarray(bias), c)
        ours = np.sort(np.asarray(ids), axis=1)
        np.testing.assert_array_equal(ours, _route_numpy(x, router, bias, c))
        results[fill] = ours
    assert (results["neg_inf"] != results["zero"]).any()
    # With -inf, the chosen experts come from at most topk_group=2 groups.
    assert max(len(set(row)) for row in (results["neg_inf"] // 4).tolist()) <= 2


# ---------------------------------------------------------------------------------------------- checkpoint errors

torch = pytest.importorskip("torch")
from tests import hf_fixtures as hf  # noqa: E402
from dwdp_jax import load_model  # noqa: E402
from dwdp_jax.safetensors_io import CheckpointError  # noqa: E402


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    model = hf.random_hf_model(hf.hf_config(num_hidden_layers=2))
    return hf.save_hf(model, str(tmp_path_factory.mktemp("ckpt") / "m")), model


def _rewrite(src, dst, edit):
    from safetensors.numpy import save_file  # float32 tiny checkpoint: numpy is enough
    from dwdp_jax.safetensors_io import CheckpointDir

    shutil.copytree(src, dst)
    ckpt = CheckpointDir(dst)
    tensors = {n: np.array(ckpt.read(n)) for n in ckpt.names()}
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))


def test_missing_tensor_is_named(tiny_ckpt, tmp_path):
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    _rewrite(tiny_ckpt[0], tmp_path / "m", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_model(str(tmp_path / "m"), dtype=jnp.float32)


def test_wrong_shape_is_named(tiny_ckpt, tmp_path):
    name = "model.layers.0.self_attn.o_proj.weight"
    _rewrite(tiny_ckpt[0], tmp_path / "m", lambda t: t.__setitem__(name, np.zeros((3, 3), np.float32)))
    with pytest.raises(CheckpointError, match="o_proj"):
        load_model(str(tmp_path / "m"), dtype=jnp.float32)


def test_truncated_shard_is_named(tiny_ckpt, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_ckpt[0], dst)
    f = dst / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(str(dst), dtype=jnp.float32)


def test_index_path_escape_is_rejected(tiny_ckpt, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_ckpt[0], dst)
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../evil.safetensors"}}))
    with pytest.raises(CheckpointError, match="escapes"):
        load_model(str(dst), dtype=jnp.float32)


def test_mtp_module_matches_torch_reference(tiny_ckpt, tmp_path):
    """MTP (HF ignores it): eh_proj(cat(enorm(embed(t_{i+1})), hnorm(h_i))) -> decoder layer -> norm -> head."""
    path, _ = tiny_ckpt
    base = hf.hf_config(num_hidden_layers=3)  # layer 2 of this model serves as the MTP module's decoder layer
    full = hf.random_hf_model(base, seed=5)
    d = base.hidden_size
    g = torch.Generator().manual_seed(0)
    extra = {
        "enorm.weight": 1 + 0.1 * torch.randn(d, generator=g),
        "hnorm.weight": 1 + 0.1 * torch.randn(d, generator=g),
        "eh_proj.weight": 0.1 * torch.randn(d, 2 * d, generator=g),
        "shared_head.norm.weight": 1 + 0.1 * torch.randn(d, generator=g),
        "shared_head.head.weight": 0.1 * torch.randn(base.vocab_size, d, generator=g),
    }
    dst = tmp_path / "mtp"
    full.save_pretrained(dst)
    from safetensors.torch import load_file, save_file

    tensors = load_file(dst / "model.safetensors")
    tensors.update({f"model.layers.2.{k}": v.contiguous() for k, v in extra.items()})
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    cfg_json = json.loads((dst / "config.json").read_text())
    cfg_json["num_hidden_layers"] = 2
    cfg_json["num_nextn_predict_layers"] = 1
    (dst / "config.json").write_text(json.dumps(cfg_json))

    ids = np.random.RandomState(4).randint(0, base.vocab_size, (1, 10))
    ours = load_model(str(dst), dtype=jnp.float32)
    assert len(ours.mtp) == 1
    hidden = ours.hidden(jnp.asarray(ids[:, :-1]))
    mtp_logits = np.asarray(ours.mtp_logits(hidden, jnp.asarray(ids[:, 1:])))

    m = full.model
    with torch.no_grad():
        t = torch.tensor(ids)
        pos = torch.arange(9)[None]
        mask = torch.full((9, 9), float("-inf")).triu(1)[None, None]
        h = m.embed_tokens(t[:, :-1])
        pe = m.rotary_emb(h, pos)
        for layer in m.layers[:2]:
            h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
        rms = lambda x, w: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + base.rms_norm_eps))
        e = rms(m.embed_tokens(t[:, 1:]), extra["enorm.weight"])
        x = torch.cat([e, rms(h, extra["hnorm.weight"])], -1) @ extra["eh_proj.weight"].T
        x = m.layers[2](x, attention_mask=mask, position_ids=pos, position_embeddings=pe)
        ref = (rms(x, extra["shared_head.norm.weight"]) @ extra["shared_head.head.weight"].T).numpy()
    assert np.abs(mtp_logits - ref).max() / np.abs(ref).max() <= 1e-4


def test_bf16_attention_forms_compile_and_agree_on_cpu():
    """Both MLA forms in bf16 under jit (XLA's CPU backend lacks some bf16 x bf16 -> f32 dot forms)."""
    from flax import nnx

    from dwdp_jax.model import LayerKV, init_model

    attn = init_model(C.TINY, dtype=jnp.bfloat16).layers[0].self_attn
    x = jnp.asarray(np.random.RandomState(0).randn(2, 5, C.TINY.hidden_size), jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    kv = LayerKV(jnp.zeros((2, 8, C.TINY.kv_lora_rank), jnp.bfloat16),
                 jnp.zeros((2, 8, C.TINY.qk_rope_head_dim), jnp.bfloat16))
    run = nnx.jit(lambda a, x, p, kv, absorbed: a(x, p, kv, absorbed)[0], static_argnums=4)
    absorbed = np.asarray(run(attn, x, pos, kv, True), np.float32)
    expanded = np.asarray(run(attn, x, pos, kv, False), np.float32)
    assert np.abs(absorbed - expanded).max() / np.abs(expanded).max() < 3e-2
