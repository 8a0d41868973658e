"""Serving passes: requests split over the engines (one closed loop per DWDP/DP rank, DEP's pinned to devices),
each engine driven from its own host thread, step events recorded; the disaggregated pass; warm-up."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from tqdm import tqdm

from dwdp_jax.engine import disagg as disagg_lib
from dwdp_jax.engine import timeline
from dwdp_jax.engine import workload as workload_lib
from dwdp_jax.engine.scheduler import run_engine, wall_clock
from dwdp_jax.parallel.threads import run_in_threads
from experiments.launch.engines import Engines
from experiments.launch.validation import Setup


def split_requests(requests, num_engines: int, concurrency: int, strategy: str):
    """Requests and closed-loop concurrency per engine (None: every request queued at the start)."""
    if strategy == "dep":  # one lockstep engine; pin requests round-robin to devices, as DWDP's ranks get them
        return [list(requests)], [concurrency or None]
    per_rank = workload_lib.split_by_rank(requests, num_engines)
    if concurrency == 0:
        return per_rank, [None] * num_engines
    return per_rank, [int(c) for c in workload_lib.apportion(concurrency, np.ones(num_engines))]


def pin_requests(requests, num_devices):
    """Each request pinned to its round-robin device, in the original order (a closed loop admits requests in
    this order: grouping them by device would give the first `concurrency` requests all to device 0)."""
    rank_of = {r.request_id: rank for rank, reqs in enumerate(workload_lib.split_by_rank(requests, num_devices))
               for r in reqs}
    return [dataclasses.replace(r, rank=rank_of[r.request_id]) for r in requests]


@dataclasses.dataclass(frozen=True)
class Pass:
    """One serving pass of this process's engines: finished requests, step events, and its span on the pass's
    clock (seconds since it started)."""

    finished: list
    events: list
    start_s: float
    end_s: float

    @property
    def wall_s(self) -> float:
        return self.end_s - self.start_s


def serve(engines: Engines, requests, concurrency: int, strategy: str, num_devices: int, desc: str,
          progress: bool, before_clock=None, step_ahead: bool = True) -> Pass:
    """One colocated pass over `requests`: this process serves its engines' share (all of it, unless a
    multi-process run's `engines` are a slice). `before_clock()` runs right before the pass's clock starts (a
    multi-process run's barrier, so that every process's clock starts together). step_ahead: single and DWDP
    runners dispatch each decode step before the previous step's tokens are read (`run_engine`)."""
    if strategy == "dep":
        requests = pin_requests(requests, num_devices)
    schedulers = engines.make_schedulers()
    per_engine, conc = split_requests(requests, engines.total, concurrency, strategy)
    mine = range(engines.first_index, engines.first_index + len(engines.runners))
    per_engine, conc = [per_engine[i] for i in mine], [conc[i] for i in mine]
    bar = tqdm(total=sum(r.max_new_tokens for reqs in per_engine for r in reqs), desc=desc, unit="tok",
               disable=not progress, leave=False)
    if before_clock is not None:
        before_clock()
    clock = wall_clock()
    events: list[timeline.StepEvent] = []

    def engine(i):
        runner = engines.runners[i]
        if step_ahead and hasattr(runner, "dispatch") and strategy != "dep":
            ahead = timeline.TimedStepAhead(runner, strategy, mine[i], runner.group_devices, clock, events,
                                            timeline.fetch_wait_counter(runner), lambda t: bar.update(len(t)))
            return run_engine(schedulers[i], None, clock, requests=per_engine[i], concurrency=conc[i],
                              step_ahead=ahead)
        step_fn = timeline.timed_step_fn(runner.step_fn, strategy, mine[i], runner.group_devices, clock, events,
                                         timeline.fetch_wait_counter(runner))

        def counted(plan):
            tokens = step_fn(plan)
            bar.update(len(tokens))
            return tokens

        return run_engine(schedulers[i], counted, clock, requests=per_engine[i], concurrency=conc[i])

    runs = run_in_threads([lambda i=i: engine(i) for i in range(len(schedulers))])
    bar.close()
    rejected = [r for run in runs for r in run.rejected]
    if rejected:
        raise RuntimeError(f"{len(rejected)} requests were rejected, e.g. {rejected[0]}")
    return Pass([f for s in schedulers for f in s.finished], events, min(run.start_s for run in runs),
                max(run.end_s for run in runs))


def serve_disagg(engine: disagg_lib.DisaggEngine, requests, concurrency: int, desc: str,
                 progress: bool) -> disagg_lib.DisaggRun:
    """One disaggregated pass (the progress bar counts the output tokens of finished requests)."""
    bar = tqdm(total=sum(r.max_new_tokens for r in requests), desc=desc, unit="tok", disable=not progress,
               leave=False)
    run = engine.serve(requests, concurrency=concurrency or None, on_finish=lambda r: bar.update(r.num_output_tokens))
    bar.close()
    if run.rejected:
        raise RuntimeError(f"{len(run.rejected)} requests were rejected, e.g. {run.rejected[0]}")
    return run


def warmup(f, engines: Engines, setup: Setup, concurrency: int) -> float:
    t0 = time.perf_counter()
    if f.warmup == "run":
        serve(engines, setup.requests, concurrency, setup.strategy, setup.num_devices, "warm-up", f.progress,
              step_ahead=f.step_ahead)
    elif f.warmup == "buckets":
        run_in_threads([lambda r=r: r.warmup() for r in engines.runners])
    return time.perf_counter() - t0


def check_finished(finished, requests) -> None:
    short = [x.request_id for x in finished if x.finish_reason == "length" and x.num_output_tokens != x.max_new_tokens]
    if len(finished) != len(requests) or short:
        raise RuntimeError(f"{len(finished)}/{len(requests)} requests finished; short: {short[:4]}")
