"""Prefetch policies: which remote experts a rank pulls for its next MoE layer, from whom, and in what order.

A rank does not know layer l+1's routing when its fetch starts, so it plans from a predicted routed share
p [E] (`RouterStats.predicted_share`). With T tokens in the next step and k experts per token, expert e is
picked by one token with probability about q_e = min(1, k * p_e) and is needed in the step with probability

    h_e = 1 - (1 - q_e) ** T,

and sum_e h_e is the expected number of distinct experts the step hits. (The per-token form is used rather than
T*k independent draws, 1 - (1 - p_e) ** (T * k): the two agree for small p_e, and the per-token form does not
under-count hot experts, which a token picks at most once.) Policies:

* `fetch_all`: every remote expert (the paper's default).
* `top_k`: the max(k, ceil(expected distinct remote experts needed)) remote experts of largest h_e (k is a floor:
  fetching fewer than the step is expected to need guarantees misses); in a long prefill every h_e -> 1 and this
  becomes fetch_all.
* `coverage`: remote experts in decreasing h_e until the fetched ones carry a fraction >= p of the expected
  number of needed remote experts, i.e. the expected miss rate is <= 1 - p. For T = 1 this is the share of
  routed tokens covered; as T grows it tends to a fraction p of all remote experts with nonzero share.

The staging budget always caps the count (lowest h_e dropped first). A routed expert that was not fetched is a
miss: `account` returns the misses and `FetchPlan.source_of` says where the executor fetches each on demand.

Ordering (no communication between ranks at run time): sources are visited rotated by rank, rank r first reading
from r+1, then r+2, ... (mod G), so with an even split no two ranks read one source in the same slot; among
replicas the source is chosen deterministically to spread load. `source_schedule` measures the collisions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Literal, NamedTuple, Sequence

import numpy as np

from dwdp_jax.planner.placement import Placement

PolicyKind = Literal["fetch_all", "top_k", "coverage"]
SourceOrder = Literal["rotated", "interleaved", "naive"]
SourceChoice = Literal["least_loaded", "hash"]


@dataclasses.dataclass(frozen=True)
class FetchPolicy:
    """How to choose and order a layer's prefetch.

    kind: `fetch_all`, `top_k` or `coverage`.
    k: top_k's minimum number of remote experts.
    coverage: coverage's target fraction p in (0, 1] of expected needed remote experts to prefetch.
    experts_per_token: routed experts per token (`ModelConfig.num_experts_per_tok`).
    smoothing: weight of a uniform share mixed into the prediction, so rarely seen experts keep a chance.
    prefill_fetch_all: in prefill steps behave as fetch_all whatever `kind` says.
    source_order: `rotated` (one block per source, rank r starts at r+1), `interleaved` (one expert at a time,
      slot t aiming at offset 1 + t mod (G-1) or the next source with experts left: a sliced round-robin pull),
      `naive` (sources 0, 1, ... for every rank; the baseline that makes a hot source).
    source_choice: among several holders, `least_loaded` (fewest experts already taken from it by this plan,
      ties by hash) or `hash` (a fixed hash of (rank, layer, expert)).
    """

    kind: PolicyKind = "fetch_all"
    k: int = 0
    coverage: float = 0.95
    experts_per_token: int = 8
    smoothing: float = 0.01
    prefill_fetch_all: bool = False
    source_order: SourceOrder = "rotated"
    source_choice: SourceChoice = "least_loaded"

    def __post_init__(self):
        if self.kind not in ("fetch_all", "top_k", "coverage"):
            raise ValueError(f"kind must be fetch_all, top_k or coverage, got {self.kind!r}")
        if self.k < 0:
            raise ValueError(f"k must be >= 0, got {self.k}")
        if not 0.0 < self.coverage <= 1.0:
            raise ValueError(f"coverage must be in (0, 1], got {self.coverage}")
        if self.experts_per_token < 1:
            raise ValueError(f"experts_per_token must be >= 1, got {self.experts_per_token}")
        if not 0.0 <= self.smoothing <= 1.0:
            raise ValueError(f"smoothing must be in [0, 1], got {self.smoothing}")
        if self.source_order not in ("rotated", "interleaved", "naive"):
            raise ValueError(f"source_order must be rotated, interleaved or naive, got {self.source_order!r}")
        if self.source_choice not in ("least_loaded", "hash"):
            raise ValueError(f"source_choice must be least_loaded or hash, got {self.source_choice!r}")


@dataclasses.dataclass(frozen=True)
class FetchPlan:
    """One rank's prefetch for one layer.

    fetches: (expert, source rank) in issue order.
    source_of: [num_experts] source rank for every remote expert (fetched or not: misses are pulled from it on
      demand), -1 for experts this rank holds.
    dropped_by_budget: experts the policy chose but the staging budget cut, highest need first.
    expected_needed: expected number of distinct remote experts the step routes to (sum of h_e).
    """

    layer: int
    rank: int
    step: int
    fetches: tuple[tuple[int, int], ...]
    source_of: tuple[int, ...]
    dropped_by_budget: tuple[int, ...] = ()
    expected_needed: float = 0.0

    @property
    def experts(self) -> tuple[int, ...]:
        return tuple(e for e, _ in self.fetches)

    @property
    def sources(self) -> tuple[int, ...]:
        return tuple(s for _, s in self.fetches)

    @property
    def remote(self) -> frozenset[int]:
        return frozenset(e for e, s in enumerate(self.source_of) if s >= 0)

    def fetched_bytes(self, bytes_per_expert: int = 1) -> int:
        return len(self.fetches) * bytes_per_expert


class Accounting(NamedTuple):
    """Outcome of a plan against the experts the step actually routed to.

    hits: needed remote experts that were prefetched; misses: needed remote experts that were not (the executor
    must fetch them on demand from `plan.source_of`); fetched_bytes: bytes prefetched (used or not).
    """

    hits: tuple[int, ...]
    misses: tuple[int, ...]
    fetched_bytes: int

    @property
    def miss_rate(self) -> float:
        """Misses / needed remote experts (0 when nothing remote was needed)."""
        needed = len(self.hits) + len(self.misses)
        return len(self.misses) / needed if needed else 0.0


def hit_probability(share_e: np.ndarray, tokens: int, experts_per_token: int) -> np.ndarray:
    """[E] probability each expert is routed to at least once by `tokens` tokens (see the module docstring)."""
    share_e = np.asarray(share_e, dtype=np.float64)
    q = np.clip(experts_per_token * share_e, 0.0, 1.0)
    return 1.0 - (1.0 - q) ** max(int(tokens), 0)


def _mix(x: int) -> int:
    """splitmix64 finalizer: a fixed, platform-independent integer hash."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _hash(rank: int, layer: int, expert: int) -> int:
    return _mix(_mix(_mix(rank) ^ layer) ^ expert)


