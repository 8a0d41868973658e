"""Step runners: execute a scheduler's `StepPlan` on the model and a slot cache, in fixed-shape programs.

A step's rows (prefill chunks, or one decode token per request) are packed into [rows, length] blocks whose
shapes come from a small set of `Buckets`, so that programs compile once per bucket, never per request:
  * rows are padded to a batch bucket; padding rows use the cache's scratch slot;
  * each row is right-aligned in its length bucket, so its last real token is the row's last column (whose
    logits the step returns); the padding tokens in front are written to the scratch position.
Prefill chunks are grouped by length bucket, one program call per group; a chunk longer than the largest
bucket runs in pieces. Decode is one call of length 1. Prefill uses the expanded MLA form, decode the
weight-absorbed form (`absorbed=True`).

Inside a call, every layer gathers the rows' slots from the cache ([rows, max_len + 1, ...]), runs MLA with
that cache (which writes the new tokens at their positions and attends to every position <= the query's),
and writes only the new tokens back into the cache.

Runners, all with `step_fn(plan) -> {request_id: token}` for `scheduler.run_engine`:
  * `ModelRunner`: one device; one jitted program per (bucket, form) over the whole model.
  * `DwdpRankRunner`: one DWDP rank, through `DwdpRank.forward` (per-layer programs, prefetched experts).
  * `DepRunner`: one SPMD program over G devices (DEP); device g serves its own slot group. It drives a
    `LockstepScheduler`: G per-device schedulers that step together, as an SPMD program must.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dwdp_jax.engine import kv_cache
from dwdp_jax.engine.kv_cache import CacheSpec
from dwdp_jax.engine.sampling import SamplingParams, sample
from dwdp_jax.engine.scheduler import DecodeItem, FinishedRequest, PrefillChunk, Scheduler, StepPlan
from dwdp_jax.engine.workload import Request, RequestError
from dwdp_jax.experts import ExpertExecutor, LocalExecutor
from dwdp_jax.model import DeepseekV3, LayerKV
from dwdp_jax.parallel.dep import AXIS, DepExecutor, DepModel, state_specs
from dwdp_jax.parallel.dwdp import DwdpRank


# ---------------------------------------------------------------------------------------------------------------
# Shapes


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


def pack_rows(rows: Sequence[_Row], num_rows: int, length: int, spec: CacheSpec):
    """Right-aligned [num_rows, length] block: (token_ids, positions, slots), int32 numpy.

    Padding tokens sit at the scratch position, padding rows in the scratch slot."""
    ids = np.zeros((num_rows, length), np.int32)
    positions = np.full((num_rows, length), spec.scratch_pos, np.int32)
    slots = np.full((num_rows,), spec.scratch_slot, np.int32)
    for i, row in enumerate(rows):
        n = len(row.tokens)
        if not 0 < n <= length:
            raise ValueError(f"row of {n} tokens does not fit length {length}")
        if row.start + n > spec.max_len:
            raise ValueError(f"positions up to {row.start + n} exceed the cache's max_len={spec.max_len}")
        if not 0 <= row.slot < spec.num_slots:
            raise ValueError(f"slot {row.slot} outside [0, {spec.num_slots})")
        ids[i, length - n:] = row.tokens
        positions[i, length - n:] = np.arange(row.start, row.start + n, dtype=np.int32)
        slots[i] = row.slot
    return ids, positions, slots


# ---------------------------------------------------------------------------------------------------------------
# The model with a slot cache (traced inside the runners' programs)


def gather_rows(cache: list[LayerKV], slots_n) -> list[LayerKV]:
    """The slots' cache rows, per layer [n, max_len + 1, ...]."""
    return [LayerKV(kv.latent[slots_n], kv.k_pe[slots_n]) for kv in cache]


def write_back(kv: LayerKV, rows: LayerKV, slots_n, positions_ns) -> LayerKV:
    """Copies the tokens at `positions_ns` of the updated rows into the slot cache (only those: a step
    writes its new tokens, never whole rows)."""
    r = jnp.arange(slots_n.shape[0])[:, None]
    s = slots_n[:, None]
    return LayerKV(
        kv.latent.at[s, positions_ns].set(rows.latent[r, positions_ns]),
        kv.k_pe.at[s, positions_ns].set(rows.k_pe[r, positions_ns]),
    )


