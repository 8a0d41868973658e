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

Modules: this one holds the roles, the configuration and `DisaggEngine`; `disagg_serving.py` the serving threads
of one `serve` call (dispatch, hand-off credits, context and generation loops); `disagg_metrics.py` the records
of a run (`RequestRecord`, `DisaggRun`) and `summarize`, both importable from here too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from dwdp_jax.engine.disagg_metrics import DisaggRun, RequestRecord, summarize
from dwdp_jax.engine.disagg_serving import ServePass
from dwdp_jax.engine.kv_transfer import DevicePutTransport, KVTransport
from dwdp_jax.engine.scheduler import SchedulerConfig, wall_clock
from dwdp_jax.engine.workload import Request, validate_request

__all__ = ["ROLES", "STRATEGIES", "DisaggConfig", "DisaggEngine", "DisaggRun", "RequestRecord", "RoleSpec",
           "split_devices", "summarize"]

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
    `min_transfer_len` (one gather program per length), capped by the caches' lengths. step_ahead: a
    generation engine of one slot group (not DEP) dispatches each decode step before the previous step's tokens
    reach the host (`scheduler.run_engine`'s step-ahead mode)."""

    context: SchedulerConfig
    generation: SchedulerConfig
    min_transfer_len: int = 16
    step_ahead: bool = True

    def __post_init__(self):
        if self.min_transfer_len < 1:
            raise ValueError(f"DisaggConfig.min_transfer_len must be >= 1, got {self.min_transfer_len}")
        if self.context.eos_id != self.generation.eos_id:
            raise ValueError(f"DisaggConfig: context eos_id {self.context.eos_id} != generation eos_id "
                             f"{self.generation.eos_id}")


# ---------------------------------------------------------------------------------------------------------------
# The engine


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
        return ServePass(self, requests, concurrency, clock or wall_clock(), on_finish).run()
