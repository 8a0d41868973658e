"""Disaggregated serving: context servers prefill, generation servers decode, the KV cache moves between them.

Roles. A run splits its devices into a context role and a generation role, each with its own strategy and
group size (`RoleSpec`). A role is served by engines, each one step runner with its own scheduler and host
thread: one per device for `dwdp` and `dp` (a DWDP group's ranks share experts through their fetches only),
one per `dep` group (one SPMD program over the group's devices, one slot group per device), one for `single`.

Life of a request (all times in seconds on one clock, from `serve`'s start):
  1. arrival_s: it joins one FCFS queue, and is assigned to the context engine with a free slot that has
     the fewest prompt tokens left to prefill (a closed loop also waits until fewer than `concurrency`
     requests are in flight; a context slot is busy from assignment until its cache has been copied out).
  2. The context engine prefills it in chunks within its step token budget (`DisaggConfig.context`) and
     samples the first token (context_first_token_s). The slot stays held (`hold_retired_slots`).
  3. Hand-off: once a generation slot group has room (a credit, taken by the context thread), the context
     thread sends the cache rows (`KVTransport.send`, before it dispatches its next step) and posts the
     request to that generation engine (handoff_start_s). A watcher thread stamps when the source rows were
     released (the context thread then frees the slot) and when they arrived (handoff_end_s).
  4. The generation engine writes arrived rows into a free slot between two of its steps and admits the
     request with its first token: first_token_s is this moment, so TTFT includes queueing, prefill and
     hand-off. It then decodes with continuous batching until the request finishes (last_token_s).
A request whose first token ends it (max_new_tokens == 1, or EOS) finishes on its context engine.

Metrics (`summarize`): output TPS/GPU over the GPUs of both roles, TTFT, TPOT and TPS/user per request, and
per role: context prefill throughput and busy fraction, hand-off time and bytes, generation throughput.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
from collections.abc import Callable, Sequence

import numpy as np

from dwdp_jax.engine import metrics as metrics_lib
from dwdp_jax.engine import timeline
from dwdp_jax.engine.kv_transfer import DevicePutTransport, KVTransport, Transfer, TransferWatcher
from dwdp_jax.engine.runner import DepRunner, LockstepScheduler
from dwdp_jax.engine.scheduler import FinishedRequest, Scheduler, SchedulerConfig, wall_clock
from dwdp_jax.engine.workload import Request, RequestError, validate_request
from dwdp_jax.parallel.threads import run_in_threads

STRATEGIES = ("single", "dwdp", "dp", "dep")
ROLES = ("context", "generation")


# ---------------------------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class RoleSpec:
    """How one role serves: `strategy` over `num_devices` devices. group_size: devices per DWDP group or DEP
    group (0: all the role's devices; must divide num_devices); dp and single engines are one device each.
    `name` ("context" or "generation") prefixes the fields in error messages ("context_group_size=3 must
    divide context_devices=4": the launcher's flag names)."""

    strategy: str
    num_devices: int
    group_size: int = 0
    name: str = "role"

    def __post_init__(self):
        n = self.name
        if self.strategy not in STRATEGIES:
            raise ValueError(f"{n}_strategy={self.strategy!r}: use one of {', '.join(STRATEGIES)}")
        if self.num_devices < 1:
            raise ValueError(f"{n}_devices must be >= 1, got {self.num_devices}")
        if self.group_size < 0:
            raise ValueError(f"{n}_group_size must be >= 0 (0: all the role's devices), got {self.group_size}")
        if self.strategy == "single" and self.num_devices != 1:
            raise ValueError(f"{n}_strategy=single runs on one device, got {n}_devices={self.num_devices}")
        if self.strategy in ("dwdp", "dep") and self.num_devices % self.group:
            raise ValueError(f"{n}_group_size={self.group} must divide {n}_devices={self.num_devices}")
        if self.strategy in ("dp", "single") and self.group_size not in (0, 1):
            raise ValueError(f"{n}_strategy={self.strategy} has no groups, got {n}_group_size={self.group_size}")

    @property
    def group(self) -> int:
        """Devices per group: the DWDP or DEP group size; 1 for dp and single."""
        if self.strategy in ("dp", "single"):
            return 1
        return self.group_size or self.num_devices

    @property
    def num_engines(self) -> int:
        """Engines (host threads) of the role: one per DEP group, one per device otherwise."""
        return self.num_devices // self.group if self.strategy == "dep" else self.num_devices

    def check_experts(self, n_routed_experts: int) -> None:
        """DWDP splits and DEP shards each MoE layer's experts over a group: the group must divide them."""
        if self.strategy in ("dwdp", "dep") and n_routed_experts % self.group:
            raise ValueError(f"{self.name}_group_size={self.group} must divide the {n_routed_experts} routed "
                             f"experts ({self.strategy})")


def split_devices(devices: Sequence, context: RoleSpec, generation: RoleSpec) -> tuple[list, list]:
    """The first context.num_devices devices for the context role, the next generation.num_devices for the
    generation role."""
    need = context.num_devices + generation.num_devices
    if need > len(devices):
        raise ValueError(f"context ({context.num_devices}) + generation ({generation.num_devices}) devices = {need}"
                         f", but only {len(devices)} devices are given")
    devices = list(devices)
    return devices[: context.num_devices], devices[context.num_devices : need]


@dataclasses.dataclass(frozen=True)
class DisaggConfig:
    """Scheduling of each role, per slot group (a device): `context` (slots for prompts being prefilled or
    waiting for their hand-off, max_seq_len >= the longest prompt + 1, token_budget = tokens per prefill step)
    and `generation` (slots for decoding requests, max_seq_len >= the longest prompt + output, token_budget >=
    max_batch_size). Hand-offs copy the prompt's positions rounded up to a power of two from
    `min_transfer_len` (one gather program per length), capped by the caches' lengths."""

    context: SchedulerConfig
    generation: SchedulerConfig
    min_transfer_len: int = 16

    def __post_init__(self):
        if self.min_transfer_len < 1:
            raise ValueError(f"DisaggConfig.min_transfer_len must be >= 1, got {self.min_transfer_len}")
        if self.context.eos_id != self.generation.eos_id:
            raise ValueError(f"DisaggConfig: context eos_id {self.context.eos_id} != generation eos_id "
                             f"{self.generation.eos_id}")


# ---------------------------------------------------------------------------------------------------------------
# Records


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    """A finished request of a disaggregated run. Hand-off fields are NaN / -1 / 0 for a request that finished
    on its context engine. Times in seconds on the run's clock; `first_token_s` is when the first token was
    delivered (generation admission after the hand-off), `context_first_token_s` when it was sampled."""

    request_id: str
    prompt_len: int
    max_new_tokens: int
    output_tokens: tuple[int, ...]
    finish_reason: str
    arrival_s: float
    context_engine: int
    context_device: int
    context_admitted_s: float
    context_first_token_s: float
    handoff_start_s: float
    handoff_source_done_s: float
    handoff_end_s: float
    kv_len: int  # positions copied
    kv_bytes: int  # bytes copied
    generation_engine: int
    generation_device: int
    generation_admitted_s: float
    first_token_s: float
    last_token_s: float
    token_times_s: tuple[float, ...]

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_tokens)

    @property
    def handed_off(self) -> bool:
        return self.generation_engine >= 0

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    def to_json(self) -> dict:
        """A results row: the fields (no token lists) plus derived latencies; NaN becomes None."""
        row = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("output_tokens", "token_times_s")}
        n = self.num_output_tokens
        row.update(
            num_output_tokens=n,
            ttft_s=self.ttft_s,
            context_queue_s=self.context_admitted_s - self.arrival_s,
            context_ttft_s=self.context_first_token_s - self.arrival_s,
            handoff_wait_s=self.handoff_start_s - self.context_first_token_s,
            handoff_s=self.handoff_end_s - self.handoff_start_s,
            tpot_s=(self.last_token_s - self.first_token_s) / (n - 1) if n > 1 else math.nan,
        )
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


