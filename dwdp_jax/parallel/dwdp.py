"""DWDP: Distributed Weight Data Parallelism.

Each device (rank) of a group of G serves its own batch with its own host thread and its own jit-compiled
programs. Where each weight lives:

  * replicated on every rank: embeddings, attention, norms, dense layers, routers, shared experts, LM head;
  * split across the group: each MoE layer's routed experts, by a `Placement` (rank r holds
    `placement.local_experts(layer, r)` in one [E_r, ...] buffer per layer; replicas allowed).

What moves, and when: the model runs one jitted program per decoder layer. Before the host dispatches layer
l's program it issues the fetch of MoE layer l+depth's remote experts: one copy per peer of that peer's
whole expert buffer, peers visited in an order rotated by rank (rank r reads r+1, r+2, ...) so that the ranks
of a group do not all read one source at once. The copies land in fresh staging buffers on this rank (at
most `depth` layers of them are alive: ring buffering by reference lifetime) and layer l+depth's program
consumes local and staged buffers where they lie (`experts.split_weight_ffn`): no merge copy, no collective,
no barrier. A fetch backend decides which engine moves the bytes (`fetch.py`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import gc
import itertools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dwdp_jax import host_inputs, xla_flags
from dwdp_jax.config import ModelConfig
from dwdp_jax.experts import ExpertWeights
from dwdp_jax.model import Block, DeepseekV3, with_absorbed_kv_b
from dwdp_jax.parallel.fetch import DevicePutFetch, FetchBackend
from dwdp_jax.parallel.rank_programs import Head, head_logits, layer_programs, prologue_step
from dwdp_jax.parallel.threads import run_in_threads
from dwdp_jax.planner.placement import Placement
from dwdp_jax.planner.policies import FetchPlan, FetchPolicy, account, plan_fetch
from dwdp_jax.planner.stats import RouterStats


@dataclasses.dataclass(frozen=True)
class DwdpConfig:
    """How a DWDP group runs.

    group_size: ranks (GPUs) in the group.
    prefetch_depth: MoE layers fetched ahead of compute; 0 fetches each layer right before it runs (the
      "no prefetch" ablation: nothing overlaps).
    staggered: rank-rotated source order (rank r reads r+1, r+2, ...); False: every rank reads peers 0, 1, ...
    expert_backend: 'jnp' (ragged_dot, any platform) or 'pallas' (Mosaic GPU grouped GEMM).
    policy: None fetches every remote expert as whole peer buffers (the paper's default; no host sync). A
      `FetchPolicy` switches to planned fetches: per layer the planner picks remote experts from this rank's
      router statistics; after the router runs, the host reads which experts were routed and fetches the
      misses on demand before the expert GEMMs (correct, counted, but a host sync per MoE layer).
    staging_budget_experts: planned fetches: most experts prefetched per layer (None: no cap).
    merge_copy: ablation of split-weight management: copy local and staged experts into one buffer before
      the grouped GEMM (what DWDP avoids).
    stats_decay: per-step decay of the router statistics the planner reads.
    gemm_sms: Pallas expert GEMMs: persistent CTAs (None: one per SM). With the `pallas_async` fetch, the SM count
      minus the fetch kernel's CTAs, so that neither kernel waits for the other's SMs.
    cuda_graphs: compile the rank's programs with the process's XLA command buffers (CUDA graphs); False (the
      default) launches their kernels one by one. A rank runs one program per MoE layer, and with the engine's
      command buffers each costs more host time than it saves (H100, B=1 at 4K: a step dispatched ahead 3.16 ms
      without, 4.23 ms with; WORKSPACE Finding 28).
    """

    group_size: int
    prefetch_depth: int = 1
    staggered: bool = True
    expert_backend: str = "jnp"
    policy: FetchPolicy | None = None
    staging_budget_experts: int | None = None
    merge_copy: bool = False
    stats_decay: float = 0.9
    gemm_sms: int | None = None
    cuda_graphs: bool = False

    def __post_init__(self):
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.prefetch_depth < 0:
            raise ValueError(f"prefetch_depth must be >= 0, got {self.prefetch_depth}")
        if self.expert_backend not in ("jnp", "pallas"):
            raise ValueError(f"expert_backend must be 'jnp' or 'pallas', got {self.expert_backend!r}")
        if self.staging_budget_experts is not None and self.policy is None:
            raise ValueError("staging_budget_experts needs a planner policy (policy=FetchPolicy(...))")
        if self.staging_budget_experts is not None and self.staging_budget_experts < 0:
            raise ValueError(f"staging_budget_experts must be >= 0, got {self.staging_budget_experts}")
        if self.gemm_sms is not None and self.gemm_sms < 1:
            raise ValueError(f"gemm_sms must be >= 1 (or None), got {self.gemm_sms}")

    @property
    def planned(self) -> bool:
        return self.policy is not None


def source_order(rank: int, group_size: int, staggered: bool = True) -> list[int]:
    """Peers in the order rank `rank` reads them: rotated by rank so that at each step the ranks read
    distinct sources (a permutation), or the same fixed order for all ranks."""
    if staggered:
        return [(rank + i) % group_size for i in range(1, group_size)]
    return [p for p in range(group_size) if p != rank]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotMap:
    """Where each global expert is found at run time: expert e is `buffers[buffer[e]][slot[e]]`."""

    buffer: jax.Array  # [n_routed_experts] int32
    slot: jax.Array  # [n_routed_experts] int32


def slot_map(placement: Placement, moe_layer: int, rank: int, peers: Sequence[int]) -> tuple[SlotMap, list[int]]:
    """Buffer 0 is the local buffer; then one buffer per peer that supplies at least one expert, in the order
    of `peers`. A locally held expert is always read locally; otherwise from the first peer holding it.
    Returns the map and the peers to fetch from (in order)."""
    n = placement.num_experts
    buffer = np.full(n, -1, np.int32)
    slot = np.zeros(n, np.int32)
    for s, e in enumerate(placement.local_experts(moe_layer, rank)):
        buffer[e], slot[e] = 0, s
    used = []
    for owner in peers:
        supplied = [(s, e) for s, e in enumerate(placement.local_experts(moe_layer, owner)) if buffer[e] < 0]
        if supplied:
            used.append(owner)
            for s, e in supplied:
                buffer[e], slot[e] = len(used), s
    if (buffer < 0).any():
        raise ValueError(f"layer {moe_layer}: experts {np.flatnonzero(buffer < 0)} are held by no rank")
    return SlotMap(jnp.asarray(buffer), jnp.asarray(slot)), used


class DwdpRank:
    """One rank: its weights on its device, and a forward pass that prefetches remote experts.

    Counters (`self.counters`, summed over steps; `reset_counters()` clears them): prefetched_experts /
    prefetched_bytes (copies issued ahead), miss_experts / miss_bytes (planned fetches: routed remote experts
    not prefetched, fetched on demand), routed_remote_experts (distinct remote experts routed, per layer and
    step), fetch_wait_s (host time blocked on copies before dispatching a layer: the exposed fetch as the
    host sees it; 0 for backends whose copies XLA orders on the device, e.g. device_put).
    `router_stats` holds this rank's decayed per-expert routing counts (the planner's input) and their trace.
    """

    def __init__(self, cfg: ModelConfig, rank: int, device: jax.Device, head: Head, layers: list[Block],
                 placement: Placement, dwdp: DwdpConfig, fetch: FetchBackend):
        self.cfg, self.rank, self.device = cfg, rank, device
        self.placement, self.dwdp, self.fetch = placement, dwdp, fetch
        self.head_graph, self.head_state = nnx.split(head)
        self._head_leaves, head_def = jax.tree.flatten(self.head_state)
        head_graph = self.head_graph  # closed over instead of self: no rank <-> program cycle
        head_of = lambda leaves: jax.tree.unflatten(head_def, leaves)
        jit = functools.partial(jax.jit, compiler_options=None if dwdp.cuda_graphs else xla_flags.NO_COMMAND_BUFFERS)
        self._logits = jit(lambda leaves, hidden, last_at, last_only: head_logits(
            head_graph, head_of(leaves), hidden, last_at, last_only), static_argnames=("last_only",))
        # decode reads kv_b dequantized once (not per step) where the checkpoint's kv_b is FP8
        dtype = head.embed_tokens[...].dtype
        self.layers = [nnx.split(with_absorbed_kv_b(layer, dtype)) for layer in layers]
        self._layer_leaves, self._programs, state_defs = [], [], []
        for i, (graph, state) in enumerate(self.layers):
            leaves, state_def = jax.tree.flatten(state)
            self._layer_leaves.append(leaves)
            state_defs.append(state_def)
            moe = cfg.is_moe_layer(i)
            head_here = (head_graph, head_of) if i == cfg.num_layers - 1 else None
            self._programs.append(layer_programs(graph, state_def, dwdp.expert_backend, dwdp.merge_copy and moe,
                                                  dwdp.gemm_sms, head=head_here, jit=jit))
        # the embedding and the dense layers before the first MoE layer run as one program (the "prologue"):
        # each program a step dispatches costs host time (bench_dwdp_dispatch.py), and no fetch lies among them
        self.prologue_layers = list(itertools.takewhile(lambda i: not cfg.is_moe_layer(i), range(cfg.num_layers)))
        graphs = [self.layers[i][0] for i in self.prologue_layers]
        defs = [state_defs[i] for i in self.prologue_layers]

        def prologue(head_leaves, leaves, packed, apart, pages, layout, absorbed):
            """Also unpacks the step's inputs (one transfer, `host_inputs`) and returns those the later
            programs read: (x, pages, (positions, meta, last_at))."""
            ids, positions, meta, last_at = host_inputs.unpack(packed, apart, layout)
            states = [jax.tree.unflatten(d, layer_leaves) for d, layer_leaves in zip(defs, leaves)]
            x, out_pages = prologue_step(head_graph, head_of(head_leaves), graphs, states, ids, positions, pages,
                                         meta, absorbed, dwdp.expert_backend)
            return x, out_pages, (positions, meta, last_at)

        self._prologue = {absorbed: jit(functools.partial(prologue, absorbed=absorbed), donate_argnums=4,
                                        static_argnames=("layout",))
                          for absorbed in (False, True)}
        # the LM head runs in the last layer's program when that layer is a MoE layer of one program
        last = cfg.num_layers - 1
        self._head_fused = cfg.is_moe_layer(last) and not dwdp.planned
        self.expert_buffers = {i: layer.mlp.experts.weights() for i, layer in enumerate(layers) if layer.is_moe}
        self.moe_layers = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
        self.order = source_order(rank, dwdp.group_size, dwdp.staggered)
        self.slot_maps, self.fetch_peers = {}, {}
        for i in self.moe_layers:
            slots, peers = slot_map(placement, self._moe_index(i), rank, self.order)
            self.slot_maps[i], self.fetch_peers[i] = jax.device_put(slots, device), peers
        self.group: list[DwdpRank] = []  # set by DwdpGroup
        self._carry = None  # staged fetches of the next step's first MoE layers
        self.router_stats = RouterStats(rank, max(cfg.num_moe_layers, 1), cfg.n_routed_experts,
                                        decay=dwdp.stats_decay)
        # per dispatched step, [([moe indices], device counts [E] or [n, E])] not yet added to router_stats
        self._pending_counts: collections.deque[list] = collections.deque()
        self.counters: collections.Counter = collections.Counter()
        any_buffer = next(iter(self.expert_buffers.values()), None)
        self.expert_bytes = any_buffer.nbytes() // max(any_buffer.num_experts, 1) if any_buffer else 0  # with scales
        self._slot_of = {(i, p): {int(e): j for j, e in enumerate(placement.local_experts(self._moe_index(i), p))}
                         for i in self.moe_layers for p in range(dwdp.group_size)}  # (layer, holder) -> slot

    @property
    def programs_per_step(self) -> int:
        """Programs one step dispatches: the prologue, one per later layer (two per MoE layer with planned
        fetches: attention + router, then experts), and the head unless the last layer's program holds it."""
        later = self.cfg.num_layers - len(self.prologue_layers)
        return 1 + later + (len(self.moe_layers) if self.dwdp.planned else 0) + (0 if self._head_fused else 1)

    def _moe_index(self, layer: int) -> int:
        return layer - self.cfg.first_k_dense_replace

    def reset_counters(self) -> None:
        self.counters = collections.Counter()

    def replace_expert_arrays(self, layer: int, replacement: dict[int, jax.Array]) -> None:
        """Makes `layer`'s local experts read from other memory holding the same values: `replacement` maps the
        device address of each expert array to replace (its `unsafe_buffer_pointer`) to its substitute. Used when
        the exported copy must live in memory peers can open (CUDA IPC): the rank then computes from the very
        memory it exports and holds each buffer once."""
        address = lambda a: a.unsafe_buffer_pointer() if isinstance(a, jax.Array) else None
        leaves = [replacement.get(address(x), x) for x in self._layer_leaves[layer]]
        swapped = sum(new is not old for new, old in zip(leaves, self._layer_leaves[layer]))
        if swapped != len(replacement):
            raise ValueError(f"layer {layer}: {len(replacement)} expert arrays to replace, {swapped} found among "
                             "the layer's parameters")
        graph, state = self.layers[layer]
        self._layer_leaves[layer] = leaves
        self.layers[layer] = (graph, jax.tree.unflatten(jax.tree.structure(state), leaves))
        w = self.expert_buffers[layer]
        self.expert_buffers[layer] = dataclasses.replace(w, **{
            f: replacement.get(address(getattr(w, f)), getattr(w, f))
            for f in ("w_gate_up", "w_down", "s_gate_up", "s_down") if getattr(w, f) is not None})

    def local_experts(self, layer: int) -> ExpertWeights:
        """This rank's expert buffer of decoder layer `layer` (what peers copy from)."""
        return self.expert_buffers[layer]

    def issue_fetch(self, layer: int) -> list:
        """Starts the copies of `layer`'s remote expert buffers (whole buffers), peers in this rank's source
        order; returns the backend's staged handles (`self.fetch.ready(handle)` gives the weights)."""
        handles = [self.fetch(self.group[p].local_experts(layer), self.device) for p in self.fetch_peers[layer]]
        n = sum(self.group[p].local_experts(layer).num_experts for p in self.fetch_peers[layer])
        self.counters["prefetched_experts"] += n
        self.counters["prefetched_bytes"] += n * self.expert_bytes
        return handles

    # -- planned fetches ---------------------------------------------------------------------------------

    def plan(self, layer: int, tokens: int, is_prefill: bool) -> FetchPlan:
        """The planner's choice of `layer`'s remote experts for a step of `tokens` tokens (no prefetch at
        depth 0: every routed remote expert is then fetched on demand)."""
        policy = self.dwdp.policy
        budget = 0 if self.dwdp.prefetch_depth == 0 else self.dwdp.staging_budget_experts
        return plan_fetch(policy, layer=self._moe_index(layer), rank=self.rank, placement=self.placement,
                          predicted_share=self.router_stats.predicted_share(self._moe_index(layer)),
                          tokens_next_step=tokens, is_prefill=is_prefill, staging_budget_experts=budget,
                          step=self.router_stats.step)

    def _peer_slot(self, layer: int, peer: int, expert: int) -> int:
        return self._slot_of[(layer, peer)][expert]

    def issue_planned(self, layer: int, plan: FetchPlan) -> dict:
        """Starts the plan's copies, one subset fetch per peer (every peer gets a staging buffer, so the layer
        program's inputs keep one shape). Returns {"plan", "handles": {peer: handle}, "pos": {expert: (peer,
        position)}, "filled": {peer: experts staged}}."""
        by_peer = {p: [] for p in self.order}
        for e, src in plan.fetches:
            by_peer[src].append(e)
        staged = dict(plan=plan, handles={}, pos={}, filled={})
        for p in sorted(self.order, key=lambda q: (not by_peer[q], self.order.index(q))):  # plan order first
            experts = sorted(by_peer[p], key=lambda e: self._peer_slot(layer, p, e))
            slots = [self._peer_slot(layer, p, e) for e in experts]
            staged["handles"][p] = self.fetch.subset(self.group[p].local_experts(layer), self.device, slots)
            staged["pos"].update({e: (p, j) for j, e in enumerate(experts)})
            staged["filled"][p] = len(experts)
        self.counters["prefetched_experts"] += len(plan.fetches)
        self.counters["prefetched_bytes"] += len(plan.fetches) * self.expert_bytes
        return staged

    def _serve_misses(self, layer: int, staged: dict, counts: np.ndarray) -> SlotMap:
        """Fetches the routed remote experts the plan missed (on demand, into the same staging) and builds
        the layer's slot map. Counts hits and misses."""
        plan = staged["plan"]
        routed = np.flatnonzero(counts)
        acc = account(plan, routed)
        self.counters["routed_remote_experts"] += len(acc.hits) + len(acc.misses)
        self.counters["miss_experts"] += len(acc.misses)
        self.counters["miss_bytes"] += len(acc.misses) * self.expert_bytes
        by_peer: dict[int, list[int]] = {}
        for e in acc.misses:
            by_peer.setdefault(plan.source_of[e], []).append(e)
        for p, experts in by_peer.items():
            experts.sort(key=lambda e: self._peer_slot(layer, p, e))
            offset = staged["filled"][p]
            staged["handles"][p] = self.fetch.subset(self.group[p].local_experts(layer), self.device,
                                                     [self._peer_slot(layer, p, e) for e in experts],
                                                     into=staged["handles"][p], offset=offset)
            staged["pos"].update({e: (p, offset + j) for j, e in enumerate(experts)})
            staged["filled"][p] = offset + len(experts)
        n = self.cfg.n_routed_experts
        buffer, slot = np.zeros(n, np.int32), np.zeros(n, np.int32)
        for e, (p, j) in staged["pos"].items():
            buffer[e], slot[e] = 1 + self.order.index(p), j
        for j, e in enumerate(self.placement.local_experts(self._moe_index(layer), self.rank)):
            buffer[e], slot[e] = 0, j
        return jax.device_put(SlotMap(buffer, slot), self.device)

    # -- the step ------------------------------------------------------------------------------------------

    def _flush_counts(self, wait: bool = False) -> None:
        """Adds earlier steps' router histograms to the statistics, oldest step first, as far as their device
        work is done: each was copied to the host asynchronously when its layer was dispatched, so a step never
        waits here for the previous one (which would undo step-ahead dispatch). wait: all of them, waiting."""
        while self._pending_counts:
            step_counts = self._pending_counts[0]
            if not wait and not all(counts.is_ready() for _, counts in step_counts):
                return
            for moe_indices, counts in step_counts:  # counts [E] of one MoE layer or [n, E] of n
                self.router_stats.update_layers(moe_indices, np.asarray(counts).reshape(len(moe_indices), -1))
            self.router_stats.next_step()
            self._pending_counts.popleft()

    def flush_router_stats(self) -> RouterStats:
        """The router statistics with every dispatched step's histograms in them (waits for the device)."""
        self._flush_counts(wait=True)
        return self.router_stats

    def _wait(self, handles) -> list[ExpertWeights]:
        t0 = time.perf_counter()
        buffers = self.fetch.ready_all(handles)
        self.counters["fetch_wait_s"] += time.perf_counter() - t0
        return buffers

    def forward(self, token_ids, positions=None, paged=None, absorbed: bool = False, stats: list | None = None,
                last_only: bool = False, last_at=None):
        """Logits [b, s, vocab] ([b, 1, vocab] with last_only; [b, vocab] of column last_at[b] of each row) for this
        rank's batch; with `paged` = (pages per layer, `PagedKV` without pages: the step's block table and
        lengths), the step's tokens are written into the pages (donated) and attend over them, and the updated
        pages are returned too: (logits, pages).

        One program for the embedding and the dense layers before the first MoE layer, then a host loop over
        the MoE layers (the last one's program also runs the LM head, except with planned fetches): issue layer
        l+depth's fetch, then dispatch layer l. JAX dispatch is
        asynchronous, so the host runs ahead of the device and the copies overlap earlier layers' compute.
        Whole-buffer fetches (no policy): after the last layer, the next step's first `depth` MoE layers are
        fetched (fetch-all needs the same experts every step), so no step starts with an unhidden fetch.
        Planned fetches: each MoE layer runs as two programs (attention + router, then experts); between
        them the host reads the routed experts, fetches the misses and builds the slot map.
        """
        cfg, dw = self.cfg, self.dwdp
        # Step inputs are made on the host (or must already be on this rank's device): an array computed on
        # another device would order this rank's step after that device's queued work.
        if positions is None:
            positions = np.broadcast_to(np.arange(token_ids.shape[1], dtype=np.int32), token_ids.shape)
        tokens, is_prefill = int(np.prod(token_ids.shape)), token_ids.shape[1] > 1
        pages_in, meta = paged if paged is not None else ([None] * cfg.num_layers, None)
        # the host-made inputs in one transfer (`host_inputs`), unpacked by the prologue program
        packed, apart, layout = host_inputs.pack((token_ids, positions, meta, last_at))
        packed, apart = jax.device_put((packed, apart), self.device)
        self._flush_counts()
        moe, depth = self.moe_layers, dw.prefetch_depth
        issue = ((lambda j: self.issue_planned(j, self.plan(j, tokens, is_prefill))) if dw.planned
                 else self.issue_fetch)
        # Whole-buffer fetches of the first `depth` MoE layers were issued at the end of the previous step.
        staged = self._carry or collections.OrderedDict((j, issue(j)) for j in moe[:depth])
        self._carry = None
        first = len(self.prologue_layers)
        x, new_pages, (positions, meta, last_at) = self._prologue[absorbed](
            self._head_leaves, self._layer_leaves[:first], packed, apart, pages_in[:first], layout=layout)
        step_counts, logits = [], None
        for i in range(first, cfg.num_layers):
            leaves, programs = self._layer_leaves[i], self._programs[i]
            if not cfg.is_moe_layer(i):
                x, layer_pages, _ = programs["layer", absorbed](leaves, [], None, x, positions, pages_in[i], meta)
                new_pages.append(layer_pages)
                continue
            ahead = moe.index(i) + depth
            if ahead < len(moe) and depth > 0:
                staged[moe[ahead]] = issue(moe[ahead])
            pending = staged.pop(i) if depth > 0 else issue(i)
            if dw.planned:
                x, layer_pages, ids, weights, counts = programs["route", absorbed](leaves, x, positions,
                                                                                   pages_in[i], meta)
                counts_host = np.asarray(counts)  # host sync: which experts the router chose
                self.router_stats.update(self._moe_index(i), counts_host)
                slots = self._serve_misses(i, pending, counts_host)
                handles = [pending["handles"][p] for p in self.order]
                buffers = self._wait(handles)
                x = programs["expert"](leaves, buffers, slots, x, ids, weights)
            else:
                handles = pending
                buffers = self._wait(handles)
                args = (leaves, buffers, self.slot_maps[i], x, positions, pages_in[i], meta)
                if i == cfg.num_layers - 1 and self._head_fused:
                    # the program also stacks the step's histograms: one copy to the host a step
                    logits, layer_pages, stacked = programs["layer_head", absorbed](
                        *args, self._head_leaves, last_at, [c for _, c in step_counts], last_only=last_only)
                    x = logits  # what the staged buffers' last reader made
                    step_counts = [([j for js, _ in step_counts for j in js] + [self._moe_index(i)], stacked)]
                    counts = stacked[-1] if stats is not None else None
                else:
                    x, layer_pages, counts = programs["layer", absorbed](*args)
                    step_counts.append(([self._moe_index(i)], counts))
            for h in handles:
                self.fetch.consumed(h, x)
            new_pages.append(layer_pages)
            if stats is not None:
                stats.append((i, counts))
            del buffers, handles, pending  # staging dies with its last reference (or returns to the ring)
        if dw.planned:
            self.router_stats.next_step()
        elif step_counts:
            for _, counts in step_counts:
                counts.copy_to_host_async()  # read by a later step's `_flush_counts`, without a wait
            self._pending_counts.append(step_counts)
        if logits is None:
            logits = self._logits(self._head_leaves, x, last_at, last_only=last_only)
        if depth > 0 and not dw.planned:  # prefetch across steps: the next step's first MoE layers
            self._carry = collections.OrderedDict((j, issue(j)) for j in moe[:depth])
        return (logits, new_pages) if paged is not None else logits

    def compiled_programs(self, batch: int, seq: int) -> list[str]:
        """Compiled HLO text of this rank's per-layer step programs (for inspection: no collectives)."""
        x = jax.device_put(jnp.zeros((batch, seq, self.cfg.hidden_size), jnp.float32), self.device)
        positions = jax.device_put(jnp.zeros((batch, seq), jnp.int32), self.device)
        texts = []
        for i in range(len(self.layers)):
            buffers = [self.fetch.ready(p) for p in self.issue_fetch(i)] if self.cfg.is_moe_layer(i) else []
            lowered = self._programs[i]["layer", False].lower(self._layer_leaves[i], buffers,
                                                              self.slot_maps.get(i), x, positions, None, None)
            texts.append(lowered.compile().as_text())
        return texts