def cached_forward(model: DeepseekV3, cache: list[LayerKV], token_ids_ns, positions_ns, slots_n, absorbed: bool,
                   executor: ExpertExecutor):
    """Runs rows [n, s] whose sequences live in cache rows `slots_n`; writes their tokens into the cache.

    Returns (logits of each row's last column [n, vocab] float32, updated cache)."""
    x = model.embed(token_ids_ns)
    new_cache = []
    for layer, kv, rows in zip(model.layers, cache, gather_rows(cache, slots_n)):
        x, rows = layer(x, positions_ns, executor, rows, absorbed)
        new_cache.append(write_back(kv, rows, slots_n, positions_ns))
    return model.logits(x[:, -1]), new_cache


def _model_step(graph, state, cache, token_ids, positions, slots, absorbed, executor):
    return cached_forward(nnx.merge(graph, state), cache, token_ids, positions, slots, absorbed, executor)


_model_step_jit = jax.jit(_model_step, static_argnums=(0, 6, 7), donate_argnums=2)
_gather_jit = jax.jit(gather_rows)
_write_back_all_jit = jax.jit(
    lambda cache, rows, slots, positions: [write_back(kv, r, slots, positions) for kv, r in zip(cache, rows)],
    donate_argnums=0,
)
_sample_jit = jax.jit(sample, static_argnames="params")


# ---------------------------------------------------------------------------------------------------------------
# Runners


@dataclasses.dataclass(frozen=True)
class _Call:
    """One executed program call: padded logits [groups * rows, vocab]; members[(group, index)] = row."""

    logits: jax.Array
    members: dict


