"""Serve a workload end to end with one strategy (single device, DWDP, replicated DP or DEP) and record it.

Per run: a model (a preset with random weights, or an HF checkpoint), one engine per rank (its own
`Scheduler`, slot cache and host thread; DEP: one lockstep engine whose SPMD program spans all devices, each
device with its own slot group), a warm-up, then one timed pass per `--concurrency` value with a progress
bar, a summary table, and one results JSON (part `e2e`) under `--out`.

Demo (tiny random model, two simulated CPU devices, well under a minute):

  XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m experiments.launch --preset=tiny
      --strategy=dwdp --num_devices=2 --num_requests=8 --input_len=32 --output_len=16   (one line)

Concurrency is the number of requests in flight over all GPUs (split evenly over the data-parallel ranks);
0 queues every request at the start (offline batch).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Callable

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dwdp_jax import config as config_lib  # noqa: E402
from dwdp_jax.engine import metrics as metrics_lib  # noqa: E402
from dwdp_jax.engine import workload as workload_lib  # noqa: E402
from dwdp_jax.engine.kv_cache import CacheSpec  # noqa: E402
from dwdp_jax.engine.runner import (Buckets, DepRunner, DwdpRankRunner, LockstepScheduler,  # noqa: E402
                                    ModelRunner)
from dwdp_jax.engine.sampling import SamplingParams  # noqa: E402
from dwdp_jax.engine.scheduler import Scheduler, SchedulerConfig, run_engine, wall_clock  # noqa: E402
from dwdp_jax.experts import LocalExecutor  # noqa: E402
from dwdp_jax.model import init_model  # noqa: E402
from dwdp_jax.parallel.threads import run_in_threads
from dwdp_jax.parallel.dep import DepModel  # noqa: E402
from dwdp_jax.parallel.dwdp import DwdpConfig, DwdpGroup, memory_per_device, replicated_placement  # noqa: E402
from dwdp_jax.parallel.fetch import CopyEnginePull, DevicePutFetch  # noqa: E402
from dwdp_jax.planner.placement import Placement  # noqa: E402
from experiments.results_io import git_commit  # noqa: E402

STRATEGIES = ["single", "dwdp", "dp", "dep"]
# A preset whose whole model is at most this large is built once and split (every strategy then serves the
# same weights); larger presets get random weights built directly on each rank.
FULL_MODEL_MAX_BYTES = 4e9

FLAGS = flags.FLAGS

# (define function, name, default, help, extra keyword arguments). Defined on absl's global FLAGS by
# `define_flags`, at run time (not import time), so that importing this module defines nothing.
_FLAGS = [
    (flags.DEFINE_string, "preset", "tiny", "model preset with random weights: tiny, r1-layers-N, deepseek-r1", {}),
    (flags.DEFINE_string, "checkpoint", None, "HF DeepSeek-V3/R1 directory (overrides --preset)", {}),
    (flags.DEFINE_enum, "dtype", None, "activation / unquantized weight dtype (default: float32 on CPU, whose XLA "
     "backend lacks bf16 x bf16 -> f32 batched dots; bfloat16 elsewhere)", dict(enum_values=["bfloat16", "float32"])),
    (flags.DEFINE_enum, "strategy", "dwdp", "single device, DWDP, replicated data parallel, or DEP",
     dict(enum_values=STRATEGIES)),
    (flags.DEFINE_integer, "num_devices", 0, "devices to use (0: 1 for single, every visible device otherwise)", {}),
    (flags.DEFINE_integer, "group_size", None, "DWDP group size (default: num_devices); num_devices / group_size "
     "groups", {}),
    (flags.DEFINE_enum, "fetch", "device_put", "DWDP fetch backend", dict(enum_values=["device_put", "copy_engine"])),
    (flags.DEFINE_enum, "expert_backend", "jnp", "expert GEMMs: ragged_dot or Mosaic GPU kernels",
     dict(enum_values=["jnp", "pallas"])),
    (flags.DEFINE_integer, "prefetch_depth", 1, "DWDP: MoE layers fetched ahead", {}),
    (flags.DEFINE_string, "workload", "fixed", "fixed (--input_len/--output_len), fixed-<I>-<O> (e.g. fixed-8k-1k), "
     "lognormal (medians --input_len/--output_len), or a JSONL trace path", {}),
    (flags.DEFINE_integer, "num_requests", 8, "requests to generate (a trace: the first N when given)", {}),
    (flags.DEFINE_integer, "input_len", 32, "prompt tokens (median for lognormal)", {}),
    (flags.DEFINE_integer, "output_len", 16, "output tokens (median for lognormal)", {}),
    (flags.DEFINE_float, "lognormal_sigma", 0.5, "sigma of the lognormal lengths", {}),
    (flags.DEFINE_list, "concurrency", ["0"], "requests in flight over all GPUs, one timed pass each (0: all "
     "queued at the start)", {}),
    (flags.DEFINE_integer, "max_batch_size", 8, "cache slots (requests in flight) per rank", {}),
    (flags.DEFINE_integer, "token_budget", 0, "tokens per step per rank (0: max(max_batch_size, 2048))", {}),
    (flags.DEFINE_integer, "max_seq_len", 0, "tokens per cache slot (0: the longest request's prompt + output)", {}),
    (flags.DEFINE_float, "temperature", 0.0, "sampling temperature (0: greedy)", {}),
    (flags.DEFINE_integer, "seed", 0, "seed of the weights, the workload and sampling", {}),
    (flags.DEFINE_enum, "warmup", "run", "before each timed pass: run the same pass untimed (exactly its "
     "programs), compile every bucket, or nothing", dict(enum_values=["run", "buckets", "none"])),
    (flags.DEFINE_integer, "show_requests", 8, "requests whose first generated tokens are printed", {}),
    (flags.DEFINE_bool, "progress", True, "show a progress bar", {}),
    (flags.DEFINE_string, "device_kind", "", "the device tool's kind for the results file (default: cpu, or the "
     "platform's device kind)", {}),
    (flags.DEFINE_string, "out", "experiments/results", "results directory", {}),
    (flags.DEFINE_string, "tag", "", "file-name tag (default: <strategy>-<model>-g<devices>)", {}),
]
_defined: list[str] = []


def define_flags() -> None:
    """Defines the launcher's flags once. A flag that another entry point in this process already defined
    under the same name (`--group_size`, `--progress` of dwdp-convert) is shared, not redefined."""
    for define, name, default, help_text, extra in _FLAGS:
        if name not in FLAGS:
            define(name, default, help=help_text, **extra)
            _defined.append(name)


def undefine_flags() -> None:
    """Removes the flags `define_flags` added (in-process tests share absl's global FLAGS)."""
    while _defined:
        delattr(FLAGS, _defined.pop())


# ---------------------------------------------------------------------------------------------------------------
# Flags


@dataclasses.dataclass(frozen=True)
class Setup:
    """Validated flags."""

    cfg: config_lib.ModelConfig
    model_name: str
    strategy: str
    devices: tuple
    group_size: int
    dtype: object
    requests: tuple
    concurrency: tuple[int, ...]
    sched: SchedulerConfig
    buckets: Buckets


def _usage(msg: str):
    raise app.UsageError(msg)


def _parse_len(text: str) -> int:
    return int(text[:-1]) * 1024 if text.lower().endswith("k") else int(text)


def _workload(f, cfg) -> list[workload_lib.Request]:
    name = f.workload
    if name.endswith(".jsonl") or os.path.exists(name):
        if not os.path.exists(name):
            _usage(f"--workload={name}: no such trace file")
        reqs = workload_lib.load_trace(name)
        return reqs[: f.num_requests] if f["num_requests"].present else reqs
    if f.num_requests < 1:
        _usage(f"--num_requests must be >= 1, got {f.num_requests}")
    if f.input_len < 1 or f.output_len < 1:
        _usage(f"--input_len and --output_len must be >= 1, got {f.input_len}, {f.output_len}")
    match = re.fullmatch(r"fixed(?:-(\d+k?)-(\d+k?))?", name, re.IGNORECASE)
    if match:
        i, o = (_parse_len(g) for g in match.groups()) if match.group(1) else (f.input_len, f.output_len)
        lengths = workload_lib.FixedLength(i), workload_lib.FixedLength(o)
    elif name == "lognormal":
        cap = f.max_seq_len // 2 if f.max_seq_len else 1 << 20
        lengths = (workload_lib.LognormalLength(f.input_len, f.lognormal_sigma, 1, cap),
                   workload_lib.LognormalLength(f.output_len, f.lognormal_sigma, 1, cap))
    else:
        _usage(f"--workload={name!r}: use fixed, fixed-<I>-<O> (e.g. fixed-8k-1k), lognormal, or a .jsonl trace")
    spec = workload_lib.WorkloadSpec(f.num_requests, *lengths, vocab_size=cfg.vocab_size, seed=f.seed)
    return workload_lib.generate(spec)


def validate(f) -> Setup:
    """Checks the flags against each other and the visible devices; raises `app.UsageError` saying why."""
    if f.checkpoint:
        if not os.path.isdir(f.checkpoint):
            _usage(f"--checkpoint={f.checkpoint}: not a directory")
        cfg, model_name = config_lib.from_hf_json(f.checkpoint), os.path.basename(os.path.normpath(f.checkpoint))
    else:
        try:
            cfg = config_lib.preset(f.preset)
        except config_lib.ConfigError as e:
            _usage(f"--preset: {e}")
        model_name = f.preset
    visible = jax.devices()
    platform = visible[0].platform
    n = f.num_devices or (1 if f.strategy == "single" else len(visible))
    if n > len(visible):
        hint = (" (on CPU, simulate more with XLA_FLAGS=--xla_force_host_platform_device_count=N)"
                if platform == "cpu" else "")
        _usage(f"--num_devices={n} but only {len(visible)} {platform} devices are visible{hint}")
    if n < 1:
        _usage(f"--num_devices must be >= 1, got {n}")
    if f.strategy == "single" and n != 1:
        _usage(f"--strategy=single runs on one device, got --num_devices={n}")
    g = f.group_size or n
    if f.strategy == "dwdp":
        if n % g:
            _usage(f"--group_size={g} must divide --num_devices={n}")
        if cfg.n_routed_experts % g:
            _usage(f"--group_size={g} must divide the {cfg.n_routed_experts} routed experts")
    if f.strategy == "dep" and cfg.n_routed_experts % n:
        _usage(f"DEP needs --num_devices={n} to divide the {cfg.n_routed_experts} routed experts")
    if f.expert_backend == "pallas" and platform != "gpu":
        _usage(f"--expert_backend=pallas needs GPUs (Mosaic GPU kernels); this run sees {platform} devices")
    if f.strategy == "dwdp" and f.fetch == "copy_engine" and platform != "gpu":
        _usage("--fetch=copy_engine needs GPUs (cudaMemcpyPeerAsync through CuPy)")
    if f.strategy == "dep" and f.expert_backend == "jnp" and platform == "gpu":
        warnings.warn("DEP with --expert_backend=jnp: the expert GEMMs are XLA ragged_dot, slower than the "
                      "Pallas kernels DWDP can use; compare both strategies with the same backend")
    if f.prefetch_depth < 0:
        _usage(f"--prefetch_depth must be >= 0, got {f.prefetch_depth}")
    if f.max_batch_size < 1:
        _usage(f"--max_batch_size must be >= 1, got {f.max_batch_size}")
    try:
        concurrency = tuple(int(c) for c in f.concurrency)
    except ValueError:
        _usage(f"--concurrency must be integers, got {f.concurrency}")
    ranks = 1 if f.strategy == "single" else n
    for c in concurrency:
        if c < 0 or 0 < c < ranks:
            _usage(f"--concurrency={c}: use 0 (all queued) or at least one request per rank ({ranks})")
    requests = _workload(f, cfg)
    if not requests:
        _usage("the workload has no requests")
    longest = max(r.prompt_len + r.max_new_tokens for r in requests)
    max_seq_len = f.max_seq_len or longest
    if longest > max_seq_len:
        too_long = sum(r.prompt_len + r.max_new_tokens > max_seq_len for r in requests)
        _usage(f"--max_seq_len={max_seq_len}: {too_long} requests need up to {longest} tokens (prompt + output)")
    budget = f.token_budget or max(f.max_batch_size, 2048)
    if budget < f.max_batch_size:
        _usage(f"--token_budget={budget} must be >= --max_batch_size={f.max_batch_size}")
    sched = SchedulerConfig(f.max_batch_size, max_seq_len, budget, vocab_size=cfg.vocab_size)
    buckets = Buckets.default(f.max_batch_size, min(budget, max_seq_len))
    dtype = jnp.dtype(f.dtype or ("float32" if platform == "cpu" else "bfloat16"))
    return Setup(cfg, model_name, f.strategy, tuple(visible[:n]), g, dtype, tuple(requests),
                 concurrency, sched, buckets)


# ---------------------------------------------------------------------------------------------------------------
# Models and engines


def _full_model_fits(cfg, dtype) -> bool:
    weight_bytes = 1.0 if cfg.weight_block_size else jnp.dtype(dtype).itemsize
    return memory_per_device(cfg, 1, 0, weight_bytes)["total_bytes"] <= FULL_MODEL_MAX_BYTES


def _build_model(f, cfg, dtype, device, expert_ids=None):
    """The model on `device`; with `expert_ids(layer)`, only those routed experts (a rank's shard)."""
    if f.checkpoint:
        from dwdp_jax import load_model

        return load_model(f.checkpoint, dtype=dtype, with_mtp=False, expert_ids=expert_ids,
                          n_local_experts=None if expert_ids is None else len(expert_ids(cfg.first_k_dense_replace)),
                          device=device)
    with jax.default_device(device):
        n_local = None if expert_ids is None else len(expert_ids(cfg.first_k_dense_replace))
        return init_model(cfg.replace(num_mtp_layers=0), seed=f.seed, dtype=dtype, n_local_experts=n_local)


def _rank_models(f, setup, devices, placement):
    """One model per device holding the placement's experts (random presets: the same seed on every rank)."""
    cfg = setup.cfg
    def expert_ids(rank):
        first = cfg.first_k_dense_replace
        return lambda layer: (placement.local_experts(layer - first, rank)
                              if first <= layer < cfg.num_layers else None)

    return [_build_model(f, cfg, setup.dtype, d, expert_ids(r)) for r, d in enumerate(devices)]


@dataclasses.dataclass
class Engines:
    """What serves the workload: runners with their scheduler factories, and how requests are split."""

    runners: list
    make_schedulers: Callable[[], list]  # () -> one scheduler per runner
    weights_bytes_per_device: int
    notes: dict


def _bytes_on(tree, device) -> int:
    total = 0
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            total += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == device)
    return total


