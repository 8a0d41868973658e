"""Our converted checkpoint: one orbax composite checkpoint (OCDBT, zarr3), laid out for DWDP ranks.

`dwdp_jax.convert` writes it from an HF checkpoint; `restore_model` (and `dwdp_jax.load_model`, which
dispatches here when it finds our metadata item) reads it back. A checkpoint directory is an orbax composite
checkpoint whose items are:

    dwdp_metadata/            orbax JSON item: our metadata record: source files (sizes, sha256), the HF
                              config.json, our ModelConfig fields, dtype policy, group size, placement, converter
                              and orbax versions, every parameter (shape, dtype, where its slabs are), every item
    <group>.part<k>/          orbax PyTree item (OCDBT, zarr3, uncompressed): a nested dict of arrays keyed by the
                              parameter path, e.g. {'layers': {'3': {'self_attn': {'q_a_proj': {'kernel': ..}}}}}

plus orbax's `_CHECKPOINT_METADATA` and `config.json`: the HF config edited to describe the output (no
quantization_config when dequantized, no MTP when dropped), so `from_hf_json(path)` works.

A group is what a rank restores whole: `embed`; `head` (final norm + LM head); `layers.<l>` (decoder layer l's
replicated weights: attention, norms, router, bias, shared experts or dense MLP); `layers.<l>.experts.rank<r>`
(the routed experts rank r holds in layer l, [E_r, ...] in the order the metadata lists them); `mtp.<d>` and
`mtp.<d>.experts.rank<r>` for MTP module d. Orbax saves an item from memory, so the converter splits each group
into parts of about `convert.ITEM_BYTES` and saves them one at a time: an array larger than that is stored as
slabs along one axis (experts, rows of a copied tensor, columns of a transposed one), one slab per part, and
concatenated again on restore.

Every part is saved by orbax's own `Checkpointer(PyTreeCheckpointHandler)`, and restores with orbax's public API
alone, e.g. `ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(path, args=ocp.args.Composite(**{name:
ocp.args.PyTreeRestore(restore_args=...)}))`. A DWDP rank restores its replicated groups and its own expert
groups (`rank_experts`) straight onto its device (orbax restore args with a SingleDeviceSharding); no other
rank's item directory is opened.

Integrity: orbax checks the OCDBT b-tree nodes and the zarr shard indexes (crc32c) and reports missing or
truncated data files, but keeps no checksum of the array bytes themselves: `dwdp-convert --verify` compares
every stored byte with the source.

The writer fills a hidden temporary sibling directory and renames the finished checkpoint into place: a
checkpoint directory holds a whole checkpoint or does not exist.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import json
import os
import shutil
import tempfile
import threading
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx, traverse_util

from dwdp_jax import config as config_lib
from dwdp_jax.model import DeepseekV3
from dwdp_jax.safetensors_io import CheckpointError

FORMAT = "dwdp_jax.checkpoint"
FORMAT_VERSION = 3  # 3: FP8 linear layers stored [out, in] (2: [in, out])
METADATA_ITEM = "dwdp_metadata"
EXPERT_PARAMS = ("w_gate_up", "w_down", "s_gate_up", "s_down")
_FORMAT_1_FILE = "dwdp_checkpoint.json"  # format 1 (plain zarr3 arrays): refused with a clear message


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True when `path` is a directory holding a checkpoint written by `dwdp_jax.convert`."""
    path = os.fspath(path)
    return os.path.isdir(os.path.join(path, METADATA_ITEM)) or os.path.isfile(os.path.join(path, _FORMAT_1_FILE))


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


def group_of(path: tuple, rank: int | None = None) -> str:
    """The restore group of a parameter (a rank's share of it, for routed experts): see the module docstring."""
    if path[0] == "embed_tokens":
        return "embed"
    if path[0] in ("norm", "lm_head"):
        return "head"
    group = f"{path[0]}.{path[1]}"
    return f"{group}.experts.rank{rank}" if is_expert_param(path) else group


def item_name(group: str, part: int) -> str:
    return f"{group}.part{part}"


def nest(flat: dict) -> dict:
    """{parameter path: leaf} -> the nested dict with string keys that an item holds."""
    return traverse_util.unflatten_dict({tuple(map(str, p)): v for p, v in flat.items()})


# ------------------------------------------------------------------------------------------------------ metadata