def _choose_sources(
    experts: Sequence[int], holders: dict[int, tuple[int, ...]], rank: int, layer: int, choice: SourceChoice
) -> dict[int, int]:
    taken: dict[int, int] = {}
    source: dict[int, int] = {}
    for e in experts:
        cands = holders[e]
        if len(cands) == 1:
            s = cands[0]
        elif choice == "hash":
            s = cands[_hash(rank, layer, e) % len(cands)]
        else:
            h = _hash(rank, layer, e)
            s = min(cands, key=lambda c: (taken.get(c, 0), _mix(h ^ c)))
        source[e] = s
        taken[s] = taken.get(s, 0) + 1
    return source


def _order(selected: Sequence[int], source: dict[int, int], rank: int, num_ranks: int, order: SourceOrder):
    """Issue order of (expert, source); `selected` is in priority order and stays so within a source."""
    by_source: dict[int, list[int]] = {}
    for e in selected:
        by_source.setdefault(source[e], []).append(e)
    if order == "naive":
        keys = sorted(by_source)
    else:
        keys = sorted(by_source, key=lambda s: (s - rank) % num_ranks)
    if order == "interleaved":
        # Slot t aims at the source at offset 1 + t mod (G-1) from this rank, or the next one that still has
        # experts: the aim is the same for every rank, so ranks with similar plans stay on distinct sources.
        out = []
        offsets = {(s - rank) % num_ranks: list(by_source[s]) for s in keys}
        while len(out) < len(selected):
            aim = 1 + len(out) % max(num_ranks - 1, 1)
            off = min((o for o in offsets if offsets[o]), key=lambda o: (o - aim) % num_ranks)
            out.append((offsets[off].pop(0), (rank + off) % num_ranks))
        return tuple(out)
    return tuple((e, s) for s in keys for e in by_source[s])


