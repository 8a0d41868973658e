"""Paged MLA cache for one rank: fixed-size pages of cached rows, a block table per slot, a free-page pool.

Device side, per decoder layer, one array `pages [num_pages + 1, page_size, width]`: the row of a cached token
is its compressed latent (after kv_a_layernorm) followed by its rotated rope key, zero-padded to the attention
kernels' widths (`pallas_kernels.mla_decode.padded_widths`; R1's 512 + 64 need none). Page `num_pages` is the
scratch page: padding tokens of a fixed-shape step are written there, and block-table entries past a slot's
pages point to it, so a step never touches a real request's rows.

Host side, `PageTable` maps each scheduler slot (one request at a time) to the pages holding its tokens, in
order: token t of the slot's sequence lies in page `pages_of(slot)[t // page_size]`, row t % page_size. Pages
come from a free list as a slot's sequence grows (`ensure`, called by the runner before each step) and go back
when the request retires (`release`), so the pages in use follow the tokens actually held, not
num_slots x max_len. Admission is by free pages: the scheduler `reserve`s a request's worst case (prompt +
max_new_tokens) when it admits it, so a running request never finds the pool empty; `ensure` never hands
another slot's reserved pages out, and raises `OutOfPages` (a clear refusal) when a step would need them.
A slot that starts a new sequence reuses its pages (rows are overwritten from position 0 on).

Hand-off (disaggregated serving): `read_rows` copies a slot's first tokens out of the pages into one new array
[num_layers, n, kv_lora_rank + rope_dim] (unpadded: the wire format), `write_rows` writes such an array into
another cache's pages.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Sharding, SingleDeviceSharding

from dwdp_jax.config import ModelConfig

PAGE_SIZE = 64  # tokens per page: the decode kernel's key tile


class OutOfPages(RuntimeError):
    """The pool has fewer free pages than a step needs."""


def _round_up(v: int, r: int) -> int:
    return -(-v // r) * r


@dataclasses.dataclass(frozen=True)
class PagedCacheSpec:
    """One rank's paged cache: `num_pages` pages of `page_size` tokens per layer (plus the scratch page), rows
    of `kv_lora_rank + rope_dim` values stored at widths (`latent_width`, `rope_width`) padded for the kernels;
    `num_slots` requests of at most `max_len` tokens each."""

    num_layers: int
    num_pages: int
    num_slots: int
    max_len: int
    kv_lora_rank: int
    rope_dim: int
    dtype: object = jnp.bfloat16
    page_size: int = PAGE_SIZE

    def __post_init__(self):
        if min(self.num_layers, self.num_pages, self.num_slots, self.max_len, self.kv_lora_rank, self.rope_dim,
               self.page_size) < 1:
            raise ValueError(f"PagedCacheSpec needs positive sizes, got {self}")

    @classmethod
    def for_model(cls, cfg: ModelConfig, num_pages: int, num_slots: int, max_len: int,
                  dtype=jnp.bfloat16) -> PagedCacheSpec:
        return cls(cfg.num_layers, num_pages, num_slots, max_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype)

    @property
    def latent_width(self) -> int:
        """Latent columns stored per row: kv_lora_rank rounded up to 128 (each decode warpgroup owns half)."""
        return _round_up(self.kv_lora_rank, 128)

    @property
    def rope_width(self) -> int:
        return _round_up(self.rope_dim, 64)

    @property
    def width(self) -> int:
        return self.latent_width + self.rope_width

    @property
    def max_pages_per_slot(self) -> int:
        return -(-self.max_len // self.page_size)

    @property
    def scratch_page(self) -> int:
        return self.num_pages

    @property
    def bytes_per_page(self) -> int:
        """Bytes of one page over all layers."""
        return self.num_layers * self.page_size * self.width * jnp.dtype(self.dtype).itemsize

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_page * (self.num_pages + 1)

    @property
    def bytes_per_token(self) -> int:
        """Bytes of one token's latent and rope key over all layers, unpadded (what a hand-off moves)."""
        return self.num_layers * (self.kv_lora_rank + self.rope_dim) * jnp.dtype(self.dtype).itemsize

    @classmethod
    def pages_for(cls, num_slots: int, max_len: int, page_size: int = PAGE_SIZE) -> int:
        """Pages that let every slot hold max_len tokens at once (a pool that never refuses)."""
        return num_slots * -(-max_len // page_size)


def allocate(spec: PagedCacheSpec, where: jax.Device | Sharding | None = None, num_groups: int = 1) -> list[jax.Array]:
    """Zero pages of every layer [num_groups * (num_pages + 1), page_size, width], created on `where` (a
    device, or a sharding of the page axis when `num_groups` ranks' pools share one global array, as DEP's
    SPMD program does: group g's pool is rows [g (num_pages + 1), (g + 1) (num_pages + 1)))."""
    where = where or jax.devices()[0]
    sharding = SingleDeviceSharding(where) if isinstance(where, jax.Device) else where
    shape = (num_groups * (spec.num_pages + 1), spec.page_size, spec.width)
    zeros = jax.jit(lambda: [jnp.zeros(shape, spec.dtype) for _ in range(spec.num_layers)],
                    out_shardings=[sharding] * spec.num_layers)
    return zeros()


def nbytes(pages: list[jax.Array]) -> int:
    return int(sum(a.size * a.dtype.itemsize for a in pages))


def pack_rows(latent, k_pe, spec_or_widths) -> jax.Array:
    """latent [..., kv_lora_rank] and k_pe [..., rope_dim] -> cache rows [..., width] (zero-padded parts)."""
    lw, rw = ((spec_or_widths.latent_width, spec_or_widths.rope_width)
              if isinstance(spec_or_widths, PagedCacheSpec) else spec_or_widths)
    pad = lambda x, w: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, w - x.shape[-1])])
    return jnp.concatenate([pad(latent, lw), pad(k_pe, rw)], axis=-1)