def build_engines(f, setup: Setup) -> Engines:
    cfg, devices, strategy = setup.cfg, list(setup.devices), setup.strategy
    sampling = SamplingParams(temperature=f.temperature)
    kw = dict(buckets=setup.buckets, sampling=sampling)
    slots, max_len = setup.sched.max_batch_size, setup.sched.max_seq_len
    full = f.checkpoint is None and _full_model_fits(cfg, setup.dtype)
    model = _build_model(f, cfg, setup.dtype, devices[0]) if full or strategy == "single" else None
    notes = dict(weights="random" if f.checkpoint is None else "checkpoint",
                 weights_built="whole model, split per rank" if model is not None else "per rank")

    if strategy == "single":
        runner = ModelRunner(model, slots, max_len, device=devices[0],
                             executor=LocalExecutor(backend=f.expert_backend), seed=f.seed, **kw)
        return Engines([runner], lambda: [Scheduler(setup.sched)], _bytes_on(runner.state, devices[0]), notes)

    if strategy == "dep":
        if model is not None:
            dep = DepModel(model, devices, backend=f.expert_backend)
        else:
            dep = DepModel.from_rank_models(_rank_models(f, setup, devices, Placement.from_config(cfg, len(devices))),
                                            backend=f.expert_backend)
        runner = DepRunner(dep, slots, max_len, backend=f.expert_backend, seed=f.seed, **kw)
        make = lambda: [LockstepScheduler([Scheduler(setup.sched, rank=r) for r in range(len(devices))])]
        return Engines([runner], make, _bytes_on(dep.state, devices[0]), notes)

    # dwdp and dp: one rank per device, each with its own runner, scheduler and host thread
    g = setup.group_size if strategy == "dwdp" else len(devices)
    fetch = CopyEnginePull() if f.fetch == "copy_engine" else DevicePutFetch()
    groups = []
    for i in range(0, len(devices), g):
        group_devices = devices[i : i + g]
        placement = (Placement.from_config(cfg, g) if strategy == "dwdp" else replicated_placement(cfg, g))
        dwdp = DwdpConfig(g, f.prefetch_depth if strategy == "dwdp" else 0, expert_backend=f.expert_backend)
        if model is not None:
            groups.append(DwdpGroup(model, group_devices, placement, dwdp, fetch))
        else:
            groups.append(DwdpGroup.from_rank_models(_rank_models(f, setup, group_devices, placement), placement,
                                                     dwdp, fetch))
    del model  # each rank holds its own copy of what it needs
    ranks = [rank for group in groups for rank in group.ranks]
    runners = [DwdpRankRunner(rank, slots, max_len, seed=f.seed + r, **kw) for r, rank in enumerate(ranks)]
    rank0 = ranks[0]
    weights = _bytes_on([rank0.head_state] + [state for _, state in rank0.layers], rank0.device)
    notes["staging_bytes_per_device_est"] = memory_per_device(
        cfg, g, f.prefetch_depth, 1.0 if cfg.weight_block_size else setup.dtype.itemsize)["staging_bytes"] \
        if strategy == "dwdp" else 0
    make = lambda: [Scheduler(setup.sched, rank=r) for r in range(len(runners))]
    return Engines(runners, make, weights, notes)


