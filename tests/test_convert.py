"""The HF -> dwdp_jax checkpoint converter: an orbax checkpoint (restored by orbax itself), round trips, items
and slabs, per-rank restore, --inspect, --verify, and every error.

The per-rank tests need 8 host devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (set here
too, which takes effect when this module is the first to start JAX).
"""

import glob
import json
import os
import pathlib
import shutil
import subprocess
import sys

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import pytest  # noqa: E402
from flax import nnx, traverse_util  # noqa: E402

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

from dwdp_jax import (checkpoint, convert, convert_hash, convert_plan, convert_source, from_hf_json,  # noqa: E402
                      load_model, safetensors_io)
from dwdp_jax.planner.placement import Placement  # noqa: E402
from dwdp_jax.safetensors_io import CheckpointError  # noqa: E402
from tests import convert_util  # noqa: E402
from tests import hf_fixtures as hf  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------------ helpers


_cli, _flat = convert_util.run_convert_cli, convert_util.flat_params
_assert_same_params, _logits = convert_util.assert_same_params, convert_util.logits_of


def _rewrite(src, dst, edit):
    """Copies HF checkpoint `src` to `dst` with its tensors edited by edit(dict) (torch: handles FP8)."""
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def _leftovers(out):
    return glob.glob(os.path.join(os.path.dirname(str(out)), f".{os.path.basename(str(out))}.tmp-*"))


