"""The serving threads of one `DisaggEngine.serve` call (`disagg.py`), and what they share.

One thread per context engine and per generation engine (`ServePass`), under one condition variable: the FCFS
queue and its dispatch to context engines, the generation slot credits taken by hand-offs, each generation
engine's inbox of handed-off requests, and the records of finished requests. The life of a request through
these threads is told in `disagg.py`.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from dwdp_jax.engine import timeline
from dwdp_jax.engine.disagg_metrics import DisaggRun, RequestRecord
from dwdp_jax.engine.kv_transfer import Transfer, TransferWatcher
from dwdp_jax.engine.lockstep import LockstepScheduler
from dwdp_jax.engine.runner import DepRunner
from dwdp_jax.engine.scheduler import FinishedRequest, Scheduler, SchedulerConfig, collect_ahead
from dwdp_jax.engine.workload import Request, RequestError
from dwdp_jax.parallel.threads import run_in_threads

if TYPE_CHECKING:
    from dwdp_jax.engine.disagg import DisaggEngine

@dataclasses.dataclass(eq=False)
class _Handoff:
    """A request between its context engine's first token and its retirement on a generation engine."""

    request: Request
    first_token: int
    context_engine: int
    context_group: int
    context_device: int
    context_slot: int
    context_admitted_s: float
    context_first_token_s: float
    transfer: Transfer | None = None
    generation_engine: int = -1
    generation_group: int = -1
    generation_device: int = -1
    generation_admitted_s: float = math.nan


def _record(h: _Handoff, f: FinishedRequest) -> RequestRecord:
    t = h.transfer
    nan = math.nan
    return RequestRecord(
        request_id=h.request.request_id, prompt_len=h.request.prompt_len, max_new_tokens=h.request.max_new_tokens,
        output_tokens=f.output_tokens, finish_reason=f.finish_reason, arrival_s=float(h.request.arrival_s),
        context_engine=h.context_engine, context_device=h.context_device, context_admitted_s=h.context_admitted_s,
        context_first_token_s=h.context_first_token_s,
        handoff_start_s=t.start_s if t else nan, handoff_source_done_s=t.source_done_s if t else nan,
        handoff_end_s=t.end_s if t else nan, kv_len=t.length if t else 0, kv_bytes=t.nbytes if t else 0,
        generation_engine=h.generation_engine, generation_device=h.generation_device,
        generation_admitted_s=h.generation_admitted_s, first_token_s=f.first_token_s, last_token_s=f.last_token_s,
        token_times_s=f.token_times_s,
    )


def _schedulers(runner, config: SchedulerConfig, hold: bool):
    """One `Scheduler` per slot group of `runner`, and the scheduler its `step_fn` takes (a DEP runner takes
    lockstep plans, even over one device)."""
    scheds = [Scheduler(config, rank=g, hold_retired_slots=hold, page_table=runner.page_tables[g])
              for g in range(runner.num_groups)]
    return scheds, (LockstepScheduler(scheds) if isinstance(runner, DepRunner) else scheds[0])


class _Failed(Exception):
    """Another serving thread failed; this one stops."""


