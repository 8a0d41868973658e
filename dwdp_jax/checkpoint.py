"""Our converted checkpoint: one zarr v3 array per parameter, each MoE layer's routed experts split per rank.

`dwdp_jax.convert` writes it from an HF checkpoint; `restore_model` (and `dwdp_jax.load_model`, which
dispatches here when it finds the metadata file) reads it back. A checkpoint directory holds:

    dwdp_checkpoint.json           metadata: source files (sizes, sha256), the HF config.json, our ModelConfig
                                   fields, dtype policy, group size, placement, converter version, and for every
                                   parameter its shape, dtype and arrays
    config.json                    the HF config.json edited to describe the output (no quantization_config
                                   when dequantized, no MTP when dropped): `from_hf_json(path)` works
    arrays/<key>/zarr.json, c/...  one zarr v3 array per parameter, key = the dotted parameter path, e.g.
                                   `layers.0.self_attn.q_a_proj.kernel`; a routed-expert parameter is one array
                                   per (layer, rank), e.g. `layers.3.mlp.experts.w_gate_up.rank2` [E_r, ...]
                                   holding the rank's experts in the order the metadata lists them

Arrays are written and read with plain TensorStore (`ts.open` with the `zarr3` driver over the `file` kvstore,
`ts.Context`, indexed reads and writes; no orbax API, so the orbax version does not matter). Chunks are stored
uncompressed with a crc32c checksum; a routed-expert weight array has one chunk per expert, so a rank, or any
subset of experts, reads only those experts' chunk files. The writer fills a hidden temporary sibling directory
and renames it into place once complete: a checkpoint directory holds a whole checkpoint or does not exist.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import shutil
import tempfile
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from flax import nnx, traverse_util

from dwdp_jax import config as config_lib
from dwdp_jax.model import DeepseekV3
from dwdp_jax.safetensors_io import CheckpointError
from dwdp_jax.weights import _cast

FORMAT = "dwdp_jax.checkpoint"
FORMAT_VERSION = 1
METADATA_NAME = "dwdp_checkpoint.json"
ARRAYS_DIR = "arrays"
EXPERT_PARAMS = ("w_gate_up", "w_down", "s_gate_up", "s_down")

# No chunk cache (every chunk is written or read once); durability comes from one fsync pass before the rename.
_CONTEXT = {"file_io_sync": False, "cache_pool": {"total_bytes_limit": 0}}


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True when `path` is a directory holding a checkpoint written by `dwdp_jax.convert`."""
    return os.path.isfile(os.path.join(os.fspath(path), METADATA_NAME))


def param_key(path: tuple) -> str:
    return ".".join(map(str, path))


def is_expert_param(path: tuple) -> bool:
    return len(path) >= 2 and path[-2] == "experts" and path[-1] in EXPERT_PARAMS


def layer_of(path: tuple, cfg: config_lib.ModelConfig) -> int | None:
    """Decoder-layer index of a parameter; MTP module d counts as layer num_layers + d (as in `load_state`)."""
    if path[0] == "layers":
        return path[1]
    if path[0] == "mtp":
        return cfg.num_layers + path[1]
    return None


# ------------------------------------------------------------------------------------------------------ metadata


def read_metadata(path: str | os.PathLike) -> dict:
    meta_path = os.path.join(os.fspath(path), METADATA_NAME)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{meta_path}: missing: not a dwdp_jax checkpoint directory") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path}: cannot read checkpoint metadata: {e}") from e
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: format {meta.get('format')!r} version {meta.get('format_version')!r}, this code reads"
            f" {FORMAT!r} version {FORMAT_VERSION}"
        )
    return meta


def config_to_json(cfg: config_lib.ModelConfig) -> dict:
    return dataclasses.asdict(cfg)


def model_config(meta: dict) -> config_lib.ModelConfig:
    """The ModelConfig the checkpoint was written for (FP8 block size None when dequantized at conversion)."""
    fields = dict(meta["model_config"])
    if fields.get("rope_scaling"):
        fields["rope_scaling"] = config_lib.YarnConfig(**fields["rope_scaling"])
    if fields.get("weight_block_size"):
        fields["weight_block_size"] = tuple(fields["weight_block_size"])
    known = {f.name for f in dataclasses.fields(config_lib.ModelConfig)}
    return config_lib.ModelConfig(**{k: v for k, v in fields.items() if k in known})


# -------------------------------------------------------------------------------------------------------- arrays


def _spec(directory: str) -> dict:
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": directory}}