@dataclasses.dataclass(frozen=True)
class DisaggRun:
    """What `DisaggEngine.serve` observed: its span, finished requests, every step on every device (role
    "context" or "generation"), rejected (request_id, reason), and the GPUs of each role."""

    start_s: float
    end_s: float
    requests: tuple[RequestRecord, ...]
    events: tuple[timeline.StepEvent, ...]
    rejected: tuple[tuple[str, str], ...]
    num_context_gpus: int
    num_generation_gpus: int

    @property
    def wall_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def num_gpus(self) -> int:
        return self.num_context_gpus + self.num_generation_gpus

    def outputs(self) -> dict[str, list[int]]:
        return {r.request_id: list(r.output_tokens) for r in self.requests}


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


# ---------------------------------------------------------------------------------------------------------------
# The engine


def _schedulers(runner, config: SchedulerConfig, hold: bool):
    """One `Scheduler` per slot group of `runner`, and the scheduler its `step_fn` takes (a DEP runner takes
    lockstep plans, even over one device)."""
    scheds = [Scheduler(config, rank=g, hold_retired_slots=hold, page_table=runner.page_tables[g])
              for g in range(runner.num_groups)]
    return scheds, (LockstepScheduler(scheds) if isinstance(runner, DepRunner) else scheds[0])