# ----------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    fp32_model = hf.random_hf_model(hf.hf_config(), seed=1)
    paths = {"fp32": hf.save_hf(fp32_model, str(root / "fp32"))}
    paths["bf16"] = hf.save_hf(hf.random_hf_model(hf.hf_config(), seed=2).to(torch.bfloat16), str(root / "bf16"))
    fp8_model = hf.random_hf_model(hf.hf_config(), seed=7)
    paths["fp8"] = hf.write_fp8_checkpoint(fp8_model, str(root / "fp8"), block=(16, 16))

    # Two shards with an index (the published layout).
    two = root / "two_shards"
    shutil.copytree(paths["fp32"], two)
    tensors = load_file(str(two / "model.safetensors"))
    os.remove(two / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(two / shard), metadata={"format": "pt"})
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    (two / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    paths["two_shards"] = str(two)

    # An MTP module (layer 2 of a 3-layer model serves as it) plus the published MTP copy of the embedding.
    mtp = root / "mtp"
    hf.random_hf_model(hf.hf_config(num_hidden_layers=3), seed=3).save_pretrained(mtp)
    tensors = load_file(str(mtp / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    d = hf.BASE["hidden_size"]
    extra = {
        "enorm.weight": 1 + 0.1 * torch.randn(d, generator=g), "hnorm.weight": 1 + 0.1 * torch.randn(d, generator=g),
        "eh_proj.weight": 0.1 * torch.randn(d, 2 * d, generator=g),
        "shared_head.norm.weight": 1 + 0.1 * torch.randn(d, generator=g),
        "shared_head.head.weight": 0.1 * torch.randn(hf.BASE["vocab_size"], d, generator=g),
        "embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
    }
    tensors.update({f"model.layers.2.{k}": v.contiguous() for k, v in extra.items()})
    save_file(tensors, str(mtp / "model.safetensors"), metadata={"format": "pt"})
    cfg_json = json.loads((mtp / "config.json").read_text())
    cfg_json.update(num_hidden_layers=2, num_nextn_predict_layers=1)
    (mtp / "config.json").write_text(json.dumps(cfg_json))
    paths["mtp"] = str(mtp)
    paths["fp8_model"] = fp8_model
    return paths


@pytest.fixture(scope="module")
def converted(ckpts, tmp_path_factory):
    """Each source converted once with default flags (contiguous, group size 2)."""
    root = tmp_path_factory.mktemp("out")
    out = {}
    for name in ("fp32", "bf16", "fp8"):
        out[name] = str(root / name)
        assert _cli(f"--input={ckpts[name]}", f"--output={out[name]}", "--group_size=2") == 0
    return out


# ---------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("source, dtype", [("bf16", jnp.bfloat16), ("fp8", jnp.float32)])
def test_round_trip_logits(ckpts, converted, source, dtype):
    ours = load_model(converted[source], dtype=dtype)
    ref = load_model(ckpts[source], dtype=dtype)
    _assert_same_params(ours, ref)
    if source == "fp8":
        assert ours.layers[1].mlp.experts.w_gate_up.dtype == jnp.float8_e4m3fn  # [E, out, in] with block scales
    ids = np.random.RandomState(0).randint(0, hf.BASE["vocab_size"], (2, 12))
    got, want = _logits([ours, ref], ids)
    np.testing.assert_array_equal(got, want)
    if source == "fp8":  # and the dequantized HF model agrees, as for the HF loader
        torch_ref = hf.hf_logits(ckpts["fp8_model"], ids)
        assert np.abs(got - torch_ref).max() / np.abs(torch_ref).max() <= 1e-4


def test_orbax_alone_restores_the_checkpoint(ckpts, converted):
    """The output is an orbax composite checkpoint (OCDBT items): orbax's public API, without our code, restores
    the metadata record and any item, onto a chosen device; the arrays are the model's parameters."""
    out = converted["fp8"]
    meta = checkpoint.read_metadata(out)
    assert meta["format_version"] == checkpoint.FORMAT_VERSION and meta["converter"]["version"] == convert.CONVERTER_VERSION
    assert meta["dtype_policy"] == "keep_fp8" and meta["group_size"] == 2
    assert Placement.from_json_dict(meta["placement"]) == Placement.contiguous(2, 8, 2)
    with open(os.path.join(ckpts["fp8"], "config.json")) as f:
        assert meta["hf_config"] == json.load(f)
    source = {f["name"]: f for f in meta["source"]["files"]}
    assert source["model.safetensors"]["bytes"] == os.path.getsize(os.path.join(ckpts["fp8"], "model.safetensors"))
    assert len(source["model.safetensors"]["sha256"]) == 64
    names = [i["name"] for i in meta["items"]]
    assert {"embed.part0", "head.part0", "layers.0.part0", "layers.1.experts.rank1.part0"} <= set(names)
    assert all(os.path.isfile(os.path.join(out, n, "manifest.ocdbt")) for n in names)

    ref = _flat(load_model(ckpts["fp8"], dtype=jnp.float32))
    device = jax.devices()[1]
    experts = "layers.1.experts.rank1.part0"
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as orbax:
        plain = orbax.restore(out, args=ocp.args.Composite(
            dwdp_metadata=ocp.args.JsonRestore(), **{"layers.0.part0": ocp.args.PyTreeRestore(),
                                                       experts: ocp.args.PyTreeRestore()}))
        on_device = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=jax.sharding.SingleDeviceSharding(device)),
                                 plain[experts])
        placed = orbax.restore(out, args=ocp.args.Composite(**{experts: ocp.args.PyTreeRestore(restore_args=on_device)}))
    assert plain["dwdp_metadata"] == meta
    layer0 = traverse_util.flatten_dict(plain["layers.0.part0"])
    assert len(layer0) > 10
    for key, value in layer0.items():
        path = ("layers", 0) + key[2:]
        np.testing.assert_array_equal(np.asarray(value, np.float32), np.asarray(ref[path], np.float32), str(path))
    for key, value in traverse_util.flatten_dict(placed[experts]).items():
        path = ("layers", 1) + key[2:]
        assert value.devices() == {device}
        np.testing.assert_array_equal(np.asarray(value).view(np.uint8), np.asarray(ref[path])[4:].view(np.uint8))
    with ocp.StandardCheckpointer() as orbax:
        embed = orbax.restore(os.path.join(out, "embed.part0"))["embed_tokens"]
    np.testing.assert_array_equal(np.asarray(embed, np.float32), np.asarray(ref[("embed_tokens",)], np.float32))


def test_fp32_and_two_shard_round_trip(ckpts, converted, tmp_path):
    ref = load_model(ckpts["fp32"], dtype=jnp.float32)
    _assert_same_params(load_model(converted["fp32"], dtype=jnp.float32), ref)
    out = tmp_path / "two"
    assert _cli(f"--input={ckpts['two_shards']}", f"--output={out}", "--verify") == 0
    _assert_same_params(load_model(str(out), dtype=jnp.float32), ref)
    files = {f["name"] for f in checkpoint.read_metadata(out)["source"]["files"]}
    assert files == {"config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                     "model-00002-of-00002.safetensors"}


def test_bf16_policy_matches_dequantizing_loader(ckpts, tmp_path):
    out = tmp_path / "bf16"
    assert _cli(f"--input={ckpts['fp8']}", f"--output={out}", "--dtype_policy=bf16", "--verify") == 0
    meta = checkpoint.read_metadata(out)
    assert meta["dtype_policy"] == "bf16" and meta["model_config"]["weight_block_size"] is None
    experts = next(p for p in meta["params"] if p["key"] == "layers.1.mlp.experts.w_gate_up")
    assert experts["dtype"] == "bfloat16" and experts["dequantized"] and experts["source_dtype"] == "float8_e4m3fn"
    ours = load_model(str(out), dtype=jnp.bfloat16)
    _assert_same_params(ours, load_model(ckpts["fp8"], dtype=jnp.bfloat16, dequantize=True))
    assert from_hf_json(out) == checkpoint.model_config(meta) == ours.cfg  # config.json describes the output


def test_small_items_split_arrays_into_slabs(ckpts, tmp_path, monkeypatch):
    """Tiny items: copies split by rows, transposes by columns (whole FP8 blocks when dequantizing), experts by
    expert; each slab is a leaf of its own item and the restore concatenates them, on the host and on a device."""
    monkeypatch.setattr(convert_plan, "ITEM_BYTES", 2048)
    monkeypatch.setattr(convert_source, "CHUNK_BYTES", 300)
    out = tmp_path / "out"
    assert _cli(f"--input={ckpts['fp8']}", f"--output={out}", "--dtype_policy=bf16", "--group_size=2", "--verify") == 0
    meta = checkpoint.read_metadata(out)
    arrays = {p["key"]: p["arrays"] for p in meta["params"]}
    embed, lm_head = arrays["embed_tokens"][0], arrays["lm_head.kernel"][0]
    for array, axis in ((embed, 0), (lm_head, 1)):
        slabs = array["slabs"]
        assert array["axis"] == axis and len(slabs) > 1 and len({s["item"] for s in slabs}) == len(slabs)
        assert [s["start"] for s in slabs] == [0] + [s["stop"] for s in slabs][:-1]
        assert slabs[-1]["stop"] == array["shape"][axis]
    q_b = arrays["layers.0.self_attn.q_b_proj.kernel"][0]  # dequantized in whole 16-row source blocks
    assert q_b["axis"] == 1 and len(q_b["slabs"]) > 1 and all(s["start"] % 16 == 0 for s in q_b["slabs"])
    w_down = arrays["layers.2.mlp.experts.w_down"][1]
    assert w_down["rank"] == 1 and len(w_down["slabs"]) > 1
    assert all(s["item"].startswith("layers.2.experts.rank1.part") for s in w_down["slabs"])
    leaves = checkpoint.item_leaves(meta)  # an item exceeds the budget only with a single row, column or expert
    assert all(i["bytes"] <= 2048 or len(leaves[i["name"]]) == 1 for i in meta["items"])

    full = load_model(ckpts["fp8"], dtype=jnp.bfloat16, dequantize=True)
    _assert_same_params(load_model(str(out), dtype=jnp.bfloat16), full)
    device = jax.devices()[-1]
    ids_fn, n_local = checkpoint.rank_experts(meta, 1)
    rank1 = load_model(str(out), dtype=jnp.bfloat16, expert_ids=ids_fn, n_local_experts=n_local, device=device)
    got, ref = rank1.layers[2].mlp.experts.w_down[...], full.layers[2].mlp.experts.w_down[...]
    assert got.devices() == {device}
    np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(ref)[ids_fn(2)].view(np.uint8))
    # Row slabs are joined on the device, column slabs on the host; both end on the device.
    for got, ref in ((rank1.embed_tokens, full.embed_tokens), (rank1.lm_head.kernel, full.lm_head.kernel)):
        assert got[...].devices() == {device}
        np.testing.assert_array_equal(np.asarray(got[...]).view(np.uint8), np.asarray(ref[...]).view(np.uint8))
    some = load_model(str(out), dtype=jnp.bfloat16, expert_ids=lambda layer: [7, 0, 3], n_local_experts=3)
    np.testing.assert_array_equal(np.asarray(some.layers[2].mlp.experts.w_gate_up[...]).view(np.uint8),
                                  np.asarray(full.layers[2].mlp.experts.w_gate_up[...])[[7, 0, 3]].view(np.uint8))


def test_dequantize_request_on_fp8_checkpoint_is_refused(converted):
    with pytest.raises(CheckpointError, match="dtype_policy=bf16"):
        load_model(converted["fp8"], dequantize=True)


def test_mtp_kept_or_dropped(ckpts, tmp_path):
    ref = load_model(ckpts["mtp"], dtype=jnp.float32)
    assert len(ref.mtp) == 1
    assert _cli(f"--input={ckpts['mtp']}", f"--output={tmp_path / 'with'}", "--group_size=2") == 0
    with_mtp = load_model(str(tmp_path / "with"), dtype=jnp.float32)
    _assert_same_params(with_mtp, ref)
    meta = checkpoint.read_metadata(tmp_path / "with")
    assert meta["mtp"] and meta["source"]["ignored_tensors"] == ["model.layers.2.embed_tokens.weight"]
    ids_fn, _ = checkpoint.rank_experts(meta, 1)
    np.testing.assert_array_equal(ids_fn(2), [4, 5, 6, 7])  # MTP module: contiguous split

    assert _cli(f"--input={ckpts['mtp']}", f"--output={tmp_path / 'without'}", "--nomtp") == 0
    without = load_model(str(tmp_path / "without"), dtype=jnp.float32)
    assert len(without.mtp) == 0 and from_hf_json(tmp_path / "without").num_mtp_layers == 0
    _assert_same_params(without, load_model(ckpts["mtp"], dtype=jnp.float32, with_mtp=False))
    assert all(n.startswith("model.layers.2.") for n in checkpoint.read_metadata(tmp_path / "without")["source"]["ignored_tensors"])


def test_mtp_requested_but_absent(ckpts, tmp_path, capsys):
    assert _cli(f"--input={ckpts['fp32']}", f"--output={tmp_path / 'o'}", "--mtp") == 1
    assert "MTP" in capsys.readouterr().err and not os.path.exists(tmp_path / "o")


# ------------------------------------------------------------------------------------------------ per-rank restore


def _placement(kind: str, num_moe_layers: int, num_experts: int, g: int) -> Placement:
    if kind == "contiguous":
        return Placement.contiguous(num_moe_layers, num_experts, g)
    rng = np.random.RandomState(g)
    base = Placement.contiguous(1, num_experts, g).home_le[0]
    return Placement(num_ranks=g, home_le=np.stack([rng.permutation(base) for _ in range(num_moe_layers)]))


@pytest.mark.parametrize("source, g, kind", [("fp8", 2, "contiguous"), ("fp32", 4, "planner")])
def test_per_rank_restore_reads_only_its_experts(ckpts, tmp_path, source, g, kind):
    devices = jax.devices()
    if len(devices) < g:
        pytest.skip(f"needs {g} devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    full = load_model(ckpts[source], dtype=jnp.float32)
    cfg = full.cfg
    placement = _placement(kind, cfg.num_moe_layers, cfg.n_routed_experts, g)
    out = tmp_path / "out"
    if kind == "contiguous":
        assert _cli(f"--input={ckpts[source]}", f"--output={out}", f"--group_size={g}") == 0
    else:
        placement.save(tmp_path / "placement.json")
        assert _cli(f"--input={ckpts[source]}", f"--output={out}", f"--placement={tmp_path / 'placement.json'}") == 0
    assert Placement.from_json_dict(checkpoint.read_metadata(out)["placement"]) == placement
    for rank in range(g):
        # A copy holding only this rank's expert items: the restore must not need any other rank's files.
        mine = tmp_path / f"rank{rank}"
        shutil.copytree(out, mine)
        for d in glob.glob(str(mine / "*.experts.rank*")):
            if f".experts.rank{rank}.part" not in d:
                shutil.rmtree(d)
        expert_ids = lambda layer, rank=rank: placement.local_experts(layer - cfg.first_k_dense_replace, rank)
        n_local = len(expert_ids(cfg.first_k_dense_replace))
        ids_fn, n_stored = checkpoint.rank_experts(str(mine), rank)
        assert n_stored == n_local
        model = load_model(str(mine), dtype=jnp.float32, expert_ids=expert_ids, n_local_experts=n_local,
                           device=devices[rank])
        for layer in range(cfg.first_k_dense_replace, cfg.num_layers):
            ids = expert_ids(layer)
            np.testing.assert_array_equal(ids_fn(layer), ids)
            got, ref = model.layers[layer].mlp.experts, full.layers[layer].mlp.experts
            for name in ("w_gate_up", "w_down", "s_gate_up", "s_down"):
                if getattr(ref, name) is None:
                    continue
                np.testing.assert_array_equal(np.asarray(getattr(got, name)[...]).view(np.uint8),
                                              np.asarray(getattr(ref, name)[...])[ids].view(np.uint8))
        assert {d for leaf in jax.tree.leaves(nnx.split(model)[1]) for d in leaf.devices()} == {devices[rank]}
        shutil.rmtree(mine)
    # Any subset of experts (not a rank's set) comes from the arrays holding them.
    subset = lambda layer: [7, 0, 3]
    some = load_model(str(out), dtype=jnp.float32, expert_ids=subset, n_local_experts=3)
    np.testing.assert_array_equal(np.asarray(some.layers[2].mlp.experts.w_down[...]).view(np.uint8),
                                  np.asarray(full.layers[2].mlp.experts.w_down[...])[[7, 0, 3]].view(np.uint8))


# ---------------------------------------------------------------------------------------------- inspect, verify


def test_inspect_lists_parameters_and_writes_nothing(ckpts, converted, tmp_path, capsys):
    out = tmp_path / "never"
    assert _cli(f"--input={ckpts['fp8']}", f"--output={out}", "--inspect", "--group_size=4") == 0
    text = capsys.readouterr().out
    assert not os.path.exists(out) and not _leftovers(out)
    assert "layers.1.mlp.experts.w_gate_up" in text and "[8, 32, 32]" in text and "4 ranks" in text
    assert "float8_e4m3fn" in text and "lm_head.kernel" in text
    for kind in ("attention", "routed_experts", "shared_experts", "dense_mlp", "router", "norm", "embedding", "total"):
        assert f"\n{kind} " in text
    assert _cli(f"--input={converted['fp8']}", "--inspect") == 0  # a converted checkpoint, from its metadata
    assert "converted checkpoint" in capsys.readouterr().out


def _data_file(out, item):
    """The largest OCDBT data file of an item (its array bytes)."""
    files = [f for f in glob.glob(os.path.join(out, item, "**"), recursive=True) if os.path.isfile(f)]
    return max(files, key=os.path.getsize)


def test_verify_passes_then_catches_corruption(ckpts, converted, tmp_path, capsys):
    assert _cli(f"--input={ckpts['fp8']}", f"--output={converted['fp8']}", "--verify") == 0
    assert "bit-exact" in capsys.readouterr().out

    # A flipped byte in an item's data: orbax keeps no checksum of array bytes; the comparison catches it.
    flipped = tmp_path / "flipped"
    shutil.copytree(converted["fp8"], flipped)
    chunk = pathlib.Path(_data_file(flipped, "layers.1.experts.rank0.part0"))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert _cli(f"--input={ckpts['fp8']}", f"--output={flipped}", "--verify") == 1
    err = capsys.readouterr().err
    assert "layers.1.experts.rank0.part0" in err and "differ from the source" in err

    # A well-formed item with different data (saved by orbax itself): the comparison with the source fails.
    rewritten = tmp_path / "rewritten"
    shutil.copytree(converted["fp8"], rewritten)
    item = rewritten / "layers.0.part0"
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as orbax:
        tree = orbax.restore(item)
        kernel = np.asarray(tree["layers"]["0"]["self_attn"]["o_proj"]["kernel"]).copy()
        kernel[0, 0] = -kernel[0, 0] if kernel[0, 0] != 0 else np.float32(1).astype(kernel.dtype)
        tree["layers"]["0"]["self_attn"]["o_proj"]["kernel"] = kernel
        shutil.rmtree(item)
        orbax.save(item, args=ocp.args.PyTreeSave(tree))
    assert _cli(f"--input={ckpts['fp8']}", f"--output={rewritten}", "--verify") == 1
    err = capsys.readouterr().err
    assert "layers.0.self_attn.o_proj.kernel" in err and "differ from the source" in err

    # A missing data file: restore and verify refuse, naming the item.
    holed = tmp_path / "holed"
    shutil.copytree(converted["fp8"], holed)
    os.remove(_data_file(holed, "layers.2.experts.rank1.part0"))
    with pytest.raises(CheckpointError, match="layers.2.experts.rank1.part0"):
        load_model(str(holed))
    assert _cli(f"--input={ckpts['fp8']}", f"--output={holed}", "--verify") == 1
    assert "layers.2.experts.rank1.part0" in capsys.readouterr().err

    # A missing item directory.
    shutil.rmtree(holed / "layers.2.experts.rank1.part0")
    assert _cli(f"--input={ckpts['fp8']}", f"--output={holed}", "--verify") == 1
    assert "item layers.2.experts.rank1.part0 is missing" in capsys.readouterr().err


def test_verify_detects_a_changed_source(ckpts, converted, tmp_path, capsys):
    src = tmp_path / "src"
    _rewrite(ckpts["fp32"], src, lambda t: t["model.norm.weight"].mul_(2))
    assert _cli(f"--input={src}", f"--output={converted['fp32']}", "--verify") == 1
    assert "changed since conversion" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------- errors

FP32_EDITS = {
    "missing": (lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"),
                ["model.layers.1.mlp.experts.3.up_proj.weight", "layers.1.mlp.experts.w_gate_up"]),
    "unexpected": (lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(2)),
                   ["unexpected tensor", "model.layers.0.mlp.extra.weight", "model.safetensors"]),
    "shape": (lambda t: t.__setitem__("model.layers.0.self_attn.o_proj.weight", torch.zeros(3, 3)),
              ["model.layers.0.self_attn.o_proj.weight", "shape (3, 3)", "model.safetensors"]),
}
FP8_EDITS = {
    "dtype": (lambda t: t.__setitem__("model.layers.0.self_attn.q_a_proj.weight",
                                      t["model.layers.0.self_attn.q_a_proj.weight"].to(torch.bfloat16)),
              ["model.layers.0.self_attn.q_a_proj.weight", "bfloat16", "float8_e4m3fn", "model.safetensors"]),
    "missing_scale": (lambda t: t.pop("model.layers.2.mlp.experts.5.down_proj.weight_scale_inv"),
                      ["model.layers.2.mlp.experts.5.down_proj.weight_scale_inv"]),
}


def _damage(kind, ckpts, dst):
    if kind in FP32_EDITS:
        return _rewrite(ckpts["fp32"], dst, FP32_EDITS[kind][0]), FP32_EDITS[kind][1]
    if kind in FP8_EDITS:
        return _rewrite(ckpts["fp8"], dst, FP8_EDITS[kind][0]), FP8_EDITS[kind][1]
    if kind == "truncated":
        shutil.copytree(ckpts["fp32"], dst)
        f = dst / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
        return str(dst), ["truncated", "model.safetensors"]
    if kind == "corrupt_header":
        shutil.copytree(ckpts["fp32"], dst)
        f = dst / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[8:16] = b"\x00garbage"
        f.write_bytes(bytes(data))
        return str(dst), ["model.safetensors", "header"]
    if kind == "no_index":
        shutil.copytree(ckpts["two_shards"], dst)
        os.remove(dst / "model.safetensors.index.json")
        return str(dst), ["2 safetensors shards but no model.safetensors.index.json"]
    if kind == "missing_shard":
        shutil.copytree(ckpts["two_shards"], dst)
        os.remove(dst / "model-00002-of-00002.safetensors")
        return str(dst), ["model-00002-of-00002.safetensors", "missing"]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", sorted(FP32_EDITS) + sorted(FP8_EDITS) +
                         ["truncated", "corrupt_header", "no_index", "missing_shard"])