def read_metadata(path: str | os.PathLike) -> dict:
    """Our metadata record, restored through orbax (the checkpoint's JSON item)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isfile(os.path.join(path, _FORMAT_1_FILE)):
        raise CheckpointError(f"{path}: written by dwdp-convert format 1 (plain zarr3 arrays); this code reads"
                              f" {FORMAT!r} version {FORMAT_VERSION} (an orbax checkpoint): convert again")
    if not os.path.isdir(os.path.join(path, METADATA_ITEM)):
        raise CheckpointError(f"{path}: no {METADATA_ITEM}/ item: not a dwdp_jax checkpoint directory")
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            meta = checkpointer.restore(path, args=ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()}))
        meta = meta[METADATA_ITEM]
    except Exception as e:  # orbax raises plain Exceptions for unreadable files
        raise CheckpointError(f"{os.path.join(path, METADATA_ITEM)}: cannot read checkpoint metadata: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        found = (meta.get("format"), meta.get("format_version")) if isinstance(meta, dict) else (None, None)
        raise CheckpointError(f"{path}: format {found[0]!r} version {found[1]!r}, this code reads {FORMAT!r}"
                              f" version {FORMAT_VERSION}")
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


def item_leaves(meta: dict) -> dict[str, list[tuple[tuple, dict, dict]]]:
    """{item: [(parameter path, array entry, slab entry)]} for every item the metadata lists, in saving order."""
    out = {item["name"]: [] for item in meta["items"]}
    for param in meta["params"]:
        for array in param["arrays"]:
            for slab in array["slabs"]:
                out[slab["item"]].append((tuple(param["path"]), array, slab))
    return out


# -------------------------------------------------------------------------------------------------------- writer


def _numpy_save_handler():
    """orbax's numpy handler without its defensive deep copy of every array where this orbax offers that
    (`deepcopy_host_arrays`, orbax-checkpoint 0.12.8 here): `Writer.save_item` returns only once the item is on
    disk, and its caller keeps the arrays unchanged until then (the copy, and the kernel zeroing its fresh pages,
    were a sixth of the converter's CPU). Older orbax (the GPU image's, 2026-12-06) has no such argument: its
    default handler, which copies. Same typestr and files either way."""
    handler = ocp.type_handlers.NumpyHandler
    if "deepcopy_host_arrays" in inspect.signature(handler.__init__).parameters:
        return handler(deepcopy_host_arrays=False)
    return handler()


# jax.Array keeps orbax's handler only because orbax warns about every registry without one.
_SAVE_HANDLERS = ocp.type_handlers.create_type_handler_registry(
    (np.ndarray, _numpy_save_handler()),
    (jax.Array, ocp.type_handlers.ArrayHandler()),
)


class Writer:
    """Saves items one at a time into a temporary sibling of `path`; `commit` renames the checkpoint to `path`.

    Use as a context manager: leaving the block without `commit` (an error, an interrupt) deletes the temporary
    directory, so no partial checkpoint is ever left under `path`. Each `save_item` is one orbax save of arrays
    held in memory, so the caller bounds the memory by the size of the items it builds. Threads may save items
    concurrently (one orbax checkpointer per thread): each save writes and syncs its own item directory.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(path))
        if os.path.lexists(self.path):
            raise FileExistsError(f"{self.path}: output directory already exists (refusing to overwrite)")
        parent = os.path.dirname(self.path)
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"{parent}: parent of the output directory does not exist")
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.tmp-", dir=parent)
        self._items_dir = os.path.join(self.tmp, "items")
        os.mkdir(self._items_dir)
        self._items: list[str] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self._checkpointers: list[ocp.Checkpointer] = []
        self.committed = False

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, *exc):
        if not self.committed:
            self.abort()

    def _checkpointer(self) -> ocp.Checkpointer:
        checkpointer = getattr(self._local, "checkpointer", None)
        if checkpointer is None:
            checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(
                use_ocdbt=True, use_zarr3=True, use_compression=False, type_handler_registry=_SAVE_HANDLERS))
            self._local.checkpointer = checkpointer
            with self._lock:
                self._checkpointers.append(checkpointer)
        return checkpointer

    def save_item(self, name: str, arrays: dict[tuple, np.ndarray]):
        """Saves item `name` = {parameter path: numpy array}; returns when it is on disk. The arrays go to orbax
        as numpy arrays (restorable as jax arrays onto any device), written from the caller's memory without a
        copy: the caller must not change them before this returns."""
        where = os.path.join(self._items_dir, name)
        try:
            self._checkpointer().save(where, args=ocp.args.PyTreeSave(nest(arrays)))
        except Exception as e:  # orbax and TensorStore raise plain Exceptions
            raise CheckpointError(f"{self.tmp}: saving item {name} failed: {e}") from e
        # TensorStore syncs the array files, orbax not its JSON files: synced here, in the saving thread, so that
        # `commit` has only directories left to sync.
        _fsync_tree(where)
        with self._lock:
            self._items.append(name)

    def _close_checkpointers(self):
        with self._lock:
            for checkpointer in self._checkpointers:
                checkpointer.close()
            self._checkpointers.clear()

    def commit(self, metadata: dict, json_files: dict[str, dict]):
        """Saves the metadata item (which makes the directory an orbax composite checkpoint), moves the items into
        it, writes `json_files` ({name: object}) beside them, syncs everything and renames it to `path`."""
        self._close_checkpointers()
        final = os.path.join(self.tmp, "checkpoint")
        try:
            with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
                checkpointer.save(final, args=ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonSave(metadata)}))
        except Exception as e:
            raise CheckpointError(f"{self.tmp}: saving the metadata item failed: {e}") from e
        for name, obj in json_files.items():
            with open(os.path.join(final, name), "w") as f:
                json.dump(obj, f, indent=1)
        _fsync_tree(final)  # before the items move in: they are synced already (`save_item`)
        for name in self._items:
            os.rename(os.path.join(self._items_dir, name), os.path.join(final, name))
        _fsync_dir(final)
        if os.path.lexists(self.path):
            raise FileExistsError(f"{self.path}: output directory appeared while converting (refusing to overwrite)")
        os.rename(final, self.path)
        _fsync_dir(os.path.dirname(self.path))
        self.committed = True
        shutil.rmtree(self.tmp, ignore_errors=True)

    def abort(self):
        self._close_checkpointers()
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


