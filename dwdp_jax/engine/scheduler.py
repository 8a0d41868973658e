"""Per-rank continuous-batching scheduler with chunked prefill, and a loop that drives it.

One `Scheduler` per data-parallel rank; ranks never coordinate (DWDP's point: a slow rank does not hold up
the others). The scheduler owns a queue and `max_batch_size` cache slots of `max_seq_len` tokens each. Every
step it plans, within `token_budget` tokens:
  1. one decode token for every running request whose prompt is fully cached (decode first, so running
     requests are never starved by new prompts);
  2. the next chunk of a request whose prompt is partly cached;
  3. FCFS admission of arrived requests into free slots, each with a first prompt chunk,
     until the budget or the slots run out.
The engine executes the `StepPlan` (see `run_engine` for the contract of a step function) and reports the
sampled tokens with `complete_step`, which retires finished requests and frees their slots.

Disaggregated serving (`dwdp_jax.engine.disagg`) uses three hooks: a context server's scheduler holds a retired
request's slot until its cache has been copied out (`hold_retired_slots`, `release_slot`); a generation server's
scheduler reserves a slot for an incoming cache (`reserve_slot`) and admits the request with its prompt already
cached and its first token known (`admit_prefilled`).
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Literal, Protocol

import numpy as np

from dwdp_jax.engine.metrics import StepRecord
from dwdp_jax.engine.workload import Request, RequestError, validate_request


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """max_batch_size: cache slots (requests in flight); max_seq_len: tokens per slot (prompt + output);
    token_budget: tokens per step (prefill chunk tokens + 1 per decode), >= max_batch_size so that every
    running request decodes every step; eos_id: a sampled id that ends a request early (kept in its output);
    vocab_size: when set, prompts with ids outside [0, vocab_size) are rejected."""

    max_batch_size: int
    max_seq_len: int
    token_budget: int
    eos_id: int | None = None
    vocab_size: int | None = None

    def __post_init__(self):
        if self.max_batch_size < 1 or self.max_seq_len < 2:
            raise ValueError(
                f"SchedulerConfig needs max_batch_size >= 1 and max_seq_len >= 2, got "
                f"{self.max_batch_size}, {self.max_seq_len}"
            )
        if self.token_budget < self.max_batch_size:
            raise ValueError(
                f"SchedulerConfig.token_budget ({self.token_budget}) must be >= max_batch_size "
                f"({self.max_batch_size}) so that all running requests decode each step"
            )


def _tokens(req: Request) -> int:
    """The most tokens a request can hold in the cache: its prompt and every output."""
    return req.prompt_len + req.max_new_tokens


@dataclasses.dataclass(frozen=True, eq=False)
class PrefillChunk:
    """Prompt tokens [start, start + len(tokens)) of a request, written to its slot's cache.

    start == 0 means the slot begins a new sequence: whatever it held before is stale.
    is_last: the chunk completes the prompt, so the step must return the request's first output token.
    """

    request_id: str
    slot: int
    start: int
    tokens: np.ndarray  # int32 [chunk_len]
    is_last: bool


PENDING = -1  # DecodeItem.token of a step planned ahead: the token the step before it samples for the request


@dataclasses.dataclass(frozen=True)
class DecodeItem:
    """Feed `token` (the request's latest output; `PENDING` in a step planned ahead: the token the step in
    flight samples) at `position` (== tokens already cached in `slot`)."""

    request_id: str
    slot: int
    token: int
    position: int


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What one step of one rank computes. Every request appears at most once and owns a distinct slot."""

    step: int
    rank: int
    prefill: tuple[PrefillChunk, ...]
    decode: tuple[DecodeItem, ...]

    @property
    def num_prefill_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.prefill)

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + len(self.decode)

    @property
    def is_empty(self) -> bool:
        return not self.prefill and not self.decode

    def decode_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(slots, tokens, positions), each int32 [num_decode], in plan order."""
        d = self.decode
        return (
            np.array([x.slot for x in d], dtype=np.int32),
            np.array([x.token for x in d], dtype=np.int32),
            np.array([x.position for x in d], dtype=np.int32),
        )


@dataclasses.dataclass(frozen=True)
class FinishedRequest:
    """A retired request. Times are seconds on the run's clock; token_times_s[i] is when output i arrived."""

    request_id: str
    rank: int
    prompt_len: int
    max_new_tokens: int
    output_tokens: tuple[int, ...]
    arrival_s: float
    admitted_s: float  # the step that first scheduled it (slot allocated)
    first_token_s: float
    last_token_s: float
    token_times_s: tuple[float, ...]
    finish_reason: Literal["length", "eos"]
    slot: int = -1  # the cache slot it held (held on after retirement with `hold_retired_slots`)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_tokens)


