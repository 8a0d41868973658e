"""Loading HF-format DeepSeek-V3/R1 checkpoints into the Flax model.

Every parameter of `DeepseekV3` is named by its path in the NNX state, e.g. ('layers', 3, 'self_attn',
'q_a_proj', 'kernel'). `hf_source(path, cfg)` says which HF tensors make it and how: copy (FP8 linear layers
and their block scales keep the checkpoint's [out, in]), transpose (unquantized [out, in] -> [in, out]), or
stack the per-expert gate/up/down matrices of a MoE layer. The same table serves the loader here and the
checkpoint converter.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from dwdp_jax import config as config_lib
from dwdp_jax import quant
from dwdp_jax.experts import fp8_expert_dims
from dwdp_jax.model import DeepseekV3
from dwdp_jax.safetensors_io import CheckpointDir, CheckpointError

Path = tuple


@dataclasses.dataclass(frozen=True)
class Source:
    """How one model parameter is built from HF tensors.

    kind: 'copy' (as is), 'transpose' (an [out, in] matrix or its block scales), 'experts' (stack over experts
    of the matrices named by `names`, each a tuple of per-expert names; gate and up are concatenated along
    the output axis). Unquantized experts are transposed to [E, in, out]; FP8 experts and their scales keep
    the checkpoint's [E, out, in] layout (what the FP8 grouped GEMM reads), each per-expert tensor (`shape`)
    zero-padded to whole blocks (`padded`, see `experts.fp8_expert_dims`).
    """

    kind: str
    names: tuple  # tensor names; for 'experts' a tuple of per-matrix tuples of per-expert names
    shape: tuple | None = None  # FP8 'experts': [out, in] of every per-expert tensor in the checkpoint
    padded: tuple | None = None  # FP8 'experts': the [out, in] each is zero-padded to (>= shape)


def _hf_linear(prefix: str) -> tuple[str, str]:
    return prefix + ".weight", prefix + ".weight_scale_inv"


def hf_source(path: Path, cfg: config_lib.ModelConfig, expert_ids: Sequence[int] | None = None) -> Source:
    """The HF tensors behind one parameter path. `expert_ids`: which routed experts this model holds."""
    if path == ("embed_tokens",):
        return Source("copy", ("model.embed_tokens.weight",))
    if path == ("norm", "weight"):
        return Source("copy", ("model.norm.weight",))
    if path == ("lm_head", "kernel"):
        name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        return Source("transpose", (name,))
    if path[0] == "layers":
        return _layer_source(f"model.layers.{path[1]}", path[2:], cfg, expert_ids)
    if path[0] == "mtp":
        prefix = f"model.layers.{cfg.num_layers + path[1]}"
        rest = path[2:]
        if rest[0] == "block":
            return _layer_source(prefix, rest[1:], cfg, expert_ids)
        if rest in (("enorm", "weight"), ("hnorm", "weight")):
            return Source("copy", (f"{prefix}.{rest[0]}.weight",))
        if rest == ("norm", "weight"):
            return Source("copy", (f"{prefix}.shared_head.norm.weight",))
        if rest == ("head", "kernel"):
            return Source("transpose", (f"{prefix}.shared_head.head.weight",))
        if rest[0] == "eh_proj":
            w, s = _hf_linear(f"{prefix}.eh_proj")
            return Source("transpose", (s if rest[-1] == "scale" else w,))
    raise KeyError(f"no HF source known for parameter {'.'.join(map(str, path))}")


def _layer_source(prefix: str, rest: Path, cfg, expert_ids) -> Source:
    if rest[-1] == "weight":  # RMSNorm
        return Source("copy", (f"{prefix}.{'.'.join(rest)}",))
    if rest == ("mlp", "router"):
        return Source("transpose", (f"{prefix}.mlp.gate.weight",))
    if rest == ("mlp", "bias"):
        return Source("copy", (f"{prefix}.mlp.gate.e_score_correction_bias",))
    if rest[:2] == ("mlp", "experts"):
        ids = range(cfg.n_routed_experts) if expert_ids is None else expert_ids
        matrices = ("gate_proj", "up_proj") if rest[2].endswith("gate_up") else ("down_proj",)
        suffix = "weight_scale_inv" if rest[2].startswith("s_") else "weight"
        names = tuple(tuple(f"{prefix}.mlp.experts.{e}.{m}.{suffix}" for e in ids) for m in matrices)
        if cfg.weight_block_size is None:
            return Source("experts", names)
        shape, padded = fp8_expert_source_shapes(cfg, rest[2])
        return Source("experts", names, shape, padded)
    if rest[-1] in ("kernel", "scale"):
        module = ".".join("shared_experts" if p == "shared" else str(p) for p in rest[:-1])
        w, s = _hf_linear(f"{prefix}.{module}")
        # FP8 linears keep the checkpoint's [out, in] (what the FP8 GEMM reads); unquantized ones are [in, out].
        return Source("transpose" if cfg.weight_block_size is None else "copy", (s if rest[-1] == "scale" else w,))
    raise KeyError(f"no HF source known for parameter {prefix}.{'.'.join(map(str, rest))}")


def fp8_expert_source_shapes(cfg: config_lib.ModelConfig, param: str) -> tuple[tuple, tuple]:
    """([out, in] of each per-expert checkpoint tensor, [out, in] it is padded to) for FP8 expert parameter
    `param` (w_gate_up, w_down, s_gate_up or s_down): weights, or their ceil-divided block-scale grids."""
    d, i = cfg.hidden_size, cfg.moe_intermediate_size
    d_pad, i_pad = fp8_expert_dims(d, i, cfg.weight_block_size)
    shape, padded = ((i, d), (i_pad, d_pad)) if param.endswith("gate_up") else ((d, i), (d_pad, i_pad))
    if param.startswith("s_"):
        bo, bi = cfg.weight_block_size
        shape, padded = (-(-shape[0] // bo), -(-shape[1] // bi)), (padded[0] // bo, padded[1] // bi)
    return shape, padded


def pad_matrix(array: np.ndarray, shape: tuple) -> np.ndarray:
    """A 2-D array zero-padded at the end of both axes to `shape`."""
    if array.shape == tuple(shape):
        return array
    out = np.zeros(shape, array.dtype)
    out[: array.shape[0], : array.shape[1]] = array
    return out


def _dequantized_if_fp8(ckpt: CheckpointDir, name: str, block) -> np.ndarray:
    """Reads an [out, in] weight; an FP8 one is dequantized with its weight_scale_inv (float32)."""
    w = ckpt.read(name)
    if w.dtype == quant.FP8 or w.dtype.name.startswith("float8"):
        scale_name = name[: -len("weight")] + "weight_scale_inv"
        if block is None:
            raise CheckpointError(f"{ckpt.file_of(name)}: {name} is FP8 but config.json has no weight_block_size")
        return quant.dequantize_np(w, ckpt.read(scale_name), block, np.float32)
    return w


def assemble(src: Source, ckpt: CheckpointDir, *, keep_fp8: bool, block, fp8_experts: bool = False) -> np.ndarray:
    """Builds one parameter (numpy) from the checkpoint. fp8_experts: the model keeps its routed experts in
    FP8 (then expert weights and scales are stacked in [E, out, in] without transposing)."""
    read = ckpt.read if keep_fp8 else (lambda n: _dequantized_if_fp8(ckpt, n, block))
    if src.kind == "copy":
        return np.asarray(read(src.names[0]))
    if src.kind == "transpose":
        return np.ascontiguousarray(np.asarray(read(src.names[0])).T)
    if src.kind == "experts":
        if fp8_experts:
            per_matrix = [np.stack([_padded_expert(read, n, src) for n in names]) for names in src.names]
            return np.concatenate(per_matrix, axis=-2) if len(per_matrix) > 1 else per_matrix[0]
        per_matrix = [np.stack([np.asarray(read(n)).T for n in names]) for names in src.names]
        return np.concatenate(per_matrix, axis=-1) if len(per_matrix) > 1 else per_matrix[0]
    raise ValueError(src.kind)


def _padded_expert(read, name: str, src: Source) -> np.ndarray:
    """One FP8 expert tensor, checked against the config's shape (padding must never hide a wrong-shape tensor),
    then zero-padded to whole blocks."""
    array = np.asarray(read(name))
    if src.shape is None:
        return array
    if tuple(array.shape) != tuple(src.shape):
        raise CheckpointError(f"tensor {name!r} has shape {tuple(array.shape)}, the config expects {tuple(src.shape)}")
    return pad_matrix(array, src.padded)


def _cast(array: np.ndarray, target: jax.ShapeDtypeStruct, name: str, path: Path) -> np.ndarray:
    if tuple(array.shape) != tuple(target.shape):
        raise CheckpointError(
            f"tensor {name!r} gives shape {tuple(array.shape)} for {'.'.join(map(str, path))},"
            f" the config expects {tuple(target.shape)}"
        )
    src_fp8 = array.dtype.name.startswith("float8")
    dst_fp8 = jnp.dtype(target.dtype).name.startswith("float8")
    if src_fp8 != dst_fp8:
        raise CheckpointError(f"tensor {name!r} has dtype {array.dtype}, the model expects {target.dtype}")
    return array.astype(target.dtype)


def load_state(
    model_abstract: DeepseekV3,
    ckpt: CheckpointDir,
    *,
    expert_ids: Callable[[int], Sequence[int]] | None = None,
    device: jax.Device | None = None,
    progress: Callable[[str], None] | None = None,
) -> DeepseekV3:
    """Fills an abstract model (from `nnx.eval_shape`) with checkpoint tensors, one parameter at a time.

    expert_ids(layer) -> the routed experts this model holds for that decoder layer (all when None); MTP
    modules use layer index num_layers + depth.
    """
    cfg = model_abstract.cfg
    ckpt_block = _checkpoint_block(ckpt)
    graphdef, state = nnx.split(model_abstract)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    out = {}
    for path, target in flat.items():
        layer = path[1] if path[0] == "layers" else (cfg.num_layers + path[1] if path[0] == "mtp" else None)
        ids = expert_ids(layer) if (expert_ids is not None and layer is not None) else None
        src = hf_source(path, cfg, ids)
        first = src.names[0] if src.kind != "experts" else src.names[0][0]
        keep_fp8 = jnp.dtype(target.dtype).name.startswith("float8")  # else FP8 sources are dequantized
        array = assemble(src, ckpt, keep_fp8=keep_fp8, block=ckpt_block, fp8_experts=cfg.weight_block_size is not None)
        array = _cast(array, target, first, path)
        out[path] = jax.device_put(array, device) if device is not None else jnp.asarray(array)
        if progress:
            progress(first)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(out))
    return nnx.merge(graphdef, state)


def _checkpoint_block(ckpt: CheckpointDir):
    with open(os.path.join(ckpt.path, "config.json")) as f:
        quant_cfg = json.load(f).get("quantization_config") or {}
    block = quant_cfg.get("weight_block_size")
    return tuple(block) if block else None


def load_model(
    path: str,
    *,
    dtype=jnp.bfloat16,
    dequantize: bool = False,
    with_mtp: bool | None = None,
    expert_ids: Callable[[int], Sequence[int]] | None = None,
    n_local_experts: int | None = None,
    device: jax.Device | None = None,
) -> DeepseekV3:
    """Loads an HF DeepSeek-V3/R1 directory (`config.json` + safetensors shards) into `DeepseekV3`.

    dtype: dtype of the unquantized weights (embeddings, attention when not FP8, LM head). FP8 checkpoints
    stay FP8 with their block scales unless `dequantize=True`. `expert_ids` / `n_local_experts` load only a
    subset of each MoE layer's routed experts (a DWDP rank's shard). with_mtp: load the MTP modules (None:
    when the checkpoint has them; HF `save_pretrained` drops them).
    """
    from dwdp_jax import checkpoint  # our converted format (dwdp_jax.convert); imports this module

    if checkpoint.is_checkpoint(path):
        return checkpoint.restore_model(path, dtype=dtype, dequantize=dequantize, with_mtp=with_mtp,
                                        expert_ids=expert_ids, n_local_experts=n_local_experts, device=device)
    cfg = config_lib.from_hf_json(path)
    if dequantize:
        cfg = cfg.replace(weight_block_size=None)
    ckpt = CheckpointDir(path)
    if with_mtp is None:
        with_mtp = f"model.layers.{cfg.num_layers}.eh_proj.weight" in ckpt
    if not with_mtp:
        cfg = cfg.replace(num_mtp_layers=0)
    abstract = nnx.eval_shape(lambda: DeepseekV3(cfg, rngs=nnx.Rngs(0), dtype=dtype, n_local_experts=n_local_experts))
    return load_state(abstract, ckpt, expert_ids=expert_ids, device=device)
