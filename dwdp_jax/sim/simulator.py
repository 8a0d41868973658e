"""Discrete-event simulation of DWDP and DEP serving of DeepSeek-R1, per rank and per layer.

Read it top to bottom:
  1. configs: the workload (arrivals, lengths) and the per-rank scheduler (here), and the two strategies
     (`strategies.py`);
  2. one step, given each rank's per-layer times (`step.py`): `dwdp_rank_step` (one rank alone: prefetch
     overlapped with compute) and `dep_step` (all ranks in lockstep: every MoE layer waits for the slowest rank);
  3. `step_costs` (`step.py`): from a rank's batch to those per-layer times, through `costs.CostModel`;
  4. `simulate` (here): requests arrive, a router gives each to a rank, each rank's scheduler builds batches with
     continuous batching, and steps run (DWDP: every rank on its own clock; DEP: one clock for the group).
     Everything that happens at one instant (step ends, the closed-loop refills they cause, arrivals) is
     applied before any idle rank plans its next step, as `dwdp_jax/engine/scheduler.run_engine` submits, then
     plans. Optionally a step is padded into our engine's fixed-shape calls (`EngineShapes`).
The names of `strategies.py` and `step.py` are importable from here too.

One group is simulated (G ranks); groups of a larger system are independent, so per-GPU rates carry over.
Not modelled: KV-cache capacity (`max_batch` bounds the batch), MTP, routing skew across experts, host
overheads between steps (0.1 ms on our runs' timelines).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Literal

import numpy as np

from dwdp_jax.config import ModelConfig
from dwdp_jax.sim import costs
from dwdp_jax.sim.hardware import Hardware
from dwdp_jax.sim.step import RankBatch, RankStep, dep_step, dwdp_rank_step, fetch_time_s, step_costs
from dwdp_jax.sim.strategies import COPY_ENGINE_SLOWDOWN, DEVICE_PUT_SLOWDOWN, DEPConfig, DWDPConfig, Strategy

__all__ = [
    "COPY_ENGINE_SLOWDOWN", "DEVICE_PUT_SLOWDOWN", "DEPConfig", "DWDPConfig", "EngineShapes", "RankBatch", "RankStep",
    "RunResult", "SchedulerConfig", "Strategy", "Workload", "dep_step", "dwdp_rank_step", "fetch_time_s",
    "simulate", "step_costs",
]


# --------------------------------------------------------------------------------------------------------------
# 1. Configs (the strategies: `strategies.py`).

@dataclasses.dataclass(frozen=True)
class Workload:
    """Requests for one group. Lengths: fixed, or lognormal with mean `input_len`/`output_len` and CV `length_cv`,
    or given request by request (`lengths`, e.g. a recorded run's).

    Which rank serves a request (`routing`): the rank with the fewest requests queued ('least_loaded'), request
    i on rank i mod G ('round_robin': the launcher pins requests so), or drawn with `rank_weights`. A closed loop
    (`closed_loop`) keeps `concurrency` requests in flight over the whole group ('group': the launcher's DEP
    engine) or apportions it over the ranks, each rank refilling from its own round-robin share of the requests
    ('rank': the launcher's DWDP and DP ranks, one `run_engine` loop each). A refill arrives at the step end that
    retired the request it replaces, before any rank plans its next step (as `run_engine` submits, then plans).
    """

    num_requests: int = 128
    input_len: int = 8192
    output_len: int = 1024
    length_cv: float = 0.0  # 0: fixed lengths
    arrival: Literal["closed", "poisson"] = "closed"
    concurrency: int = 32  # closed loop: requests in flight in the group
    rate_per_s: float = 1.0  # poisson: arrivals per second to the group
    rank_weights: tuple[float, ...] | None = None  # skewed split: a request goes to rank r with this probability
    prefill_only: bool = False  # context server: a request ends with its first token
    seed: int = 0
    lengths: tuple[tuple[int, int], ...] | None = None  # (input, output) per request in submission order
    routing: Literal["least_loaded", "round_robin"] = "least_loaded"
    closed_loop: Literal["group", "rank"] = "group"

    def __post_init__(self):
        if self.num_requests < 1 or self.input_len < 1 or self.output_len < 1 or self.concurrency < 1:
            raise ValueError("num_requests, input_len, output_len and concurrency must be >= 1")
        if self.length_cv < 0 or self.rate_per_s <= 0:
            raise ValueError("length_cv must be >= 0 and rate_per_s > 0")
        if self.arrival not in ("closed", "poisson"):
            raise ValueError(f"arrival must be 'closed' or 'poisson', got {self.arrival!r}")
        if self.routing not in ("least_loaded", "round_robin") or self.closed_loop not in ("group", "rank"):
            raise ValueError(f"routing must be 'least_loaded' or 'round_robin' and closed_loop 'group' or 'rank', "
                             f"got {self.routing!r}, {self.closed_loop!r}")
        if self.closed_loop == "rank" and (self.routing != "round_robin" or self.rank_weights is not None):
            raise ValueError("closed_loop='rank' needs routing='round_robin' (each rank refills from its own share)")
        if self.lengths is not None:
            if len(self.lengths) != self.num_requests:
                raise ValueError(f"lengths has {len(self.lengths)} entries for num_requests={self.num_requests}")
            if any(a < 1 or b < 1 for a, b in self.lengths):
                raise ValueError("every (input, output) in lengths must be >= 1")


@dataclasses.dataclass(frozen=True)
class EngineShapes:
    """The fixed-shape programs of our engine (`dwdp_jax/engine/runner.py`), which a step's rows are padded to.

    A step runs as calls: decode rows in one call of [batch bucket, 1]; prefill chunks grouped by length bucket,
    one call of [batch bucket, length bucket] per group (a chunk longer than the largest bucket in pieces).
    Under DEP one SPMD program serves every rank, so a call's batch bucket fits the rank with the most rows, and
    every rank runs every call (padding rows where it has none). `row_len`: the slot-cache engine (until
    2026-12-06) read every query's whole cache row of max_seq_len + 1 positions; None: the causal extent.
    """

    batch: tuple[int, ...]
    length: tuple[int, ...]
    row_len: int | None = None

    def __post_init__(self):
        for name in ("batch", "length"):
            v = getattr(self, name)
            if not v or list(v) != sorted(v) or v[0] < 1:
                raise ValueError(f"EngineShapes.{name} must be increasing positive sizes, got {v}")
        if self.row_len is not None and self.row_len < 1:
            raise ValueError(f"EngineShapes.row_len must be >= 1, got {self.row_len}")

    @staticmethod
    def _fit(sizes: tuple[int, ...], n: int) -> int:
        for b in sizes:
            if b >= n:
                return b
        raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")

    def calls(self, plans: list[list[tuple[int, int]]]) -> list[list[RankBatch]]:
        """The padded calls of one step: plans[r] lists rank r's rows as (new tokens, cached tokens, decode?);
        returns per call one RankBatch per rank (padding rows: no cache)."""
        longest = self.length[-1]
        decode = [[(m, c) for m, c, d in p if d] for p in plans]
        prefill = [[] for _ in plans]
        for r, p in enumerate(plans):
            for m, c, d in p:
                if not d:
                    while m > longest:  # leading pieces of a chunk longer than the largest bucket
                        prefill[r].append((longest, c))
                        m, c = m - longest, c + longest
                    prefill[r].append((m, c))
        groups = [(1, decode)] if any(decode) else []
        for length in sorted({self._fit(self.length, m) for p in prefill for m, _ in p}):
            groups.append((length, [[(m, c) for m, c in p if self._fit(self.length, m) == length] for p in prefill]))
        out = []
        for length, rows in groups:
            nb = self._fit(self.batch, max(len(x) for x in rows))
            call = []
            for x in rows:
                ctx = np.array([c for _, c in x] + [0] * (nb - len(x)), np.int64)
                row_len = None if self.row_len is None else np.full(nb, self.row_len, np.int64)
                call.append(RankBatch(np.full(nb, length, np.int64), ctx, nb, row_len))
            out.append(call)
        return out


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Per-rank continuous batching: decode tokens first, then prefill (FCFS) up to the token budget.
    `shapes`: our engine's padding of a step into fixed-shape calls (None: exactly the planned tokens)."""

    token_budget: int = 8192  # new tokens per rank per step
    max_batch: int = 128  # requests per rank per step
    chunked_prefill: bool = True  # False: a prompt is prefilled whole (alone if it exceeds the budget)
    shapes: EngineShapes | None = None


# --------------------------------------------------------------------------------------------------------------
# 4. Serving (steps 2 and 3: `step.py`).

@dataclasses.dataclass
class _Request:
    rid: int
    arrival_s: float
    input_len: int
    output_len: int
    rank: int = -1
    prefilled: int = 0
    generated: int = 0
    first_token_s: float = math.nan
    finish_s: float = math.nan


def _schedule(queue: list[_Request], sched: SchedulerConfig) -> list[tuple[_Request, int]]:
    """A rank's batch: (request, new tokens). Decoding requests first, then prefill in arrival order
    (the policy of `dwdp_jax/engine/scheduler.py`, without its cache slots)."""
    batch, budget = [], sched.token_budget
    for req in queue:
        if len(batch) == sched.max_batch or budget == 0:
            break
        if req.prefilled == req.input_len:
            batch.append((req, 1))
            budget -= 1
    for req in queue:
        if len(batch) == sched.max_batch or budget == 0:
            break
        todo = req.input_len - req.prefilled
        if todo == 0:
            continue
        if sched.chunked_prefill:
            n = min(todo, budget)
        elif todo <= budget or not batch:
            n = todo
        else:
            break
        batch.append((req, n))
        budget -= min(n, budget)
    return batch


@dataclasses.dataclass
class RunResult:
    """Outcome of one `simulate` run (one group; rates are per GPU)."""

    strategy: str
    num_gpus: int
    ttft_s: np.ndarray  # [requests]
    arrival_s: np.ndarray  # [requests], when each request reached its rank's queue
    ranks: np.ndarray  # [requests], the rank that served each request
    tpot_s: np.ndarray  # [requests] (nan when output_len == 1)
    output_tps_per_gpu: float
    input_tps_per_gpu: float
    step_times_s: list[np.ndarray]  # per rank
    breakdown_s: dict[str, np.ndarray]  # per rank totals: compute, interference, exposed_fetch, comm, wait
    fits_memory: bool
    makespan_s: float
    output_tokens: int = 0

    @property
    def wall_output_tps_per_gpu(self) -> float:
        """Output tokens / time to the last one / GPUs: the launcher's `output_tps_per_gpu` (ramps included)."""
        return self.output_tokens / self.makespan_s / self.num_gpus

    @property
    def ttft_median_s(self) -> float:
        return float(np.nanmedian(self.ttft_s))

    @property
    def tpot_median_s(self) -> float:
        return float(np.nanmedian(self.tpot_s)) if np.isfinite(self.tpot_s).any() else math.nan

    @property
    def tps_per_user(self) -> float:
        return 1.0 / self.tpot_median_s

    def breakdown_frac(self) -> dict[str, float]:
        """Share of the ranks' busy time spent in each part."""
        total = sum(v.sum() for v in self.breakdown_s.values())
        return {k: float(v.sum() / total) for k, v in self.breakdown_s.items()}


def _lengths(rng: np.random.Generator, mean: int, cv: float, n: int) -> np.ndarray:
    if cv == 0:
        return np.full(n, mean, dtype=np.int64)
    sigma2 = math.log1p(cv * cv)
    x = rng.lognormal(math.log(mean) - sigma2 / 2, math.sqrt(sigma2), n)
    return np.maximum(1, np.rint(x)).astype(np.int64)


def _window_rate(times: np.ndarray, counts: np.ndarray, lo: float = 0.1, hi: float = 0.9) -> float:
    """Tokens per second between the moments `lo` and `hi` of all tokens were done (drops ramp-up and drain)."""
    if counts.sum() == 0:
        return 0.0
    order = np.argsort(times, kind="stable")
    t, c = times[order], np.cumsum(counts[order])
    i0, i1 = np.searchsorted(c, lo * c[-1]), np.searchsorted(c, hi * c[-1])
    if t[i1] <= t[i0]:
        return float(c[-1] / t[-1])
    return float((c[i1] - c[i0]) / (t[i1] - t[i0]))


def simulate(cfg: ModelConfig, hw: Hardware, strategy: Strategy, workload: Workload,
             sched: SchedulerConfig = SchedulerConfig(), eff: costs.Efficiency = costs.Efficiency(),
             expert_format: str = "fp8", dense_matmul_dtype: str | None = None) -> RunResult:
    """Serves `workload` on one group of `strategy.group_size` GPUs of `hw` and measures it."""
    g = strategy.group_size
    if g > hw.gpus_per_domain:
        raise ValueError(f"group_size={g} exceeds the NVLink domain of {hw.name} ({hw.gpus_per_domain} GPUs)")
    if workload.rank_weights is not None and len(workload.rank_weights) != g:
        raise ValueError(f"rank_weights needs {g} entries, got {len(workload.rank_weights)}")
    cm = costs.CostModel(cfg, hw, eff, expert_format=expert_format, dense_matmul_dtype=dense_matmul_dtype)
    rng = np.random.default_rng(workload.seed)
    n = workload.num_requests
    if workload.lengths is not None:
        in_len, out_len = (np.array(x, np.int64) for x in zip(*workload.lengths))
    else:
        out_len = (np.ones(n, np.int64) if workload.prefill_only
                   else _lengths(rng, workload.output_len, workload.length_cv, n))
        in_len = _lengths(rng, workload.input_len, workload.length_cv, n)
    if workload.prefill_only:
        out_len = np.ones(n, np.int64)
    reqs = [_Request(i, math.nan, int(a), int(b)) for i, (a, b) in enumerate(zip(in_len, out_len))]
    staging = (strategy.prefetch_depth + 1) if isinstance(strategy, DWDPConfig) else 0
    per_peer = strategy.prefetch_per_peer if isinstance(strategy, DWDPConfig) else None
    fits = costs.weight_memory_gb(cfg, g, staging, expert_format, prefetch_per_peer=per_peer) < hw.hbm_gb

    # Events: (time, seq, kind, payload). An executor is one rank (DWDP) or the whole group (DEP).
    executors = [[r] for r in range(g)] if isinstance(strategy, DWDPConfig) else [list(range(g))]
    executor_of = {r: i for i, ranks in enumerate(executors) for r in ranks}
    busy = [False] * len(executors)
    queues: list[list[_Request]] = [[] for _ in range(g)]
    events, seq = [], 0

    def push(t, kind, payload):
        nonlocal seq
        heapq.heappush(events, (t, seq, kind, payload))
        seq += 1

    # Closed loop: one pool of pending requests per loop (the group, or each rank), refilled in order.
    if workload.closed_loop == "rank":
        pools = [list(range(r, n, g)) for r in range(g)]
        limits = [workload.concurrency // g + (r < workload.concurrency % g) for r in range(g)]
    else:
        pools, limits = [list(range(n))], [workload.concurrency]
    pool_of = {i: k for k, pool in enumerate(pools) for i in pool}
    pools = [pool[::-1] for pool in pools]  # popped from the end
    if workload.arrival == "closed":
        for pool, limit in zip(pools, limits):
            for _ in range(min(limit, len(pool))):
                push(0.0, "arrive", pool.pop())
    else:
        for i, t in enumerate(np.cumsum(rng.exponential(1.0 / workload.rate_per_s, n))):
            push(float(t), "arrive", i)

    step_log: list[list[float]] = [[] for _ in range(g)]
    parts = ("compute", "interference", "exposed_fetch", "comm", "wait")
    breakdown = {p: np.zeros(g) for p in parts}
    out_events, in_events = [], []  # (time, tokens)

    def start(ex: int, t: float):
        ranks = executors[ex]
        plans = [_schedule(queues[r], sched) for r in ranks]
        if not any(plans):
            return
        if sched.shapes is None:
            calls = [[RankBatch(np.array([m for _, m in p], np.int64),
                                np.array([q.prefilled + max(q.generated - 1, 0) for q, _ in p], np.int64),
                                sum(1 for q, m in p if q.prefilled + m >= q.input_len)) for p in plans]]
        else:
            calls = sched.shapes.calls([[(m, q.prefilled + max(q.generated - 1, 0), q.prefilled == q.input_len)
                                         for q, m in p] for p in plans])
        duration = 0.0
        for batches in calls:
            steps = step_costs(cm, hw, strategy, batches)
            duration += max(s.time_s for s in steps)
            for r, s in zip(ranks, steps):
                for p in parts:
                    breakdown[p][r] += getattr(s, f"{p}_s")
        for r in ranks:
            step_log[r].append(duration)
        busy[ex] = True
        push(t + duration, "step_end", (ex, plans))

    def arrive(req: _Request, t: float):
        req.arrival_s = t
        if workload.rank_weights is not None:
            w = np.asarray(workload.rank_weights, dtype=np.float64)
            req.rank = int(rng.choice(g, p=w / w.sum()))
        elif workload.routing == "round_robin":
            req.rank = req.rid % g
        else:
            req.rank = int(np.argmin([len(q) for q in queues]))
        queues[req.rank].append(req)

    def complete(plans, t: float) -> int:
        finished = 0
        for plan in plans:
            prefill_tokens = 0
            for req, m in plan:
                if req.prefilled < req.input_len:
                    req.prefilled += m
                    prefill_tokens += m
                    if req.prefilled == req.input_len:
                        req.first_token_s, req.generated = t, 1
                        out_events.append((t, 1))
                else:
                    req.generated += 1
                    out_events.append((t, 1))
                if req.generated == req.output_len:
                    req.finish_s = t
                    queues[req.rank].remove(req)
                    finished += 1
                    pool = pools[pool_of[req.rid]]
                    if workload.arrival == "closed" and pool:
                        push(t, "arrive", pool.pop())
            in_events.append((t, prefill_tokens))
        return finished

    done = 0
    while events:
        # Everything that happens at time t (step ends, the refills they cause, arrivals) before any idle
        # executor plans its next step at t.
        t = events[0][0]
        while events and events[0][0] == t:
            _, _, kind, payload = heapq.heappop(events)
            if kind == "arrive":
                arrive(reqs[payload], t)
            else:
                ex, plans = payload
                busy[ex] = False
                done += complete(plans, t)
        for ex in range(len(executors)):
            if not busy[ex]:
                start(ex, t)
    if done != n:
        raise RuntimeError(f"simulation ended with {n - done} of {n} requests unfinished")

    ttft = np.array([r.first_token_s - r.arrival_s for r in reqs])
    tpot = np.array([(r.finish_s - r.first_token_s) / (r.output_len - 1) if r.output_len > 1 else math.nan
                     for r in reqs])
    out_t, out_c = (np.array(x, dtype=np.float64) for x in zip(*out_events))
    in_t, in_c = (np.array(x, dtype=np.float64) for x in zip(*in_events))
    return RunResult(
        strategy=strategy.name,
        num_gpus=g,
        ttft_s=ttft,
        arrival_s=np.array([r.arrival_s for r in reqs]),
        ranks=np.array([r.rank for r in reqs]),
        tpot_s=tpot,
        output_tps_per_gpu=_window_rate(out_t, out_c) / g,
        input_tps_per_gpu=_window_rate(in_t, in_c) / g,
        step_times_s=[np.array(s) for s in step_log],
        breakdown_s=breakdown,
        fits_memory=bool(fits),
        makespan_s=float(max(r.finish_s for r in reqs)),
        output_tokens=int(sum(r.output_len for r in reqs)),
    )