def _num_chunks(shape: Sequence[int], chunk_shape: Sequence[int]) -> int:
    return math.prod(-(-s // c) for s, c in zip(shape, chunk_shape))


class Writer:
    """Creates and fills arrays in a temporary sibling of `path`; `commit(metadata)` renames it to `path`.

    Use as a context manager: leaving the block without `commit` (an error, an interrupt) deletes the temporary
    directory, so no partial checkpoint is ever left under `path`. At most `max_inflight` chunk writes are
    pending at once, which bounds the memory the writer holds.
    """

    def __init__(self, path: str | os.PathLike, max_inflight: int = 2):
        self.path = os.path.abspath(os.fspath(path))
        if os.path.lexists(self.path):
            raise FileExistsError(f"{self.path}: output directory already exists (refusing to overwrite)")
        parent = os.path.dirname(self.path)
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"{parent}: parent of the output directory does not exist")
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.tmp-", dir=parent)
        self.max_inflight = max_inflight
        self._context = ts.Context(_CONTEXT)
        self._stores: dict[str, ts.TensorStore] = {}
        self._pending: collections.deque = collections.deque()
        self.committed = False

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, *exc):
        if not self.committed:
            self.abort()

    def create(self, key: str, shape: Sequence[int], dtype, chunk_shape: Sequence[int]):
        metadata = {
            "shape": list(shape),
            "data_type": np.dtype(dtype).name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [max(1, c) for c in chunk_shape]}},
            "chunk_key_encoding": {"name": "default"},
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
            "fill_value": 0,
        }
        # Chunks equal to the fill value are still written: restore checks that every chunk file exists.
        spec = dict(_spec(os.path.join(self.tmp, ARRAYS_DIR, key)), metadata=metadata,
                    store_data_equal_to_fill_value=True)
        try:
            self._stores[key] = ts.open(spec, create=True, context=self._context).result()
        except ValueError as e:
            raise CheckpointError(f"{self.tmp}: cannot create array {key}: {e}") from e

    def write(self, key: str, index: tuple, array: np.ndarray):
        """Writes `array` into region `index` of array `key`, asynchronously (errors surface here or in
        `commit`). TensorStore reads `array` in place, without a copy: the caller must not modify it after."""
        future = self._stores[key][index].write(array, can_reference_source_data_indefinitely=True)
        self._pending.append((key, future))
        while len(self._pending) > self.max_inflight:
            self._wait(*self._pending.popleft())

    def _wait(self, key, future):
        try:
            future.result()
        except ValueError as e:
            raise CheckpointError(f"{self.tmp}: writing array {key} failed: {e}") from e

    def write_json(self, name: str, obj: dict):
        with open(os.path.join(self.tmp, name), "w") as f:
            json.dump(obj, f, indent=1)

    def commit(self, metadata: dict):
        """Writes the metadata, syncs every file to disk and renames the directory into place."""
        while self._pending:
            self._wait(*self._pending.popleft())
        self.write_json(METADATA_NAME, metadata)
        _fsync_tree(self.tmp)
        if os.path.lexists(self.path):
            raise FileExistsError(f"{self.path}: output directory appeared while converting (refusing to overwrite)")
        os.rename(self.tmp, self.path)
        _fsync_dir(os.path.dirname(self.path))
        self.committed = True

    def abort(self):
        for _, future in self._pending:
            try:
                future.result()
            except Exception:  # the directory is deleted anyway
                pass
        self._pending.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _fsync_dir(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str):
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(directory)


def open_array(path: str | os.PathLike, array: dict, context: ts.Context | None = None) -> ts.TensorStore:
    """Opens one stored array (an entry of a parameter's `arrays` in the metadata) for reading, after checking
    its shape and dtype against the metadata and that none of its chunk files is missing (zarr would read a
    missing chunk as zeros)."""
    directory = os.path.join(os.fspath(path), ARRAYS_DIR, array["key"])
    try:
        store = ts.open(_spec(directory), open=True, read=True, context=context or ts.Context(_CONTEXT)).result()
    except ValueError as e:
        raise CheckpointError(f"{directory}: cannot open array {array['key']}: {e}") from e
    if list(store.shape) != list(array["shape"]) or store.dtype.name != array["dtype"]:
        raise CheckpointError(
            f"{directory}: array {array['key']} is {store.dtype.name}{list(store.shape)}, the metadata says"
            f" {array['dtype']}{list(array['shape'])}"
        )
    expected = _num_chunks(array["shape"], array["chunk_shape"])
    found = sum(len(files) for _, _, files in os.walk(os.path.join(directory, "c")))
    if found != expected:
        raise CheckpointError(f"{directory}: array {array['key']} has {found} chunk files, expected {expected}")
    return store


def read_array(path, array: dict, index=None, context=None) -> np.ndarray:
    """Reads a stored array (or `store[index]`) into numpy; a corrupt chunk raises CheckpointError."""
    store = open_array(path, array, context)
    try:
        return (store if index is None else store[index]).read().result()
    except ValueError as e:
        raise CheckpointError(f"{os.path.join(os.fspath(path), ARRAYS_DIR, array['key'])}: {e}") from e


