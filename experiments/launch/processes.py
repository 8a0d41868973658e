"""Multi-process runs: one DWDP (or replicated DP) group over several processes or hosts.

Each process (`--num_processes=N --process_id=I --coordinator_address=HOST:PORT`, or `--cluster_detection` under
SLURM / Open MPI) joins the group's coordination service, builds its local ranks (`DwdpProcessGroup`: the
placement, planner and programs of an in-process group), serves its ranks' share of the workload (requests and
concurrency split over the group's ranks exactly as in-process) and sends its pass to process 0, which merges
every process's requests, step events and fetch counters and writes the group's one record.
`--spawn_local_processes=N` starts the N processes on this machine and waits for them.

Clocks: before each timed pass the processes meet at a barrier and start their pass clocks as they leave it, so
their times share an origin (to the barrier's release skew: milliseconds on one host). Step events name the
group rank in `device` (as an in-process run's device ids 0..n-1 do).
Failures: a process's error is reported on the control channel and the others stop naming it; the entry point
(`experiments.launch.main`) then exits at once, skipping jax's shutdown barrier, which would wait for the dead.
"""

from __future__ import annotations

import json
import pickle
import socket
import subprocess
import sys
import threading
import time
import zlib

from dwdp_jax.parallel.coordination import ControlChannel, ProcessGroupSpec, join
from dwdp_jax.parallel.fetch import fetch_backend
from dwdp_jax.parallel.multiprocess import DwdpProcessGroup
from dwdp_jax.parallel.peer_memory import default_transport, make_transport
from experiments.launch.colocated import print_header, report, save_router_traces, serve_point, summarize_point
from experiments.launch.engines import dwdp_setup, rank_models, rank_runners, shared_model
from experiments.launch.validation import Setup, usage_error, validate


def is_multiprocess(f) -> bool:
    """Whether this launcher process is one process of a multi-process group (not the local spawner)."""
    return not f.spawn_local_processes and (f.num_processes > 1 or f.cluster_detection)


def _check_flags(f, spawning: bool = False) -> None:
    """What a multi-process run supports, checked before joining or spawning (nothing waits for a peer on a
    usage error)."""
    if f.mode != "colocated" or f.strategy not in ("dwdp", "dp"):
        usage_error(f"a multi-process run serves --mode=colocated with --strategy=dwdp or dp (one group over every "
                    f"process), got --mode={f.mode} --strategy={f.strategy}")
    if f.group_size is not None and f.num_devices and f.group_size != f.num_devices:
        usage_error(f"a multi-process run is one group over every process: --group_size={f.group_size} must be "
                    f"--num_devices={f.num_devices} (or left out)")
    if not spawning and not f.cluster_detection and (f.num_processes < 2 or not f.coordinator_address):
        usage_error("a multi-process run needs --num_processes >= 2 and --coordinator_address=HOST:PORT (or "
                    "--cluster_detection)")
    if f.peer_timeout_s <= 0 or f.heartbeat_timeout_s <= 0:
        usage_error(f"--peer_timeout_s and --heartbeat_timeout_s must be > 0, got {f.peer_timeout_s}, "
                    f"{f.heartbeat_timeout_s}")


def process_spec(f) -> ProcessGroupSpec:
    """The group this process joins; with --cluster_detection, flags left at their defaults are detected."""
    detect = f.cluster_detection
    try:
        return ProcessGroupSpec(
            coordinator_address=f.coordinator_address,
            num_processes=None if detect and not f["num_processes"].present else f.num_processes,
            process_id=None if detect and not f["process_id"].present else f.process_id,
            local_device_ids=tuple(int(i) for i in f.local_device_ids) if f.local_device_ids else None,
            startup_timeout_s=f.peer_timeout_s, control_timeout_s=f.peer_timeout_s,
            heartbeat_timeout_s=f.heartbeat_timeout_s, join_devices=f.join_devices)
    except ValueError as e:
        usage_error(f"multi-process flags: {e}")


def launch_processes(f, argv: list[str]) -> dict:
    """This process's part of a multi-process run. Returns the record on process 0 (with `path`), else
    {"path": None, "process_id": i}."""
    _check_flags(f)
    channel = join(process_spec(f))
    try:
        setup = validate(f, channel.num_processes)
        result = _run(f, setup, channel, argv)
    except BaseException as e:
        channel.report_failure(f"{type(e).__name__}: {e}")
        raise
    channel.close()
    return result


