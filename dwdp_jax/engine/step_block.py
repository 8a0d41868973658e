"""A step's block of rows: the shape buckets programs compile for, and the packing of prefill chunks and decode
tokens into left-aligned [rows, length] arrays with their block table (`StepArrays`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from dwdp_jax.engine.paged_cache import PageTable


def _pow2_from(lo: int, hi: int) -> tuple[int, ...]:
    """lo, 2 lo, 4 lo, ... up to the first value >= hi."""
    values = [lo]
    while values[-1] < hi:
        values.append(values[-1] * 2)
    return tuple(values)


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Row counts (`batch`) and prefill chunk lengths (`length`) that a step's blocks are padded to."""

    batch: tuple[int, ...]
    length: tuple[int, ...]

    def __post_init__(self):
        for name in ("batch", "length"):
            values = getattr(self, name)
            if not values or min(values) < 1 or list(values) != sorted(set(values)):
                raise ValueError(f"Buckets.{name} must be distinct positive ints in ascending order, got {values}")

    @classmethod
    def default(cls, max_batch_size: int, max_chunk_len: int, min_len: int = 16) -> Buckets:
        """Powers of two: rows 1, 2, 4, ... >= max_batch_size; lengths min_len, 2 min_len, ... >= max_chunk_len."""
        return cls(_pow2_from(1, max_batch_size), _pow2_from(min_len, max_chunk_len))

    def batch_for(self, n: int) -> int:
        for b in self.batch:
            if b >= n:
                return b
        raise ValueError(f"{n} rows exceed the largest batch bucket {self.batch[-1]}")

    def length_for(self, n: int) -> int:
        """Smallest length bucket >= n (n must be <= the largest; longer chunks run in pieces)."""
        for b in self.length:
            if b >= n:
                return b
        raise ValueError(f"{n} tokens exceed the largest length bucket {self.length[-1]}")


@dataclasses.dataclass(frozen=True)
class _Row:
    """Tokens [start, start + len(tokens)) of the sequence in `slot`."""

    slot: int
    start: int
    tokens: np.ndarray  # int32 [n]


@dataclasses.dataclass(frozen=True)
class StepArrays:
    """A step block's inputs, int32 numpy: ids and positions [rows, length] (left-aligned: row i's tokens
    first, padding after), q_lens [rows] (its tokens), lengths [rows] (tokens cached after the step),
    block_table [rows, pages]. A padding row has q_lens = lengths = 0 and only scratch pages."""

    ids: np.ndarray
    positions: np.ndarray
    q_lens: np.ndarray
    lengths: np.ndarray
    block_table: np.ndarray

    @staticmethod
    def concat(parts: Sequence[StepArrays]) -> StepArrays:
        """The parts' rows one after the other (a single part as it is: no copy; `dataclasses.astuple` would
        deep-copy every array)."""
        if len(parts) == 1:
            return parts[0]
        names = [f.name for f in dataclasses.fields(StepArrays)]
        return StepArrays(*(np.concatenate([getattr(p, n) for p in parts]) for n in names))

    def pack(self):
        """(ids, every other field in one int32 vector): a step's inputs in two host-to-device transfers instead of
        five (each a copy the host issues and orders; ids may already be on the device, fed from the previous
        step's samples). The vector holds positions, q_lens and lengths each from an offset that is a multiple of
        PACK_ALIGN elements (256 bytes), then block_table: XLA hands contiguous slices of an input to a kernel as
        views, and a Mosaic GPU kernel refuses an input not 256-byte aligned (jaxlib/mosaic/gpu/custom_call.cc;
        the unaligned pack failed every decode step on an H100, 2026-12-06)."""
        rows, length = self.ids.shape
        offsets, total = _pack_offsets(rows, length)
        rest = np.zeros((total + self.block_table.size,), np.int32)
        for name, off in offsets.items():
            value = getattr(self, name).ravel()
            rest[off:off + value.size] = value
        rest[total:] = self.block_table.ravel()
        return self.ids, rest

    @staticmethod
    def unpack(ids, rest) -> StepArrays:
        """The inverse of `pack` (inside a step program: the shapes follow from ids [rows, length] and rest)."""
        rows, length = ids.shape
        offsets, total = _pack_offsets(rows, length)
        pages = (rest.shape[0] - total) // rows
        q, n = offsets["q_lens"], offsets["lengths"]
        return StepArrays(ids, rest[:rows * length].reshape(rows, length), rest[q:q + rows], rest[n:n + rows],
                          rest[total:].reshape(rows, pages))


PACK_ALIGN = 64  # int32 elements: 256 bytes, Mosaic GPU's required input alignment


def _pack_offsets(rows: int, length: int) -> tuple[dict[str, int], int]:
    """Offsets (int32 elements) of positions, q_lens and lengths in `StepArrays.pack`'s vector, and where
    block_table starts: each a multiple of PACK_ALIGN."""
    up = lambda v: -(-v // PACK_ALIGN) * PACK_ALIGN  # noqa: E731
    q = up(rows * length)
    n = q + up(rows)
    return {"positions": 0, "q_lens": q, "lengths": n}, n + up(rows)


jax.tree_util.register_dataclass(StepArrays, data_fields=[f.name for f in dataclasses.fields(StepArrays)],
                                 meta_fields=[])


def pages_bucket(n: int, max_pages: int) -> int:
    """Block-table width for a step whose rows need up to n pages: a power of two, at most max_pages."""
    b = 1
    while b < n:
        b *= 2
    return min(b, max_pages)


def pack_rows(rows: Sequence[_Row], num_rows: int, length: int, table: PageTable, num_pages: int) -> StepArrays:
    """Left-aligned [num_rows, length] block of `rows` (pages for their tokens taken from `table` first)."""
    spec = table.spec
    ids = np.zeros((num_rows, length), np.int32)
    starts = np.zeros((num_rows,), np.int32)
    q_lens = np.zeros((num_rows,), np.int32)
    slots = np.full((num_rows,), -1, np.int32)
    for i, row in enumerate(rows):
        n = len(row.tokens)
        if not 0 < n <= length:
            raise ValueError(f"row of {n} tokens does not fit length {length}")
        if row.start + n > spec.max_len:
            raise ValueError(f"positions up to {row.start + n} exceed the cache's max_len={spec.max_len}")
        table.ensure(row.slot, row.start + n)
        ids[i, :n] = row.tokens
        starts[i], q_lens[i], slots[i] = row.start, n, row.slot
    # row i: positions start_i .. start_i + q_len_i - 1, then zeros (padding)
    column = np.arange(length, dtype=np.int32)
    positions = np.where(column < q_lens[:, None], starts[:, None] + column, 0).astype(np.int32)
    lengths = np.where(q_lens > 0, starts + q_lens, 0).astype(np.int32)
    return StepArrays(ids, positions, q_lens, lengths, table.block_table(slots, num_pages))