# ---------------------------------------------------------------------------------------------------------------
# Serving


def _split_requests(requests, num_engines: int, concurrency: int, strategy: str):
    """Requests and closed-loop concurrency per engine (None: every request queued at the start)."""
    if strategy == "dep":  # one lockstep engine; pin requests round-robin to devices, as DWDP's ranks get them
        return [list(requests)], [concurrency or None]
    per_rank = workload_lib.split_by_rank(requests, num_engines)
    if concurrency == 0:
        return per_rank, [None] * num_engines
    return per_rank, [int(c) for c in workload_lib.apportion(concurrency, np.ones(num_engines))]


def _pin(requests, num_devices):
    per_rank = workload_lib.split_by_rank(requests, num_devices)
    return [dataclasses.replace(r, rank=rank) for rank, reqs in enumerate(per_rank) for r in reqs]


def serve(engines: Engines, requests, concurrency: int, strategy: str, num_devices: int, desc: str,
          progress: bool):
    """One pass over `requests`. Returns (finished requests, step records, wall seconds)."""
    if strategy == "dep":
        requests = _pin(requests, num_devices)
    schedulers = engines.make_schedulers()
    per_engine, conc = _split_requests(requests, len(engines.runners), concurrency, strategy)
    bar = tqdm(total=sum(r.max_new_tokens for r in requests), desc=desc, unit="tok", disable=not progress,
               leave=False)
    clock = wall_clock()

    def engine(i):
        step_fn = engines.runners[i].step_fn

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
    finished = [f for s in schedulers for f in s.finished]
    wall = max(run.end_s for run in runs) - min(run.start_s for run in runs)
    return finished, [step for run in runs for step in run.steps], wall