def plan_fetch(
    policy: FetchPolicy,
    *,
    layer: int,
    rank: int,
    placement: Placement,
    predicted_share: np.ndarray,
    tokens_next_step: int,
    is_prefill: bool,
    staging_budget_experts: int | None,
    step: int = 0,
) -> FetchPlan:
    """Plans `rank`'s prefetch of `layer` (placement layer index) for the next step.

    predicted_share: [num_experts] >= 0, this rank's predicted routed share (normalized here).
    tokens_next_step: tokens this rank runs through the layer in the next step (>= 0).
    staging_budget_experts: most experts the staging buffers take for one layer (None: unlimited).
    step: recorded in the plan; the plan does not otherwise depend on it (same inputs, same plan).
    """
    num_experts = placement.num_experts
    share = np.asarray(predicted_share, dtype=np.float64)
    if share.shape != (num_experts,):
        raise ValueError(f"predicted_share must have shape ({num_experts},), got {share.shape}")
    if not np.all(np.isfinite(share)) or (share < 0).any():
        raise ValueError("predicted_share must be finite and >= 0")
    if tokens_next_step < 0:
        raise ValueError(f"tokens_next_step must be >= 0, got {tokens_next_step}")
    if staging_budget_experts is not None and staging_budget_experts < 0:
        raise ValueError(f"staging_budget_experts must be >= 0 or None, got {staging_budget_experts}")
    total = share.sum()
    share = share / total if total > 0 else np.full(num_experts, 1.0 / num_experts)
    share = (1.0 - policy.smoothing) * share + policy.smoothing / num_experts

    remote = placement.remote_experts(layer, rank)
    holders = {int(e): tuple(r for r in placement.holders(layer, int(e)) if r != rank) for e in remote}
    h = hit_probability(share, tokens_next_step, policy.experts_per_token)
    h_remote = h[remote]
    priority = remote[np.lexsort((remote, -share[remote], -h_remote))]  # most needed first, ties by id
    expected = float(h_remote.sum())

    kind = "fetch_all" if (is_prefill and policy.prefill_fetch_all) else policy.kind
    if kind == "fetch_all":
        n = len(priority)
    elif kind == "top_k":
        n = min(len(priority), max(policy.k, math.ceil(expected - 1e-9)))
    else:
        cum = np.cumsum(h[priority])
        target = policy.coverage * expected * (1 - 1e-12)
        n = min(int(np.searchsorted(cum, target, side="left")) + 1, len(priority)) if expected > 0 else 0
    chosen = [int(e) for e in priority[:n]]
    cap = len(chosen) if staging_budget_experts is None else min(len(chosen), staging_budget_experts)
    chosen, dropped = chosen[:cap], tuple(chosen[cap:])

    # Sources of every remote expert (misses too), chosen in priority order so fetched ones spread first.
    source = _choose_sources([int(e) for e in priority], holders, rank, layer, policy.source_choice)
    source_of = [-1] * num_experts
    for e, s in source.items():
        source_of[e] = s
    return FetchPlan(
        layer=layer,
        rank=rank,
        step=step,
        fetches=_order(chosen, source, rank, placement.num_ranks, policy.source_order),
        source_of=tuple(source_of),
        dropped_by_budget=dropped,
        expected_needed=expected,
    )


def account(
    plan: FetchPlan, routed_experts_needed: Iterable[int] | np.ndarray, bytes_per_expert: int = 1
) -> Accounting:
    """Scores `plan` against the experts the step routed to (ids, any shape, e.g. `expert_ids` [T, k]).

    Local experts are neither hits nor misses. fetched_bytes = prefetched experts * bytes_per_expert.
    """
    needed = {int(e) for e in np.asarray(routed_experts_needed).reshape(-1)}
    bad = [e for e in needed if not 0 <= e < len(plan.source_of)]
    if bad:
        raise ValueError(f"routed expert ids {sorted(bad)[:5]} not in [0, {len(plan.source_of)})")
    remote_needed = {e for e in needed if plan.source_of[e] >= 0}
    fetched = set(plan.experts)
    return Accounting(
        hits=tuple(sorted(remote_needed & fetched)),
        misses=tuple(sorted(remote_needed - fetched)),
        fetched_bytes=plan.fetched_bytes(bytes_per_expert),
    )


@dataclasses.dataclass(frozen=True)
class SourceSchedule:
    """Contention of a set of plans issued at once (one per rank, same layer).

    max_readers_per_slot: [num_slots] largest number of ranks reading one source in each slot.
    peak: max over slots (1 means no source is ever read by two ranks at once).
    served_per_source: [num_ranks] experts each rank serves in total.
    """

    max_readers_per_slot: np.ndarray
    peak: int
    served_per_source: np.ndarray


def source_schedule(
    plans_of_all_ranks: Sequence[FetchPlan], granularity: Literal["expert", "source"] = "expert"
) -> SourceSchedule:
    """Counts readers per source per slot, assuming every rank issues its plan at once.

    granularity `expert`: slot i is each rank's i-th fetch (equal transfer time per expert); `source`: slot j
    is each rank's j-th run of consecutive fetches from one source.
    """
    if granularity not in ("expert", "source"):
        raise ValueError(f"granularity must be expert or source, got {granularity!r}")
    seqs = []
    for p in plans_of_all_ranks:
        srcs = list(p.sources)
        if granularity == "source":
            srcs = [s for i, s in enumerate(srcs) if i == 0 or srcs[i - 1] != s]
        seqs.append(srcs)
    num_ranks = max([p.rank + 1 for p in plans_of_all_ranks] + [s + 1 for q in seqs for s in q] + [1])
    num_slots = max((len(q) for q in seqs), default=0)
    readers = np.zeros((num_slots, num_ranks), np.int64)
    for q in seqs:
        for slot, s in enumerate(q):
            readers[slot, s] += 1
    served = np.zeros(num_ranks, np.int64)
    for p in plans_of_all_ranks:
        for s in p.sources:
            served[s] += 1
    per_slot = readers.max(1) if num_slots else np.zeros(0, np.int64)
    return SourceSchedule(per_slot, int(per_slot.max()) if num_slots else 0, served)
