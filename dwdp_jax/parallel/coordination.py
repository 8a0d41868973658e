"""The control channel of a multi-process DWDP group: the JAX coordination service and its key-value store.

Used at start-up (who is in the group, the exported expert buffers), at shutdown (barriers) and for small
control messages (a launcher's gathered results); never on the step path. Every wait has a deadline and, while
it waits, looks at the group's error keys: a peer that fails publishes its error and the others stop at once
naming it; a peer that hangs, or dies before it could publish, surfaces as a `PeerError` naming the processes
that did not answer. A process that dies outright is also caught by the service's heartbeats, after which JAX
terminates the others with its own message ("the JAX distributed service detected fatal errors"): never a hang.

Joining: `join(spec)` calls `jax.distributed.initialize` (explicit address / process count / id, or detected
from SLURM, Open MPI, ... as jax does), or with `join_devices=False` connects to the coordination service only,
leaving each process a single-process JAX backend (DWDP needs no global device view: no program spans
processes).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Sequence

import jax

_CHUNK = 1 << 20  # bytes per key-value entry (large values are split)
_POLL_S = 1.0  # a wait looks at the error keys this often


class PeerError(RuntimeError):
    """Another process of the group failed, died, or did not answer in time."""


class PeerTimeout(PeerError):
    """A wait on the control channel ran out of time."""


@dataclasses.dataclass(frozen=True)
class ProcessGroupSpec:
    """How this process joins its group.

    coordinator_address: 'host:port' of the coordination service (process 0 serves it); num_processes,
      process_id: this group's size and this process's index. None: detected by jax (SLURM, Open MPI, ...).
    local_device_ids: GPUs this process uses (None: every visible one).
    startup_timeout_s: joining and the start-up exchange (peers build their models meanwhile: be generous).
    control_timeout_s: barriers and gathers after start-up (a gather waits for the slowest peer's run).
    heartbeat_timeout_s: the service declares a silent process dead after this long.
    join_devices: True: `jax.distributed.initialize` (JAX's multi-process device view); False: the coordination
      service only.
    """

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    startup_timeout_s: float = 600.0
    control_timeout_s: float = 600.0
    heartbeat_timeout_s: float = 60.0
    join_devices: bool = True

    def __post_init__(self):
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None and self.num_processes is not None \
                and not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"process_id must be in [0, {self.num_processes}), got {self.process_id}")
        if self.coordinator_address is not None and ":" not in self.coordinator_address:
            raise ValueError(f"coordinator_address must be 'host:port', got {self.coordinator_address!r}")
        for name in ("startup_timeout_s", "control_timeout_s", "heartbeat_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


class ControlChannel:
    """Keys under `namespace/` in the coordination service's key-value store, for `num_processes` processes.

    client: jax's DistributedRuntimeClient (or anything with its key_value_set_bytes, blocking_key_value_get_bytes
    and key_value_dir_get). Values are bytes, split into 1 MiB entries. Keys are written once.
    """

    def __init__(self, client, process_id: int, num_processes: int, spec: ProcessGroupSpec,
                 namespace: str = "dwdp", errors: str | None = None, on_close=None):
        self.client, self.process_id, self.num_processes, self.spec = client, process_id, num_processes, spec
        self.namespace = namespace
        self._errors = errors or f"{namespace}/error/"  # where failures are reported: group-wide
        self._on_close = on_close

    def scoped(self, name: str) -> "ControlChannel":
        """The same channel with keys under `namespace/name/` (failures stay group-wide; closing stays with the
        parent)."""
        return ControlChannel(self.client, self.process_id, self.num_processes, self.spec, f"{self.namespace}/{name}",
                              self._errors)

    # -- values --------------------------------------------------------------------------------------------

    def publish(self, key: str, value: bytes) -> None:
        """Sets `key` to `value` (once)."""
        chunks = [value[i : i + _CHUNK] for i in range(0, len(value), _CHUNK)] or [b""]
        for i, chunk in enumerate(chunks):
            self.client.key_value_set_bytes(f"{self.namespace}/{key}#{i}", chunk)
        self.client.key_value_set_bytes(f"{self.namespace}/{key}#n", str(len(chunks)).encode())

    def read(self, key: str, timeout_s: float, what: str) -> bytes:
        """The value of `key`, waiting up to `timeout_s` for some process to publish it; `what` names it in
        the error ("process 1's expert handles")."""
        deadline = time.monotonic() + timeout_s
        n = int(self._get(f"{self.namespace}/{key}#n", deadline, timeout_s, what))
        return b"".join(self._get(f"{self.namespace}/{key}#{i}", deadline, timeout_s, what) for i in range(n))

    def all_gather(self, key: str, value: bytes, timeout_s: float, what: str) -> list[bytes]:
        """Every process's `value` under `key`, in process order (this one's included)."""
        self.publish(f"{key}/p{self.process_id}", value)
        return [value if p == self.process_id else self.read(f"{key}/p{p}", timeout_s, f"process {p}'s {what}")
                for p in range(self.num_processes)]

    def gather_json(self, key: str, value, timeout_s: float, what: str) -> list:
        return [json.loads(v) for v in self.all_gather(key, json.dumps(value).encode(), timeout_s, what)]

    def barrier(self, name: str, timeout_s: float) -> None:
        """Returns once every process has reached barrier `name`; a `PeerTimeout` names those that did not within
        `timeout_s` (a `PeerError` if one reported a failure)."""
        self.publish(f"barrier/{name}/p{self.process_id}", b"")
        deadline, missing = time.monotonic() + timeout_s, []
        for p in range(self.num_processes):
            try:
                self._get(f"{self.namespace}/barrier/{name}/p{p}#n", deadline, timeout_s, f"barrier {name!r}")
            except PeerTimeout:
                missing.append(p)
                deadline = time.monotonic()  # the rest: one look each, no further wait
        if missing:
            raise PeerTimeout(f"processes {missing} did not reach barrier {self.namespace}/{name!r} within "
                              f"{timeout_s:g} s (dead, hung, or still running)")

    # -- failures ------------------------------------------------------------------------------------------

    def report_failure(self, message: str) -> None:
        """Tells the other processes that this one failed (best effort: the service may be gone)."""
        try:
            self.client.key_value_set(f"{self._errors}p{self.process_id}", message[:_CHUNK])
        except Exception:  # noqa: BLE001 (the failure being reported matters, not this one)
            pass

    def check_peers(self) -> None:
        """Raises `PeerError` if another process has reported a failure."""
        for key, value in self.client.key_value_dir_get(self._errors):
            process = key.rsplit("p", 1)[-1]
            if process != str(self.process_id):
                raise PeerError(f"process {process} failed: {value}")

    def _get(self, key: str, deadline: float, timeout_s: float, what: str) -> bytes:
        while True:
            self.check_peers()
            left = deadline - time.monotonic()
            try:
                return self.client.blocking_key_value_get_bytes(key, max(1, int(min(left, _POLL_S) * 1000)))
            except Exception as e:  # noqa: BLE001 (jax raises its own runtime error type)
                if "DEADLINE_EXCEEDED" not in str(e) and "timed out" not in str(e).lower():
                    raise PeerError(f"the coordination service failed while waiting for {what}: {e}") from e
            if time.monotonic() >= deadline:
                self.check_peers()
                raise PeerTimeout(f"{what} did not arrive within {timeout_s:g} s: that process died, hung, or is "
                                  "still starting (raise the timeout if it is slow)")

    def close(self) -> None:
        """Leaves the group (jax.distributed.shutdown, or the service-only client and service)."""
        if self._on_close is not None:
            self._on_close()
            self._on_close = None


def join(spec: ProcessGroupSpec) -> ControlChannel:
    """Joins this process to its group (module docstring); returns the group's control channel."""
    if spec.join_devices:
        jax.distributed.initialize(
            spec.coordinator_address, spec.num_processes, spec.process_id,
            local_device_ids=list(spec.local_device_ids) if spec.local_device_ids is not None else None,
            initialization_timeout=int(spec.startup_timeout_s), heartbeat_timeout_seconds=int(spec.heartbeat_timeout_s),
            shutdown_timeout_seconds=int(spec.control_timeout_s))
        from jax._src.distributed import global_state

        return ControlChannel(global_state.client, global_state.process_id, global_state.num_processes, spec,
                              on_close=jax.distributed.shutdown)
    return _join_service_only(spec)