class _SlotRunner:
    """Packing, bucketing and sampling shared by the runners. A subclass provides `_call`, which runs a
    [num_groups * rows, length] block (group g's rows first-to-last in block g) and returns the padded logits.
    Single-rank runners have one group."""

    num_groups = 1

    def __init__(self, spec: CacheSpec, buckets: Buckets | None, sampling: SamplingParams, seed: int, where):
        self.spec = spec
        self.buckets = buckets or Buckets.default(spec.num_slots, spec.max_len)
        if self.buckets.batch[-1] < spec.num_slots:
            raise ValueError(f"largest batch bucket {self.buckets.batch[-1]} < num_slots {spec.num_slots}")
        self.sampling = sampling
        # The key lives where the logits do: a key on another device would order this rank's sampling after
        # that device's queued work (and couple DWDP ranks).
        self._key = jax.device_put(jax.random.key(seed), where)

    def _call(self, token_ids, positions, slots, absorbed: bool) -> jax.Array:
        raise NotImplementedError

    # -- execution -------------------------------------------------------------------------------------------

    def _run_block(self, groups: Sequence[Sequence[tuple[int, _Row]]], length: int, absorbed: bool) -> _Call:
        nb = self.buckets.batch_for(max(len(g) for g in groups))
        packs = [pack_rows([row for _, row in g], nb, length, self.spec) for g in groups]
        ids, positions, slots = (np.concatenate(parts) for parts in zip(*packs))
        logits = self._call(ids, positions, slots, absorbed)
        members = {(g, idx): g * nb + j for g, group in enumerate(groups) for j, (idx, _) in enumerate(group)}
        return _Call(logits, members)

    def _execute(self, rows_per_group: Sequence[Sequence[_Row]], decode: bool) -> list[_Call]:
        """Runs every group's rows (distinct slots within a group): decode rows (one token each) in one
        absorbed call of length 1, prefill rows in expanded calls of their length buckets."""
        rows = [list(rows) for rows in rows_per_group]
        if decode:
            return [self._run_block([list(enumerate(group)) for group in rows], 1, True)]
        max_len = self.buckets.length[-1]
        # Chunks longer than the largest bucket: their leading pieces first, in rounds.
        while any(len(r.tokens) > max_len for group in rows for r in group):
            pieces = [[(i, _Row(r.slot, r.start, r.tokens[:max_len])) for i, r in enumerate(group)
                       if len(r.tokens) > max_len] for group in rows]
            self._run_block(pieces, max_len, False)
            rows = [[_Row(r.slot, r.start + max_len, r.tokens[max_len:]) if len(r.tokens) > max_len else r
                     for r in group] for group in rows]
        lengths = sorted({self.buckets.length_for(len(r.tokens)) for group in rows for r in group})
        calls = []
        for length in lengths:
            groups = [[(i, r) for i, r in enumerate(group) if self.buckets.length_for(len(r.tokens)) == length]
                      for group in rows]
            calls.append(self._run_block(groups, length, False))
        return calls

    @staticmethod
    def _gather_logits(calls: list[_Call], keys) -> jax.Array:
        offsets = np.cumsum([0] + [c.logits.shape[0] for c in calls])
        index = []
        for key in keys:
            c = next(n for n, call in enumerate(calls) if key in call.members)
            index.append(offsets[c] + calls[c].members[key])
        logits = calls[0].logits if len(calls) == 1 else jnp.concatenate([c.logits for c in calls])
        return logits[np.asarray(index, np.int32)]

    # -- public ----------------------------------------------------------------------------------------------

    def prefill(self, chunks: Sequence[PrefillChunk]) -> jax.Array:
        """Writes the chunks into their slots (expanded MLA). Returns each chunk's last-token logits
        [len(chunks), vocab] float32, in chunk order."""
        calls = self._execute([[_Row(c.slot, c.start, np.asarray(c.tokens, np.int32)) for c in chunks]], decode=False)
        return self._gather_logits(calls, [(0, i) for i in range(len(chunks))])

    def decode(self, items: Sequence[DecodeItem]) -> jax.Array:
        """One token per request at its position (weight-absorbed MLA). Returns logits [len(items), vocab]."""
        calls = self._execute([[_Row(d.slot, d.position, np.array([d.token], np.int32)) for d in items]], decode=True)
        return self._gather_logits(calls, [(0, i) for i in range(len(items))])

    def _sample(self, logits):
        if self.sampling.temperature > 0:  # greedy needs no fresh key (and no extra dispatch)
            self._key = jax.random.split(self._key)[1]
        return _sample_jit(logits, params=self.sampling, key=self._key)

    def _step_groups(self, plans: Sequence[StepPlan]) -> dict[str, int]:
        """Executes one plan per group; samples a token for every last chunk and decode item."""
        sampled = []  # (tokens [rows] on device, {padded row: request_id})
        for decode in (False, True):
            rows, wanted = [], {}
            for g, plan in enumerate(plans):
                if decode:
                    rows.append([_Row(d.slot, d.position, np.array([d.token], np.int32)) for d in plan.decode])
                    wanted.update({(g, i): d.request_id for i, d in enumerate(plan.decode)})
                else:
                    rows.append([_Row(c.slot, c.start, np.asarray(c.tokens, np.int32)) for c in plan.prefill])
                    wanted.update({(g, i): c.request_id for i, c in enumerate(plan.prefill) if c.is_last})
            if not any(rows):
                continue
            for call in self._execute(rows, decode):
                picked = {call.members[k]: rid for k, rid in wanted.items() if k in call.members}
                if picked:
                    sampled.append((self._sample(call.logits), picked))
        host = jax.device_get([tokens for tokens, _ in sampled])
        return {rid: int(tokens[j]) for tokens, (_, picked) in zip(host, sampled) for j, rid in picked.items()}

    def step_fn(self, plan: StepPlan) -> dict[str, int]:
        """Executes `plan` and returns {request_id: sampled token} (the `run_engine` step contract)."""
        return self._step_groups([plan])

    # -- KV hand-off hooks (disaggregated serving, `dwdp_jax.engine.disagg`) -----------------------------------

    @property
    def group_devices(self) -> list[jax.Device]:
        """The device of each slot group (one per group)."""
        raise NotImplementedError

    def slot_cache(self, group: int) -> list[LayerKV]:
        """Slot group `group`'s cache, per layer [num_slots + 1, max_len + 1, ...] on its device (no copy).
        Valid until the next step replaces the cache: read from it before dispatching another step."""
        if group != 0:
            raise ValueError(f"slot group {group} of a runner with one group")
        return self.cache

    def write_slot(self, group: int, slot: int, rows: jax.Array) -> None:
        """Writes `rows` [num_layers, n, kv_lora_rank + rope_dim] (on the group's device) into positions
        [0, n) of `slot` of slot group `group`."""
        if group != 0:
            raise ValueError(f"slot group {group} of a runner with one group")
        self.cache = kv_cache.write_slot(self.cache, rows, slot)

    def warmup(self, lengths: Sequence[int] | None = None) -> None:
        """Compiles the decode program for every batch bucket and the prefill program for every (batch,
        length) bucket (`lengths`: only these length buckets), running padding rows in the scratch slot."""
        spec = self.spec
        shapes = [(b, 1, True) for b in self.buckets.batch]
        shapes += [(b, n, False) for n in (lengths or self.buckets.length) for b in self.buckets.batch]
        for b, n, absorbed in shapes:
            g = self.num_groups
            ids = np.zeros((g * b, n), np.int32)
            positions = np.full((g * b, n), spec.scratch_pos, np.int32)
            slots = np.full((g * b,), spec.scratch_slot, np.int32)
            self._sample(self._call(ids, positions, slots, absorbed)).block_until_ready()


