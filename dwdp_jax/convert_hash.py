"""The converter's source files: which they are, and their sizes and sha256, hashed by threads beside the
conversion. Standard library only, so that `dwdp-convert` starts hashing before it imports JAX."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import mmap
import os
import threading

INDEX_NAME = "model.safetensors.index.json"  # as in safetensors_io (which imports numpy and ml_dtypes)
_HASH_READ = 64 << 20  # a multiple of mmap.ALLOCATIONGRANULARITY


def source_files(path: str) -> list[str]:
    """The files a conversion reads, relative to HF checkpoint directory `path`: config.json, the index (when
    sharded) and the shards, by the rule of `safetensors_io.CheckpointDir` (which checks them)."""
    names = ["config.json"]
    index = os.path.join(path, INDEX_NAME)
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        names.append(INDEX_NAME)
    else:
        shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    return names + shards


class SourceHasher:
    """Size and sha256 of source files, computed by `threads` threads while the conversion runs (hashlib
    releases the GIL); the files are hashed in parallel, each in one pass."""

    def __init__(self, root: str, names: list[str], threads: int = 2):
        self._stop = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="dwdp-hash")
        self._futures = [self._pool.submit(hash_file, os.path.join(root, name), self._stop) for name in names]
        self.root, self.names = os.path.abspath(root), list(names)

    def result(self) -> list[dict]:
        """[{name, bytes, sha256}] in the order of `names`; waits for the hashes."""
        return [dict(name=name, **future.result()) for name, future in zip(self.names, self._futures)]

    def close(self):
        """Stops hashing (unfinished hashes are dropped) and joins the threads."""
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "SourceHasher":
        return self

    def __exit__(self, *exc):
        self.close()


def hash_file(path: str, stop: threading.Event | None = None) -> dict:
    """{bytes, sha256} of a file, hashed through read-only mappings of _HASH_READ bytes: no copy into the process
    (half the CPU of read() + hash), and the pages it brings in serve the converter's reads. Returns {} when
    `stop` is set first."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for offset in range(0, size, _HASH_READ):
            if stop is not None and stop.is_set():
                return {}
            with mmap.mmap(f.fileno(), min(_HASH_READ, size - offset), offset=offset,
                           access=mmap.ACCESS_READ) as window:
                window.madvise(mmap.MADV_SEQUENTIAL)
                digest.update(window)
    return dict(bytes=size, sha256=digest.hexdigest())