class PageTable:
    """Host-side page bookkeeping of one rank: slot -> its pages in order, and the free pool."""

    def __init__(self, spec: PagedCacheSpec):
        self.spec = spec
        self._free = list(range(spec.num_pages - 1, -1, -1))  # pop() hands out the lowest page first
        self._held: list[list[int]] = [[] for _ in range(spec.num_slots)]
        # the held pages as block-table rows, scratch past each slot's own: `block_table` is one gather
        self._rows = np.full((spec.num_slots, spec.max_pages_per_slot), spec.scratch_page, np.int32)
        self._reserved = [0] * spec.num_slots  # pages promised to each slot's request (`reserve`)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_available(self) -> int:
        """Free pages not promised to a reserved slot's future tokens."""
        owed = sum(max(0, r - len(p)) for r, p in zip(self._reserved, self._held))
        return len(self._free) - owed

    def _count(self, tokens: int) -> int:
        return -(-tokens // self.spec.page_size)

    def can_reserve(self, slot: int, tokens: int) -> bool:
        """Whether `reserve(slot, tokens)` would succeed (changes nothing)."""
        self._check_slot(slot)
        if tokens > self.spec.max_len:
            return False
        others = self.num_available + max(0, self._reserved[slot] - len(self._held[slot]))
        return max(0, self._count(tokens) - len(self._held[slot])) <= others

    def reserve(self, slot: int, tokens: int) -> bool:
        """Promises `slot` pages for `tokens` tokens (its request's prompt + max_new_tokens); False, promising
        nothing, when the pool cannot cover them besides every other promise."""
        if not self.can_reserve(slot, tokens):
            return False
        self._reserved[slot] = self._count(tokens)
        return True

    def pages_of(self, slot: int) -> list[int]:
        return list(self._held[slot])

    def pages_needed(self, slot: int, length: int) -> int:
        """Extra pages `slot` needs to hold `length` tokens."""
        return max(0, -(-length // self.spec.page_size) - len(self._held[slot]))

    def ensure(self, slot: int, length: int) -> None:
        """Gives `slot` pages for tokens [0, length) (its own promise first, then unpromised pages). Raises
        OutOfPages (taking nothing) if the pool is short, ValueError past max_len."""
        self._check_slot(slot)
        if length > self.spec.max_len:
            raise ValueError(f"slot {slot}: {length} tokens exceed the cache's max_len={self.spec.max_len}")
        need = self.pages_needed(slot, length)
        if need == 0:  # most calls (a decode step needs a page once per page_size tokens): no pool scan
            return
        own = max(0, self._reserved[slot] - len(self._held[slot]))  # this slot's own promise
        if need > self.num_available + own:
            raise OutOfPages(f"slot {slot} needs {need} more pages for {length} tokens; {self.num_available} of "
                             f"{self.spec.num_pages} are free and not reserved")
        first = len(self._held[slot])
        self._held[slot] += [self._free.pop() for _ in range(need)]
        self._rows[slot, first:first + need] = self._held[slot][first:]

    def release(self, slot: int) -> None:
        """Returns the slot's pages and promise to the pool (its request retired)."""
        self._check_slot(slot)
        self._free += reversed(self._held[slot])
        self._held[slot] = []
        self._rows[slot] = self.spec.scratch_page
        self._reserved[slot] = 0

    def block_table(self, slots, num_pages: int | None = None) -> np.ndarray:
        """int32 [len(slots), num_pages] (default max_pages_per_slot): each slot's pages, then the scratch page.
        A slot of -1 (a padding row) gets only scratch entries."""
        n = num_pages or self.spec.max_pages_per_slot
        slots = np.asarray(slots, np.int64).reshape(-1)
        table = self._rows[np.maximum(slots, 0), :n]  # a copy (fancy indexing)
        table[slots < 0] = self.spec.scratch_page
        if n > table.shape[1]:  # wider than any slot's pages: scratch columns
            table = np.pad(table, ((0, 0), (0, n - table.shape[1])), constant_values=self.spec.scratch_page)
        return table

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.spec.num_slots:
            raise ValueError(f"slot {slot} outside [0, {self.spec.num_slots})")


# ---------------------------------------------------------------------------------------------------------------
# Hand-off: a slot's rows out of one cache and into another


def _read_rows(pages, page_ids, length: int, kv_lora_rank: int, rope_dim: int, latent_width: int):
    def one(p):
        rows = p[page_ids].reshape(-1, p.shape[-1])[:length]
        return jnp.concatenate([rows[:, :kv_lora_rank], rows[:, latent_width: latent_width + rope_dim]], -1)
    return jnp.stack([one(p) for p in pages])


def _write_rows(pages, rows, page_ids, latent_width: int, kv_lora_rank: int):
    n = rows.shape[1]
    t = jnp.arange(n)
    page_size = pages[0].shape[1]
    out = []
    for p, r in zip(pages, rows):
        packed = pack_rows(r[:, :kv_lora_rank], r[:, kv_lora_rank:], (latent_width, p.shape[-1] - latent_width))
        out.append(p.at[page_ids[t // page_size], t % page_size].set(packed.astype(p.dtype)))
    return out


_read_rows_jit = jax.jit(_read_rows, static_argnums=(2, 3, 4, 5))
_write_rows_jit = jax.jit(_write_rows, static_argnums=(3, 4), donate_argnums=0)


def read_rows(pages: list[jax.Array], table: PageTable, slot: int, length: int) -> jax.Array:
    """Tokens [0, length) of `slot`: [num_layers, length, kv_lora_rank + rope_dim], a new array on the pages'
    device (the slot may be reused once it is ready). One program per `length`: round lengths to buckets."""
    spec = table.spec
    held = table.pages_of(slot)
    if not 0 < length <= len(held) * spec.page_size:
        raise ValueError(f"read_rows: slot {slot} holds {len(held)} pages, not {length} tokens")
    ids = np.asarray(held[: -(-length // spec.page_size)], np.int32)
    return _read_rows_jit(pages, ids, length, spec.kv_lora_rank, spec.rope_dim, spec.latent_width)


def write_rows(pages: list[jax.Array], table: PageTable, slot: int, rows: jax.Array) -> list[jax.Array]:
    """Writes `rows` [num_layers, n, kv_lora_rank + rope_dim] (on the pages' device) into tokens [0, n) of
    `slot`, taking pages for them from the pool. Donates `pages`; returns the updated list."""
    spec = table.spec
    if rows.ndim != 3 or rows.shape[0] != spec.num_layers or rows.shape[2] != spec.kv_lora_rank + spec.rope_dim:
        raise ValueError(f"write_rows: rows of shape {rows.shape} do not fit a cache of {spec.num_layers} layers "
                         f"and {spec.kv_lora_rank + spec.rope_dim} values per token")
    if rows.dtype != pages[0].dtype:
        raise ValueError(f"write_rows: rows are {rows.dtype}, the cache {pages[0].dtype}")
    table.ensure(slot, rows.shape[1])
    ids = table.block_table([slot])[0]  # fixed length: one program per rows shape
    return _write_rows_jit(pages, rows, ids, spec.latent_width, spec.kv_lora_rank)


def sharded_writer(mesh, axis: str, spec: PagedCacheSpec):
    """`write_rows` for pages whose page axis is split over mesh axis `axis` (DEP: one pool per device).
    Returns write(pages, tables, group, slot, rows) -> pages: one SPMD program in which device `group`
    writes `rows` (on its device) into its `slot`'s pages and every other device writes zeros into its scratch
    page. Donates `pages`."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    page_specs = [P(axis)] * spec.num_layers

    def local(pages, rows, ids):  # per device: rows [1, L, n, width], ids [1, max_pages]
        return _write_rows(pages, rows[0], ids[0], spec.latent_width, spec.kv_lora_rank)

    program = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(page_specs, P(axis), P(axis)),
                                    out_specs=page_specs, check_vma=False), donate_argnums=0)
    block = NamedSharding(mesh, P(axis))
    devices = list(mesh.devices.flat)
    zeros: dict = {}

    def write(pages, tables: list[PageTable], group: int, slot: int, rows):
        key = (rows.shape, rows.dtype)
        if key not in zeros:
            zeros[key] = [jnp.zeros((1, *rows.shape), rows.dtype, device=d) for d in devices]
        tables[group].ensure(slot, rows.shape[1])
        parts = [rows[None] if g == group else z for g, z in enumerate(zeros[key])]
        stacked = jax.make_array_from_single_device_arrays((len(devices), *rows.shape), block, parts)
        ids = np.stack([t.block_table([slot if g == group else -1])[0] for g, t in enumerate(tables)])
        return program(pages, stacked, jax.device_put(ids, block))

    return write