class ServePass:
    """The state of one `serve` call, shared by the serving threads under one condition variable."""

    # Longest a serving thread sleeps without a notification (a safety net; wake-ups are notified).
    MAX_WAIT_S = 0.5

    def __init__(self, engine: DisaggEngine, requests: Sequence[Request], concurrency: int | None, clock,
                 on_finish=None):
        self.engine, self.concurrency, self.clock, self.on_finish = engine, concurrency, clock, on_finish
        self.cond = threading.Condition(threading.RLock())  # reentrant: `_notify` may run with it held
        self.version = 0  # bumped by every notification: a waiter sleeps only if nothing changed since it looked
        self.failed: BaseException | None = None
        self.rejected: list[tuple[str, str]] = []
        accepted, ids = [], set()
        for req in requests:
            try:
                if req.request_id in ids:
                    raise RequestError(f"request {req.request_id!r}: duplicate request_id")
                engine.check_request(req)
            except RequestError as e:
                self.rejected.append((req.request_id, str(e)))
                continue
            ids.add(req.request_id)
            accepted.append(dataclasses.replace(req, rank=None))
        order = sorted(range(len(accepted)), key=lambda i: (accepted[i].arrival_s, i))
        self.queue = collections.deque(accepted[i] for i in order)
        self.num_accepted = len(accepted)
        self._by_id: dict[str, Request] = {}  # requests taken by a context engine (arrival_s as taken)
        self.in_flight = 0
        # Dispatch to context engines: requests assigned and not yet submitted, requests holding a slot (or
        # about to), prompt tokens assigned and not yet prefilled, and the slots of each engine.
        self.ctx_inbox: list[list[Request]] = [[] for _ in engine.context]
        self.ctx_held = [0] * len(engine.context)
        self.ctx_tokens = [0] * len(engine.context)
        self.ctx_capacity = [engine.config.context.max_batch_size * r.num_groups for r in engine.context]
        self.contexts_left = len(engine.context)
        gen_slots = engine.config.generation.max_batch_size
        self.credits = [[gen_slots] * r.num_groups for r in engine.generation]
        self.inbox: list[list[_Handoff]] = [[] for _ in engine.generation]
        self.records: list[RequestRecord] = []
        self.events: list[timeline.StepEvent] = []
        self.watcher = TransferWatcher(engine.transport, clock, self._notify, verify=engine.verify_handoff)

    # -- shared state ------------------------------------------------------------------------------------------

    def _notify(self) -> None:
        """Wakes every waiting serving thread (callable with `cond` held: it is reentrant)."""
        with self.cond:
            self.version += 1
            self.cond.notify_all()

    def _wait(self, seen: int, timeout_s: float | None = None) -> None:
        """Sleeps until a notification after version `seen` (or timeout_s, capped at MAX_WAIT_S)."""
        timeout_s = self.MAX_WAIT_S if timeout_s is None else max(0.0, min(timeout_s, self.MAX_WAIT_S))
        with self.cond:
            self.cond.wait_for(lambda: self.version != seen or self.failed is not None, timeout_s)
        if self.failed is not None:
            raise _Failed()

    def _finish(self, record: RequestRecord) -> None:
        with self.cond:
            self.records.append(record)
            self.in_flight -= 1
            self._notify()
        if self.on_finish is not None:
            self.on_finish(record)

    def _guarded(self, fn):
        def run():
            try:
                fn()
            except _Failed:
                pass
            except BaseException as e:
                with self.cond:
                    self.failed = self.failed or e
                    self._notify()
                raise
        return run

    # -- context engines ---------------------------------------------------------------------------------------

    def _dispatch(self, now: float) -> None:
        """Assigns arrived requests (FCFS) to context engines with a free slot, each to the one with the fewest
        prompt tokens still to prefill (then the fewest requests, then the lowest index). Any context thread
        dispatches for all of them."""
        with self.cond:
            changed = False
            while self.queue and self.queue[0].arrival_s <= now and (
                    self.concurrency is None or self.in_flight < self.concurrency):
                free = [i for i, held in enumerate(self.ctx_held) if held < self.ctx_capacity[i]]
                if not free:
                    break
                i = min(free, key=lambda i: (self.ctx_tokens[i], self.ctx_held[i], i))
                req = self.queue.popleft()
                if self.concurrency is not None:  # closed loop: it arrives when taken, stamped under the lock
                    req = dataclasses.replace(req, arrival_s=self.clock())  # (after the finish that freed it)
                self.in_flight += 1
                self._by_id[req.request_id] = req
                self.ctx_inbox[i].append(req)
                self.ctx_held[i] += 1
                self.ctx_tokens[i] += req.prompt_len
                changed = True
            if changed:
                self._notify()

    def _submit_assigned(self, i: int, scheds, sched) -> None:
        """Submits the requests assigned to context engine i, each to its slot group with the most room."""
        with self.cond:
            reqs, self.ctx_inbox[i] = self.ctx_inbox[i], []
        room = [s.num_free_slots - s.num_waiting for s in scheds]
        for req in reqs:
            g = int(np.argmax(room))
            sched.submit(dataclasses.replace(req, max_new_tokens=1, rank=g))
            room[g] -= 1

    def _release_context(self, i: int, scheds, group: int, slot: int) -> None:
        scheds[group].release_slot(slot)
        with self.cond:
            self.ctx_held[i] -= 1
            self._notify()

    def _reserve_generation(self) -> tuple[int, int] | None:
        """Takes a credit of the generation slot group with the most room (lowest index on ties)."""
        with self.cond:
            best = max(((c, -j, -g) for j, groups in enumerate(self.credits) for g, c in enumerate(groups)),
                       default=None)
            if best is None or best[0] <= 0:
                return None
            j, g = -best[1], -best[2]
            self.credits[j][g] -= 1
            return j, g

    def _hand_off(self, h: _Handoff, runner, target: tuple[int, int]) -> None:
        engine = self.engine
        j, g = target
        device = engine.generation[j].group_devices[g]
        length = engine.transfer_len(h.request.prompt_len)
        start = self.clock()
        handle = engine.transport.send(runner.read_slot(h.context_group, h.context_slot, length), device)
        h.transfer = Transfer(h.request.request_id, length, length * runner.spec.bytes_per_token, start)
        h.generation_engine, h.generation_group, h.generation_device = j, g, int(device.id)
        self.watcher.start(h.transfer, handle)
        with self.cond:
            self.inbox[j].append(h)
            self._notify()

    def _context(self, i: int) -> None:
        runner = self.engine.context[i]
        devices = runner.group_devices
        scheds, sched = _schedulers(runner, self.engine.config.context, hold=True)
        step = timeline.timed_step_fn(runner.step_fn, "context", i, devices, self.clock, self.events,
                                      timeline.fetch_wait_counter(runner))
        awaiting: collections.deque[_Handoff] = collections.deque()  # first token sampled, no generation slot yet
        holding: list[_Handoff] = []  # sent, source slot not yet released
        while True:
            with self.cond:
                seen, failed = self.version, self.failed
            if failed is not None:
                return
            self._dispatch(self.clock())
            self._submit_assigned(i, scheds, sched)
            for h in [h for h in holding if h.transfer.source_done or h.transfer.error]:
                TransferWatcher.check(h.transfer)
                self._release_context(i, scheds, h.context_group, h.context_slot)
                holding.remove(h)
            while awaiting:
                target = self._reserve_generation()
                if target is None:
                    break
                h = awaiting.popleft()
                self._hand_off(h, runner, target)
                holding.append(h)
            with self.cond:
                queue_empty = not self.queue and not self.ctx_inbox[i]
                next_arrival = self.queue[0].arrival_s if self.queue else None
            if sched.idle and not awaiting and not holding and queue_empty:
                with self.cond:
                    self.contexts_left -= 1
                    self._notify()
                return
            plan = sched.schedule(self.clock())
            if plan.is_empty:
                self._wait(seen, None if next_arrival is None else next_arrival - self.clock())
                continue
            tokens = step(plan)
            for f in sched.complete_step(plan, tokens, self.clock()):
                req = self._by_id[f.request_id]
                with self.cond:
                    self.ctx_tokens[i] -= req.prompt_len
                h = _Handoff(req, f.output_tokens[0], i, f.rank, int(devices[f.rank].id), f.slot, f.admitted_s,
                             f.first_token_s)
                if req.max_new_tokens == 1 or f.finish_reason == "eos":
                    self._release_context(i, scheds, f.rank, f.slot)
                    self._finish(_record(h, f))
                else:
                    awaiting.append(h)

    # -- generation engines ------------------------------------------------------------------------------------

    def _generation(self, j: int) -> None:
        runner = self.engine.generation[j]
        scheds, sched = _schedulers(runner, self.engine.config.generation, hold=False)
        step = timeline.timed_step_fn(runner.step_fn, "generation", j, runner.group_devices, self.clock,
                                      self.events, timeline.fetch_wait_counter(runner))
        ahead = None
        if self.engine.config.step_ahead and hasattr(sched, "schedule_ahead"):
            ahead = timeline.TimedStepAhead(runner, "generation", j, runner.group_devices, self.clock, self.events,
                                            timeline.fetch_wait_counter(runner))
        active: dict[str, _Handoff] = {}
        inflight = None  # step ahead: (plan, handle) of the step on the device
        while True:
            with self.cond:
                seen, failed = self.version, self.failed
                arrived = [h for h in self.inbox[j] if h.transfer.arrived or h.transfer.error]
                for h in arrived:
                    self.inbox[j].remove(h)
                no_more = self.contexts_left == 0 and not self.inbox[j]
            if failed is not None:
                return
            for h in arrived:
                TransferWatcher.check(h.transfer)
                s = scheds[h.generation_group]
                slot = s.reserve_slot(h.request.prompt_len + h.request.max_new_tokens)
                if slot is None:  # the credit taken for this hand-off guarantees a slot (and its pages)
                    raise RuntimeError(f"generation engine {j} group {h.generation_group}: no free slot (or "
                                       f"too few pages) for {h.request.request_id!r} despite its credit")
                runner.write_slot(h.generation_group, slot, h.transfer.rows)
                h.transfer.rows = None
                now = self.clock()
                h.generation_admitted_s = now
                active[h.request.request_id] = h
                done = s.admit_prefilled(h.request, slot, h.first_token, now, now)
                if done is not None:
                    self._retire_generation(j, active.pop(done.request_id), done)
            if sched.num_running == 0 and inflight is None:
                if no_more and not arrived:
                    return
                self._wait(seen)
                continue
            if ahead is None:
                plan = sched.schedule(self.clock())
                tokens = step(plan)
            else:  # dispatch the next step (its tokens fed on the device) before reading this one's
                if inflight is None:
                    plan = sched.schedule(self.clock())
                    inflight = (plan, ahead.dispatch(plan, None))
                plan, handle = inflight
                tokens, inflight = collect_ahead(sched, ahead, handle, self.clock())
            for f in sched.complete_step(plan, tokens, self.clock()):
                self._retire_generation(j, active.pop(f.request_id), f)

    def _retire_generation(self, j: int, h: _Handoff, f: FinishedRequest) -> None:
        with self.cond:
            self.credits[j][h.generation_group] += 1
        self._finish(_record(h, f))

    # -- driver ------------------------------------------------------------------------------------------------

    def run(self) -> DisaggRun:
        engine = self.engine
        start = self.clock()
        fns = [self._guarded(lambda i=i: self._context(i)) for i in range(len(engine.context))]
        fns += [self._guarded(lambda j=j: self._generation(j)) for j in range(len(engine.generation))]
        try:
            run_in_threads(fns, name="disagg")
        finally:
            self.watcher.close()
        end = self.clock()
        if len(self.records) != self.num_accepted:
            raise RuntimeError(f"{len(self.records)} of {self.num_accepted} accepted requests finished")
        records = sorted(self.records, key=lambda r: r.request_id)
        return DisaggRun(start, end, tuple(records), tuple(sorted(self.events, key=lambda e: (e.start_s, e.device))),
                         tuple(self.rejected), engine.num_context_gpus, engine.num_generation_gpus)