@dataclasses.dataclass(eq=False)
class _Sequence:
    """Mutable state of a request that holds a slot."""

    request: Request
    slot: int
    admitted_s: float
    num_prefilled: int = 0
    output: list[int] = dataclasses.field(default_factory=list)
    token_times_s: list[float] = dataclasses.field(default_factory=list)

    @property
    def prefill_done(self) -> bool:
        return self.num_prefilled == self.request.prompt_len


class Scheduler:
    """Continuous batching for one rank; one plan in flight at a time (`schedule`, then `complete_step`), or
    two when the second is planned ahead (`schedule_ahead`: decode steps, while the first one runs).

    hold_retired_slots: a retired request's slot stays allocated until `release_slot` (its cache rows are
    still being read, e.g. copied to another server).
    page_table: the rank's paged-cache `PageTable` (`runner.page_tables[rank]`): a request is admitted only when
    the pool can promise pages for its prompt + max_new_tokens (FCFS: a request that does not fit waits, and
    so do the ones behind it); its pages return to the pool when its slot is freed. A request larger than the
    whole pool is refused at submit."""

    def __init__(self, config: SchedulerConfig, rank: int = 0, *, hold_retired_slots: bool = False,
                 page_table=None):
        self.config = config
        self.rank = rank
        self.hold_retired_slots = hold_retired_slots
        self.page_table = page_table
        self._held: set[int] = set()  # retired requests' slots not yet released
        self._reserved: set[int] = set()  # slots taken by `reserve_slot`, not yet admitted
        self.finished: list[FinishedRequest] = []
        self._waiting: list[tuple[float, int, Request]] = []  # heap on (arrival_s, submit order)
        self._running: list[_Sequence] = []  # admission order
        self._free_slots = list(range(config.max_batch_size))  # heap: lowest slot first
        self._seen_ids: set[str] = set()
        self._submitted = 0
        self._step = 0
        self._inflight: StepPlan | None = None
        self._ahead: StepPlan | None = None  # planned by `schedule_ahead` while `_inflight` runs
        self._discard: set[str] = set()  # requests of `_ahead` that retired in `_inflight`: tokens dropped

    @property
    def idle(self) -> bool:
        """Nothing waiting, running or in flight."""
        return not self._waiting and not self._running and self._inflight is None

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def num_held_slots(self) -> int:
        """Slots of retired requests not yet released (`hold_retired_slots`)."""
        return len(self._held)

    def next_arrival_s(self) -> float | None:
        """Arrival time of the next request to admit, None when the queue is empty."""
        return self._waiting[0][0] if self._waiting else None

    def submit(self, req: Request) -> None:
        """Queues `req`, or raises `RequestError` (leaving the scheduler unchanged) if it cannot be served."""
        validate_request(req, self.config.max_seq_len, self.config.vocab_size)
        self._check_pages(req)
        if req.rank is not None and req.rank != self.rank:
            raise RequestError(f"request {req.request_id!r} is for rank {req.rank}, submitted to rank {self.rank}")
        if req.request_id in self._seen_ids:
            raise RequestError(f"request {req.request_id!r}: duplicate request_id")
        self._seen_ids.add(req.request_id)
        heapq.heappush(self._waiting, (float(req.arrival_s), self._submitted, req))
        self._submitted += 1

    def schedule(self, now_s: float) -> StepPlan:
        """The next step's plan at time `now_s`. A non-empty plan must be passed to `complete_step` next."""
        if self._inflight is not None:
            raise RuntimeError(f"step {self._inflight.step} is still in flight: call complete_step first")
        budget = self.config.token_budget
        decode = [
            # the cache holds the prompt and every output but the latest, which this step feeds in
            DecodeItem(seq.request.request_id, seq.slot, seq.output[-1], seq.request.prompt_len + len(seq.output) - 1)
            for seq in self._running
            if seq.prefill_done
        ]
        budget -= len(decode)
        prefill = []
        for seq in self._running:
            if not seq.prefill_done and budget > 0:
                prefill.append(self._chunk(seq, budget))
                budget -= len(prefill[-1].tokens)
        while budget > 0 and self._free_slots and self._waiting and self._waiting[0][0] <= now_s:
            head = self._waiting[0][2]
            if self.page_table is not None and not self.page_table.reserve(self._free_slots[0], _tokens(head)):
                break  # not enough free pages yet: the head of the queue waits for retirements
            _, _, req = heapq.heappop(self._waiting)
            seq = _Sequence(req, heapq.heappop(self._free_slots), admitted_s=now_s)
            self._running.append(seq)
            prefill.append(self._chunk(seq, budget))
            budget -= len(prefill[-1].tokens)
        plan = StepPlan(self._step, self.rank, tuple(prefill), tuple(decode))
        if not plan.is_empty:
            self._inflight = plan
        return plan

    def schedule_ahead(self, now_s: float) -> StepPlan | None:
        """The step after the one in flight, planned before its tokens are known (so that the host's work for
        it overlaps the device's), or None when that step must wait for them: when a prompt is still being
        chunked, an arrived request can be admitted (a free slot, and pages for it), or no request would decode.

        The plan decodes every running request that may still be running after the step in flight: its token
        there is `PENDING` (the runner feeds it from the step in flight's samples on the device). A request
        sure to stop there (its max_new_tokens reached) is left out; one that stops there on EOS is computed
        once more and that token dropped. Pass it to `complete_step` after the step in flight."""
        plan = self._inflight
        if plan is None:
            raise RuntimeError("schedule_ahead plans the step after the one in flight: none is in flight")
        if self._ahead is not None:
            raise RuntimeError(f"step {self._ahead.step} is already planned ahead")
        if any(not c.is_last for c in plan.prefill):
            return None
        if self._free_slots and self._waiting and self._waiting[0][0] <= now_s and (
                self.page_table is None
                or self.page_table.can_reserve(self._free_slots[0], _tokens(self._waiting[0][2]))):
            return None  # the next `schedule` admits it (one that waits for pages does not stop running ahead)
        pending = {d.request_id for d in plan.decode} | {c.request_id for c in plan.prefill}
        decode = []
        for seq in self._running:
            rid, n = seq.request.request_id, len(seq.output)
            if rid in pending:
                if n + 1 < seq.request.max_new_tokens:  # the token in flight does not end it by length
                    decode.append(DecodeItem(rid, seq.slot, PENDING, seq.request.prompt_len + n))
            elif seq.prefill_done:  # e.g. admitted with its first token (`admit_prefilled`) after the plan
                decode.append(DecodeItem(rid, seq.slot, seq.output[-1], seq.request.prompt_len + n - 1))
            else:
                return None  # a prompt not yet started in any step
        if not decode or len(decode) > self.config.token_budget:
            return None
        self._ahead = StepPlan(plan.step + 1, self.rank, (), tuple(decode))
        return self._ahead

    # -- hooks for disaggregated serving ----------------------------------------------------------------------

    def release_slot(self, slot: int) -> None:
        """Frees the slot of a retired request (held because of `hold_retired_slots`)."""
        if slot not in self._held:
            raise ValueError(f"rank {self.rank}: slot {slot} is not held by a retired request")
        self._held.remove(slot)
        self._free(slot)

    def reserve_slot(self, tokens: int | None = None) -> int | None:
        """Takes the lowest free slot for a request whose cache will be written there from elsewhere (then
        `admit_prefilled`); None when no slot is free or, with a page table, when the pool cannot promise
        pages for `tokens` (its prompt + max_new_tokens; required then)."""
        if not self._free_slots:
            return None
        if self.page_table is not None:
            if tokens is None:
                raise ValueError("reserve_slot needs the request's tokens when the scheduler has a page table")
            if not self.page_table.reserve(self._free_slots[0], tokens):
                return None
        slot = heapq.heappop(self._free_slots)
        self._reserved.add(slot)
        return slot

    def _free(self, slot: int) -> None:
        if self.page_table is not None:
            self.page_table.release(slot)
        heapq.heappush(self._free_slots, slot)

    def _check_pages(self, req: Request) -> None:
        table = self.page_table
        if table is not None and -(-_tokens(req) // table.spec.page_size) > table.spec.num_pages:
            raise RequestError(f"request {req.request_id!r}: {_tokens(req)} tokens need more pages than the "
                               f"cache's pool of {table.spec.num_pages}")

    def admit_prefilled(self, req: Request, slot: int, first_token: int, first_token_s: float,
                        admitted_s: float) -> FinishedRequest | None:
        """Admits `req` into the reserved `slot`, whose cache already holds the whole prompt; `first_token`
        (sampled by the prefill elsewhere, delivered at `first_token_s`) is its first output, so the next
        `schedule` decodes it. Returns the retired record when that token already ends the request (EOS or
        max_new_tokens == 1; the slot is then freed), else None. Raises `RequestError` for a request this
        scheduler cannot serve, and frees the slot."""
        if slot not in self._reserved:
            raise ValueError(f"rank {self.rank}: slot {slot} was not reserved with reserve_slot")
        self._reserved.remove(slot)
        try:
            validate_request(req, self.config.max_seq_len, self.config.vocab_size)
            if req.request_id in self._seen_ids:
                raise RequestError(f"request {req.request_id!r}: duplicate request_id")
        except RequestError:
            self._free(slot)
            raise
        self._seen_ids.add(req.request_id)
        seq = _Sequence(req, slot, admitted_s=float(admitted_s), num_prefilled=req.prompt_len,
                        output=[int(first_token)], token_times_s=[float(first_token_s)])
        self._running.append(seq)
        if first_token == self.config.eos_id or req.max_new_tokens == 1:
            return self._retire(seq, "eos" if first_token == self.config.eos_id else "length")
        return None

    @staticmethod
    def _chunk(seq: _Sequence, budget: int) -> PrefillChunk:
        req, start = seq.request, seq.num_prefilled
        end = min(req.prompt_len, start + budget)
        return PrefillChunk(req.request_id, seq.slot, start, req.prompt[start:end], end == req.prompt_len)

    def complete_step(
        self, plan: StepPlan, new_tokens: Mapping[str, int | None], now_s: float
    ) -> list[FinishedRequest]:
        """Applies an executed plan: `new_tokens` maps each decoded request and each request whose last prompt
        chunk ran to its sampled token; tokens for partial chunks are ignored. Returns the requests retired
        by this step (also appended to `finished`); their slots are free for the next `schedule`."""
        if plan.is_empty:
            return []
        if plan is not self._inflight:
            raise ValueError(f"plan of step {plan.step} is not the plan in flight")
        in_plan = {c.request_id for c in plan.prefill} | {d.request_id for d in plan.decode}
        unknown = set(new_tokens) - in_plan
        if unknown:
            raise ValueError(f"step {plan.step}: tokens for requests not in the plan: {sorted(unknown)}")
        # requests that retired in the step before (planned ahead of them): their tokens here are dropped
        dropped, self._discard = self._discard, set()
        expect = [c.request_id for c in plan.prefill if c.is_last] + [d.request_id for d in plan.decode
                                                                       if d.request_id not in dropped]
        missing = [rid for rid in expect if new_tokens.get(rid) is None]
        if missing:
            raise ValueError(f"step {plan.step}: no token for {missing}")

        by_id = {seq.request.request_id: seq for seq in self._running}
        for chunk in plan.prefill:
            by_id[chunk.request_id].num_prefilled += len(chunk.tokens)
        retired = []
        for rid in expect:
            seq = by_id[rid]
            token = int(new_tokens[rid])
            seq.output.append(token)
            seq.token_times_s.append(float(now_s))
            if token == self.config.eos_id or len(seq.output) >= seq.request.max_new_tokens:
                retired.append(self._retire(seq, "eos" if token == self.config.eos_id else "length"))
        self._inflight, self._ahead = self._ahead, None
        if self._inflight is not None:
            ahead_ids = {d.request_id for d in self._inflight.decode}
            self._discard = {r.request_id for r in retired} & ahead_ids
        self._step += 1
        return retired

    def _retire(self, seq: _Sequence, reason: Literal["length", "eos"]) -> FinishedRequest:
        self._running.remove(seq)
        if self.hold_retired_slots:
            self._held.add(seq.slot)
        else:
            self._free(seq.slot)
        req = seq.request
        record = FinishedRequest(
            request_id=req.request_id,
            rank=self.rank,
            prompt_len=req.prompt_len,
            max_new_tokens=req.max_new_tokens,
            output_tokens=tuple(seq.output),
            arrival_s=float(req.arrival_s),
            admitted_s=seq.admitted_s,
            first_token_s=seq.token_times_s[0],
            last_token_s=seq.token_times_s[-1],
            token_times_s=tuple(seq.token_times_s),
            finish_reason=reason,
            slot=seq.slot,
        )
        self.finished.append(record)
        return record


# ---------------------------------------------------------------------------------------------------------------
# Driving loop


class FakeClock:
    """A clock for tests and dry runs: time moves only by `advance` (or `sleep`, the same)."""

    def __init__(self, start_s: float = 0.0):
        self.now_s = float(start_s)

    def __call__(self) -> float:
        return self.now_s

    def advance(self, dt_s: float) -> None:
        if dt_s < 0:
            raise ValueError(f"FakeClock cannot go back ({dt_s} s)")
        self.now_s += dt_s

    sleep = advance


def wall_clock() -> Callable[[], float]:
    """Seconds since this call (time.perf_counter), the clock request arrival times are measured on."""
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0


@dataclasses.dataclass(frozen=True)
class EngineRun:
    """What `run_engine` observed: its time span, every executed step, and rejected (request_id, reason)."""

    start_s: float
    end_s: float
    steps: tuple[StepRecord, ...]
    rejected: tuple[tuple[str, str], ...]

    @property
    def wall_s(self) -> float:
        return self.end_s - self.start_s


StepFn = Callable[[StepPlan], Mapping[str, int | None]]


class StepAhead(Protocol):
    """A runner that starts a step without waiting for it (`run_engine`'s step-ahead mode; `_SlotRunner`)."""

    def dispatch(self, plan: StepPlan, prev: object | None) -> object:
        """Starts `plan`; its `PENDING` decode tokens come from `prev` (the step dispatched just before)."""

    def collect(self, pending: object) -> Mapping[str, int | None]:
        """The step's tokens on the host, as `step_fn` returns them (waits for the step)."""


def collect_ahead(scheduler, stepper: StepAhead, handle, now_s: float, plan_next: bool = True):
    """One turn of the step-ahead loop for the step running as `handle`: plans and dispatches the step after
    it (`Scheduler.schedule_ahead`, when `plan_next` and the scheduler can), then reads the running step's
    tokens. Returns (tokens, (next plan, its handle) or None)."""
    nxt = scheduler.schedule_ahead(now_s) if plan_next and hasattr(scheduler, "schedule_ahead") else None
    nxt_handle = None if nxt is None else stepper.dispatch(nxt, handle)
    return stepper.collect(handle), (None if nxt is None else (nxt, nxt_handle))


def run_engine(
    scheduler: Scheduler,
    step_fn: StepFn | None,
    clock: Callable[[], float],
    *,
    requests: Iterable[Request] = (),
    concurrency: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
    max_steps: int | None = None,
    step_ahead: StepAhead | None = None,
) -> EngineRun:
    """Runs `scheduler` until every request is served (or `max_steps` steps ran).

    step_fn(plan) executes a non-empty plan and returns {request_id: token} for every decode item and every
    last prefill chunk (see `Scheduler.complete_step`). It must return only when the step's results are on the
    host, so that clock() after it is the step's end.
    clock(): seconds on the clock the requests' `arrival_s` use (`wall_clock()`, or a `FakeClock`).
    requests: submitted at the start (open loop: each is admitted once clock() >= its arrival_s); or, when
      `concurrency` is set, a closed loop: a request is submitted, with arrival_s set to now, whenever fewer
      than `concurrency` requests are waiting or running. Requests that `submit` rejects are recorded in
      `rejected` and skipped.
    sleep(dt_s): waits when nothing can run before the next arrival (`FakeClock.sleep` in tests).
    step_ahead: instead of step_fn, a runner that dispatches without waiting: while a step runs, the next one
      is planned (`Scheduler.schedule_ahead`) and dispatched, its tokens fed on the device from the running
      step's, before the running step's tokens are read, so the device never waits for the host between
      decode steps. Same tokens as step_fn (a request that ends on EOS costs one dropped step of compute).
      A step's record then starts when the step before it ended.
    """
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if (step_fn is None) == (step_ahead is None):
        raise ValueError("run_engine takes exactly one of step_fn and step_ahead")
    start_s = clock()
    rejected: list[tuple[str, str]] = []
    steps: list[StepRecord] = []

    def submit(req: Request) -> None:
        try:
            scheduler.submit(req)
        except RequestError as e:
            rejected.append((req.request_id, str(e)))

    pending = list(requests)[::-1]  # closed loop pops from the end
    if concurrency is None:
        while pending:
            submit(pending.pop())
    inflight = None  # step-ahead: (plan, handle, t0) of the step running on the device
    while max_steps is None or len(steps) < max_steps:
        now = clock()
        while pending and scheduler.num_waiting + scheduler.num_running < concurrency:
            submit(dataclasses.replace(pending.pop(), arrival_s=now))
        if inflight is None:
            if scheduler.idle and not pending:
                break
            plan = scheduler.schedule(now)
            if plan.is_empty:
                next_s = scheduler.next_arrival_s()
                if next_s is None or next_s <= now:
                    raise RuntimeError("scheduler made no progress with work queued")  # a scheduler bug
                sleep(next_s - now)
                continue
            t0 = clock()
            if step_ahead is None:
                tokens = step_fn(plan)
                t1 = clock()
                scheduler.complete_step(plan, tokens, t1)
                steps.append(StepRecord(scheduler.rank, t0, t1, plan.num_tokens))
                continue
            inflight = (plan, step_ahead.dispatch(plan, None), t0)
        plan, handle, t0 = inflight
        tokens, ahead = collect_ahead(scheduler, step_ahead, handle, now,
                                      plan_next=max_steps is None or len(steps) + 1 < max_steps)
        t1 = clock()
        scheduler.complete_step(plan, tokens, t1)
        steps.append(StepRecord(scheduler.rank, t0, t1, plan.num_tokens))
        inflight = None if ahead is None else (*ahead, t1)
    return EngineRun(start_s, clock(), tuple(steps), tuple(rejected))