class DwdpGroup:
    """G ranks built from one model; each rank runs from its own host thread."""

    def __init__(self, model: DeepseekV3, devices: Sequence[jax.Device], placement: Placement | None = None,
                 dwdp: DwdpConfig | None = None, fetch: FetchBackend | None = None):
        cfg = model.cfg
        dwdp = dwdp or DwdpConfig(group_size=len(devices))
        if dwdp.group_size != len(devices):
            raise ValueError(f"group_size={dwdp.group_size} but {len(devices)} devices were given")
        if len(set(devices)) != len(devices):
            raise ValueError("devices must be distinct")
        placement = placement or Placement.from_config(cfg, dwdp.group_size)
        if placement.num_ranks != dwdp.group_size or placement.num_layers != cfg.num_moe_layers:
            raise ValueError(
                f"placement is for {placement.num_ranks} ranks x {placement.num_layers} MoE layers; the group has"
                f" {dwdp.group_size} ranks and the model {cfg.num_moe_layers} MoE layers"
            )
        self.cfg, self.placement, self.dwdp = cfg, placement, dwdp
        rank_models = [rank_weights(model, placement, r, device) for r, device in enumerate(devices)]
        self._build(cfg, devices, rank_models, placement, dwdp, fetch or DevicePutFetch())

    @classmethod
    def from_rank_models(cls, models: Sequence[DeepseekV3], placement: Placement, dwdp: DwdpConfig,
                         fetch: FetchBackend | None = None) -> "DwdpGroup":
        """A group from per-rank models that already live on their devices and hold only their local experts
        (e.g. built with `init_model(..., n_local_experts=...)` under `jax.default_device`, or loaded with
        `load_model(..., expert_ids=...)`)."""
        self = cls.__new__(cls)
        self.cfg, self.placement, self.dwdp = models[0].cfg, placement, dwdp
        devices = [model_device(m) for m in models]
        self._build(self.cfg, devices, [own_rank_weights(m) for m in models], placement, dwdp,
                    fetch or DevicePutFetch())
        return self

    def _build(self, cfg, devices, rank_models, placement, dwdp, fetch):
        self.ranks = [DwdpRank(cfg, r, device, head, layers, placement, dwdp, fetch)
                      for r, (device, (head, layers)) in enumerate(zip(devices, rank_models))]
        for rank in self.ranks:
            rank.group = self.ranks

    def close(self) -> None:
        """Drops staged fetches and the ranks' references to each other (a cycle that otherwise keeps every
        rank's weights and staging alive until Python's cycle collector runs). Call before building another
        group in the same process: GPU memory comes back at once."""
        for rank in self.ranks:
            rank._carry = None
            rank.group = []
        gc.collect()

    def run_parallel(self, fn, args_per_rank: Sequence) -> list:
        """Runs fn(rank, arg) for every rank, each in its own host thread; returns results in rank order."""
        return run_in_threads([lambda r=r: fn(self.ranks[r], args_per_rank[r]) for r in range(len(self.ranks))],
                              name="dwdp-rank")