class DisaggEngine:
    """Serves requests with `context` runners (prefill) and `generation` runners (decode), each a runner of
    `dwdp_jax.engine.runner` (ModelRunner, DwdpRankRunner or DepRunner) on its own devices.

    transport: how cache rows move between devices (default `DevicePutTransport`).
    verify_handoff: compare every transfer's arrived rows with its source rows, bit for bit (a failed check
    fails the run, naming the request)."""

    def __init__(self, context: Sequence, generation: Sequence, config: DisaggConfig,
                 transport: KVTransport | None = None, verify_handoff: bool = False):
        if not context or not generation:
            raise ValueError(f"disaggregated serving needs context and generation runners, got {len(context)} "
                             f"and {len(generation)}")
        self.context, self.generation, self.config = list(context), list(generation), config
        self.transport = transport or DevicePutTransport()
        self.verify_handoff = verify_handoff
        seen = {}
        for role, runners, sched in (("context", self.context, config.context),
                                     ("generation", self.generation, config.generation)):
            for i, r in enumerate(runners):
                spec = r.spec
                if spec.num_slots < sched.max_batch_size or spec.max_len < sched.max_seq_len:
                    raise ValueError(f"{role} runner {i}: cache of {spec.num_slots} slots x {spec.max_len} tokens "
                                     f"is smaller than its scheduler's {sched.max_batch_size} x {sched.max_seq_len}")
                for d in r.group_devices:
                    if d in seen:
                        raise ValueError(f"device {d} serves both {seen[d]} and {role} runner {i}")
                    seen[d] = f"{role} runner {i}"
        ref = self.context[0].spec
        for role, runners in (("context", self.context), ("generation", self.generation)):
            for i, r in enumerate(runners):
                s = r.spec
                if (s.num_layers, s.kv_lora_rank, s.rope_dim, s.dtype) != (ref.num_layers, ref.kv_lora_rank,
                                                                            ref.rope_dim, ref.dtype):
                    raise ValueError(f"{role} runner {i}: cache {s} does not match context runner 0's {ref}")
        self._max_transfer_len = min(r.spec.max_len for r in self.context + self.generation)

    @property
    def num_context_gpus(self) -> int:
        return sum(len(r.group_devices) for r in self.context)

    @property
    def num_generation_gpus(self) -> int:
        return sum(len(r.group_devices) for r in self.generation)

    def transfer_len(self, prompt_len: int) -> int:
        """Positions a hand-off copies: the prompt rounded up to a power of two from min_transfer_len, capped at
        the shortest cache (which holds every valid prompt)."""
        n = self.config.min_transfer_len
        while n < prompt_len:
            n *= 2
        return min(n, self._max_transfer_len)

    def transfer_bytes(self, prompt_len: int) -> int:
        return self.transfer_len(prompt_len) * self.context[0].spec.bytes_per_token

    def check_request(self, req: Request) -> None:
        """Raises `RequestError` if `req` cannot be served (prompt + 1 too long for a context slot, prompt +
        output too long for a generation slot, bad ids or lengths)."""
        validate_request(dataclasses.replace(req, max_new_tokens=1, rank=None), self.config.context.max_seq_len,
                         self.config.context.vocab_size)
        validate_request(dataclasses.replace(req, rank=None), self.config.generation.max_seq_len,
                         self.config.generation.vocab_size)

    def serve(self, requests: Sequence[Request], *, concurrency: int | None = None,
              clock: Callable[[], float] | None = None,
              on_finish: Callable[[RequestRecord], None] | None = None) -> DisaggRun:
        """Serves `requests` (open loop: each is taken once the clock reaches its arrival_s; closed loop with
        `concurrency`: at most that many in flight, each arriving when it is taken). Requests that cannot be
        served are rejected (in `rejected`), the others all finish; on_finish(record) is called (from a
        serving thread) as each finishes. Blocks until done."""
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"concurrency must be >= 1 or None, got {concurrency}")
        return _Pass(self, requests, concurrency, clock or wall_clock(), on_finish).run()