# ------------------------------------------------------------------------------------------------------ restore


def restore_items(path: str | os.PathLike, requests: dict[str, dict[tuple, ocp.RestoreArgs]]) -> dict[str, dict]:
    """Restores whole items through orbax: requests = {item: {parameter path: restore args}} naming every leaf
    of the item (`ocp.ArrayRestoreArgs(sharding=...)` puts a leaf on a device, `ocp.RestoreArgs(restore_type=
    np.ndarray)` keeps it on the host; `dtype` casts while reading). Returns {item: {parameter path: array}}.
    Items are restored one by one, so an error names the item."""
    path = os.path.abspath(os.fspath(path))
    out = {}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        for name, leaves in requests.items():
            where = os.path.join(path, name)
            if not os.path.isdir(where):
                raise CheckpointError(f"{where}: item {name} is missing")
            args = ocp.args.Composite(**{name: ocp.args.PyTreeRestore(restore_args=nest(leaves))})
            try:
                tree = checkpointer.restore(path, args=args)[name]
            except Exception as e:  # orbax and TensorStore raise plain Exceptions
                raise CheckpointError(f"{where}: cannot restore item {name}: {_first_line(e)}") from e
            flat = traverse_util.flatten_dict(tree)
            out[name] = {p: flat[tuple(map(str, p))] for p in leaves}
    return out


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:600] if text else type(e).__name__


