"""Multi-process DWDP check: a DWDP group over N processes, peers' expert buffers shared across processes, against
the same group in one process (same programs, same devices: exact) and the single-device model.

GPU (one GPU shared by two processes, each rank's experts read by the other through real CUDA IPC handles):

  PYTHONPATH=. python3 experiments/gpu_check_multiprocess.py --device_kind=nvidia-h100-x1 --out=$OUT

CPU (CI: tests/test_multiprocess.py; POSIX shared memory stands in for IPC):

  python experiments/gpu_check_multiprocess.py --platform=cpu --ranks_per_process=2 --out=/tmp/mp

The parent starts `--num_processes` workers (this file with --worker), each joining the group through the
coordination service (`dwdp_jax.parallel.coordination`) and running `--ranks_per_process` ranks. For each variant
(a fetch backend, optionally with the top_k planner) the workers build a `DwdpProcessGroup`, run every local
rank's batch (the logits of one forward, and a greedy continuation), write them to an npz, and close the group.
The parent then runs the same variants in one process and compares. Metrics (part `dwdp`):
  * multiprocess_max_rel_diff: max |logits_multiprocess - logits_in_process| / max |logits_in_process| (0 expected);
  * multiprocess_vs_single_device_max_rel_diff, multiprocess_tokens_equal: against the single-device model.
Joining JAX's multi-process device view with two processes on one GPU is untested territory, so on failure the
parent retries with the coordination service only (--no-join_devices), then with XLA's per-buffer allocator (in
case its allocations cannot be IPC-exported); every attempt is recorded.

Failure handling: --kill_process=P --kill_at=startup|serving makes process P exit abruptly there; the check passes
when every other process stops with a PeerError naming P within the time-outs (no hang).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import numpy as np  # noqa: E402

VARIANTS_GPU = ["copy_engine", "copy_engine_stream", "pallas_pull", "device_put", "copy_engine+top_k"]
VARIANTS_CPU = ["device_put", "copy_engine_stream", "device_put+top_k"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--platform", choices=["gpu", "cpu"], default="gpu")
    p.add_argument("--num_processes", type=int, default=2)
    p.add_argument("--ranks_per_process", type=int, default=1)
    p.add_argument("--shared_gpu", action=argparse.BooleanOptionalAction, default=True,
                   help="GPU: every process uses GPU 0 (else process i uses the next GPUs)")
    p.add_argument("--variants", default="", help="comma list of <fetch>[+top_k] (default: all for the platform)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--fp8", action="store_true", help="FP8 experts with 128x128 block scales (scale buffers too)")
    p.add_argument("--expert_backend", default="jnp", choices=["jnp", "pallas"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="greedy tokens per rank")
    p.add_argument("--timeout_s", type=float, default=60.0, help="start-up and control time-out of the workers (a "
                   "spawn is killed after 2x this + 60 s)")
    p.add_argument("--autotune", action="store_true", help="GPU: keep XLA's autotuning (off by default: processes "
                   "that time kernels apart may pick different GEMM algorithms, and the comparison is bitwise)")
    p.add_argument("--heartbeat_timeout_s", type=float, default=300.0)
    p.add_argument("--kill_process", type=int, default=-1)
    p.add_argument("--kill_at", choices=["startup", "serving"], default="startup")
    p.add_argument("--jax_cache_dir", default="", help="persistent compilation cache shared by the parent and the "
                   "workers (the references run first and fill it)")
    p.add_argument("--device_kind", default="")
    p.add_argument("--out", default="", help="results directory (dwdp-<date>-<kind>-multiprocess.json)")
    # worker side
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--process_id", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--coordinator_address", default="", help=argparse.SUPPRESS)
    p.add_argument("--join_devices", action=argparse.BooleanOptionalAction, default=True,
                   help="first attempt: join JAX's multi-process device view (else the coordination service only)")
    p.add_argument("--tmp", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.platform == "gpu" and args.shared_gpu and args.ranks_per_process != 1:
        p.error("--shared_gpu runs one rank per process (a process's ranks need distinct devices)")
    if not args.variants:
        args.variants = ",".join(VARIANTS_GPU if args.platform == "gpu" else VARIANTS_CPU)
    return args


# ---------------------------------------------------------------------------------------------------------------
# The model, the batches and the ranks' work (shared by workers and the parent's references)


def setup(args):
    """(model on the first local device, placement, dtype) from the same seed in every process."""
    import jax
    import jax.numpy as jnp

    from dwdp_jax.config import preset
    from dwdp_jax.model import init_model
    from dwdp_jax.planner.placement import Placement

    cfg = preset(args.preset).replace(num_mtp_layers=0)
    if args.fp8:
        cfg = cfg.replace(weight_block_size=(128, 128))
    dtype = jnp.float32 if args.platform == "cpu" else jnp.bfloat16
    with jax.default_device(jax.local_devices()[0]):
        model = init_model(cfg, seed=0, dtype=dtype)
    return model, Placement.from_config(cfg, args.num_processes * args.ranks_per_process)


def batch(cfg, rank: int, args) -> np.ndarray:
    return np.random.RandomState(100 + rank).randint(0, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)


def variant_config(variant: str, cfg, group_size: int, args):
    """(fetch backend name, DwdpConfig) of a variant `<fetch>[+top_k]`."""
    from dwdp_jax.parallel.dwdp import DwdpConfig
    from dwdp_jax.planner.policies import FetchPolicy

    fetch, _, planner = variant.partition("+")
    policy = FetchPolicy("top_k", k=1, experts_per_token=cfg.num_experts_per_tok) if planner == "top_k" else None
    return fetch, DwdpConfig(group_size, 1, expert_backend=args.expert_backend, policy=policy)


def rank_work(rank, ids: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 logits [b, s, vocab] of `ids`, greedy continuation [b, s + steps]) from one rank's `forward`:
    argmax re-forwards of one fixed padded shape (causal: the end padding changes nothing before it), so each
    program compiles once; the logits are the first re-forward's."""
    b, s = ids.shape
    buf = np.zeros((b, s + steps), ids.dtype)
    buf[:, :s] = ids
    first = None
    for j in range(steps):
        logits = np.asarray(rank.forward(buf)).astype(np.float32)
        first = logits[:, :s] if first is None else first
        buf[:, s + j] = logits[:, s + j - 1].argmax(-1)
    return first, buf