def read_experts(path, param: dict, expert_ids: Sequence[int] | None, context=None) -> np.ndarray:
    """Routed-expert parameter restricted to `expert_ids` (all when None): [len(ids), ...] in that order.

    A rank's own array is read whole when it holds exactly the requested experts; otherwise each expert comes
    from the first array (in rank order) that holds it, reading only its chunks.
    """
    arrays = param["arrays"]
    ids = list(range(param["shape"][0])) if expert_ids is None else [int(e) for e in expert_ids]
    for array in arrays:
        if array["experts"] == ids:
            return read_array(path, array, context=context)
    where = {}
    for a, array in enumerate(arrays):
        for slot, e in enumerate(array["experts"]):
            where.setdefault(e, (a, slot))
    missing = [e for e in ids if e not in where]
    if missing:
        raise CheckpointError(f"{path}: parameter {param['key']} has no stored expert(s) {missing[:8]}")
    out = np.empty((len(ids),) + tuple(param["shape"][1:]), np.dtype(arrays[0]["dtype"]))
    by_array = collections.defaultdict(list)
    for pos, e in enumerate(ids):
        by_array[where[e][0]].append((pos, where[e][1]))
    for a, pairs in by_array.items():
        positions, slots = zip(*pairs)
        out[list(positions)] = read_array(path, arrays[a], np.asarray(slots, np.int64), context)
    return out


# ------------------------------------------------------------------------------------------------------ restore


def rank_experts(path_or_meta, rank: int) -> tuple[Callable[[int], np.ndarray], int]:
    """(expert_ids, n_local_experts) for DWDP rank `rank` of the group the checkpoint was converted for.

    expert_ids(layer) -> the experts stored in that rank's arrays for decoder layer `layer` (MTP module d:
    num_layers + d): the placement's `local_experts` for the main MoE layers, the contiguous split for MTP.
    """
    meta = path_or_meta if isinstance(path_or_meta, dict) else read_metadata(path_or_meta)
    cfg = model_config(meta)
    if not 0 <= rank < meta["group_size"]:
        raise CheckpointError(f"rank {rank} not in [0, {meta['group_size']}) (the checkpoint's group size)")
    per_layer = {}
    for param in meta["params"]:
        path = tuple(param["path"])
        if path[-1] == "w_gate_up" and is_expert_param(path):
            for array in param["arrays"]:
                if array["rank"] == rank:
                    per_layer[layer_of(path, cfg)] = np.asarray(array["experts"], np.int32)
    counts = sorted({len(ids) for ids in per_layer.values()})
    if len(counts) > 1:
        raise CheckpointError(f"rank {rank} holds {counts} experts in different layers; a model has one count")

    def expert_ids(layer: int) -> np.ndarray:
        if layer not in per_layer:
            raise KeyError(f"layer {layer} is not a MoE layer of this checkpoint")
        return per_layer[layer]

    return expert_ids, (counts[0] if counts else 0)


def restore_model(
    path: str | os.PathLike,
    *,
    dtype=jnp.bfloat16,
    expert_ids: Callable[[int], Sequence[int]] | None = None,
    n_local_experts: int | None = None,
    device: jax.Device | None = None,
    with_mtp: bool | None = None,
    dequantize: bool = False,
) -> DeepseekV3:
    """Builds `DeepseekV3` from a converted checkpoint, one parameter at a time, each put straight on `device`.

    dtype: dtype of the unquantized weights (as in `load_model`). expert_ids(layer) -> the routed experts to
    hold in that MoE layer (all when None), with `n_local_experts` their count; only those experts' chunks are
    read (see `rank_experts` for a DWDP rank's). with_mtp: restore the MTP modules (None: when stored).
    dequantize: FP8 checkpoints are dequantized at conversion (`--dtype_policy=bf16`), not here.
    """
    path = os.fspath(path)
    meta = read_metadata(path)
    cfg = model_config(meta)
    if dequantize and cfg.weight_block_size is not None:
        raise CheckpointError(
            f"{path}: stores FP8 weights (dtype_policy {meta['dtype_policy']!r}); convert with --dtype_policy=bf16"
            " for a dequantized model"
        )
    if with_mtp and not cfg.num_mtp_layers:
        raise CheckpointError(f"{path}: has no MTP modules (the source had none, or it was converted with --nomtp)")
    if with_mtp is False:
        cfg = cfg.replace(num_mtp_layers=0)
    abstract = nnx.eval_shape(
        lambda: DeepseekV3(cfg, rngs=nnx.Rngs(0), dtype=dtype, n_local_experts=n_local_experts)
    )
    graphdef, state = nnx.split(abstract)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    params = {tuple(p["path"]): p for p in meta["params"]}
    missing = [param_key(p) for p in flat if p not in params]
    if missing:
        raise CheckpointError(f"{path}: missing parameter(s) {missing[:8]} that the model expects")
    unexpected = [param_key(p) for p in params if p not in flat and not (p[0] == "mtp" and not cfg.num_mtp_layers)]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected parameter(s) {unexpected[:8]} that the model does not have")
    context = ts.Context(_CONTEXT)
    out = {}
    for p, target in flat.items():
        param = params[p]
        if is_expert_param(p):
            ids = expert_ids(layer_of(p, cfg)) if expert_ids is not None else None
            array = read_experts(path, param, ids, context)
        else:
            array = read_array(path, param["arrays"][0], context=context)
        array = _cast(array, target, param["key"], p)
        out[p] = jax.device_put(array, device) if device is not None else jnp.asarray(array)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(out))
    return nnx.merge(graphdef, state)