def _join_service_only(spec: ProcessGroupSpec) -> ControlChannel:
    """The coordination service and a client, as jax.distributed makes them, without joining JAX's backends."""
    from jax._src import clusters
    from jax._src.lib import _jax

    address, n, pid, local_ids = spec.coordinator_address, spec.num_processes, spec.process_id, spec.local_device_ids
    if None in (address, n, pid):
        address, n, pid, local_ids = clusters.ClusterEnv.auto_detect_unset_distributed_params(
            address, n, pid, local_ids, None, int(spec.startup_timeout_s))
    if None in (address, n, pid):
        raise ValueError("no coordinator address / process count / process id given or detected")
    if local_ids:
        jax.config.update("jax_cuda_visible_devices", ",".join(str(i) for i in local_ids))
    service = None
    if pid == 0:
        service = _jax.get_distributed_runtime_service(
            "[::]:" + address.rsplit(":", 1)[1], n, heartbeat_timeout=int(spec.heartbeat_timeout_s),
            shutdown_timeout=int(spec.control_timeout_s))
    client = _jax.get_distributed_runtime_client(address, pid, init_timeout=int(spec.startup_timeout_s),
                                                 heartbeat_timeout=int(spec.heartbeat_timeout_s), use_compression=True)
    client.connect()

    def close():
        client.shutdown()
        if service is not None:
            service.shutdown()

    return ControlChannel(client, pid, n, spec, on_close=close)


def process_slices(counts: Sequence[int]) -> list[range]:
    """Global ranks of each process, given each process's local rank count: contiguous, in process order."""
    starts = [sum(counts[:p]) for p in range(len(counts))]
    return [range(s, s + c) for s, c in zip(starts, counts)]
