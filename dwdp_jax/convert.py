"""Converts an HF DeepSeek-V3/R1 checkpoint into our orbax checkpoint (`dwdp_jax.checkpoint`), streaming.

    python -m dwdp_jax.convert --input=HF_DIR --output=OUT_DIR [--dtype_policy=keep_fp8|bf16]
        [--group_size=G | --placement=placement.json] [--mtp|--nomtp] [--inspect] [--verify] [--workers=N]

Every model parameter is built from its HF tensors by the same table the loader uses (`weights.hf_source`).
Orbax saves an item from memory, so the output is cut into items of at most about ITEM_BYTES (whole parameters,
or slabs of a larger one: experts, rows of a copied tensor, columns of a transposed one). A pool of `workers`
threads each builds one item and saves it (orbax syncs each item to disk before returning), so the reads,
transposes and dequantization of some items overlap the writes of others: source bytes are read with `pread`
into fresh buffers (no memmap, whose resident pages would count against the process), at most about
CHUNK_BYTES of source at a time when transposing or dequantizing, transposed and dequantized with vectorized
numpy (`quant.transpose_np`, `quant.dequantize_np`: numpy releases the GIL), assembled into the item's arrays
and handed to orbax. Peak memory is about `workers` items plus the interpreter, whatever the checkpoint size. A
progress bar shows source bytes converted, throughput and ETA; another thread hashes the source files.

Routed experts are laid out for a DWDP group: with group size G (contiguous split) or a planner placement,
each MoE layer's expert parameters become one array per rank holding that rank's experts (replicas included),
in that rank's own items, so a rank restores only its own items (`checkpoint.rank_experts`). The MTP modules,
which the placement does not cover, use the contiguous split.

dtype policies: keep_fp8 stores FP8 weights with their block scales as in the source; bf16 dequantizes them
(value * scale in float32, rounded to bfloat16). Everything else keeps its source dtype, except a weight the
model keeps unquantized but the source has in FP8 (the MTP eh_proj): dequantized, float32 under keep_fp8.

--inspect lists the parameters the conversion would write (or a converted checkpoint holds), with shapes,
dtypes and per-kind byte totals, and writes nothing. --verify restores every item through orbax and compares it
bit-exactly with the tensors re-derived from the source through `weights.hf_source`/`weights.assemble` (after
converting, or alone when OUT_DIR already holds a converted checkpoint).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import mmap
import os
import re
import sys
import threading
from typing import Callable

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging
from flax import nnx, traverse_util
from tqdm import tqdm

from dwdp_jax import checkpoint, quant, weights
from dwdp_jax import config as config_lib
from dwdp_jax.model import DeepseekV3
from dwdp_jax.planner.placement import Placement, PlacementError
from dwdp_jax.safetensors_io import INDEX_NAME, CheckpointDir, CheckpointError

CONVERTER_VERSION = "2.0"
POLICIES = ("keep_fp8", "bf16")
ITEM_BYTES = 256 << 20  # target size of one orbax item (one expert, or one row/column, may exceed it)
CHUNK_BYTES = 16 << 20  # target size of one source read when transposing or dequantizing
# Items built and saved at once (each thread holds one): 3 on the 2-core machine of experiments/bench_convert.py
# (2: 12.0 s, 3: 10.5 s for 5.9 GB of keep_fp8); more cores and faster disks take more.
WORKERS = min(8, (os.cpu_count() or 2) + 1)
_HASH_READ = 64 << 20  # a multiple of mmap.ALLOCATIONGRANULARITY


class VerifyError(CheckpointError):
    """A converted checkpoint does not match its source."""


def _is_fp8(dtype) -> bool:
    return np.dtype(dtype).name.startswith("float8")


def _prod(shape) -> int:
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


# --------------------------------------------------------------------------------------------------------- plan


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
        per = _prod(self.shape) // max(1, extent) * self.dtype.itemsize
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
        return sum(_slab_bytes(piece, a, b) for piece, a, b in self.slabs)


def _slab_bytes(piece: Piece, a: int, b: int) -> int:
    return _prod(piece.shape) // max(1, piece.shape[piece.axis]) * (b - a) * piece.dtype.itemsize


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
                nbytes = _slab_bytes(piece, a, b)
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
        return sum(_prod(p.shape) * p.dtype.itemsize for p in self.pieces)


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


def _scale_name(name: str) -> str:
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
        target_fp8 = _is_fp8(target_dtype)
        for n, d in dtypes.items():
            if d != src_dtype:
                raise CheckpointError(
                    f"{self.ckpt.file_of(n)}: tensor {n!r} has dtype {d}, the other tensors of parameter {key}"
                    f" have {src_dtype}"
                )
        if target_fp8 and not _is_fp8(src_dtype):
            raise CheckpointError(
                f"{self.ckpt.file_of(names[0])}: tensor {names[0]!r} has dtype {src_dtype}, parameter {key} is"
                " float8_e4m3fn (config.json declares FP8 block quantization)"
            )
        dequantize = _is_fp8(src_dtype) and not target_fp8
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
            source_bytes += _prod(expected) * np.dtype(src_dtype).itemsize
            if dequantize:
                bo, bi = self.block
                scale = _scale_name(n)
                self._expect(scale, key, (-(-expected[0] // bo), -(-expected[1] // bi)))
                self.consumed.add(scale)
                source_bytes += _prod(self.ckpt.info(scale)[1]) * self.ckpt.info(scale)[0].itemsize
        self.consumed.update(names)
        self.source_dtype[key] = np.dtype(src_dtype).name
        # Slabs follow the rows of the source: rows of a copy, columns of a transposed matrix; an expert is whole.
        axis = 1 if src.kind == "transpose" else 0
        align = self.block[0] if dequantize and src.kind != "experts" else 1
        return Piece(key, path, checkpoint.group_of(path, rank), tuple(shape), stored, axis, align, src, dequantize,
                     source_bytes, rank, experts)


# ---------------------------------------------------------------------------------------------------- streaming


class SourceReader:
    """Reads tensors (or row ranges of them) of an HF checkpoint into fresh numpy arrays with pread.

    Quacks like `CheckpointDir` for `weights.assemble` (read, file_of). Unlike the memmap reads of
    `CheckpointDir`, nothing stays mapped, so resident memory is only what the caller keeps. Safe to share
    between threads (positional reads; file descriptors opened under a lock)."""

    def __init__(self, ckpt: CheckpointDir, block=None):
        self.ckpt, self.block = ckpt, block
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> "SourceReader":
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def file_of(self, name: str) -> str:
        return self.ckpt.file_of(name)

    def read(self, name: str) -> np.ndarray:
        return self.rows(name, 0, self.ckpt.info(name)[1][0])

    def rows(self, name: str, r0: int, r1: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [r0, r1) of a tensor, into `out` (C-contiguous, the tensor's dtype) when given."""
        if name not in self.ckpt:
            raise CheckpointError(f"{self.ckpt.path}: missing tensor {name!r}")
        shard = self.ckpt.shards[self.ckpt.location[name]]
        dtype, shape, begin = shard.tensors[name]
        if out is None:
            out = np.empty((r1 - r0,) + tuple(shape[1:]), dtype)
        assert out.dtype == dtype and out.shape == (r1 - r0,) + tuple(shape[1:]) and out.flags.c_contiguous
        row_bytes = _prod(shape[1:]) * dtype.itemsize
        self._pread(shard.path, name, out, shard.data_start + begin + r0 * row_bytes)
        return out

    def dequantized_rows(self, name: str, r0: int, r1: int, dtype, transpose: bool = False,
                         out: np.ndarray | None = None, alloc=np.empty) -> np.ndarray:
        """Rows [r0, r1) of an FP8 [out, in] weight times its block scales, in `dtype` (transposed: [in, r1 - r0]),
        exactly as `weights.assemble` computes them; r0 must start a block. alloc: see `quant.dequantize_np`."""
        bo, _ = self.block
        assert r0 % bo == 0, (name, r0, bo)
        scale = self.rows(_scale_name(name), r0 // bo, -(-r1 // bo))
        value = self.rows(name, r0, r1, out=alloc((r1 - r0,) + tuple(self.ckpt.info(name)[1][1:]), quant.FP8))
        return quant.dequantize_np(value, scale, self.block, dtype, transpose, out, alloc)

    def _fd(self, path: str) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(f"{path}: cannot open shard: {e}") from e
            return fd

    def _pread(self, path: str, name: str, out: np.ndarray, offset: int):
        fd = self._fd(path)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        done = 0
        while done < len(buf):
            try:
                n = os.preadv(fd, [buf[done:]], offset + done)
            except OSError as e:
                raise CheckpointError(f"{path}: reading tensor {name!r} failed: {e}") from e
            if n == 0:
                raise CheckpointError(f"{path}: truncated: tensor {name!r} ends past the end of the file")
            done += n


def _rows_as_stored(reader: SourceReader, piece: Piece, name: str, r0: int, r1: int, transpose: bool,
                    out: np.ndarray | None = None, scratch: Arena | None = None) -> np.ndarray:
    """Source rows [r0, r1) of tensor `name` in the piece's stored dtype, transposed ([in, r1 - r0]) or not:
    dequantized when the piece is (FP8 source, unquantized parameter), else as read. The result (when `out` is
    None) and the temporaries come from `scratch` (reset here) when given."""
    alloc = np.empty
    if scratch is not None:
        scratch.reset()
        alloc = scratch.empty
    if piece.dequantize:
        return reader.dequantized_rows(name, r0, r1, piece.dtype, transpose, out, alloc)
    if not transpose:
        return reader.rows(name, r0, r1, out=out)
    dtype, shape = reader.ckpt.info(name)
    return quant.transpose_np(reader.rows(name, r0, r1, out=alloc((r1 - r0,) + tuple(shape[1:]), dtype)), out, alloc)


class Arena:
    """A worker's reusable memory: arrays are cut from one buffer that outlives them, so building an item costs
    no fresh pages (page faults and kernel zeroing were an eighth of the converter's CPU). Each worker has one for
    the arrays of its item (handed to orbax, which has written them when `save` returns) and one for the
    temporaries of one source chunk (reads, transposes, dequantization)."""

    def __init__(self):
        self._buffer = np.empty(0, np.uint8)
        self._used = 0

    def reset(self, nbytes: int = 0):
        """Frees every array cut so far (the caller no longer uses them); makes room for `nbytes` (64-byte
        alignment included; more grows the buffer)."""
        if self._buffer.size < nbytes:
            self._buffer = np.empty(0, np.uint8)  # drop the old buffer before allocating the new one
            self._buffer = np.empty(nbytes, np.uint8)
        self._used = 0

    def empty(self, shape: tuple, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        start = -(-self._used // 64) * 64
        stop = start + _prod(shape) * dtype.itemsize
        if stop > self._buffer.size:  # a larger buffer; arrays cut from the old one keep it alive while in use
            self._buffer = np.empty(max(stop - start, 2 * self._buffer.size), np.uint8)
            start, stop = 0, stop - start
        self._used = stop
        return self._buffer[start:stop].view(dtype).reshape(shape)


def read_slab(piece: Piece, start: int, stop: int, reader: SourceReader, fp8_layout: bool,
              progress: Callable[[int], None] = lambda nbytes: None, arena: Arena | None = None,
              scratch: Arena | None = None) -> np.ndarray:
    """piece[start:stop] along `piece.axis`, laid out as `weights.assemble` does, in a fresh array (or one cut from
    `arena`; temporaries from `scratch`); reads at most about CHUNK_BYTES of source at a time when transposing or
    dequantizing. progress(source bytes) per read."""
    src, shape, axis = piece.source, piece.shape, piece.axis
    out_shape = shape[:axis] + (stop - start,) + shape[axis + 1 :]
    out = arena.empty(out_shape, piece.dtype) if arena is not None else np.empty(out_shape, piece.dtype)
    if src.shape is not None and src.shape != src.padded:
        quant.as_bits(out)[...] = 0  # FP8 experts padded to whole blocks: the padding is zeros
    extent = shape[axis]
    if src.kind == "experts":
        per_expert = piece.source_bytes // max(1, extent)
        for i in range(start, stop):
            for m, names in enumerate(src.names):
                name = names[i]
                rows = reader.ckpt.info(name)[1][0]
                if fp8_layout:  # [out, in]: gate rows then up rows (each padded to src.padded)
                    r0 = m * src.padded[0]
                    if src.shape[1] == src.padded[1]:  # whole rows: read straight into the slab
                        reader.rows(name, 0, rows, out=out[i - start, r0 : r0 + rows])
                    else:
                        quant.as_bits(out[i - start, r0 : r0 + rows, : src.shape[1]])[...] = quant.as_bits(
                            reader.rows(name, 0, rows))
                elif len(src.names) == 1:  # [in, out]: the down matrix, transposed straight into the slab
                    _rows_as_stored(reader, piece, name, 0, rows, True, out[i - start], scratch)
                else:  # [in, out]: gate columns then up columns
                    quant.as_bits(out[i - start, :, m * rows : (m + 1) * rows])[...] = quant.as_bits(
                        _rows_as_stored(reader, piece, name, 0, rows, True, scratch=scratch))
            progress(per_expert)
        return out
    name = src.names[0]
    if axis == 0 and not piece.dequantize:  # rows of a copy, straight into the slab
        reader.rows(name, start, stop, out=out)
        progress(piece.source_bytes * (stop - start) // extent)
        return out
    step = max(1, CHUNK_BYTES // max(1, _prod(shape) // extent * piece.dtype.itemsize))
    step = max(piece.align, step // piece.align * piece.align)
    for a in range(start, stop, step):
        b = min(a + step, stop)
        if axis == 0:
            _rows_as_stored(reader, piece, name, a, b, False, out[a - start : b - start], scratch)
        elif start == a and b == stop:  # the whole slab in one read: transposed straight into it
            _rows_as_stored(reader, piece, name, a, b, True, out, scratch)
        else:
            rows = _rows_as_stored(reader, piece, name, a, b, True, scratch=scratch)
            quant.as_bits(out[:, a - start : b - start])[...] = quant.as_bits(rows)
        progress(piece.source_bytes * (b - a) // extent)
    return out


def _source_files(ckpt: CheckpointDir) -> list[str]:
    names = ["config.json"] + ([INDEX_NAME] if os.path.exists(os.path.join(ckpt.path, INDEX_NAME)) else [])
    return names + sorted(ckpt.shards)


def _hash_files(root: str, names: list[str], stop: threading.Event | None = None) -> list[dict]:
    """[{name, bytes, sha256}] of the files, hashed through read-only mappings of _HASH_READ bytes: no copy into
    the process (half the CPU of read() + hash), and the pages it brings in serve the converter's reads. hashlib
    releases the GIL, so this overlaps the conversion."""
    out = []
    for name in names:
        digest = hashlib.sha256()
        with open(os.path.join(root, name), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            for offset in range(0, size, _HASH_READ):
                if stop is not None and stop.is_set():
                    return out
                with mmap.mmap(f.fileno(), min(_HASH_READ, size - offset), offset=offset,
                               access=mmap.ACCESS_READ) as window:
                    window.madvise(mmap.MADV_SEQUENTIAL)
                    digest.update(window)
        out.append(dict(name=name, bytes=size, sha256=digest.hexdigest()))
    return out


def _read_hf_config(path: str) -> dict:
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{config_path}: missing (an HF checkpoint directory needs its config.json)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: cannot read: {e}") from e


def convert(
    input_dir: str,
    output_dir: str,
    *,
    dtype_policy: str = "keep_fp8",
    group_size: int | None = None,
    placement: Placement | None = None,
    placement_source: str = "contiguous",
    mtp: bool | None = None,
    progress: bool = True,
    workers: int = WORKERS,
) -> dict:
    """Converts HF_DIR into OUT_DIR (which must not exist). Returns the metadata.

    `workers` threads each build one item at a time (pread, transposes, dequantization: numpy releases the GIL)
    and save it (orbax, which syncs it to disk), so reads, compute and writes of different items overlap while at
    most `workers` items are in memory; a thread hashes the source files meanwhile."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    input_dir = os.path.abspath(input_dir)
    ckpt = CheckpointDir(input_dir)
    hf_config = _read_hf_config(input_dir)
    plan = make_plan(ckpt, hf_config, dtype_policy=dtype_policy, group_size=group_size, placement=placement, mtp=mtp)
    fp8_layout = plan.cfg.weight_block_size is not None
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as hasher, checkpoint.Writer(output_dir) as writer:
        hashes = hasher.submit(_hash_files, input_dir, _source_files(ckpt), stop)
        try:
            with SourceReader(ckpt, plan.source_cfg.weight_block_size) as reader, tqdm(
                total=plan.source_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="dwdp-convert",
                disable=not progress, mininterval=1.0, file=sys.stderr,
            ) as bar:
                lock = threading.Lock()

                def update(nbytes: int):
                    with lock:
                        bar.update(nbytes)

                arenas = threading.local()

                def write(item: Item):
                    if stop.is_set():  # another item failed: do not start this one
                        return
                    if not hasattr(arenas, "item"):
                        arenas.item, arenas.scratch = Arena(), Arena()
                    arenas.item.reset(sum(_slab_bytes(piece, a, b) + 64 for piece, a, b in item.slabs))
                    arrays = {piece.path: read_slab(piece, a, b, reader, fp8_layout, update, arenas.item,
                                                    arenas.scratch)
                              for piece, a, b in item.slabs}
                    writer.save_item(item.name, arrays)

                with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="dwdp-convert") as pool:
                    futures = [pool.submit(write, item) for item in plan.items]
                    try:
                        for future in concurrent.futures.as_completed(futures):
                            future.result()
                    except BaseException:
                        stop.set()
                        for future in futures:
                            future.cancel()
                        raise
            metadata = _metadata(plan, input_dir, hf_config, hashes.result(), placement_source)
        finally:
            stop.set()
        writer.commit(metadata, {"config.json": _output_hf_config(hf_config, plan.cfg)})
    return metadata


def _output_hf_config(hf_config: dict, cfg: config_lib.ModelConfig) -> dict:
    """The source's config.json, edited to describe what the output holds (`from_hf_json(OUT_DIR)` == cfg)."""
    out = dict(hf_config)
    if cfg.weight_block_size is None:
        out.pop("quantization_config", None)
    if not cfg.num_mtp_layers:
        out["num_nextn_predict_layers"] = 0
    return out


def _metadata(plan: Plan, input_dir: str, hf_config: dict, files: list[dict], placement_source: str) -> dict:
    return {
        "format": checkpoint.FORMAT,
        "format_version": checkpoint.FORMAT_VERSION,
        "converter": {"name": "dwdp_jax.convert", "version": CONVERTER_VERSION},
        "orbax_checkpoint_version": ocp.__version__,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": input_dir, "files": files, "ignored_tensors": plan.ignored},
        "hf_config": hf_config,
        "model_config": checkpoint.config_to_json(plan.cfg),
        "dtype_policy": plan.dtype_policy,
        "group_size": plan.group_size,
        "placement_source": placement_source,
        "placement": plan.placement.to_json_dict() if plan.placement is not None else None,
        "mtp": plan.mtp,
        "source_bytes": plan.source_bytes,
        "output_bytes": plan.output_bytes,
        "item_bytes": plan.item_bytes,
        "items": [dict(name=item.name, group=item.group, bytes=item.nbytes) for item in plan.items],
        "params": plan.params,
    }


# ---------------------------------------------------------------------------------------------------- verify


def verify(output_dir: str, input_dir: str | None = None, *, check_hashes: bool = True, progress: bool = True) -> dict:
    """Restores every item through orbax (on the host, one at a time) and compares it bit-exactly with the
    tensors re-derived from the source (`weights.hf_source` + `weights.assemble`); also checks that the source
    files still have the recorded sizes and sha256 and that the stored parameters and items are exactly the
    planned ones. Raises VerifyError naming the item and array; returns a summary."""
    output_dir = os.path.abspath(output_dir)
    meta = checkpoint.read_metadata(output_dir)
    input_dir = os.path.abspath(input_dir or meta["source"]["path"])
    ckpt = CheckpointDir(input_dir)
    if check_hashes:
        recorded = {f["name"]: f for f in meta["source"]["files"]}
        for now in _hash_files(input_dir, list(recorded)):
            then = recorded[now["name"]]
            if (now["bytes"], now["sha256"]) != (then["bytes"], then["sha256"]):
                raise VerifyError(
                    f"{os.path.join(input_dir, now['name'])}: changed since conversion ({now['bytes']} bytes,"
                    f" sha256 {now['sha256'][:16]}..., recorded {then['bytes']} bytes, {then['sha256'][:16]}...)"
                )
    placement = Placement.from_json_dict(meta["placement"]) if meta["placement"] else None
    plan = make_plan(ckpt, _read_hf_config(input_dir), dtype_policy=meta["dtype_policy"],
                     group_size=meta["group_size"], placement=placement, mtp=meta["mtp"],
                     item_bytes=meta["item_bytes"])
    stored = {p["key"]: p for p in meta["params"]}
    planned = {p["key"]: p for p in plan.params}
    odd = sorted(set(stored) ^ set(planned))
    if odd:
        raise VerifyError(f"{output_dir}: parameter {odd[0]} is {'missing' if odd[0] in planned else 'unexpected'}")
    for key, p in planned.items():
        if p["arrays"] != stored[key]["arrays"] or p["dtype"] != stored[key]["dtype"]:
            raise VerifyError(f"{output_dir}: parameter {key}: stored arrays differ from the planned ones")
    expected = {item.name for item in plan.items}
    on_disk = {d for d in os.listdir(output_dir)
               if os.path.isdir(os.path.join(output_dir, d)) and d != checkpoint.METADATA_ITEM}
    odd = sorted(on_disk ^ expected)
    if odd:
        raise VerifyError(f"{output_dir}: item {odd[0]} is {'missing' if odd[0] in expected else 'unexpected'}")

    fp8_layout = plan.cfg.weight_block_size is not None
    reference = (None, None)  # (piece key, whole stored array): a piece's slabs lie in consecutive items
    with SourceReader(ckpt, plan.source_cfg.weight_block_size) as reader, tqdm(
        total=plan.output_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="dwdp-verify",
        disable=not progress, mininterval=1.0, file=sys.stderr,
    ) as bar:
        for item in plan.items:
            where = os.path.join(output_dir, item.name)
            try:
                restored = checkpoint.restore_items(
                    output_dir, {item.name: {piece.path: ocp.RestoreArgs(restore_type=np.ndarray)
                                             for piece, _, _ in item.slabs}})[item.name]
            except CheckpointError as e:
                raise VerifyError(str(e)) from e
            for piece, a, b in item.slabs:
                got = restored[piece.path]
                if piece.experts is not None:
                    for slot in range(a, b):
                        expert = piece.experts[slot]
                        ref = _reference(piece, weights.hf_source(piece.path, plan.cfg, [expert]), reader, fp8_layout)
                        _compare(f"{where}: {piece.key}", f"expert {expert} (slot {slot})",
                                 got[slot - a : slot - a + 1], ref)
                else:
                    if reference[0] != piece.key:
                        reference = (piece.key, _reference(piece, piece.source, reader, fp8_layout))
                    index = (slice(None),) * piece.axis + (slice(a, b),)
                    what = f"{'rows' if piece.axis == 0 else 'columns'} {a}:{b}"
                    _compare(f"{where}: {piece.key}", what, got, reference[1][index])
                bar.update(got.nbytes)
    return {"arrays": len(plan.pieces), "items": len(plan.items), "bytes": plan.output_bytes,
            "source_bytes": plan.source_bytes}


def _reference(piece: Piece, src: weights.Source, reader: SourceReader, fp8_layout: bool) -> np.ndarray:
    """What the stored array (or one expert of it) must hold, built by the HF loader's `weights.assemble`."""
    array = weights.assemble(src, reader, keep_fp8=not piece.dequantize, block=reader.block, fp8_experts=fp8_layout)
    return array.astype(piece.dtype, copy=False)


def _compare(where: str, what: str, got: np.ndarray, ref: np.ndarray):
    if got.shape != ref.shape or got.dtype != ref.dtype:
        raise VerifyError(f"{where}: {what}: stored {got.dtype}{got.shape}, source gives {ref.dtype}{ref.shape}")
    a, b = got.reshape(-1).view(np.uint8), np.ascontiguousarray(ref).reshape(-1).view(np.uint8)
    if not np.array_equal(a, b):
        raise VerifyError(f"{where}: {what}: {int((a != b).sum())} of {a.size} bytes differ from the source")


# ---------------------------------------------------------------------------------------------------- inspect


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def inspect(
    path: str,
    *,
    dtype_policy: str = "keep_fp8",
    group_size: int | None = None,
    placement: Placement | None = None,
    mtp: bool | None = None,
) -> str:
    """A table of the parameters a conversion of HF dir `path` would write (or converted checkpoint `path`
    holds): shape, stored and source dtype, bytes, arrays; then totals per kind. Writes nothing."""
    if checkpoint.is_checkpoint(path):
        meta = checkpoint.read_metadata(path)
        params = meta["params"]
        header = (f"{path}: converted checkpoint (dtype_policy={meta['dtype_policy']}, group_size="
                  f"{meta['group_size']}, placement={meta['placement_source']}, mtp={meta['mtp']}; orbax composite"
                  f" checkpoint of {len(meta['items'])} items)")
    else:
        ckpt = CheckpointDir(path)
        plan = make_plan(ckpt, _read_hf_config(path), dtype_policy=dtype_policy, group_size=group_size,
                         placement=placement, mtp=mtp)
        params = plan.params
        files = len(ckpt.shards)
        header = (f"{path}: HF checkpoint, {len(ckpt.names())} tensors in {files} shard(s); conversion with"
                  f" dtype_policy={dtype_policy}, group_size={plan.group_size}, mtp={plan.mtp}, into"
                  f" {len(plan.items)} orbax items of at most {_fmt_bytes(plan.item_bytes)}"
                  + (f"; {len(plan.ignored)} tensors not converted" if plan.ignored else ""))
    lines = [header, f"{'parameter':<48} {'kind':<15} {'shape':<22} {'dtype':<14} {'source':<14} {'bytes':>11}  arrays"]
    totals: dict[str, list] = {}
    for p in params:
        out_bytes = sum(_prod(a["shape"]) * np.dtype(a["dtype"]).itemsize for a in p["arrays"])
        arrays = f"{len(p['arrays'])} ranks" if len(p["arrays"]) > 1 else "1"
        slabs = sum(len(a["slabs"]) for a in p["arrays"])
        arrays += f", {slabs} slabs" if slabs > len(p["arrays"]) else ""
        lines.append(f"{p['key']:<48} {p['kind']:<15} {str(p['shape']):<22} {p['dtype']:<14} {p['source_dtype']:<14}"
                     f" {_fmt_bytes(out_bytes):>11}  {arrays}")
        t = totals.setdefault(p["kind"], [0, 0, 0])
        t[0] += 1
        t[1] += p["source_bytes"]
        t[2] += out_bytes
    lines.append("")
    lines.append(f"{'kind':<16} {'params':>7} {'source bytes':>14} {'output bytes':>14}")
    for kind, (n, src, out) in sorted(totals.items()):
        lines.append(f"{kind:<16} {n:>7} {_fmt_bytes(src):>14} {_fmt_bytes(out):>14}")
    n, src, out = (sum(t[i] for t in totals.values()) for i in range(3))
    lines.append(f"{'total':<16} {n:>7} {_fmt_bytes(src):>14} {_fmt_bytes(out):>14}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------- CLI

FLAGS = flags.FLAGS


_FLAGS = [
    (flags.DEFINE_string, "input", None, "HF checkpoint directory: config.json + *.safetensors (+ index if sharded).",
     {}),
    (flags.DEFINE_string, "output", None, "Output directory; must not exist (written to a temporary sibling).", {}),
    (flags.DEFINE_enum, "dtype_policy", "keep_fp8", "keep_fp8: FP8 + block scales as in the source; bf16: "
     "dequantize FP8 weights to bfloat16.", dict(enum_values=POLICIES)),
    (flags.DEFINE_integer, "group_size", None, "DWDP group size: routed experts split contiguously over this many "
     "ranks (default 1, or the placement's rank count).", {}),
    (flags.DEFINE_string, "placement", None, "Placement JSON from the planner (Placement.save) instead of the "
     "contiguous split.", {}),
    (flags.DEFINE_bool, "mtp", None, "Convert the MTP modules (default: when the checkpoint has them).", {}),
    (flags.DEFINE_bool, "inspect", False, "List parameters, shapes, dtypes and per-kind bytes; write nothing.", {}),
    (flags.DEFINE_bool, "verify", False, "Compare every stored tensor bit-exactly with the source (after "
     "converting, or alone when --output already holds a converted checkpoint).", {}),
    (flags.DEFINE_bool, "progress", True, "Show a progress bar (bytes, throughput, ETA).", {}),
    (flags.DEFINE_integer, "workers", None, "Threads building and saving items at once (default: CPUs + 1, at most"
     " 8); each holds one item in memory.", {}),
]


def _define_flags():
    """Defines the CLI's flags at run time, each unless another entry point in this process already has it
    (the launcher shares --group_size and --progress)."""
    for define, name, default, help_text, extra in _FLAGS:
        if name not in FLAGS:
            define(name, default, help=help_text, **extra)


def _pin_mmap_threshold(nbytes: int = 1 << 20):
    """Has glibc serve every allocation above `nbytes` with its own mmap, returned to the OS when freed.

    By default glibc raises its mmap threshold after each large free (up to 32 MiB), so chunk-sized buffers
    then come from the heap and per-thread arenas, where the converter's and TensorStore's threads leave them
    fragmented: peak RSS creeps up by hundreds of MB. Only the CLI process does this (a library must not)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def main(argv) -> int:
    _pin_mmap_threshold()
    if not FLAGS["verbosity"].present:  # orbax logs every item it saves or restores at INFO
        logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        print(f"dwdp-convert: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    try:
        placement = Placement.load(FLAGS.placement) if FLAGS.placement else None
        if FLAGS.inspect:
            target = FLAGS.input or FLAGS.output
            if not target:
                print("dwdp-convert: --inspect needs --input (or a converted --output)", file=sys.stderr)
                return 2
            print(inspect(target, dtype_policy=FLAGS.dtype_policy, group_size=FLAGS.group_size,
                          placement=placement, mtp=FLAGS.mtp))
            return 0
        if not FLAGS.output or not (FLAGS.input or FLAGS.verify):
            print("dwdp-convert: needs --input and --output", file=sys.stderr)
            return 2
        if not (FLAGS.verify and checkpoint.is_checkpoint(FLAGS.output)):
            meta = convert(FLAGS.input, FLAGS.output, dtype_policy=FLAGS.dtype_policy, group_size=FLAGS.group_size,
                           placement=placement, placement_source=FLAGS.placement or "contiguous", mtp=FLAGS.mtp,
                           progress=FLAGS.progress, workers=FLAGS.workers or WORKERS)
            print(f"dwdp-convert: wrote {FLAGS.output}: {len(meta['params'])} parameters, "
                  f"{_fmt_bytes(meta['output_bytes'])} from {_fmt_bytes(meta['source_bytes'])} of source")
        if FLAGS.verify:
            summary = verify(FLAGS.output, FLAGS.input, progress=FLAGS.progress)
            print(f"dwdp-convert: verified {FLAGS.output}: {summary['arrays']} arrays in {summary['items']} items, "
                  f"{_fmt_bytes(summary['bytes'])} bit-exact with the source")
        return 0
    except (ValueError, OSError) as e:  # CheckpointError, ConfigError, PlacementError are ValueErrors
        print(f"dwdp-convert: error: {e}", file=sys.stderr)
        return 1


def run(argv=None):
    """Console-script entry point (`dwdp-convert`)."""
    _define_flags()
    app.run(main, argv=argv)


if __name__ == "__main__":
    run()