def _cpu_in_order(variants) -> None:
    """The device-ordered backends on CPU (copy engine, pallas_async) write staging when the device reaches them:
    dispatch order only with synchronous CPU dispatch."""
    import jax

    if any(v.startswith(("copy_engine_stream", "pallas_async")) for v in variants):
        jax.config.update("jax_cpu_enable_async_dispatch", False)


# ---------------------------------------------------------------------------------------------------------------
# Worker


def worker(args) -> None:
    import jax

    from dwdp_jax.parallel.coordination import ProcessGroupSpec, join
    from dwdp_jax.parallel.fetch import fetch_backend
    from dwdp_jax.parallel.multiprocess import DwdpProcessGroup
    from dwdp_jax.parallel.peer_memory import default_transport, make_transport

    k, pid = args.ranks_per_process, args.process_id
    local_ids = None
    if args.platform == "gpu":
        local_ids = (0,) if args.shared_gpu else tuple(range(pid * k, (pid + 1) * k))
    spec = ProcessGroupSpec(args.coordinator_address, args.num_processes, pid, local_ids, args.timeout_s,
                            args.timeout_s, args.heartbeat_timeout_s, args.join_devices)
    variants = args.variants.split(",")
    _cpu_in_order(variants)  # before the backend starts: the CPU client reads it once
    channel = join(spec)
    devices = jax.local_devices()[:k]  # with join_devices, starting the backend is itself a group-wide exchange
    if pid == args.kill_process and args.kill_at == "startup":
        os._exit(3)
    model, placement = setup(args)
    out = {}
    for variant in variants:
        fetch, dwdp = variant_config(variant, model.cfg, args.num_processes * k, args)
        transport = make_transport(default_transport(devices[0].platform))
        group = DwdpProcessGroup(channel, devices, placement, dwdp, fetch_backend(fetch), transport, model=model,
                                 name=f"check-{variant}")
        results = group.run_parallel(lambda rank, ids: rank_work(rank, ids, args.steps),
                                     [batch(model.cfg, r, args) for r in group.rank_ids])
        for r, (logits, tokens) in zip(group.rank_ids, results):
            out[f"{variant}/logits/{r}"], out[f"{variant}/tokens/{r}"] = logits, tokens
        if pid == args.kill_process and args.kill_at == "serving":
            os._exit(3)
        group.close()
        moved = getattr(transport, "relocated", 0)
        print(f"process {pid}: {variant} done (ranks {group.rank_ids}, {transport.name}, {moved} expert arrays "
              "copied into exportable memory)", flush=True)
    np.savez(os.path.join(args.tmp, f"p{pid}.npz"), **out)
    channel.close()


def run_worker(args) -> None:
    try:
        worker(args)
    except BaseException:  # say why, then leave at once: jax's shutdown barrier would wait for a dead peer
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


# ---------------------------------------------------------------------------------------------------------------
# Parent