class ModelRunner(_SlotRunner):
    """A `DeepseekV3` on one device with a slot cache of `num_slots` x `max_len` tokens."""

    def __init__(self, model: DeepseekV3, num_slots: int, max_len: int, *, buckets: Buckets | None = None,
                 device: jax.Device | None = None, executor: ExpertExecutor | None = None, cache_dtype=None,
                 sampling: SamplingParams = SamplingParams(), seed: int = 0):
        spec = CacheSpec.for_model(model.cfg, num_slots, max_len, cache_dtype or model.dtype)
        self.device = device or jax.devices()[0]
        super().__init__(spec, buckets, sampling, seed, self.device)
        self.graph, state = nnx.split(model)
        self.state = jax.device_put(state, self.device)
        self.executor = executor or LocalExecutor()
        self.cache = kv_cache.allocate(spec, self.device)

    @property
    def group_devices(self) -> list[jax.Device]:
        return [self.device]

    def _call(self, token_ids, positions, slots, absorbed):
        logits, self.cache = _model_step_jit(self.graph, self.state, self.cache, token_ids, positions, slots,
                                             absorbed, self.executor)
        return logits


class DwdpRankRunner(_SlotRunner):
    """One DWDP rank with its own slot cache on its device; the model runs through `DwdpRank.forward`."""

    def __init__(self, rank: DwdpRank, num_slots: int, max_len: int, *, buckets: Buckets | None = None,
                 cache_dtype=None, sampling: SamplingParams = SamplingParams(), seed: int = 0):
        if cache_dtype is None:
            cache_dtype = nnx.merge(rank.head_graph, rank.head_state).embed_tokens[...].dtype
        spec = CacheSpec.for_model(rank.cfg, num_slots, max_len, cache_dtype)
        super().__init__(spec, buckets, sampling, seed, rank.device)
        self.rank = rank
        self.cache = kv_cache.allocate(spec, rank.device)

    @property
    def group_devices(self) -> list[jax.Device]:
        return [self.rank.device]

    def _call(self, token_ids, positions, slots, absorbed):
        positions, slots = jax.device_put((positions, slots), self.rank.device)
        rows = _gather_jit(self.cache, slots)
        logits, rows = self.rank.forward(token_ids, positions, kv=rows, absorbed=absorbed, last_only=True)
        self.cache = _write_back_all_jit(self.cache, rows, slots, positions)
        return logits[:, 0]


class DepRunner(_SlotRunner):
    """DEP (attention data parallel + expert parallel all-to-all) as one SPMD program over a `DepModel`'s
    devices, each device with its own slot group of `num_slots` x `max_len` tokens. `step_fn` takes a
    `LockstepPlan`. capacity, backend: of the `DepExecutor` (as for `DepModel`)."""

    def __init__(self, dep: DepModel, num_slots: int, max_len: int, *, buckets: Buckets | None = None,
                 capacity: int | None = None, backend: str = "jnp", cache_dtype=None,
                 sampling: SamplingParams = SamplingParams(), seed: int = 0):
        graph = dep.graph
        model = nnx.merge(graph, dep.state)  # for its config and dtype only
        g = dep.mesh.devices.size
        spec = CacheSpec.for_model(model.cfg, num_slots, max_len, cache_dtype or model.dtype)
        super().__init__(spec, buckets, sampling, seed, NamedSharding(dep.mesh, P()))
        self.num_groups = g
        self.mesh, self.state = dep.mesh, dep.state
        self.cache = kv_cache.allocate(spec, NamedSharding(self.mesh, P(AXIS)), num_groups=g)
        executor = DepExecutor(g, capacity, backend)
        specs = state_specs(dep.state)
        cache_specs = [LayerKV(P(AXIS), P(AXIS))] * model.cfg.num_layers

        def per_device(state, cache, ids, positions, slots, absorbed):
            return cached_forward(nnx.merge(graph, state), cache, ids, positions, slots, absorbed, executor)

        self._steps = {
            absorbed: jax.jit(
                jax.shard_map(functools.partial(per_device, absorbed=absorbed), mesh=self.mesh,
                              in_specs=(specs, cache_specs, P(AXIS), P(AXIS), P(AXIS)),
                              out_specs=(P(AXIS), cache_specs), check_vma=False),
                donate_argnums=1,
            )
            for absorbed in (False, True)
        }
        self._block = NamedSharding(self.mesh, P(AXIS))
        self._zero_rows: dict = {}  # (shape, dtype) -> per device zeros [1, ...]: write_slot's filler

    def _call(self, token_ids, positions, slots, absorbed):
        args = jax.device_put((token_ids, positions, slots), self._block)
        logits, self.cache = self._steps[absorbed](self.state, self.cache, *args)
        return logits

    def step_fn(self, plan: LockstepPlan) -> dict[str, int]:
        if len(plan.plans) != self.num_groups:
            raise ValueError(f"plan has {len(plan.plans)} device plans, the runner {self.num_groups} devices")
        return self._step_groups(plan.plans)

    @property
    def group_devices(self) -> list[jax.Device]:
        return list(self.mesh.devices.flat)

    def slot_cache(self, group: int) -> list[LayerKV]:
        """Device `group`'s shard of the cache (its slot group), per layer [num_slots + 1, max_len + 1, ...]."""
        if not 0 <= group < self.num_groups:
            raise ValueError(f"slot group {group} outside [0, {self.num_groups})")
        start = group * (self.spec.num_slots + 1)

        def shard(a):
            return next(s.data for s in a.addressable_shards if (s.index[0].start or 0) == start)

        return [LayerKV(shard(kv.latent), shard(kv.k_pe)) for kv in self.cache]

    def write_slot(self, group: int, slot: int, rows: jax.Array) -> None:
        """One SPMD program over the mesh: device `group` writes `rows` into its `slot`, the others write
        zeros into their scratch slot."""
        if not 0 <= group < self.num_groups:
            raise ValueError(f"slot group {group} outside [0, {self.num_groups})")
        devices = self.group_devices
        if rows.devices() != {devices[group]}:
            raise ValueError(f"rows on {rows.devices()}, slot group {group} is on {devices[group]}")
        key = (rows.shape, rows.dtype)
        if key not in self._zero_rows:
            self._zero_rows[key] = [jnp.zeros((1, *rows.shape), rows.dtype, device=d) for d in devices]
        parts = [rows[None] if g == group else z for g, z in enumerate(self._zero_rows[key])]
        stacked = jax.make_array_from_single_device_arrays((len(devices), *rows.shape), self._block, parts)
        slots = np.full(len(devices), self.spec.scratch_slot, np.int32)
        slots[group] = slot
        self.cache = kv_cache.write_slot_sharded(self.cache, stacked, slots, self.mesh, AXIS)

    def prefill(self, chunks):
        raise NotImplementedError("DepRunner runs whole lockstep plans: use step_fn")

    decode = prefill