def _run(f, setup: Setup, channel: ControlChannel, argv: list[str]) -> dict:
    t0 = time.perf_counter()
    pid, nproc, g = channel.process_id, channel.num_processes, setup.num_devices
    first = pid * len(setup.devices)
    placement, dwdp = dwdp_setup(f, setup.cfg, g, replicated=setup.strategy == "dp")
    platform = setup.devices[0].platform
    transport = make_transport(default_transport(platform) if f.peer_memory == "auto" else f.peer_memory)
    model = shared_model(f, setup)
    weights = (dict(model=model) if model is not None else
               dict(rank_models=rank_models(f, setup, list(setup.devices), placement, first_rank=first)))
    group = DwdpProcessGroup(channel, setup.devices, placement, dwdp, fetch_backend(f.fetch), transport, **weights)
    if group.rank_ids[0] != first:
        raise RuntimeError(f"process {pid} holds ranks {group.rank_ids}, expected them from {first}")
    notes = dict(weights="random" if f.checkpoint is None else "checkpoint",
                 weights_built="whole model, split per rank" if model is not None else "per rank",
                 num_processes=nproc, devices_per_process=len(setup.devices), peer_memory=transport.name,
                 join_devices=f.join_devices)
    engines = rank_runners(f, setup, group.ranks, setup.strategy, g, setup.sched, setup.buckets, f.seed, notes,
                           first_index=first, num_engines=g)
    build_s = time.perf_counter() - t0
    if pid == 0:
        print_header(setup, engines)
    points = []
    for i, c in enumerate(setup.concurrency):
        start = lambda i=i: channel.barrier(f"pass{i}", f.peer_timeout_s)
        points.append(_gather(channel, f"pass{i}", serve_point(f, setup, engines, c, before_clock=start),
                              f.peer_timeout_s))
    save_router_traces(f, engines)
    group.close()
    if pid != 0:
        print(f"process {pid}: served ranks {group.rank_ids}; process 0 writes the record", flush=True)
        return dict(path=None, process_id=pid)
    return report(f, setup, argv, engines, [summarize_point(p, setup) for p in points], build_s,
                  tag=f"-p{nproc}")


def _gather(channel: ControlChannel, key: str, point: dict, timeout_s: float) -> dict:
    """Process 0: the pass of every process merged (requests and events joined, the span from the first start to
    the last end, fetch counters summed). Others: send theirs, return it unchanged."""
    point = dict(point, events=[e._replace(device=e.engine) for e in point["events"]])
    part = {k: point[k] for k in ("finished", "events", "start_s", "end_s", "counters")}
    if channel.process_id != 0:
        channel.publish(f"results/{key}/p{channel.process_id}", zlib.compress(pickle.dumps(part)))
        return point
    parts = [part] + [pickle.loads(zlib.decompress(channel.read(f"results/{key}/p{p}", timeout_s,
                                                                f"process {p}'s results of {key}")))
                      for p in range(1, channel.num_processes)]
    counters = [q["counters"] for q in parts]
    return dict(point, finished=[x for q in parts for x in q["finished"]],
                events=[e for q in parts for e in q["events"]],
                start_s=min(q["start_s"] for q in parts), end_s=max(q["end_s"] for q in parts),
                counters=None if counters[0] is None else {k: sum(c[k] for c in counters) for k in counters[0]})


# ---------------------------------------------------------------------------------------------------------------
# Spawning the processes of a group on this machine


def spawn_local(f, argv: list[str]) -> dict:
    """--spawn_local_processes=N: N launcher processes of one group on this machine (coordinator on a free local
    port; on GPUs each gets its share of the visible GPUs), output of process 0 echoed. Returns the record process 0
    wrote; raises naming the processes that failed."""
    n = f.spawn_local_processes
    if n < 2:
        usage_error(f"--spawn_local_processes must be >= 2, got {n}")
    given = [name for name in ("num_processes", "process_id", "coordinator_address", "cluster_detection",
                               "local_device_ids") if f[name].present]
    if given:
        usage_error(f"--spawn_local_processes sets --{given[0]} for each process; leave it out")
    _check_flags(f, spawning=True)
    gpus = _visible_gpus()
    per = (f.num_devices or gpus) // n if gpus else 0
    if gpus and (per < 1 or per * n > gpus):
        usage_error(f"--spawn_local_processes={n} with --num_devices={f.num_devices or gpus}: needs a whole number of "
                    f"GPUs per process out of the {gpus} visible")
    address = f"127.0.0.1:{_free_port()}"
    base = _without_flag(argv[1:], "spawn_local_processes")
    procs = []
    for i in range(n):
        extra = [f"--num_processes={n}", f"--process_id={i}", f"--coordinator_address={address}"]
        if gpus:
            extra.append("--local_device_ids=" + ",".join(str(i * per + j) for j in range(per)))
        if i:
            extra.append("--noprogress")
        cmd = [sys.executable, "-m", "experiments.launch", *base, *extra]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE if i == 0 else None, text=True))
    lines: list[str] = []
    echo = threading.Thread(target=lambda: [(print(line, end="", flush=True), lines.append(line))
                                            for line in procs[0].stdout])
    echo.start()
    _wait_all(procs, grace_s=f.peer_timeout_s + 30)
    echo.join()
    failed = {i: p.returncode for i, p in enumerate(procs) if p.returncode}
    if failed:
        raise RuntimeError(f"processes {sorted(failed)} of the local group failed (exit codes {failed}); their "
                           "output above names the cause")
    wrote = [line.split(" ", 1)[1].strip() for line in lines if line.startswith("wrote ")]
    if not wrote:
        raise RuntimeError("process 0 did not print 'wrote <path>'")
    with open(wrote[-1]) as fh:
        record = json.load(fh)
    record["path"] = wrote[-1]
    return record


def _wait_all(procs, grace_s: float) -> None:
    """Waits for every process; once one has failed, the others get `grace_s` (their own time-outs stop them
    sooner) before they are killed."""
    deadline = None
    while any(p.poll() is None for p in procs):
        if deadline is None and any(p.returncode for p in procs if p.returncode is not None):
            deadline = time.monotonic() + grace_s
        if deadline is not None and time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.1)


def _without_flag(args: list[str], name: str) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == f"--{name}":
            skip = True
        elif not a.startswith(f"--{name}="):
            out.append(a)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _visible_gpus() -> int:
    """CUDA devices this machine shows (0 without CuPy or a driver): counted without starting JAX's backend."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 (no CuPy, no driver, no device: a CPU machine)
        return 0