def spawn(args, join_devices: bool, env_extra: dict, tmp: str) -> dict:
    """Runs the workers once; returns {codes, seconds, outputs} (outputs: each worker's combined output)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, **env_extra, **_cache_env(args))
    if args.platform == "cpu":
        env["XLA_FLAGS"] = _with_device_count(env.get("XLA_FLAGS", ""), args.ranks_per_process)
        env["JAX_PLATFORMS"] = "cpu"
    parent_only = ("--out", "--device_kind", "--join_devices", "--no-join_devices")
    base = [a for a in sys.argv[1:] if not a.startswith(parent_only)]
    procs, logs = [], []
    t0 = time.monotonic()
    for i in range(args.num_processes):
        log = open(os.path.join(tmp, f"worker{i}.log"), "w+")
        cmd = [sys.executable, os.path.abspath(__file__), *base, "--worker", f"--process_id={i}",
               f"--coordinator_address=127.0.0.1:{port}", f"--tmp={tmp}",
               "--join_devices" if join_devices else "--no-join_devices"]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
        logs.append(log)
    limit = 2 * args.timeout_s + 60
    for p in procs:
        try:
            p.wait(timeout=max(1.0, limit - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    seconds = time.monotonic() - t0
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    return dict(codes=[p.returncode for p in procs], seconds=seconds, outputs=outputs)


def _with_device_count(xla_flags: str, count: int) -> str:
    """XLA_FLAGS with `count` simulated CPU devices (the other flags kept: they are part of the compilation cache's
    key, so parent and workers share entries only with equal flags)."""
    kept = [f for f in xla_flags.split() if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join(kept + [f"--xla_force_host_platform_device_count={count}"])


def _cache_env(args) -> dict:
    if not args.jax_cache_dir:
        return {}
    return dict(JAX_COMPILATION_CACHE_DIR=args.jax_cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def references(args, variants, model, placement) -> dict:
    """The same variants in this process (ranks on the devices the workers used) and the single-device model."""
    import jax

    from dwdp_jax.parallel.dwdp import DwdpGroup, DwdpRank, rank_weights
    from dwdp_jax.parallel.fetch import fetch_backend

    g = args.num_processes * args.ranks_per_process
    local = jax.local_devices()
    shared = len(local) < g or (args.platform == "gpu" and args.shared_gpu)
    devices = local[:1] * g if shared else local[:g]
    cfg = model.cfg
    batches = [batch(cfg, r, args) for r in range(g)]
    refs = {"single": [rank_work(_Single(model), ids, args.steps) for ids in batches]}
    for variant in variants:
        fetch_name, dwdp = variant_config(variant, cfg, g, args)
        fetch = fetch_backend(fetch_name)
        if len(set(devices)) == g:
            group = DwdpGroup(model, devices, placement, dwdp, fetch)
            ranks = group.ranks
        else:  # ranks sharing a device, wired as a group by hand (DwdpGroup wants distinct devices): a backend
            # each, as in their own processes; their peers share one source device, hence one staging ring, which
            # needs the slots of every peer (3 per source otherwise)
            group = None
            ranks = [DwdpRank(cfg, r, d, *rank_weights(model, placement, r, d), placement, dwdp,
                              fetch_backend(fetch_name, slots=3 * (g - 1))) for r, d in enumerate(devices)]
            for rank in ranks:
                rank.group = ranks
        refs[variant] = [rank_work(rank, ids, args.steps) for rank, ids in zip(ranks, batches)]
        if group is not None:
            group.close()
    return refs


class _Single:
    """The single-device model behind a rank's `forward(ids)`."""

    def __init__(self, model):
        import jax
        from flax import nnx

        graph, state = nnx.split(model)
        self._state, self._forward = state, jax.jit(lambda state, ids: nnx.merge(graph, state)(ids))

    def forward(self, ids):
        return self._forward(self._state, ids)


