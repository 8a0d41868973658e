"""Paged MLA cache for one rank: fixed-size pages of cached rows, a block table per slot, a free-page pool.

Device side, per decoder layer, one array `pages [num_pages + 1, page_size, width]`: the row of a cached token
is its compressed latent (after kv_a_layernorm) followed by its rotated rope key, zero-padded to the attention
kernels' widths (`pallas_kernels.mla_decode.padded_widths`; R1's 512 + 64 need none). Page `num_pages` is the
scratch page: padding tokens of a fixed-shape step are written there, and block-table entries past a slot's
pages point to it, so a step never touches a real request's rows.

Host side, `PageTable` maps each scheduler slot (one request at a time) to the pages holding its tokens, in
order: token t of the slot's sequence lies in page `pages_of(slot)[t // page_size]`, row t % page_size. Pages
come from a free list as a slot's sequence grows and go back when the slot starts a new sequence or is
released, so memory follows the tokens actually held, not num_slots x max_len.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

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


def allocate(spec: PagedCacheSpec, device: jax.Device | None = None) -> list[jax.Array]:
    """Zero pages of every layer [num_pages + 1, page_size, width], created on `device`."""
    device = device or jax.devices()[0]
    shape = (spec.num_pages + 1, spec.page_size, spec.width)
    zeros = jax.jit(lambda: [jnp.zeros(shape, spec.dtype) for _ in range(spec.num_layers)],
                    out_shardings=[SingleDeviceSharding(device)] * spec.num_layers)
    return zeros()


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
        self._pages: list[list[int]] = [[] for _ in range(spec.num_slots)]

    @property
    def num_free(self) -> int:
        return len(self._free)

    def pages_of(self, slot: int) -> list[int]:
        return list(self._pages[slot])

    def pages_needed(self, slot: int, length: int) -> int:
        """Extra pages `slot` needs to hold `length` tokens."""
        return max(0, -(-length // self.spec.page_size) - len(self._pages[slot]))

    def ensure(self, slot: int, length: int) -> None:
        """Gives `slot` pages for tokens [0, length). Raises OutOfPages (taking nothing) if the pool is short,
        ValueError past max_len."""
        self._check_slot(slot)
        if length > self.spec.max_len:
            raise ValueError(f"slot {slot}: {length} tokens exceed the cache's max_len={self.spec.max_len}")
        need = self.pages_needed(slot, length)
        if need > len(self._free):
            raise OutOfPages(f"slot {slot} needs {need} more pages for {length} tokens; {len(self._free)} of "
                             f"{self.spec.num_pages} are free")
        self._pages[slot] += [self._free.pop() for _ in range(need)]

    def release(self, slot: int) -> None:
        """Returns the slot's pages to the pool (its sequence ended or a new one starts)."""
        self._check_slot(slot)
        self._free += reversed(self._pages[slot])
        self._pages[slot] = []

    def block_table(self, slots, num_pages: int | None = None) -> np.ndarray:
        """int32 [len(slots), num_pages] (default max_pages_per_slot): each slot's pages, then the scratch page.
        A slot of -1 (a padding row) gets only scratch entries."""
        n = num_pages or self.spec.max_pages_per_slot
        table = np.full((len(slots), n), self.spec.scratch_page, np.int32)
        for i, slot in enumerate(slots):
            if slot >= 0:
                pages = self._pages[slot][:n]
                table[i, : len(pages)] = pages
        return table

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.spec.num_slots:
            raise ValueError(f"slot {slot} outside [0, {self.spec.num_slots})")
