"""Per-device step records of a serving run, for timelines and per-role step statistics.

One `StepEvent` per executed step and device: which role and engine ran it, on which device, when (seconds on
the run's clock), how many prefill and decode tokens that device processed, and (DWDP ranks) how long its host
waited for expert fetches in the step. An SPMD step (DEP) gives one event per device of its mesh, with the
same times. `columns` turns events into the column lists a results
JSON stores (`pandas.DataFrame(columns(events))` is the timeline table).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from dwdp_jax.engine.metrics import StepRecord


class StepEvent(NamedTuple):
    """One step on one device: [start_s, end_s), its prefill and decode tokens."""

    role: str  # "context", "generation", or the strategy of a colocated run
    engine: int  # engine index within the role (a DWDP/DP rank, a DEP group, a single device)
    group: int  # slot group within the engine (the device's index in a DEP group; 0 otherwise)
    device: int  # jax device id
    start_s: float
    end_s: float
    prefill_tokens: int
    decode_tokens: int
    fetch_wait_s: float = math.nan  # host time blocked on expert fetches (DWDP ranks; NaN where none is kept)


def plan_events(plan, role: str, engine: int, devices: Sequence, start_s: float, end_s: float,
                fetch_wait_s: float = math.nan) -> list[StepEvent]:
    """Events of one executed plan: a `StepPlan` (one device) or a `LockstepPlan` (one plan per device)."""
    plans = getattr(plan, "plans", (plan,))
    if len(plans) != len(devices):
        raise ValueError(f"plan has {len(plans)} device plans for {len(devices)} devices")
    return [StepEvent(role, engine, g, int(d.id), float(start_s), float(end_s), p.num_prefill_tokens,
                      len(p.decode), float(fetch_wait_s)) for g, (p, d) in enumerate(zip(plans, devices))]


def fetch_wait_counter(runner) -> Callable[[], float] | None:
    """The cumulative fetch wait of a DWDP rank runner (`DwdpRank.counters["fetch_wait_s"]`), None for others."""
    counters = getattr(getattr(runner, "rank", None), "counters", None)
    return None if counters is None else (lambda: float(runner.rank.counters.get("fetch_wait_s", 0.0)))


def timed_step_fn(step_fn: Callable, role: str, engine: int, devices: Sequence, clock: Callable[[], float],
                  sink: list, fetch_wait: Callable[[], float] | None = None) -> Callable:
    """`step_fn` that also appends its steps' events to `sink` (times from `clock`; fetch_wait: a cumulative
    counter whose growth over the step is the event's fetch_wait_s, e.g. `fetch_wait_counter(runner)`)."""

    def run(plan):
        w0 = fetch_wait() if fetch_wait else math.nan
        t0 = clock()
        tokens = step_fn(plan)
        t1 = clock()
        wait = fetch_wait() - w0 if fetch_wait else math.nan
        sink.extend(plan_events(plan, role, engine, devices, t0, t1, wait))
        return tokens

    return run


class TimedStepAhead:
    """A runner's step-ahead contract (`run_engine(step_ahead=...)`) that also appends its steps' events to
    `sink`, as `timed_step_fn` does: a step starts when it is dispatched or when the step before it ended,
    whichever is later (the device runs them in order), and ends when its tokens reach the host."""

    def __init__(self, runner, role: str, engine: int, devices: Sequence, clock: Callable[[], float], sink: list,
                 fetch_wait: Callable[[], float] | None = None, on_tokens: Callable[[dict], None] | None = None):
        self.runner, self.role, self.engine, self.devices = runner, role, engine, devices
        self.clock, self.sink, self.fetch_wait, self.on_tokens = clock, sink, fetch_wait, on_tokens
        self._last_end = -math.inf

    def dispatch(self, plan, prev):
        # a DWDP rank's fetch waits happen on the host while it dispatches its layers: the step's own
        w0 = self.fetch_wait() if self.fetch_wait else math.nan
        t0 = self.clock()
        handle = self.runner.dispatch(plan, None if prev is None else prev[1])
        wait = self.fetch_wait() - w0 if self.fetch_wait else math.nan
        return plan, handle, t0, wait

    def collect(self, pending):
        plan, handle, t0, wait = pending
        tokens = self.runner.collect(handle)
        t1 = self.clock()
        self.sink.extend(plan_events(plan, self.role, self.engine, self.devices, max(t0, self._last_end), t1, wait))
        self._last_end = t1
        if self.on_tokens is not None:
            self.on_tokens(tokens)
        return tokens


COLUMNS = StepEvent._fields


def columns(events: Iterable[StepEvent]) -> dict[str, list]:
    """{field: [value per event]}, events sorted by (start_s, device); NaN becomes None (strict JSON)."""
    rows = sorted(events, key=lambda e: (e.start_s, e.device))
    clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v
    return {name: [clean(getattr(e, name)) for e in rows] for name in COLUMNS}


def step_records(events: Iterable[StepEvent]) -> list[StepRecord]:
    """`StepRecord`s for `metrics.step_time_stats`, ranked by device id (one record per device and step)."""
    return [StepRecord(e.device, e.start_s, e.end_s, e.prefill_tokens + e.decode_tokens) for e in events]