def rel_diff(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def compare(args, variants, refs, worker_npz: dict) -> tuple[list[dict], dict]:
    rows, worst_ip, worst_single, tokens_equal = [], 0.0, 0.0, True
    g = args.num_processes * args.ranks_per_process
    for variant in variants:
        for r in range(g):
            logits, tokens = worker_npz[f"{variant}/logits/{r}"], worker_npz[f"{variant}/tokens/{r}"]
            ip_logits, ip_tokens = refs[variant][r]
            single_logits, single_tokens = refs["single"][r]
            row = dict(variant=variant, rank=r, rel_diff_vs_in_process=rel_diff(logits, ip_logits),
                       rel_diff_vs_single_device=rel_diff(logits, single_logits),
                       tokens_equal_in_process=bool(np.array_equal(tokens, ip_tokens)),
                       tokens_equal_single_device=bool(np.array_equal(tokens, single_tokens)))
            rows.append(row)
            worst_ip = max(worst_ip, row["rel_diff_vs_in_process"])
            worst_single = max(worst_single, row["rel_diff_vs_single_device"])
            tokens_equal &= row["tokens_equal_in_process"] and row["tokens_equal_single_device"]
    metrics = dict(multiprocess_max_rel_diff=worst_ip, multiprocess_vs_single_device_max_rel_diff=worst_single,
                   multiprocess_tokens_equal=tokens_equal)
    return rows, metrics


def parent(args) -> int:
    if args.platform == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    elif not args.autotune and "xla_gpu_autotune_level" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip()
    os.environ.update(_cache_env(args))
    import jax

    from experiments.results_io import write_result

    variants = args.variants.split(",")
    kill = args.kill_process >= 0
    attempts = [(args.join_devices, {})]
    if args.platform == "gpu" and not kill:
        attempts += [(False, {}), (False, {"XLA_PYTHON_CLIENT_ALLOCATOR": "platform"})][not args.join_devices:]
    tried, ok, metrics, rows = [], False, {}, []
    tmp = tempfile.mkdtemp(prefix="dwdp-mp-")
    refs, t0 = None, time.monotonic()
    if not kill:  # first: they fill the compilation cache (if any) that the workers then read
        _cpu_in_order(variants)
        model, placement = setup(args)
        refs = references(args, variants, model, placement)
        del model
    references_s = time.monotonic() - t0
    for join_devices, env_extra in attempts:
        run = spawn(args, join_devices, env_extra, tmp)
        tried.append(dict(join_devices=join_devices, env=env_extra, exit_codes=run["codes"], seconds=run["seconds"],
                          output_tails=[o[-1500:] for o in run["outputs"]]))
        for i, out in enumerate(run["outputs"]):
            print(f"--- worker {i} (exit {run['codes'][i]}, join_devices={join_devices}, {env_extra}) ---\n"
                  f"{out[-3000:]}", flush=True)
        if kill:
            metrics, ok = dead_peer_verdict(args, run)
            break
        if all(c == 0 for c in run["codes"]):
            npz = {}
            for i in range(args.num_processes):
                npz.update(dict(np.load(os.path.join(tmp, f"p{i}.npz"))))
            rows, metrics = compare(args, variants, refs, npz)
            ok = metrics["multiprocess_max_rel_diff"] == 0.0 and metrics["multiprocess_tokens_equal"]
            metrics.update(join_devices=join_devices, env=env_extra, workers_s=run["seconds"],
                           references_s=references_s)
            break
    print("\n".join(f"{r['variant']:>20} rank {r['rank']}: vs in-process {r['rel_diff_vs_in_process']:.3g}, vs single "
                    f"device {r['rel_diff_vs_single_device']:.3g}, tokens equal "
                    f"{r['tokens_equal_in_process']}/{r['tokens_equal_single_device']}" for r in rows))
    print({k: v for k, v in metrics.items()})
    print("PASS" if ok else "FAIL", flush=True)
    if args.out:
        device_kind = args.device_kind or ("cpu" if args.platform == "cpu" else re.sub(
            r"[^a-z0-9]+", "-", jax.devices()[0].device_kind.lower()).strip("-") + "-x1")
        config = dict(platform=args.platform, num_processes=args.num_processes,
                      ranks_per_process=args.ranks_per_process, shared_gpu=args.shared_gpu, variants=variants,
                      preset=args.preset, fp8=args.fp8, expert_backend=args.expert_backend, batch=args.batch,
                      seq=args.seq, steps=args.steps, kill_process=args.kill_process, kill_at=args.kill_at,
                      xla_flags=os.environ.get("XLA_FLAGS", ""), attempts=tried)
        tag = "multiprocess" + (f"-kill-{args.kill_at}" if kill else "")
        print("wrote", write_result(args.out, "dwdp", device_kind, config, dict(metrics, passed=ok), rows, tag=tag))
    return 0 if ok else 1


def dead_peer_verdict(args, run) -> tuple[dict, bool]:
    """Every process but the killed one must have stopped with an error naming it (PeerError from our control
    channel, or JAX's heartbeat abort) before the spawn's own limit."""
    survivors = [i for i in range(args.num_processes) if i != args.kill_process]
    named = all(run["codes"][i] not in (0, None, -9) and ("PeerError" in run["outputs"][i] or "PeerTimeout"
                in run["outputs"][i] or "detected fatal errors" in run["outputs"][i]) for i in survivors)
    mentions = all(f"process {args.kill_process}" in run["outputs"][i] or f"[{args.kill_process}]" in
                   run["outputs"][i] or "detected fatal errors" in run["outputs"][i] for i in survivors)
    killed = run["codes"][args.kill_process] == 3
    ok = named and mentions and killed
    return dict(dead_peer_detected=ok, dead_peer_wall_s=run["seconds"]), ok


if __name__ == "__main__":
    ARGS = parse_args()
    if ARGS.worker:
        run_worker(ARGS)
    else:
        sys.exit(parent(ARGS))