class _Failed(Exception):
    """Another serving thread failed; this one stops."""


class _Pass:
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
        active: dict[str, _Handoff] = {}
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
            if sched.num_running == 0:
                if no_more and not arrived:
                    return
                self._wait(seen)
                continue
            plan = sched.schedule(self.clock())
            tokens = step(plan)
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


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def _median(values) -> float:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    return float(np.median(v)) if v.size else math.nan


def _p90(values) -> float:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    return float(np.percentile(v, 90)) if v.size else math.nan


def _role_steps(events, role: str, wall_s: float, num_gpus: int) -> dict:
    """Step statistics of one role's devices; tokens_per_step_mean: prefill tokens (context) or decode rows
    (generation) per device and step, over the devices that had work in it."""
    ev = [e for e in events if e.role == role]
    worked = [e.prefill_tokens if role == "context" else e.decode_tokens for e in ev]
    worked = [w for w in worked if w]
    return dict(
        num_steps=len({(e.engine, e.start_s) for e in ev}),
        busy_frac=sum(e.end_s - e.start_s for e in ev) / (wall_s * num_gpus) if wall_s > 0 else math.nan,
        step_median_s=_median([e.end_s - e.start_s for e in ev]),
        tokens_per_step_mean=float(np.mean(worked)) if worked else math.nan,
    )


def summarize(run: DisaggRun) -> dict:
    """{"metrics": flat run metrics, "roles": one row per role}. Overall metrics are those of
    `metrics.summarize_run` over all GPUs of both roles (TTFT includes queueing, prefill and hand-off);
    `context_*`, `handoff_*` and `generation_*` describe the roles. NaN where undefined."""
    reqs, wall = list(run.requests), run.wall_s
    if not reqs:
        raise ValueError("summarize: the run finished no requests")
    overall = metrics_lib.summarize_run(reqs, wall, num_gpus=run.num_gpus)
    metrics = {f.name: getattr(overall, f.name) for f in dataclasses.fields(overall)}
    rows = [r.to_json() for r in reqs]
    handed = [r for r in rows if r["generation_engine"] >= 0]
    ctx = _role_steps(run.events, "context", wall, run.num_context_gpus)
    gen = _role_steps(run.events, "generation", wall, run.num_generation_gpus)
    context = dict(
        role="context", num_gpus=run.num_context_gpus,
        input_tps_per_gpu=overall.input_tokens / wall / run.num_context_gpus,
        ttft_median_s=_median([r["context_ttft_s"] for r in rows]),
        queue_median_s=_median([r["context_queue_s"] for r in rows]), **ctx,
    )
    gbps = [r["kv_bytes"] / r["handoff_s"] / 1e9 for r in handed if r["handoff_s"]]
    handoff = dict(
        role="handoff", count=len(handed), bytes_total=int(sum(r["kv_bytes"] for r in handed)),
        median_s=_median([r["handoff_s"] for r in handed]), p90_s=_p90([r["handoff_s"] for r in handed]),
        gbps_median=_median(gbps), wait_median_s=_median([r["handoff_wait_s"] for r in handed]),
    )
    generation = dict(
        role="generation", num_gpus=run.num_generation_gpus,
        output_tps_per_gpu=sum(r.num_output_tokens - 1 for r in reqs if r.handed_off) / wall
        / run.num_generation_gpus,
        tpot_median_s=overall.tpot_median_s, **gen,
    )
    for role in (context, handoff, generation):
        metrics.update({f"{role['role']}_{k}": v for k, v in role.items() if k != "role"})
    metrics.update(num_context_gpus=run.num_context_gpus, num_generation_gpus=run.num_generation_gpus,
                   num_rejected=len(run.rejected))
    clean = lambda d: {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}
    return {"metrics": clean(metrics), "roles": [clean(context), clean(handoff), clean(generation)],
            "requests": rows}
