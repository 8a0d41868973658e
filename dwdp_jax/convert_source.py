"""Reading an HF checkpoint for the converter: one stored slab at a time.

`read_slab` builds a slab of a planned array (`convert_plan.Piece`) as `weights.assemble` lays it out. Rows of a
copied tensor are read-only views of the source file (mapped, handed to orbax as they are: no copy in this
process); experts kept in FP8 are read with `pread` straight into the slab; transposed and dequantized tensors
are built from views of at most about CHUNK_BYTES of source at a time with vectorized numpy
(`quant.transpose_np`, `quant.dequantize_np`: numpy releases the GIL, so worker threads run in parallel) into
memory a worker reuses (`Arena`).
"""

from __future__ import annotations

import mmap
import os
import threading
from typing import Callable

import numpy as np

from dwdp_jax import quant
from dwdp_jax.convert_plan import Piece, prod, scale_name
from dwdp_jax.safetensors_io import CheckpointDir, CheckpointError

CHUNK_BYTES = 16 << 20  # target size of one source read when transposing or dequantizing
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux: page a view in with one call, not a fault per page


class SourceReader:
    """Reads tensors (or row ranges of them) of an HF checkpoint: as read-only views of the file (`rows` without
    `out`: mapped and paged in at once, no copy; unmapped when the array is freed) or into a given array (`pread`).

    Quacks like `CheckpointDir` for `weights.assemble` (read, file_of). Unlike the whole-file memmaps of
    `CheckpointDir`, a view maps only its rows, so resident memory is only what the caller keeps. Safe to share
    between threads (positional reads and mappings; file descriptors opened under a lock)."""

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
        """Rows [r0, r1) of a tensor: a read-only view of the file, or read into `out` (C-contiguous, the tensor's
        dtype) when given."""
        if name not in self.ckpt:
            raise CheckpointError(f"{self.ckpt.path}: missing tensor {name!r}")
        shard = self.ckpt.shards[self.ckpt.location[name]]
        dtype, shape, begin = shard.tensors[name]
        row_bytes = prod(shape[1:]) * dtype.itemsize
        offset = shard.data_start + begin + r0 * row_bytes
        if out is None:
            view = self._map(shard.path, name, offset, (r1 - r0) * row_bytes)
            return view.view(dtype).reshape((r1 - r0,) + tuple(shape[1:]))
        assert out.dtype == dtype and out.shape == (r1 - r0,) + tuple(shape[1:]) and out.flags.c_contiguous
        self._pread(shard.path, name, out, offset)
        return out

    def _fd(self, path: str) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(f"{path}: cannot open shard: {e}") from e
            return fd

    def _map(self, path: str, name: str, offset: int, nbytes: int) -> np.ndarray:
        if nbytes == 0:
            return np.empty(0, np.uint8)
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            window = mmap.mmap(self._fd(path), offset + nbytes - start, flags=mmap.MAP_SHARED | _MAP_POPULATE,
                               prot=mmap.PROT_READ, offset=start)
        except (OSError, ValueError) as e:  # ValueError: past the end of the file
            raise CheckpointError(f"{path}: reading tensor {name!r} failed (truncated?): {e}") from e
        return np.frombuffer(window, np.uint8, nbytes, offset - start)

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


def _rows_as_stored(reader: SourceReader, piece: Piece, names: list[str], r0: int, r1: int, transpose: bool,
                    out: np.ndarray, scratch: Arena) -> np.ndarray:
    """Source rows [r0, r1) of the tensors `names` (stacked along rows: an expert's gate and up) in the piece's
    stored dtype, transposed ([in, rows]) or not, into `out`: dequantized when the piece is (FP8 source,
    unquantized parameter; r0 must start a block), else as read. Temporaries come from `scratch` (reset here)."""
    scratch.reset()
    values = [reader.rows(name, r0, r1) for name in names]
    if piece.dequantize:
        bo, _ = reader.block
        assert r0 % bo == 0, (names, r0, bo)
        scales = [reader.rows(scale_name(name), r0 // bo, -(-r1 // bo)) for name in names]
        return quant.dequantize_np(values, scales, reader.block, piece.dtype, transpose, out, scratch.empty)
    first = 0
    for value in values:
        if transpose:
            quant.transpose_np(value, out[:, first : first + len(value)], scratch.empty)
        else:
            quant.as_bits(out[first : first + len(value)])[...] = quant.as_bits(value)
        first += len(value)
    return out


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


def is_view(piece: Piece) -> bool:
    """Whether `read_slab` gives this piece's slabs as views of the source file (rows of a copy)."""
    return piece.source.kind == "copy" and piece.axis == 0 and not piece.dequantize


def read_slab(piece: Piece, start: int, stop: int, reader: SourceReader, fp8_layout: bool,
              progress: Callable[[int], None] = lambda nbytes: None, arena: Arena | None = None,
              scratch: Arena | None = None) -> np.ndarray:
    """piece[start:stop] along `piece.axis`, laid out as `weights.assemble` does: a read-only view of the source
    file (`is_view`), or a fresh array (one cut from `arena` when given; temporaries from `scratch`), built from
    at most about CHUNK_BYTES of source at a time when transposing or dequantizing. progress(source bytes) per
    read."""
    src, shape, axis = piece.source, piece.shape, piece.axis
    extent = shape[axis]
    if is_view(piece):
        progress(piece.source_bytes * (stop - start) // extent)
        return reader.rows(src.names[0], start, stop)
    scratch = Arena() if scratch is None else scratch
    out_shape = shape[:axis] + (stop - start,) + shape[axis + 1 :]
    out = arena.empty(out_shape, piece.dtype) if arena is not None else np.empty(out_shape, piece.dtype)
    if src.shape is not None and src.shape != src.padded:
        quant.as_bits(out)[...] = 0  # FP8 experts padded to whole blocks: the padding is zeros
    if src.kind == "experts":
        per_expert = piece.source_bytes // max(1, extent)
        for i in range(start, stop):
            names = [names[i] for names in src.names]
            if not fp8_layout:  # [in, out]: gate columns then up columns (or the down matrix), transposed
                _rows_as_stored(reader, piece, names, 0, reader.ckpt.info(names[0])[1][0], True, out[i - start],
                                scratch)
            for m, name in enumerate(names if fp8_layout else ()):  # [out, in]: gate rows then up rows, padded
                rows, r0 = reader.ckpt.info(name)[1][0], m * src.padded[0]
                if src.shape[1] == src.padded[1]:  # whole rows: read straight into the slab
                    reader.rows(name, 0, rows, out=out[i - start, r0 : r0 + rows])
                else:
                    quant.as_bits(out[i - start, r0 : r0 + rows, : src.shape[1]])[...] = quant.as_bits(
                        reader.rows(name, 0, rows))
            progress(per_expert)
        return out
    step = max(1, CHUNK_BYTES // max(1, prod(shape) // extent * piece.dtype.itemsize))
    step = max(piece.align, step // piece.align * piece.align)
    for a in range(start, stop, step):
        b = min(a + step, stop)
        # rows of the slab, or its columns (rows of the source) transposed straight into it
        where = out[a - start : b - start] if axis == 0 else out[:, a - start : b - start]
        _rows_as_stored(reader, piece, src.names[:1], a, b, axis == 1, where, scratch)
        progress(piece.source_bytes * (b - a) // extent)
    return out
