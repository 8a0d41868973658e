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

Hand-off helpers (disaggregated serving): `read_slot` copies a slot's first positions into one new array
[num_layers, n, kv_lora_rank + rope_dim]; `write_slot` (`write_slot_sharded` for a DEP cache) writes such an
array into another cache's slot. Positions past the prompt that ride along are stale and harmless, as above.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P, Sharding, SingleDeviceSharding

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


# ---------------------------------------------------------------------------------------------------------------
# Copying one slot's rows out of a cache and into another (the KV hand-off of disaggregated serving)


def rows_nbytes(spec: CacheSpec, length: int) -> int:
    """Bytes of `length` positions of one slot over all layers (what `read_slot` returns)."""
    return length * spec.bytes_per_token


def _read_slot(cache: list[LayerKV], slot, length: int) -> jax.Array:
    return jnp.stack([
        jnp.concatenate([kv.latent[slot, :length], kv.k_pe[slot, :length]], axis=-1) for kv in cache
    ])


def _write_slot(cache: list[LayerKV], rows, slot) -> list[LayerKV]:
    rank = cache[0].latent.shape[-1]
    out = []
    for kv, r in zip(cache, rows):
        out.append(LayerKV(
            jax.lax.dynamic_update_slice(kv.latent, r[None, :, :rank].astype(kv.latent.dtype), (slot, 0, 0)),
            jax.lax.dynamic_update_slice(kv.k_pe, r[None, :, rank:].astype(kv.k_pe.dtype), (slot, 0, 0)),
        ))
    return out


_read_slot_jit = jax.jit(_read_slot, static_argnums=2)
_write_slot_jit = jax.jit(_write_slot, donate_argnums=0)


def read_slot(cache: list[LayerKV], slot: int, length: int) -> jax.Array:
    """Positions [0, length) of `slot` in a single-device cache, every layer, latent and rope key side by side:
    [num_layers, length, kv_lora_rank + rope_dim], a new array on the cache's device (the slot may be reused
    once it is ready). One program per `length`: callers round lengths up to a few buckets."""
    spec_len = cache[0].latent.shape[1] - 1
    if not 0 < length <= spec_len:
        raise ValueError(f"read_slot: length {length} outside [1, {spec_len}] (the cache's max_len)")
    if not 0 <= slot < cache[0].latent.shape[0] - 1:
        raise ValueError(f"read_slot: slot {slot} outside [0, {cache[0].latent.shape[0] - 1})")
    return _read_slot_jit(cache, np.int32(slot), length)


def write_slot(cache: list[LayerKV], rows: jax.Array, slot: int) -> list[LayerKV]:
    """Writes `rows` [num_layers, n, kv_lora_rank + rope_dim] (from `read_slot`, on the cache's device) into
    positions [0, n) of `slot`. Donates `cache`; returns the updated cache."""
    _check_rows(cache, rows, slot)
    return _write_slot_jit(cache, rows, np.int32(slot))


def _check_rows(cache: list[LayerKV], rows, slot: int) -> None:
    width = cache[0].latent.shape[-1] + cache[0].k_pe.shape[-1]
    max_len = cache[0].latent.shape[1] - 1
    if rows.ndim != 3 or rows.shape[0] != len(cache) or rows.shape[2] != width or not 0 < rows.shape[1] <= max_len:
        raise ValueError(f"write_slot: rows of shape {rows.shape} do not fit a cache of {len(cache)} layers, "
                         f"max_len {max_len}, {width} values per token")
    if rows.dtype != cache[0].latent.dtype:
        raise ValueError(f"write_slot: rows are {rows.dtype}, the cache {cache[0].latent.dtype}")
    slots = cache[0].latent.shape[0] - 1
    if not 0 <= slot <= slots:
        raise ValueError(f"write_slot: slot {slot} outside [0, {slots}]")


@functools.cache
def _write_slot_sharded_jit(mesh, axis: str, num_layers: int):
    cache_specs = [LayerKV(P(axis), P(axis))] * num_layers

    def local(cache, rows, slot):  # per device: rows [1, L, n, width], slot [1]
        return _write_slot(cache, rows[0], slot[0])

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(cache_specs, P(axis), P(axis)), out_specs=cache_specs,
                                 check_vma=False), donate_argnums=0)


def write_slot_sharded(cache: list[LayerKV], rows: jax.Array, slots: np.ndarray, mesh, axis: str) -> list[LayerKV]:
    """`write_slot` for a cache whose slot axis is split over mesh axis `axis`, one slot group per device (DEP):
    rows [num_devices, num_layers, n, width] split the same way, device g writing rows[g] into its local slot
    slots[g] (a group with nothing to write names its scratch slot). Donates `cache`."""
    groups = mesh.shape[axis]
    slots = np.asarray(slots, np.int32)
    if rows.shape[0] != groups or slots.shape != (groups,):
        raise ValueError(f"write_slot_sharded: rows {rows.shape} and slots {slots.shape} need {groups} groups")
    per_group = cache[0].latent.shape[0] // groups
    if (slots < 0).any() or (slots >= per_group).any():
        raise ValueError(f"write_slot_sharded: slots {slots.tolist()} outside [0, {per_group})")
    slots = jax.device_put(slots, NamedSharding(mesh, P(axis)))
    return _write_slot_sharded_jit(mesh, axis, len(cache))(cache, rows, slots)