def test_source_errors_are_named_and_leave_nothing(ckpts, tmp_path, capsys, kind):
    src, expected = _damage(kind, ckpts, tmp_path / "src")
    out = tmp_path / "out"
    assert _cli(f"--input={src}", f"--output={out}") == 1
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, (text, err)
    assert not os.path.exists(out) and not _leftovers(out)


def test_existing_output_is_refused(ckpts, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _cli(f"--input={ckpts['fp32']}", f"--output={out}") == 1
    assert "already exists" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"] and not _leftovers(out)


def test_failure_while_writing_removes_the_temporary_directory(ckpts, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = convert.SourceReader.rows

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 20:
            raise CheckpointError("disk on fire")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(convert.SourceReader, "rows", failing)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="disk on fire"):
        convert.convert(ckpts["fp8"], str(out), group_size=2, progress=False)
    # Items already being built by other worker threads finish their reads; no new item starts.
    assert calls["n"] >= 20 and not os.path.exists(out) and not _leftovers(out)


def test_module_entry_point_exits_nonzero(ckpts, tmp_path):
    src, _ = _damage("no_index", ckpts, tmp_path / "src")
    result = subprocess.run(
        [sys.executable, "-m", "dwdp_jax.convert", f"--input={src}", f"--output={tmp_path / 'out'}"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        check=False,
    )
    assert result.returncode == 1 and "no model.safetensors.index.json" in result.stderr
    assert not os.path.exists(tmp_path / "out")


def test_command_line_hashes_before_jax_loads():
    """`dwdp-convert` starts hashing the source before it imports JAX (~1.5 s): its module and the hasher's need
    only the standard library and absl."""
    code = ("import sys; import dwdp_jax.convert, dwdp_jax.convert_hash; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'numpy', 'orbax', 'flax')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    assert convert_hash.INDEX_NAME == safetensors_io.INDEX_NAME
def test_numpy_save_handler_on_older_orbax(monkeypatch):
    """The GPU image's orbax has no `deepcopy_host_arrays` (the converter failed there on import, 2026-12-06):
    the writer then takes orbax's default numpy handler; with the argument, it turns the copy off."""
    import orbax.checkpoint as ocp

    from dwdp_jax import checkpoint as ckpt

    made = []

    class OldHandler:
        def __init__(self):
            made.append("old")

    class NewHandler:
        def __init__(self, deepcopy_host_arrays=True):
            made.append(deepcopy_host_arrays)

    monkeypatch.setattr(ocp.type_handlers, "NumpyHandler", OldHandler)
    assert isinstance(ckpt._numpy_save_handler(), OldHandler)
    monkeypatch.setattr(ocp.type_handlers, "NumpyHandler", NewHandler)
    assert isinstance(ckpt._numpy_save_handler(), NewHandler)
    assert made == ["old", False]
