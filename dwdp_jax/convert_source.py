"""Reading an HF checkpoint for the converter: one stored slab at a time, and the sha256 of the source files.

`read_slab` builds a slab of a planned array (`convert_plan.Piece`) as `weights.assemble` lays it out: source
bytes are read with `pread` (`SourceReader`), at most about CHUNK_BYTES of source at a time when transposing or
dequantizing, transposed and dequantized with vectorized numpy (`quant.transpose_np`, `quant.dequantize_np`:
numpy releases the GIL, so worker threads run in parallel), into memory a worker reuses (`Arena`).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from typing import Callable

import numpy as np

from dwdp_jax import quant
from dwdp_jax.convert_plan import Piece, prod, scale_name
from dwdp_jax.safetensors_io import INDEX_NAME, CheckpointDir, CheckpointError

CHUNK_BYTES = 16 << 20  # target size of one source read when transposing or dequantizing
_HASH_READ = 64 << 20  # a multiple of mmap.ALLOCATIONGRANULARITY


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
        row_bytes = prod(shape[1:]) * dtype.itemsize
        self._pread(shard.path, name, out, shard.data_start + begin + r0 * row_bytes)
        return out

    def dequantized_rows(self, name: str, r0: int, r1: int, dtype, transpose: bool = False,
                         out: np.ndarray | None = None, alloc=np.empty) -> np.ndarray:
        """Rows [r0, r1) of an FP8 [out, in] weight times its block scales, in `dtype` (transposed: [in, r1 - r0]),
        exactly as `weights.assemble` computes them; r0 must start a block. alloc: see `quant.dequantize_np`."""
        bo, _ = self.block
        assert r0 % bo == 0, (name, r0, bo)
        scale = self.rows(scale_name(name), r0 // bo, -(-r1 // bo))
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
        stop = start + prod(shape) * dtype.itemsize
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
    step = max(1, CHUNK_BYTES // max(1, prod(shape) // extent * piece.dtype.itemsize))
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


def source_files(ckpt: CheckpointDir) -> list[str]:
    names = ["config.json"] + ([INDEX_NAME] if os.path.exists(os.path.join(ckpt.path, INDEX_NAME)) else [])
    return names + sorted(ckpt.shards)


def hash_files(root: str, names: list[str], stop: threading.Event | None = None) -> list[dict]:
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