# ---------------------------------------------------------------------------------------------------------------
# Lockstep scheduling (DEP)


@dataclasses.dataclass(frozen=True)
class LockstepPlan:
    """One step of every device's scheduler, executed by one SPMD program."""

    plans: tuple[StepPlan, ...]

    @property
    def is_empty(self) -> bool:
        return all(p.is_empty for p in self.plans)

    @property
    def num_tokens(self) -> int:
        return sum(p.num_tokens for p in self.plans)


class LockstepScheduler:
    """G per-device `Scheduler`s that step together; usable wherever `run_engine` takes a scheduler.

    A request pinned to a rank goes to that device; an unpinned one to the device with the fewest requests
    waiting or running (lowest index on ties). Step records carry rank 0: the program spans all devices."""

    rank = 0

    def __init__(self, schedulers: Sequence[Scheduler]):
        self.schedulers = list(schedulers)

    @property
    def idle(self) -> bool:
        return all(s.idle for s in self.schedulers)

    @property
    def num_waiting(self) -> int:
        return sum(s.num_waiting for s in self.schedulers)

    @property
    def num_running(self) -> int:
        return sum(s.num_running for s in self.schedulers)

    @property
    def finished(self) -> list[FinishedRequest]:
        return [f for s in self.schedulers for f in s.finished]

    def next_arrival_s(self) -> float | None:
        times = [t for t in (s.next_arrival_s() for s in self.schedulers) if t is not None]
        return min(times) if times else None

    def submit(self, req: Request) -> None:
        if req.rank is not None:
            if not 0 <= req.rank < len(self.schedulers):
                raise RequestError(f"request {req.request_id!r}: rank {req.rank} outside [0, {len(self.schedulers)})")
            self.schedulers[req.rank].submit(req)
            return
        load = [s.num_waiting + s.num_running for s in self.schedulers]
        self.schedulers[int(np.argmin(load))].submit(req)

    def schedule(self, now_s: float) -> LockstepPlan:
        return LockstepPlan(tuple(s.schedule(now_s) for s in self.schedulers))

    def complete_step(self, plan: LockstepPlan, new_tokens, now_s: float) -> list[FinishedRequest]:
        retired = []
        for s, p in zip(self.schedulers, plan.plans):
            ids = {c.request_id for c in p.prefill} | {d.request_id for d in p.decode}
            retired += s.complete_step(p, {rid: t for rid, t in new_tokens.items() if rid in ids}, now_s)
        return retired
