"""Preallocated slot-based MLA cache for one rank: the compressed latent and rope key of every cached token.

Per decoder layer one `LayerKV` (from `dwdp_jax.model`):
    latent [num_slots + 1, max_len + 1, kv_lora_rank], k_pe [num_slots + 1, max_len + 1, qk_rope_head_dim]
Slot s (a scheduler slot, one request at a time) holds its request's token at position p in row s, column p.

Two scratch places take the writes of a step's padding, so that a fixed-shape step never touches a real
request's cache: row `num_slots` (the scratch slot) is the slot of padding rows, and column `max_len` (the
scratch position) is the position of padding tokens inside a row. A real token's query attends to columns
<= its position < max_len, so it never reads either.

A freed slot is reused without clearing: attention reads only positions <= the query's, and a new request's
prefill writes positions 0, 1, ... before any query reads them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Sharding, SingleDeviceSharding

from dwdp_jax.config import ModelConfig
from dwdp_jax.model import LayerKV


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """Shape of one rank's cache: `num_slots` requests of up to `max_len` tokens, in `dtype`."""

    num_layers: int
    num_slots: int
    max_len: int
    kv_lora_rank: int
    rope_dim: int
    dtype: object = jnp.bfloat16

    def __post_init__(self):
        if min(self.num_layers, self.num_slots, self.max_len, self.kv_lora_rank, self.rope_dim) < 1:
            raise ValueError(f"CacheSpec needs positive sizes, got {self}")

    @classmethod
    def for_model(cls, cfg: ModelConfig, num_slots: int, max_len: int, dtype=jnp.bfloat16) -> CacheSpec:
        return cls(cfg.num_layers, num_slots, max_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype)

    @property
    def scratch_slot(self) -> int:
        """Row that padding rows of a step read and write."""
        return self.num_slots

    @property
    def scratch_pos(self) -> int:
        """Column that padding tokens are written to."""
        return self.max_len

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes of one token over all layers (latent + rope key)."""
        return self.num_layers * (self.kv_lora_rank + self.rope_dim) * jnp.dtype(self.dtype).itemsize

    @property
    def total_bytes(self) -> int:
        """Bytes allocated on the rank, scratch row and column included."""
        return self.bytes_per_token * (self.num_slots + 1) * (self.max_len + 1)

    def layer_shapes(self, num_groups: int = 1) -> LayerKV:
        """ShapeDtypeStructs of one layer; `num_groups` stacks that many ranks' slot groups on the slot axis."""
        rows, cols = num_groups * (self.num_slots + 1), self.max_len + 1
        return LayerKV(
            jax.ShapeDtypeStruct((rows, cols, self.kv_lora_rank), self.dtype),
            jax.ShapeDtypeStruct((rows, cols, self.rope_dim), self.dtype),
        )


def allocate(spec: CacheSpec, where: jax.Device | Sharding | None = None, num_groups: int = 1) -> list[LayerKV]:
    """Zero cache of every layer, created directly on `where` (a device, or a sharding of the slot axis
    when `num_groups` ranks' slot groups share one global array, as DEP's SPMD program does)."""
    if where is None:
        where = jax.devices()[0]
    sharding = SingleDeviceSharding(where) if isinstance(where, jax.Device) else where
    shapes = spec.layer_shapes(num_groups)
    zeros = jax.jit(
        lambda: [jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes) for _ in range(spec.num_layers)],
        out_shardings=[LayerKV(sharding, sharding)] * spec.num_layers,
    )
    return zeros()


def nbytes(cache: list[LayerKV]) -> int:
    """Bytes held by an allocated cache (all shards)."""
    return int(sum(np.prod(a.shape) * a.dtype.itemsize for kv in cache for a in (kv.latent, kv.k_pe)))