def _warmup(f, engines: Engines, setup: Setup, concurrency: int) -> float:
    t0 = time.perf_counter()
    if f.warmup == "run":
        serve(engines, setup.requests, concurrency, setup.strategy, len(setup.devices), "warm-up", f.progress)
    elif f.warmup == "buckets":
        run_in_threads([lambda r=r: r.warmup() for r in engines.runners])
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------------
# Reporting


def _summary_table(points) -> str:
    head = ("concurrency", "requests", "out tok/s", "tok/s/gpu", "tok/s/user", "TTFT p50 s", "TPOT p50 s",
            "step p50 max s", "wall s")
    lines = [" | ".join(f"{h:>14}" for h in head)]
    for p in points:
        m = p["metrics"]
        cells = [p["concurrency"] or "all", m["num_requests"], m["output_tps"], m["output_tps_per_gpu"],
                 m["tps_per_user_median"], m["ttft_median_s"], m["tpot_median_s"],
                 m.get("step_time_median_max_over_ranks_s"), m["wall_s"]]
        lines.append(" | ".join(f"{c:>14.4g}" if isinstance(c, float) else f"{str(c):>14}" for c in cells))
    return "\n".join(lines)


def _device_kind(f, devices) -> str:
    if f.device_kind:
        return f.device_kind
    d = devices[0]
    if d.platform == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", d.device_kind.lower()).strip("-") + f"-x{len(devices)}"


