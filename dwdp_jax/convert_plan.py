"""What a conversion writes: every stored array, the HF tensors it comes from, its stored dtype, and the orbax
items it is cut into (`make_plan`), all checked against the source before anything is written.

The dtype policy is decided here: keep_fp8 stores FP8 weights with their block scales as in the source; bf16
dequantizes them (value * scale in float32, rounded to bfloat16). Everything else keeps its source dtype, except a
weight the model keeps unquantized but the source has in FP8 (the MTP eh_proj): dequantized, float32 under
keep_fp8. Routed experts are laid out for a DWDP group: with group size G (contiguous split) or a planner
placement, each MoE layer's expert parameters become one array per rank holding that rank's experts (replicas
included), in that rank's own items; the MTP modules, which the placement does not cover, use the contiguous
split.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx, traverse_util

from dwdp_jax import checkpoint, weights
from dwdp_jax import config as config_lib
from dwdp_jax.model import DeepseekV3
from dwdp_jax.planner.placement import Placement, PlacementError
from dwdp_jax.safetensors_io import CheckpointDir, CheckpointError

POLICIES = ("keep_fp8", "bf16")
ITEM_BYTES = 256 << 20  # target size of one orbax item (one expert, or one row/column, may exceed it)


def is_fp8(dtype) -> bool:
    return np.dtype(dtype).name.startswith("float8")


def prod(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def param_kind(path: tuple, cfg: config_lib.ModelConfig) -> str:
    """Coarse kind of a parameter, for the --inspect totals."""
    if path[0] == "mtp":
        return "mtp"
    if path[0] == "embed_tokens":
        return "embedding"
    if path[0] == "lm_head":
        return "lm_head"
    if path[-1] == "weight":  # RMSNorm weights
        return "norm"
    rest = path[2:]
    if rest[0] == "self_attn":
        return "attention"
    if rest[:2] == ("mlp", "experts"):
        return "routed_experts"
    if rest[:2] in (("mlp", "router"), ("mlp", "bias")):
        return "router"
    if rest[:2] == ("mlp", "shared"):
        return "shared_experts"
    return "dense_mlp"



@dataclasses.dataclass(frozen=True)
class Piece:
    """One stored array: a whole parameter, or one rank's share of a routed-expert parameter."""

    key: str  # its name in messages: the parameter key, plus `.rank<r>` for a rank's share
    path: tuple  # model parameter path
    group: str  # restore group (`checkpoint.group_of`)
    shape: tuple
    dtype: np.dtype  # stored dtype
    axis: int  # slabs split this axis: experts and copied rows (0), columns of a transposed matrix (1)
    align: int  # slab boundaries are multiples of this (whole FP8 blocks when dequantizing)
    source: weights.Source
    dequantize: bool  # FP8 source, unquantized parameter
    source_bytes: int
    rank: int | None = None
    experts: tuple | None = None

    def slabs(self, max_bytes: int) -> list[tuple[int, int]]:
        """[start, stop) ranges along `axis`, each of at most `max_bytes` (or one row, column or expert)."""
        extent = self.shape[self.axis]
        per = prod(self.shape) // max(1, extent) * self.dtype.itemsize
        n = max(1, max_bytes // max(1, per))
        n = max(self.align, n // self.align * self.align)
        return [(a, min(a + n, extent)) for a in range(0, extent, n)]

    def array_entry(self, slabs: list[dict]) -> dict:
        entry = dict(key=self.key, shape=list(self.shape), dtype=self.dtype.name, axis=self.axis, slabs=slabs)
        if self.experts is not None:
            entry.update(rank=self.rank, experts=list(self.experts))
        return entry


@dataclasses.dataclass(frozen=True)
class Item:
    """One orbax item: slabs (piece, start, stop) of the pieces of one restore group, saved together."""

    name: str
    group: str
    slabs: tuple

    @property
    def nbytes(self) -> int:
        return sum(slab_bytes(piece, a, b) for piece, a, b in self.slabs)


def slab_bytes(piece: Piece, a: int, b: int) -> int:
    return prod(piece.shape) // max(1, piece.shape[piece.axis]) * (b - a) * piece.dtype.itemsize


def pack_items(pieces: list[Piece], item_bytes: int) -> list[Item]:
    """Cuts each group's pieces into slabs of at most `item_bytes` and packs them, in order, into items of at
    most `item_bytes` (`<group>.part<k>`). A slab fills an item whenever its piece is split, so an item never
    holds two slabs of one piece."""
    groups = collections.defaultdict(list)
    for piece in pieces:
        groups[piece.group].append(piece)
    items = []
    for group, members in groups.items():
        parts, current, size = [], [], 0
        for piece in members:
            for a, b in piece.slabs(item_bytes):
                nbytes = slab_bytes(piece, a, b)
                if current and size + nbytes > item_bytes:
                    parts.append(current)
                    current, size = [], 0
                current.append((piece, a, b))
                size += nbytes
        if current:
            parts.append(current)
        items += [Item(checkpoint.item_name(group, k), group, tuple(slabs)) for k, slabs in enumerate(parts)]
    return items


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a conversion will write, checked against the source before anything is written."""

    source_cfg: config_lib.ModelConfig  # from config.json
    cfg: config_lib.ModelConfig  # what the output holds (no FP8 under bf16, no MTP under --nomtp)
    dtype_policy: str
    group_size: int
    placement: Placement | None
    mtp: bool
    item_bytes: int
    params: list  # metadata entries, one per model parameter, in model order
    pieces: list  # stored arrays, in model order
    items: list  # orbax items, in writing order
    ignored: list  # source tensors deliberately not converted (dropped MTP, MTP copy of the embedding)

    @property
    def source_bytes(self) -> int:
        return sum(p.source_bytes for p in self.pieces)

    @property
    def output_bytes(self) -> int:
        return sum(prod(p.shape) * p.dtype.itemsize for p in self.pieces)


def make_plan(
    ckpt: CheckpointDir,
    hf_config: dict,
    *,
    dtype_policy: str = "keep_fp8",
    group_size: int | None = None,
    placement: Placement | None = None,
    mtp: bool | None = None,
    item_bytes: int | None = None,
) -> Plan:
    """Maps every parameter of the output model to its source tensors and checks them all (present, shapes,
    dtypes, nothing left over), then cuts the output into items of `item_bytes` (default ITEM_BYTES). Raises
    CheckpointError / PlacementError naming the file and tensor."""
    if dtype_policy not in POLICIES:
        raise ValueError(f"dtype_policy must be one of {POLICIES}, got {dtype_policy!r}")
    item_bytes = ITEM_BYTES if item_bytes is None else item_bytes
    if item_bytes < 1:
        raise ValueError(f"item_bytes must be positive, got {item_bytes}")
    source_cfg = config_lib.from_hf_dict(hf_config)
    cfg = source_cfg if dtype_policy == "keep_fp8" else source_cfg.replace(weight_block_size=None)
    has_mtp = f"model.layers.{cfg.num_layers}.eh_proj.weight" in ckpt
    if mtp is None:
        mtp = has_mtp
    if mtp and not (has_mtp and cfg.num_mtp_layers):
        raise CheckpointError(
            f"{ckpt.path}: MTP requested but the checkpoint has no MTP module (no tensor"
            f" 'model.layers.{cfg.num_layers}.eh_proj.weight' or num_nextn_predict_layers = 0)"
        )
    if not mtp:
        cfg = cfg.replace(num_mtp_layers=0)
    if placement is None:
        group_size = group_size or 1
        placement = Placement.from_config(cfg, group_size) if cfg.num_moe_layers else None
    else:
        if group_size is not None and group_size != placement.num_ranks:
            raise PlacementError(f"--group_size={group_size} but the placement has {placement.num_ranks} ranks")
        group_size = placement.num_ranks
        if (placement.num_layers, placement.num_experts) != (cfg.num_moe_layers, cfg.n_routed_experts):
            raise PlacementError(
                f"placement covers {placement.num_layers} MoE layers x {placement.num_experts} experts, the model"
                f" has {cfg.num_moe_layers} x {cfg.n_routed_experts}"
            )
    mtp_split = Placement.contiguous(1, cfg.n_routed_experts, group_size) if cfg.num_mtp_layers else None

    abstract = nnx.eval_shape(lambda: DeepseekV3(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32))
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.split(abstract)[1]))
    builder = _PieceBuilder(ckpt, cfg, source_cfg.weight_block_size, dtype_policy)
    per_param = []
    for path, target in flat.items():
        key = checkpoint.param_key(path)
        if checkpoint.is_expert_param(path):
            layer = checkpoint.layer_of(path, cfg)
            group = []
            for rank in range(group_size):
                if path[0] == "layers":
                    ids = placement.local_experts(layer - cfg.first_k_dense_replace, rank)
                else:
                    ids = mtp_split.local_experts(0, rank)
                ids = tuple(int(e) for e in ids)
                shape = (len(ids),) + tuple(target.shape[1:])
                src = weights.hf_source(path, cfg, ids)
                group.append(builder.piece(f"{key}.rank{rank}", path, shape, src, target.dtype, rank, ids))
        else:
            group = [builder.piece(key, path, tuple(target.shape), weights.hf_source(path, cfg), target.dtype)]
        per_param.append((path, target, group))
    ignored, unexpected = [], []
    for name in ckpt.names():
        if name in builder.consumed:
            continue
        match = re.match(r"model\.layers\.(\d+)\.", name)
        # Dropped MTP modules; and the published MTP layer's copy of the embedding (the model shares it).
        if match and int(match.group(1)) >= cfg.num_layers and (
            not cfg.num_mtp_layers or name.endswith(f"layers.{match.group(1)}.embed_tokens.weight")
        ):
            ignored.append(name)
            continue
        unexpected.append(name)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"{ckpt.file_of(unexpected[0])}: unexpected tensor {unexpected[0]!r}: no model parameter uses it{more}"
        )

    pieces = [piece for _, _, group in per_param for piece in group]
    items = pack_items(pieces, item_bytes)
    slabs = collections.defaultdict(list)
    for item in items:
        for piece, a, b in item.slabs:
            slabs[piece.key].append(dict(item=item.name, start=a, stop=b))
    params = []
    for path, target, group in per_param:
        first = group[0]
        params.append(dict(
            key=checkpoint.param_key(path), path=list(path), kind=param_kind(path, cfg), shape=list(target.shape),
            dtype=first.dtype.name, source_dtype=builder.source_dtype[first.key], dequantized=first.dequantize,
            source_tensors=sum(len(_names(p.source)) for p in group),
            source_bytes=sum(p.source_bytes for p in group), arrays=[p.array_entry(slabs[p.key]) for p in group],
        ))
    return Plan(source_cfg, cfg, dtype_policy, group_size, placement, bool(mtp), item_bytes, params, pieces, items,
                ignored)


def _names(src: weights.Source) -> list[str]:
    return [n for names in src.names for n in names] if src.kind == "experts" else list(src.names)


def scale_name(name: str) -> str:
    return name[: -len("weight")] + "weight_scale_inv"


class _PieceBuilder:
    """Checks one array's source tensors and decides its stored dtype and slab axis."""

    def __init__(self, ckpt: CheckpointDir, cfg, block, dtype_policy):
        self.ckpt, self.cfg, self.block, self.policy = ckpt, cfg, block, dtype_policy
        self.consumed: set[str] = set()
        self.source_dtype: dict[str, str] = {}

    def _info(self, name: str, key: str):
        if name not in self.ckpt:
            raise CheckpointError(f"{self.ckpt.path}: missing tensor {name!r} (needed for parameter {key})")
        return self.ckpt.info(name)

    def _expect(self, name: str, key: str, expected: tuple):
        _, shape = self._info(name, key)
        if tuple(shape) != tuple(expected):
            raise CheckpointError(
                f"{self.ckpt.file_of(name)}: tensor {name!r} has shape {tuple(shape)}, parameter {key} needs"
                f" {tuple(expected)}"
            )

    def piece(self, key, path, shape, src: weights.Source, target_dtype, rank=None, experts=None) -> Piece:
        names = _names(src)
        dtypes = {n: self._info(n, key)[0] for n in names}
        src_dtype = dtypes[names[0]] if names else np.dtype(target_dtype)  # a rank holding no expert
        target_fp8 = is_fp8(target_dtype)
        for n, d in dtypes.items():
            if d != src_dtype:
                raise CheckpointError(
                    f"{self.ckpt.file_of(n)}: tensor {n!r} has dtype {d}, the other tensors of parameter {key}"
                    f" have {src_dtype}"
                )
        if target_fp8 and not is_fp8(src_dtype):
            raise CheckpointError(
                f"{self.ckpt.file_of(names[0])}: tensor {names[0]!r} has dtype {src_dtype}, parameter {key} is"
                " float8_e4m3fn (config.json declares FP8 block quantization)"
            )
        dequantize = is_fp8(src_dtype) and not target_fp8
        if dequantize and self.block is None:
            raise CheckpointError(
                f"{self.ckpt.file_of(names[0])}: tensor {names[0]!r} is FP8 but config.json has no"
                " quantization_config.weight_block_size"
            )
        stored = np.dtype(src_dtype)
        if dequantize:
            stored = np.dtype(np.float32 if self.policy == "keep_fp8" else ml_dtypes.bfloat16)

        if src.kind == "copy":
            expected = shape
        elif src.kind == "transpose":
            expected = shape[::-1]
        elif src.shape is not None:  # FP8 experts: the checkpoint's [out, in], padded when stored
            expected = src.shape
        else:
            m = len(src.names)
            if shape[-1] % m:
                raise CheckpointError(f"parameter {key}: shape {shape} does not split into {m} matrices")
            expected = (shape[-1] // m, shape[-2])
        source_bytes = 0
        for n in names:
            self._expect(n, key, expected)
            source_bytes += prod(expected) * np.dtype(src_dtype).itemsize
            if dequantize:
                bo, bi = self.block
                scale = scale_name(n)
                self._expect(scale, key, (-(-expected[0] // bo), -(-expected[1] // bi)))
                self.consumed.add(scale)
                source_bytes += prod(self.ckpt.info(scale)[1]) * self.ckpt.info(scale)[0].itemsize
        self.consumed.update(names)
        self.source_dtype[key] = np.dtype(src_dtype).name
        # Slabs follow the rows of the source: rows of a copy, columns of a transposed matrix; an expert is whole.
        axis = 1 if src.kind == "transpose" else 0
        align = self.block[0] if dequantize and src.kind != "experts" else 1
        return Piece(key, path, checkpoint.group_of(path, rank), tuple(shape), stored, axis, align, src, dequantize,
                     source_bytes, rank, experts)


def read_hf_config(path: str) -> dict:
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{config_path}: missing (an HF checkpoint directory needs its config.json)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: cannot read: {e}") from e