def rank_weights(model: DeepseekV3, placement: Placement, rank: int, device: jax.Device) -> tuple:
    """(head, layers) of rank `rank` on `device`, split from the whole `model`: the replicated weights and the
    routed experts `placement` gives the rank."""
    cfg = model.cfg
    layers = [_rank_layer(model.layers[i], cfg, placement, i, rank) for i in range(cfg.num_layers)]
    return jax.device_put((Head(model), layers), device)


def own_rank_weights(model: DeepseekV3) -> tuple:
    """(head, layers) of a per-rank model that already holds only its rank's experts, where it lives."""
    return Head(model), list(model.layers)


def model_device(model: DeepseekV3) -> jax.Device:
    return next(iter(model.embed_tokens[...].devices()))


def replicated_placement(cfg: ModelConfig, group_size: int) -> Placement:
    """Every rank holds every expert: replicated data parallelism (DP), the no-fetch upper bound."""
    base = Placement.from_config(cfg, group_size)
    replicas = tuple(
        tuple(tuple(r for r in range(group_size) if r != home) for home in layer) for layer in base.home_le.tolist()
    )
    return Placement(num_ranks=group_size, home_le=base.home_le, replicas=replicas)


def _rank_layer(layer: Block, cfg: ModelConfig, placement: Placement, i: int, rank: int) -> Block:
    """A copy of decoder layer i holding only `rank`'s routed experts (the rest is shared, unchanged)."""
    copy = nnx.merge(*nnx.split(layer))
    if cfg.is_moe_layer(i):
        ids = placement.local_experts(i - cfg.first_k_dense_replace, rank)
        experts = copy.mlp.experts
        for name in ("w_gate_up", "w_down", "s_gate_up", "s_down"):
            if getattr(experts, name) is not None:
                setattr(experts, name, nnx.Param(getattr(experts, name)[...][ids]))
    return copy
