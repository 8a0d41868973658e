"""Lockstep scheduling for DEP: G per-device schedulers whose plans one SPMD program executes together."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from dwdp_jax.engine.scheduler import FinishedRequest, Scheduler, StepPlan
from dwdp_jax.engine.workload import Request, RequestError


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
