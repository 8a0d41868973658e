"""Reading HF checkpoint directories: `*.safetensors` shards and `model.safetensors.index.json`.

The `safetensors` package's numpy backend cannot return float8_e4m3fn or bfloat16 arrays, so tensors are read
here straight from the file format (8-byte little-endian header length, JSON header, raw bytes) through a
read-only memmap, with ml_dtypes for the dtypes numpy lacks. Nothing is unpickled; a truncated or corrupt
shard, a missing tensor or a path that escapes the directory raises `CheckpointError` naming the file and tensor.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, corrupt, or not what the model expects."""


class SafetensorsFile:
    """One shard: its header (name -> dtype, shape, byte range) and lazy reads of single tensors."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise CheckpointError(f"{path}: truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", raw)
                if n > size - 8 or n > 100_000_000:
                    raise CheckpointError(f"{path}: corrupt safetensors header length {n}")
                header = json.loads(f.read(n))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors header: {e}") from e
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.tensors = {}
        for name, info in header.items():
            if info.get("dtype") not in DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
            begin, end = info["data_offsets"]
            dtype = DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise CheckpointError(f"{path}: tensor {name!r} byte range does not match its shape {shape}")
            if self.data_start + end > size:
                raise CheckpointError(f"{path}: truncated: tensor {name!r} ends past the end of the file")
            self.tensors[name] = (dtype, shape, begin)
        self._mm = None

    def read(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy array backed by the file (no copy until used)."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        dtype, shape, begin = self.tensors[name]
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        count = int(np.prod(shape, dtype=np.int64))
        start = self.data_start + begin
        return self._mm[start : start + count * dtype.itemsize].view(dtype).reshape(shape)


class CheckpointDir:
    """An HF checkpoint directory: maps every tensor name to its shard."""

    def __init__(self, path: str):
        self.path = os.path.abspath(os.fspath(path))
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{self.path}: not a directory")
        index_path = os.path.join(self.path, INDEX_NAME)
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from e
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
            if len(files) > 1:
                raise CheckpointError(f"{self.path}: {len(files)} safetensors shards but no {INDEX_NAME}")
            if not files:
                raise CheckpointError(f"{self.path}: no *.safetensors files")
            weight_map = None
        self.shards = {}
        for name in files:
            full = os.path.realpath(os.path.join(self.path, name))
            if os.path.dirname(full) != os.path.realpath(self.path):
                raise CheckpointError(f"{index_path}: shard path {name!r} escapes the checkpoint directory")
            if not os.path.exists(full):
                raise CheckpointError(f"{self.path}: shard {name!r} named by the index is missing")
            self.shards[name] = SafetensorsFile(full)
        self.location = {}
        for shard_name, shard in self.shards.items():
            for tensor in shard.tensors:
                self.location[tensor] = shard_name
        if weight_map is not None:
            for tensor, shard_name in weight_map.items():
                if self.location.get(tensor) != shard_name:
                    raise CheckpointError(f"{self.path}/{shard_name}: tensor {tensor!r} listed in the index is missing")

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def names(self) -> list[str]:
        return sorted(self.location)

    def info(self, name: str):
        """(dtype, shape) of a tensor."""
        dtype, shape, _ = self.shards[self._shard(name)].tensors[name]
        return dtype, shape

    def _shard(self, name: str) -> str:
        if name not in self.location:
            raise CheckpointError(f"{self.path}: missing tensor {name!r}")
        return self.location[name]

    def read(self, name: str) -> np.ndarray:
        return self.shards[self._shard(name)].read(name)

    def file_of(self, name: str) -> str:
        return os.path.join(self.path, self._shard(name))