def write_record(out_dir: str, record: dict, tag: str) -> str:
    """`e2e-<YYYYMMDD>-<device_kind>-<tag>.json` under out_dir (schema: results-schema.md)."""
    os.makedirs(out_dir, exist_ok=True)
    name = f"{record['part']}-{record['date'].replace('-', '')}-{record['device_kind']}-{tag}.json"
    path = os.path.join(out_dir, name)
    with open(path, "w") as fh:
        json.dump(record, fh, indent=1, default=float)
    return path


def launch(f, argv: list[str]) -> dict:
    """Runs the configured sweep; returns the results record (with `path`, where it was written)."""
    setup = validate(f)
    t0 = time.perf_counter()
    engines = build_engines(f, setup)
    build_s = time.perf_counter() - t0
    n = len(setup.devices)
    spec: CacheSpec = engines.runners[0].spec
    print(f"{setup.strategy} | {setup.model_name} | {n} x {setup.devices[0].platform} | "
          f"{len(setup.requests)} requests | slots/rank {spec.num_slots} x {spec.max_len} tokens | "
          f"KV cache {spec.total_bytes / 2**20:.2f} MiB/device ({spec.bytes_per_token} B/token) | "
          f"weights {engines.weights_bytes_per_device / 2**20:.1f} MiB/device", flush=True)

    points = []
    for c in setup.concurrency:
        warm_s = _warmup(f, engines, setup, c) if f.warmup != "none" else 0.0
        finished, steps, wall = serve(engines, setup.requests, c, setup.strategy, n, f"c={c or 'all'}", f.progress)
        short = [x.request_id for x in finished if x.finish_reason == "length" and
                 x.num_output_tokens != x.max_new_tokens]
        if len(finished) != len(setup.requests) or short:
            raise RuntimeError(f"{len(finished)}/{len(setup.requests)} requests finished; short: {short[:4]}")
        run = metrics_lib.summarize_run(finished, wall, num_gpus=n)
        out = metrics_lib.to_json(run, metrics_lib.step_time_stats(steps))
        points.append(dict(concurrency=c, warmup_s=warm_s, metrics=out["metrics"], ranks=out["rows"],
                           finished=finished))

    best = max(points, key=lambda p: p["metrics"]["output_tps_per_gpu"] or 0.0)
    print()
    print(_summary_table(points))
    print(f"\nfirst generated tokens (c={best['concurrency'] or 'all'}):")
    for x in sorted(best["finished"], key=lambda x: x.request_id)[: f.show_requests]:
        print(f"  {x.request_id} rank {x.rank}: prompt {x.prompt_len} -> {x.num_output_tokens} tokens "
              f"{list(x.output_tokens[:8])}{' ...' if x.num_output_tokens > 8 else ''}")

    metrics = dict(best["metrics"], concurrency=best["concurrency"], kv_cache_bytes_per_gpu=spec.total_bytes,
                   kv_bytes_per_token=spec.bytes_per_token, weights_bytes_per_gpu=engines.weights_bytes_per_device,
                   build_s=build_s, warmup_s=best["warmup_s"])
    rows = [dict(concurrency=p["concurrency"], warmup_s=p["warmup_s"], **p["metrics"], ranks=p["ranks"],
                 outputs={x.request_id: list(x.output_tokens) for x in p["finished"][: f.show_requests]})
            for p in points]
    config = dict(
        model=setup.model_name, checkpoint=f.checkpoint, strategy=setup.strategy, num_devices=n,
        group_size=setup.group_size if setup.strategy == "dwdp" else None, fetch=f.fetch,
        expert_backend=f.expert_backend, prefetch_depth=f.prefetch_depth, dtype=setup.dtype.name, workload=f.workload,
        num_requests=len(setup.requests), input_len=f.input_len, output_len=f.output_len,
        concurrency=list(setup.concurrency), max_batch_size=setup.sched.max_batch_size,
        token_budget=setup.sched.token_budget, max_seq_len=setup.sched.max_seq_len, temperature=f.temperature,
        seed=f.seed, warmup=f.warmup, buckets=dataclasses.asdict(setup.buckets), **engines.notes,
    )
    today = datetime.date.today()
    record = dict(part="e2e", date=today.isoformat(), commit=git_commit(),
                  command=" ".join(["python -m experiments.launch"] + list(argv[1:])),
                  device_kind=_device_kind(f, setup.devices), num_devices=n, jax_version=jax.__version__,
                  config=config, metrics=metrics, rows=rows)
    tag = f.tag or f"{setup.strategy}-{setup.model_name}-g{n}"
    record["path"] = write_record(f.out, record, tag)
    print(f"wrote {record['path']}")
    return record


def run_main(argv: list[str]) -> dict:
    """Parses `argv` (argv[0] is the program name) into fresh flags and runs; for tests and notebooks."""
    define_flags()
    FLAGS.unparse_flags()
    FLAGS(argv)
    return launch(FLAGS, argv)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    launch(FLAGS, sys.argv)


def run():
    """Console script `dwdp-launch`."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