def rank_experts(path_or_meta, rank: int) -> tuple[Callable[[int], np.ndarray], int]:
    """(expert_ids, n_local_experts) for DWDP rank `rank` of the group the checkpoint was converted for.

    expert_ids(layer) -> the experts stored in that rank's items for decoder layer `layer` (MTP module d:
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


def _cover(arrays: list[dict], ids: list[int]) -> list[dict] | None:
    """Stored arrays whose experts, concatenated in order, are exactly `ids`; None when there are none."""
    starting = collections.defaultdict(list)
    for array in arrays:
        if array["experts"]:
            starting[array["experts"][0]].append(array)
    out, i = [], 0
    while i < len(ids):
        for array in starting.get(ids[i], []):
            n = len(array["experts"])
            if array["experts"] == ids[i : i + n]:
                out.append(array)
                i += n
                break
        else:
            return None
    return out


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
    """Builds `DeepseekV3` from a converted checkpoint through orbax, each array restored onto `device`.

    dtype: dtype of the unquantized weights (as in `load_model`; the cast happens while reading). expert_ids(layer)
    -> the routed experts to hold in that MoE layer (all when None), with `n_local_experts` their count (see
    `rank_experts` for a DWDP rank's). When stored arrays hold exactly those experts in that order (a rank's own,
    or every rank's in rank order), only their items are restored, straight onto the device; any other subset is
    gathered on the host from the items holding it, item by item. A parameter stored in several slabs is joined
    on the device (on the host for the CPU backend). with_mtp: restore the MTP modules (None: when stored).
    dequantize: FP8 checkpoints are dequantized at conversion (`--dtype_policy=bf16`), not here. device None:
    arrays go through the host to the default device, uncommitted (as `jnp.asarray`).
    """
    path = os.path.abspath(os.fspath(path))
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

    def leaf_args(target, host: bool):
        if host:
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=target.dtype)
        return ocp.ArrayRestoreArgs(sharding=jax.sharding.SingleDeviceSharding(device), dtype=target.dtype)

    whole: dict[tuple, tuple[int, list[str], bool]] = {}  # parameter -> (axis, items of its slabs, on the host)
    gathered: dict[tuple, list[int]] = {}  # parameter -> expert ids gathered on the host
    requests: dict[str, dict] = collections.defaultdict(dict)
    for p, target in flat.items():
        param = params[p]
        _check_dtype(path, param, target)
        arrays = param["arrays"]
        axis = arrays[0]["axis"]
        if is_expert_param(p):
            ids = list(range(param["shape"][0])) if expert_ids is None else [int(e) for e in expert_ids(layer_of(p, cfg))]
            arrays = _cover(arrays, ids)
            if arrays is None:
                gathered[p] = ids
                continue
        stored = list(arrays[0]["shape"]) if arrays else [0] + list(param["shape"][1:])
        stored[axis] = sum(a["shape"][axis] for a in arrays)
        if stored != list(target.shape):
            raise CheckpointError(f"{path}: parameter {param['key']} is stored as {stored}, the model expects"
                                  f" {list(target.shape)}")
        items = [s["item"] for a in arrays for s in a["slabs"]]
        # Slabs are joined where they lie on an accelerator, on the host (numpy) for the CPU backend: XLA's CPU
        # concatenate of column slabs or of many mixed-size slabs allocates several times the output (measured:
        # +7 GB for a 1.85 GB bf16 LM head, over +11 GB for 3.8 GB of FP8 experts in 16 slabs).
        host = device is None or (len(items) > 1 and device.platform == "cpu")
        whole[p] = (axis, items, host)
        for item in items:
            requests[item][p] = leaf_args(target, host)
    restored = restore_items(path, requests)

    out = {}
    for p, (axis, items, host) in whole.items():
        target = flat[p]
        if not items:  # a rank holding no experts
            out[p] = _place(np.zeros(target.shape, target.dtype), device)
            continue
        parts = [restored[item].pop(p) for item in items]
        if len(parts) == 1:
            joined = parts[0]
        elif host:  # the bytes: numpy joins float8 through float32 temporaries
            joined = np.concatenate([part.view(np.uint8) for part in parts], axis=axis).view(parts[0].dtype)
        else:
            joined = jnp.concatenate(parts, axis=axis)
        del parts  # before the copy to the device
        out[p] = _place(joined, device) if host else joined
    del restored
    out.update(_gather_experts(path, meta, {p: params[p] for p in gathered}, gathered, flat, device))
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(out))
    return nnx.merge(graphdef, state)


def _check_dtype(path: str, param: dict, target):
    stored_fp8 = param["dtype"].startswith("float8")
    if stored_fp8 != jnp.dtype(target.dtype).name.startswith("float8"):
        raise CheckpointError(f"{path}: parameter {param['key']} is stored as {param['dtype']}, the model expects"
                              f" {jnp.dtype(target.dtype).name}")


def _place(array: np.ndarray, device):
    return jax.device_put(array, device) if device is not None else jnp.asarray(array)


def _gather_experts(path, meta, params: dict, ids: dict, targets: dict, device) -> dict:
    """Routed-expert parameters restricted to arbitrary expert ids: each item holding a wanted expert is restored
    on the host once; a parameter goes to the device when its last item has been read."""
    out, buffers, pending, where = {}, {}, {}, {}
    for p, param in params.items():
        home = {}
        for array in param["arrays"]:
            for slot, e in enumerate(array["experts"]):
                home.setdefault(e, (array, slot))
        absent = [e for e in ids[p] if e not in home]
        if absent:
            raise CheckpointError(f"{path}: parameter {param['key']} has no stored expert(s) {absent[:8]}")
        target = targets[p]
        shape = [len(ids[p])] + list(param["shape"][1:])
        if shape != list(target.shape):
            raise CheckpointError(f"{path}: parameter {param['key']} restricted to {len(ids[p])} experts is {shape},"
                                  f" the model expects {list(target.shape)}")
        buffers[p] = np.empty(shape, np.dtype(target.dtype))
        pending[p] = set()
        for pos, e in enumerate(ids[p]):
            array, slot = home[e]
            slab = next(s for s in array["slabs"] if s["start"] <= slot < s["stop"])
            where.setdefault(slab["item"], []).append((p, pos, slot - slab["start"]))
            pending[p].add(slab["item"])
    leaves = item_leaves(meta)
    for item in [i["name"] for i in meta["items"] if i["name"] in where]:
        request = {p: ocp.RestoreArgs(restore_type=np.ndarray) for p, _, _ in leaves[item]}
        tree = restore_items(path, {item: request})[item]
        for p, pos, slot in where[item]:
            buffers[p][pos] = tree[p][slot]
        for p in {p for p, _, _ in where[item]}:
            pending[p].discard(item)
            if not pending[p]:
                out[p] = _place(buffers.pop(p), device)
    return out
