"""Step runners: execute a scheduler's `StepPlan` on the model and a paged cache, in fixed-shape programs.

A step's rows (prefill chunks, or one decode token per request) are packed into [rows, length] blocks whose
shapes come from a small set of `Buckets`, so that programs compile once per bucket, never per request:
  * rows are padded to a batch bucket; a padding row has no tokens and only the scratch page;
  * each row is left-aligned in its length bucket (its tokens first, then padding, which goes to the scratch
    page); the step returns the logits of each row's last real token;
  * the block table's width is the largest pages-per-row of the step rounded up to a power of two for
    prefill (the keys the expanded form up-projects) and max_len's pages for decode (read in place).
Prefill chunks are grouped by length bucket, one program call per group; a chunk longer than the largest
bucket runs in pieces. Decode is one call of length 1. Prefill uses the expanded MLA form, decode the
weight-absorbed form (`absorbed=True`).

Inside a call every layer writes the rows' new tokens into their pages (donated: in place) and attends over
the pages (`dwdp_jax.paged_attention`: the Pallas MLA kernels on a GPU, the einsum reference elsewhere); no
cache row is gathered and written back. Pages are taken from the rank's `PageTable` before the call.

Runners, all with `step_fn(plan) -> {request_id: token}` for `scheduler.run_engine`:
  * `ModelRunner`: one device; one jitted program per (bucket, form) over the whole model.
  * `DwdpRankRunner`: one DWDP rank, through `DwdpRank.forward` (per-layer programs, prefetched experts).
  * `DepRunner`: one SPMD program over G devices (DEP); device g serves its own slot group from its own
    page pool. It drives a `LockstepScheduler`: G per-device schedulers that step together.
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

from dwdp_jax.engine import paged_cache
from dwdp_jax.engine.lockstep import LockstepPlan
from dwdp_jax.engine.paged_cache import PagedCacheSpec, PageTable
from dwdp_jax.engine.step_block import Buckets, StepArrays, _Row, pack_rows, pages_bucket
from dwdp_jax.engine.sampling import SamplingParams, sample
from dwdp_jax.engine.scheduler import PENDING, DecodeItem, PrefillChunk, StepPlan
from dwdp_jax.experts import ExpertExecutor, LocalExecutor
from dwdp_jax.model import DeepseekV3, with_absorbed_kv_b
from dwdp_jax.paged_attention import PagedAttention, default_backend
from dwdp_jax.parallel.dep import AXIS, DepExecutor, DepModel, state_specs
from dwdp_jax.parallel.dwdp import DwdpRank


# ---------------------------------------------------------------------------------------------------------------
# The model over a paged cache (traced inside the runners' programs)


def paged_forward(model: DeepseekV3, pages: list[jax.Array], step: StepArrays, absorbed: bool,
                  executor: ExpertExecutor, attention: PagedAttention):
    """Runs a step block over the pages (each layer writes its new rows in place, then attends).

    Returns (logits of each row's last token [rows, vocab] float32, updated pages)."""
    x = model.embed(step.ids)
    new_pages = []
    for layer, layer_pages in zip(model.layers, pages):
        kv = attention.layer(layer_pages, step.block_table, step.lengths, step.q_lens)
        x, kv = layer(x, step.positions, executor, kv, absorbed)
        new_pages.append(kv.pages)
    return model.logits(last_tokens(x, step.q_lens)), new_pages


def last_tokens(x_bsd, q_lens):
    """x at each row's last token (column q_lens - 1; column 0 for padding rows): [rows, d]."""
    return x_bsd[jnp.arange(x_bsd.shape[0]), jnp.maximum(q_lens - 1, 0)]


@dataclasses.dataclass(eq=False)
class _CountingExecutor:
    """`inner`, also counting (traced) the real tokens routed to each of `num_experts` experts in every call:
    int32 [num_experts] per MoE layer, appended to `counts` in layer order. valid: bool [tokens] (a step
    block's flattened rows: padding is not counted)."""

    inner: ExpertExecutor
    valid: jax.Array
    num_experts: int
    counts: list

    def __call__(self, x_td, expert_ids_tk, weights_tk, experts):
        hits = jnp.broadcast_to(self.valid[:, None], expert_ids_tk.shape).astype(jnp.int32)
        self.counts.append(jnp.zeros((self.num_experts,), jnp.int32).at[expert_ids_tk].add(hits))
        return self.inner(x_td, expert_ids_tk, weights_tk, experts)


def model_step_program(graph, state_def, executor, attention: PagedAttention, absorbed: bool,
                       expert_counts: bool = False):
    """A jitted step of the whole model: (state leaves, pages (donated), ids, rest) -> (logits, pages), the
    step's inputs as `StepArrays.pack` gives them; with `expert_counts` also the tokens routed to each expert,
    int32 [MoE layers, n_routed_experts] (a scatter-add per MoE layer). The graph, executor and attention are
    closed over, so a call hashes nothing but the arrays (a static GraphDef argument is hashed on every call)."""

    def step_fn(leaves, pages, ids, rest):
        step = StepArrays.unpack(ids, rest)
        model = nnx.merge(graph, jax.tree.unflatten(state_def, leaves))
        if not expert_counts:
            return paged_forward(model, pages, step, absorbed, executor, attention)
        length = step.ids.shape[1]
        valid = (jnp.arange(length)[None, :] < step.q_lens[:, None]).reshape(-1)
        counting = _CountingExecutor(executor, valid, model.cfg.n_routed_experts, [])
        logits, pages = paged_forward(model, pages, step, absorbed, counting, attention)
        return logits, pages, jnp.stack(counting.counts)

    return jax.jit(step_fn, donate_argnums=1)


@functools.partial(jax.jit, static_argnames="params")
def _sample_and_record(logits, slot_tokens, at, key, params: SamplingParams):
    """One program per step for sampling and the step-ahead bookkeeping: (tokens [rows] int32, slot_tokens with
    them written at positions `at` [rows] (padding rows: out of range, dropped), the next key). Greedy takes and
    returns no key (key None): unflattening a key array out of every call is host work (seen in a CPU profile)."""
    if params.temperature > 0:
        key = jax.random.split(key)[1]
    tokens = sample(logits, params, key)
    return tokens, slot_tokens.at[at].set(tokens, mode="drop"), key


# A decode row's id from the previous step's samples by slot (source >= 0) or its own (source -1): ids [rows, 1].
_chained_ids = jax.jit(lambda ids, slot_tokens, source: jnp.where(
    (source >= 0)[:, None], jnp.take(slot_tokens, jnp.maximum(source, 0))[:, None], ids))
# logits[index] as one compiled call: jnp indexing traces its gather in Python on every call (~1-2 ms a step)
_take_rows = jax.jit(lambda logits, index: jnp.take(logits, index, axis=0))


# ---------------------------------------------------------------------------------------------------------------
# Runners


@dataclasses.dataclass(frozen=True)
class PendingStep:
    """A dispatched step whose sampled tokens are still on the device: tokens, one int32 [rows] array per
    program call that sampled; index {request_id: (call, row)} (every decode item and every last prefill chunk
    of the plan); slot_tokens [num_groups * num_slots]: each slot's latest sampled token after this step."""

    tokens: tuple
    index: dict[str, tuple[int, int]]
    slot_tokens: jax.Array


@dataclasses.dataclass(frozen=True)
class _Call:
    """One executed program call: padded logits [groups * rows, vocab]; members[(group, index)] = row."""

    logits: jax.Array
    members: dict


class _SlotRunner:
    """Packing, bucketing, page bookkeeping and sampling shared by the runners. A subclass provides `_call`,
    which runs a `StepArrays` block of [num_groups * rows, length] (group g's rows in block g, its block
    table in that group's page numbering) and returns the padded logits. Single-rank runners have one group."""

    num_groups = 1

    def __init__(self, spec: PagedCacheSpec, buckets: Buckets | None, sampling: SamplingParams, seed: int, where,
                 attention: str | None, num_groups: int = 1):
        self.spec = spec
        self.num_groups = num_groups
        self.buckets = buckets or Buckets.default(spec.num_slots, spec.max_len)
        if self.buckets.batch[-1] < spec.num_slots:
            raise ValueError(f"largest batch bucket {self.buckets.batch[-1]} < num_slots {spec.num_slots}")
        self.page_tables = [PageTable(spec) for _ in range(num_groups)]
        backend = attention or default_backend(spec.dtype)
        on_gpu = jax.devices()[0].platform == "gpu"
        self.attention = PagedAttention(spec.latent_width, backend, interpret=backend == "pallas" and not on_gpu)
        self.sampling = sampling
        # The key lives where the logits do: a key on another device would order this rank's sampling after
        # that device's queued work (and couple DWDP ranks).
        self._key = jax.device_put(jax.random.key(seed), where)
        # each slot's latest sampled token, on the device (what a step planned ahead feeds back)
        self._slot_tokens = jax.device_put(jnp.zeros((num_groups * spec.num_slots,), jnp.int32), where)

    @property
    def page_table(self) -> PageTable:
        """Group 0's page table (the only one of a single-rank runner)."""
        return self.page_tables[0]

    def _call(self, step: StepArrays, absorbed: bool) -> jax.Array:
        raise NotImplementedError

    # -- execution -------------------------------------------------------------------------------------------

    def _run_block(self, groups: Sequence[Sequence[tuple[int, _Row]]], length: int, absorbed: bool,
                   chain=None) -> _Call:
        """chain: (slot tokens on the device [n], {(group, index): position in them}): those rows' ids come
        from the previous step's samples (never read on the host) instead of their rows' tokens."""
        nb = self.buckets.batch_for(max(len(g) for g in groups))
        max_pages = self.spec.max_pages_per_slot
        # Decode reads pages in place (the block table's width costs nothing); prefill's keys are bucketed.
        need = max(-(-(row.start + len(row.tokens)) // self.spec.page_size) for g in groups for _, row in g)
        num_pages = max_pages if absorbed else pages_bucket(need, max_pages)
        parts = [pack_rows([row for _, row in g], nb, length, self.page_tables[gi], num_pages)
                 for gi, g in enumerate(groups)]
        step = StepArrays.concat(parts)
        members = {(g, idx): g * nb + j for g, group in enumerate(groups) for j, (idx, _) in enumerate(group)}
        if chain is not None and chain[1]:
            source = np.full((step.ids.shape[0],), -1, np.int32)
            for key, position in chain[1].items():
                source[members[key]] = position
            step = dataclasses.replace(step, ids=_chained_ids(step.ids, chain[0], source))
        return _Call(self._call(step, absorbed), members)

    def _execute(self, rows_per_group: Sequence[Sequence[_Row]], decode: bool, chain=None) -> list[_Call]:
        """Runs every group's rows (distinct slots within a group): decode rows (one token each) in one
        absorbed call of length 1 (chain: see `_run_block`), prefill rows in expanded calls of their length
        buckets."""
        rows = [list(rows) for rows in rows_per_group]
        if decode:
            return [self._run_block([list(enumerate(group)) for group in rows], 1, True, chain)]
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
        if index == list(range(logits.shape[0])):  # every row, in order (a full batch bucket): no program
            return logits
        return _take_rows(logits, np.asarray(index, np.int32))

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

    def _sample(self, logits, slot_tokens, at, advance_key: bool = True):
        """Samples every row of `logits` and records the tokens in `slot_tokens` at `at` (one program); the
        runner's key moves on unless `advance_key` is False (warm-up)."""
        greedy = self.sampling.temperature == 0
        tokens, slot_tokens, key = _sample_and_record(logits, slot_tokens, at, None if greedy else self._key,
                                                      params=self.sampling)
        if advance_key and not greedy:
            self._key = key
        return tokens, slot_tokens

    def _dispatch_groups(self, plans: Sequence[StepPlan], prev: PendingStep | None) -> PendingStep:
        """Dispatches one plan per group and samples a token for every last chunk and decode item, without
        waiting for the device. A decode item whose token is `PENDING` is fed the token `prev` sampled for it.

        Every sampled token is also written at its request's slot of a per-runner device vector
        [num_groups * num_slots] (`PendingStep.slot_tokens`), which the next step's `PENDING` rows read: fixed
        shapes, so nothing compiles per step mix (the programs involved compile once per batch bucket)."""
        num_slots = self.spec.num_slots
        sampled, index = [], {}  # tokens [rows] on device per call; {request_id: (call, row)}
        slot_tokens = self._slot_tokens
        for decode in (False, True):
            rows, wanted, chain = [], {}, {}
            for g, plan in enumerate(plans):
                if decode:
                    rows.append([_Row(d.slot, d.position, np.array([max(d.token, 0)], np.int32))
                                 for d in plan.decode])
                    wanted.update({(g, i): (d.request_id, d.slot) for i, d in enumerate(plan.decode)})
                    for i, d in enumerate(plan.decode):
                        if d.token == PENDING:
                            if prev is None or d.request_id not in prev.index:
                                raise ValueError(f"decode item {d.request_id!r} waits for a token the previous "
                                                 "dispatched step did not sample")
                            chain[(g, i)] = g * num_slots + d.slot
                else:
                    rows.append([_Row(c.slot, c.start, np.asarray(c.tokens, np.int32)) for c in plan.prefill])
                    wanted.update({(g, i): (c.request_id, c.slot) for i, c in enumerate(plan.prefill)
                                   if c.is_last})
            if not any(rows):
                continue
            calls = self._execute(rows, decode, (prev.slot_tokens, chain) if chain else None)
            for call in calls:
                picked = {call.members[k]: (k[0], rid, slot) for k, (rid, slot) in wanted.items()
                          if k in call.members}
                if not picked:
                    continue
                at = np.full((call.logits.shape[0],), slot_tokens.shape[0], np.int32)  # padding rows: dropped
                for row, (g, rid, slot) in picked.items():
                    at[row] = g * num_slots + slot
                    index[rid] = (len(sampled), row)
                tokens, slot_tokens = self._sample(call.logits, slot_tokens, at)
                sampled.append(tokens)
        self._slot_tokens = slot_tokens
        return PendingStep(tuple(sampled), index, slot_tokens)

    def dispatch(self, plan: StepPlan, prev: PendingStep | None = None) -> PendingStep:
        """Starts `plan` on the device and returns at once (the step-ahead contract of `run_engine`): decode
        items with token `PENDING` take the token `prev` (the step dispatched before) sampled for them."""
        return self._dispatch_groups([plan], prev)

    @staticmethod
    def collect(pending: PendingStep) -> dict[str, int]:
        """{request_id: token} of a dispatched step (waits for it)."""
        host = [tokens.tolist() for tokens in jax.device_get(list(pending.tokens))]
        return {rid: host[c][row] for rid, (c, row) in pending.index.items()}

    def _step_groups(self, plans: Sequence[StepPlan]) -> dict[str, int]:
        """Executes one plan per group; returns the token sampled for every last chunk and decode item."""
        return self.collect(self._dispatch_groups(plans, None))

    def step_fn(self, plan: StepPlan) -> dict[str, int]:
        """Executes `plan` and returns {request_id: sampled token} (the `run_engine` step contract)."""
        return self._step_groups([plan])

    # -- KV hand-off hooks (disaggregated serving, `dwdp_jax.engine.disagg`) -----------------------------------

    @property
    def group_devices(self) -> list[jax.Device]:
        """The device of each slot group (one per group)."""
        raise NotImplementedError

    def group_pages(self, group: int) -> list[jax.Array]:
        """Slot group `group`'s pages, per layer [num_pages + 1, page_size, width] on its device (no copy)."""
        if group != 0:
            raise ValueError(f"slot group {group} of a runner with one group")
        return self.pages

    def read_slot(self, group: int, slot: int, length: int) -> jax.Array:
        """Tokens [0, length) of `slot` in slot group `group`: a new array [num_layers, length,
        kv_lora_rank + rope_dim] on the group's device, queued behind the steps already dispatched."""
        return paged_cache.read_rows(self.group_pages(group), self.page_tables[group], slot, length)

    def write_slot(self, group: int, slot: int, rows: jax.Array) -> None:
        """Writes `rows` [num_layers, n, kv_lora_rank + rope_dim] (on the group's device) into positions
        [0, n) of `slot` of slot group `group`."""
        if group != 0:
            raise ValueError(f"slot group {group} of a runner with one group")
        self.pages = paged_cache.write_rows(self.pages, self.page_table, slot, rows)

    def warmup(self, lengths: Sequence[int] | None = None) -> None:
        """Compiles the decode program for every batch bucket and the prefill program for every (batch,
        length) bucket (`lengths`: only these length buckets) at every block-table width it can take, running
        padding rows only."""
        max_pages = self.spec.max_pages_per_slot
        shapes = [(b, 1, True, max_pages) for b in self.buckets.batch]
        for n in lengths or self.buckets.length:
            widths = {pages_bucket(p, max_pages) for p in range(-(-n // self.spec.page_size), max_pages + 1)}
            shapes += [(b, n, False, w) for b in self.buckets.batch for w in sorted(widths)]
        for b, n, absorbed, width in shapes:
            part = pack_rows([], b, n, self.page_table, width)
            step = StepArrays.concat([part] * self.num_groups)
            logits = self._call(step, absorbed)
            rows = np.full((logits.shape[0],), -1, np.int32)
            # sampling and the step-ahead helpers at this row count (nothing written: every row out of range /
            # unchained; the key is kept)
            self._sample(logits, self._slot_tokens, rows + self._slot_tokens.shape[0] + 1,
                         advance_key=False)[0].block_until_ready()
            if absorbed:
                _chained_ids(step.ids, self._slot_tokens, rows).block_until_ready()


def _spec_for(cfg, num_slots: int, max_len: int, dtype, num_pages: int | None) -> PagedCacheSpec:
    pages = num_pages or PagedCacheSpec.pages_for(num_slots, max_len)
    return PagedCacheSpec.for_model(cfg, pages, num_slots, max_len, dtype)


class ModelRunner(_SlotRunner):
    """A `DeepseekV3` on one device with a paged cache for `num_slots` requests of up to `max_len` tokens
    (`num_pages` pages; default: enough for every slot at max_len). `attention`: "pallas" or "einsum"
    (default: `paged_attention.default_backend`). expert_counts: every program call also counts the real
    tokens routed to each expert per MoE layer (`last_expert_counts`; e.g. the bytes a decode step must read)."""

    def __init__(self, model: DeepseekV3, num_slots: int, max_len: int, *, buckets: Buckets | None = None,
                 device: jax.Device | None = None, executor: ExpertExecutor | None = None, cache_dtype=None,
                 sampling: SamplingParams = SamplingParams(), seed: int = 0, num_pages: int | None = None,
                 attention: str | None = None, expert_counts: bool = False):
        spec = _spec_for(model.cfg, num_slots, max_len, cache_dtype or model.dtype, num_pages)
        self.device = device or jax.devices()[0]
        self.expert_counts = expert_counts
        self.last_expert_counts = None  # with expert_counts: int32 [MoE layers, experts] of the last call
        super().__init__(spec, buckets, sampling, seed, self.device, attention)
        # decode reads kv_b dequantized once (not per step) where the checkpoint's kv_b is FP8
        self.graph, state = nnx.split(with_absorbed_kv_b(model, model.dtype))
        self.state = jax.device_put(state, self.device)
        self._leaves, self._state_def = jax.tree.flatten(self.state)
        # Default experts: the Pallas grouped GEMMs on a GPU (ragged_dot would dequantize every FP8 expert).
        self.executor = executor or LocalExecutor(backend="pallas" if self.device.platform == "gpu" else "jnp")
        self.pages = paged_cache.allocate(spec, self.device)
        self._programs: dict = {}  # (executor, absorbed) -> jitted step

    @property
    def group_devices(self) -> list[jax.Device]:
        return [self.device]

    def _call(self, step, absorbed):
        key = (self.executor, absorbed)
        if key not in self._programs:
            self._programs[key] = model_step_program(self.graph, self._state_def, self.executor, self.attention,
                                                     absorbed, self.expert_counts)
        # committed to the device in every call: ids computed on the device (a step planned ahead) and ids from
        # the host must give the program the same input shardings, or it compiles twice; two transfers, not five
        ids, rest = jax.device_put(step.pack(), self.device)
        out = self._programs[key](self._leaves, self.pages, ids, rest)
        if self.expert_counts:
            logits, self.pages, self.last_expert_counts = out
        else:
            logits, self.pages = out
        return logits


class DwdpRankRunner(_SlotRunner):
    """One DWDP rank with its own paged cache on its device; the model runs through `DwdpRank.forward`."""

    def __init__(self, rank: DwdpRank, num_slots: int, max_len: int, *, buckets: Buckets | None = None,
                 cache_dtype=None, sampling: SamplingParams = SamplingParams(), seed: int = 0,
                 num_pages: int | None = None, attention: str | None = None):
        if cache_dtype is None:
            cache_dtype = nnx.merge(rank.head_graph, rank.head_state).embed_tokens[...].dtype
        spec = _spec_for(rank.cfg, num_slots, max_len, cache_dtype, num_pages)
        super().__init__(spec, buckets, sampling, seed, rank.device, attention)
        self.rank = rank
        self.pages = paged_cache.allocate(spec, rank.device)

    @property
    def group_devices(self) -> list[jax.Device]:
        return [self.rank.device]

    def _call(self, step, absorbed):
        meta = self.attention.layer(None, step.block_table, step.lengths, step.q_lens)
        logits, self.pages = self.rank.forward(step.ids, step.positions, paged=(self.pages, meta), absorbed=absorbed,
                                               last_at=np.maximum(step.q_lens - 1, 0))
        return logits


class DepRunner(_SlotRunner):
    """DEP (attention data parallel + expert parallel all-to-all) as one SPMD program over a `DepModel`'s
    devices, each device with its own slot group and page pool. `step_fn` takes a `LockstepPlan`.
    capacity, backend: of the `DepExecutor` (as for `DepModel`)."""

    def __init__(self, dep: DepModel, num_slots: int, max_len: int, *, buckets: Buckets | None = None,
                 capacity: int | None = None, backend: str = "jnp", cache_dtype=None,
                 sampling: SamplingParams = SamplingParams(), seed: int = 0, num_pages: int | None = None,
                 attention: str | None = None):
        graph = dep.graph
        model = nnx.merge(graph, dep.state)  # for its config and dtype only
        g = dep.mesh.devices.size
        spec = _spec_for(model.cfg, num_slots, max_len, cache_dtype or model.dtype, num_pages)
        super().__init__(spec, buckets, sampling, seed, NamedSharding(dep.mesh, P()), attention, num_groups=g)
        self.mesh, self.state = dep.mesh, dep.state
        self.pages = paged_cache.allocate(spec, NamedSharding(self.mesh, P(AXIS)), num_groups=g)
        executor = DepExecutor(g, capacity, backend)
        self._leaves, state_def = jax.tree.flatten(dep.state)
        specs = jax.tree.leaves(state_specs(dep.state), is_leaf=lambda x: isinstance(x, P))
        page_specs = [P(AXIS)] * model.cfg.num_layers
        step_specs = StepArrays(*([P(AXIS)] * len(dataclasses.fields(StepArrays))))
        attention_cfg = self.attention

        def per_device(leaves, pages, step, absorbed):
            model = nnx.merge(graph, jax.tree.unflatten(state_def, leaves))
            return paged_forward(model, pages, step, absorbed, executor, attention_cfg)

        self._steps = {
            absorbed: jax.jit(
                jax.shard_map(functools.partial(per_device, absorbed=absorbed), mesh=self.mesh,
                              in_specs=(specs, page_specs, step_specs),
                              out_specs=(P(AXIS), page_specs), check_vma=False),
                donate_argnums=1,
            )
            for absorbed in (False, True)
        }
        self._block = NamedSharding(self.mesh, P(AXIS))
        self._write = paged_cache.sharded_writer(self.mesh, AXIS, spec)

    def _call(self, step, absorbed):
        step = jax.device_put(step, self._block)
        logits, self.pages = self._steps[absorbed](self._leaves, self.pages, step)
        return logits

    def step_fn(self, plan: LockstepPlan) -> dict[str, int]:
        if len(plan.plans) != self.num_groups:
            raise ValueError(f"plan has {len(plan.plans)} device plans, the runner {self.num_groups} devices")
        return self._step_groups(plan.plans)

    @property
    def group_devices(self) -> list[jax.Device]:
        return list(self.mesh.devices.flat)

    def group_pages(self, group: int) -> list[jax.Array]:
        """Device `group`'s shard of the pages (its pool), per layer [num_pages + 1, page_size, width]."""
        if not 0 <= group < self.num_groups:
            raise ValueError(f"slot group {group} outside [0, {self.num_groups})")
        start = group * (self.spec.num_pages + 1)

        def shard(a):
            return next(s.data for s in a.addressable_shards if (s.index[0].start or 0) == start)

        return [shard(p) for p in self.pages]

    def write_slot(self, group: int, slot: int, rows: jax.Array) -> None:
        """One SPMD program over the mesh: device `group` writes `rows` into its `slot`'s pages, the others
        write zeros into their scratch page."""
        if not 0 <= group < self.num_groups:
            raise ValueError(f"slot group {group} outside [0, {self.num_groups})")
        if rows.devices() != {self.group_devices[group]}:
            raise ValueError(f"rows on {rows.devices()}, slot group {group} is on {self.group_devices[group]}")
        self.pages = self._write(self.pages, self.page_tables, group, slot, rows)

    def prefill(self, chunks):
        raise NotImplementedError("DepRunner runs whole lockstep plans: use step_fn")

    decode = prefill
