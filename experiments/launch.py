"""Serve a workload end to end and record it: colocated (one strategy on every device) or disaggregated.

Colocated (`--mode=colocated`, the default): single device, DWDP, replicated DP or DEP (`--strategy`). One
engine per rank (its own `Scheduler`, slot cache and host thread; DEP: one lockstep engine whose SPMD program
spans its devices, each device with its own slot group), prefill and decode mixed in every step.

Disaggregated (`--mode=disagg`, `dwdp_jax.engine.disagg`): the first `--context_devices` devices are context
servers (`--context_strategy`, `--context_group_size`) that prefill prompts in steps of up to
`--context_token_budget` tokens; the rest are generation servers (`--generation_strategy`,
`--generation_group_size`) that decode; each finished prefill's MLA cache is copied from its context device to
a generation device (`--kv_transfer`). `--context_devices`, `--context_strategy` and `--context_token_budget`
take lists: every combination is one sweep point (a DWDP vs DEP context comparison at equal points gives
`dwdp_over_dep_tps_per_gpu`).

Per run: a model (a preset with random weights, or an HF checkpoint), a warm-up, then one timed pass per sweep
point and `--concurrency` value with a progress bar, a summary table, and one results JSON (part `e2e`,
`../shared/results-schema.md`) under `--out`. Its `rows` hold one `kind: "point"` row per timed pass (metrics,
per-rank step statistics, and `timeline`: every step on every device, as columns), then `kind: "role"` rows
(disaggregated: context, handoff, generation) and `kind: "request"` rows (per-request latencies).

Demos (tiny random model, simulated CPU devices, well under a minute each; one line each):

  XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m experiments.launch --preset=tiny
      --strategy=dwdp --num_devices=2 --num_requests=8 --input_len=32 --output_len=16
  XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m experiments.launch --preset=tiny --mode=disagg
      --num_devices=4 --context_devices=2 --context_strategy=dwdp --generation_strategy=dep --num_requests=8

Concurrency is the number of requests in flight over all GPUs (colocated: split evenly over the data-parallel
ranks); 0 queues every request at the start (offline batch).
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import math
import os
import re
import shlex
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
from dwdp_jax.engine import disagg as disagg_lib  # noqa: E402
from dwdp_jax.engine import metrics as metrics_lib  # noqa: E402
from dwdp_jax.engine import timeline  # noqa: E402
from dwdp_jax.engine import workload as workload_lib  # noqa: E402
from dwdp_jax.engine.paged_cache import PagedCacheSpec  # noqa: E402
from dwdp_jax.engine.kv_transfer import make_transport  # noqa: E402
from dwdp_jax.engine.runner import (Buckets, DepRunner, DwdpRankRunner, LockstepScheduler,  # noqa: E402
                                    ModelRunner)
from dwdp_jax.engine.sampling import SamplingParams  # noqa: E402
from dwdp_jax.engine.scheduler import Scheduler, SchedulerConfig, run_engine, wall_clock  # noqa: E402
from dwdp_jax.experts import LocalExecutor  # noqa: E402
from dwdp_jax.model import init_model  # noqa: E402
from dwdp_jax.parallel.dep import DepModel  # noqa: E402
from dwdp_jax.parallel.dwdp import DwdpConfig, DwdpGroup, memory_per_device, replicated_placement  # noqa: E402
from dwdp_jax.parallel.fetch import fetch_backend  # noqa: E402
from dwdp_jax.parallel.threads import run_in_threads  # noqa: E402
from dwdp_jax.planner import skew as skew_lib  # noqa: E402
from dwdp_jax.planner.placement import Placement  # noqa: E402
from dwdp_jax.planner.policies import FetchPolicy  # noqa: E402
from experiments.results_io import git_commit  # noqa: E402

STRATEGIES = list(disagg_lib.STRATEGIES)
MODES = ["colocated", "disagg"]
# A preset whose whole model is at most this large is built once and split (every strategy then serves the
# same weights); larger presets get random weights built directly on each rank.
FULL_MODEL_MAX_BYTES = 4e9
# The keys of a results file, in order (../shared/results-schema.md).
RECORD_KEYS = ("part", "date", "commit", "command", "device_kind", "num_devices", "jax_version", "config", "metrics",
               "rows")

FLAGS = flags.FLAGS

# (define function, name, default, help, extra keyword arguments). Defined on absl's global FLAGS by
# `define_flags`, at run time (not import time), so that importing this module defines nothing. A new flag is
# one row here plus its use where the engines are built (`_dwdp_groups` for every DWDP group of both modes).
_FLAGS = [
    # model
    (flags.DEFINE_string, "preset", "tiny", "model preset with random weights: tiny, r1-layers-N, deepseek-r1", {}),
    (flags.DEFINE_string, "checkpoint", None, "HF DeepSeek-V3/R1 directory (overrides --preset)", {}),
    (flags.DEFINE_enum, "dtype", None, "activation / unquantized weight dtype (default: float32 on CPU, whose XLA "
     "backend lacks bf16 x bf16 -> f32 batched dots; bfloat16 elsewhere)", dict(enum_values=["bfloat16", "float32"])),
    # what serves: colocated
    (flags.DEFINE_enum, "mode", "colocated", "colocated: one --strategy on every device; disagg: context and "
     "generation servers (--context_*, --generation_*)", dict(enum_values=MODES)),
    (flags.DEFINE_enum, "strategy", "dwdp", "colocated: single device, DWDP, replicated data parallel, or DEP",
     dict(enum_values=STRATEGIES)),
    (flags.DEFINE_integer, "num_devices", 0, "devices to use (0: 1 for single, every visible device otherwise)", {}),
    (flags.DEFINE_integer, "group_size", None, "colocated DWDP group size (default: num_devices); num_devices / "
     "group_size groups", {}),
    # what serves: disaggregated
    (flags.DEFINE_list, "context_devices", [], "disagg: devices of the context servers, one sweep point each "
     "(default: half of --num_devices); the generation servers get the rest", {}),
    (flags.DEFINE_list, "context_strategy", ["dwdp"], "disagg: context servers' strategy, one sweep point each "
     f"({', '.join(STRATEGIES)})", {}),
    (flags.DEFINE_integer, "context_group_size", 0, "disagg: DWDP/DEP group size of the context servers (0: all "
     "context devices)", {}),
    (flags.DEFINE_enum, "generation_strategy", "dep", "disagg: generation servers' strategy",
     dict(enum_values=STRATEGIES)),
    (flags.DEFINE_integer, "generation_group_size", 0, "disagg: DWDP/DEP group size of the generation servers (0: "
     "all generation devices)", {}),
    (flags.DEFINE_list, "context_token_budget", ["0"], "disagg: prefill tokens per context step per device, one "
     "sweep point each (0: --token_budget's default)", {}),
    (flags.DEFINE_integer, "context_max_batch_size", 0, "disagg: cache slots per context device (prompts being "
     "prefilled or waiting for their hand-off; 0: --max_batch_size)", {}),
    (flags.DEFINE_enum, "kv_transfer", "device_put", "disagg: how a prefilled cache moves to a generation device",
     dict(enum_values=["device_put", "copy_engine"])),
    (flags.DEFINE_bool, "verify_handoff", False, "disagg: compare every hand-off's arrived cache rows with the "
     "source's, bit for bit (two device-to-host copies per request, off the serving threads)", {}),
    # DWDP
    (flags.DEFINE_enum, "fetch", "device_put", "DWDP fetch backend: device_put, copy_engine (cudaMemcpyPeerAsync, "
     "host-ordered), copy_engine_stream (the same copies ordered on the device, no host wait) or pallas_pull (the "
     "Pallas remote-DMA kernel reading peer memory in place, on the compute stream: not overlapped)",
     dict(enum_values=["device_put", "copy_engine", "copy_engine_stream", "pallas_pull"])),
    (flags.DEFINE_enum, "expert_backend", "jnp", "expert GEMMs: ragged_dot or Mosaic GPU kernels",
     dict(enum_values=["jnp", "pallas"])),
    (flags.DEFINE_enum, "attention", "auto", "MLA over the paged cache: the Pallas kernels, the einsum "
     "reference, or auto (Pallas on a GPU with a bf16 cache)", dict(enum_values=["auto", "pallas", "einsum"])),
    (flags.DEFINE_integer, "kv_pages", 0, "pages of 64 tokens in each rank's cache pool (0: every slot at "
     "max_seq_len); requests are admitted while the pool can hold their prompt + output", {}),
    (flags.DEFINE_integer, "prefetch_depth", 1, "DWDP: MoE layers fetched ahead (0: fetch each layer right before "
     "it runs: the no-prefetch ablation)", {}),
    (flags.DEFINE_bool, "staggered", True, "DWDP: rank-rotated source order (False: every rank reads peers 0, 1, "
     "...: the no-staggering ablation)", {}),
    (flags.DEFINE_bool, "merge_copy", False, "DWDP: copy local and fetched experts into one buffer before the "
     "grouped GEMM (the no-split-weight-management ablation)", {}),
    (flags.DEFINE_enum, "planner_policy", "none", "DWDP prefetch: none (whole peer buffers, no host sync), or a "
     "planner policy (per-layer expert choice from router statistics; misses fetched on demand)",
     dict(enum_values=["none", "fetch_all", "top_k", "coverage"])),
    (flags.DEFINE_integer, "planner_top_k", 0, "top_k policy: minimum remote experts per layer", {}),
    (flags.DEFINE_float, "planner_coverage", 0.9, "coverage policy: target share of the expected needed remote "
     "experts", {}),
    (flags.DEFINE_integer, "staging_budget", 0, "planner policies: most experts prefetched per layer (0: no cap)",
     {}),
    (flags.DEFINE_string, "placement", None, "DWDP expert placement JSON (`Placement.save`, e.g. from `python -m "
     "dwdp_jax.planner.summarize TRACES --placement_out=FILE`; default: the contiguous split; shared with "
     "dwdp-convert)", {}),
    (flags.DEFINE_string, "save_router_trace", "", "DWDP: directory for each rank's router statistics after the "
     "run (`router-rank<r>.npz`; `python -m dwdp_jax.planner.summarize` summarizes them or optimizes a placement)",
     {}),
    (flags.DEFINE_float, "routing_skew", 0.0, "random weights: Zipf exponent of the expert load the routers are "
     "calibrated to (planner.skew; 0: the random init's near-uniform load)", {}),
    # workload
    (flags.DEFINE_string, "workload", "fixed", "fixed (--input_len/--output_len), fixed-<I>-<O> (e.g. fixed-8k-1k), "
     "lognormal (medians --input_len/--output_len), or a JSONL trace path", {}),
    (flags.DEFINE_integer, "num_requests", 8, "requests to generate (a trace: the first N when given)", {}),
    (flags.DEFINE_integer, "input_len", 32, "prompt tokens (median for lognormal)", {}),
    (flags.DEFINE_integer, "output_len", 16, "output tokens (median for lognormal)", {}),
    (flags.DEFINE_float, "lognormal_sigma", 0.5, "sigma of the lognormal lengths", {}),
    (flags.DEFINE_list, "concurrency", ["0"], "requests in flight over all GPUs, one timed pass each (0: all "
     "queued at the start)", {}),
    # scheduling and sampling
    (flags.DEFINE_integer, "max_batch_size", 8, "cache slots (requests in flight) per rank; disagg: per "
     "generation device", {}),
    (flags.DEFINE_integer, "token_budget", 0, "tokens per step per rank (0: max(max_batch_size, 2048))", {}),
    (flags.DEFINE_integer, "max_seq_len", 0, "tokens per cache slot (0: the longest request's prompt + output)", {}),
    (flags.DEFINE_float, "temperature", 0.0, "sampling temperature (0: greedy)", {}),
    (flags.DEFINE_integer, "seed", 0, "seed of the weights, the workload and sampling", {}),
    # the run and its record
    (flags.DEFINE_enum, "warmup", "run", "before each timed pass: run the same pass untimed (exactly its "
     "programs), compile every bucket, or nothing", dict(enum_values=["run", "buckets", "none"])),
    (flags.DEFINE_integer, "show_requests", 8, "requests whose first generated tokens are printed and recorded", {}),
    (flags.DEFINE_bool, "progress", True, "show a progress bar", {}),
    (flags.DEFINE_string, "device_kind", "", "the device tool's kind for the results file (default: cpu, or the "
     "platform's device kind)", {}),
    (flags.DEFINE_string, "out", "experiments/results", "results directory", {}),
    (flags.DEFINE_string, "tag", "", "file-name tag (default: <strategy>-<model>-g<devices>, or "
     "disagg-<context strategies>-<generation strategy>-<model>-g<devices>)", {}),
]
_DISAGG_ONLY = ("context_devices", "context_strategy", "context_group_size", "generation_strategy",
                "generation_group_size", "context_token_budget", "context_max_batch_size", "kv_transfer",
                "verify_handoff")
_COLOCATED_ONLY = ("strategy", "group_size", "save_router_trace")
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
class DisaggSetup:
    """Validated disaggregated-mode flags. roles: (context, generation) `RoleSpec`s, one per (context strategy,
    context devices) sweep point; context: the context scheduler per budget point (same slots and lengths)."""

    roles: tuple[tuple[disagg_lib.RoleSpec, disagg_lib.RoleSpec], ...]
    context: tuple[SchedulerConfig, ...]
    context_buckets: Buckets
    kv_transfer: str


@dataclasses.dataclass(frozen=True)
class Setup:
    """Validated flags. Colocated: `strategy`, `group_size`, `sched` and `buckets` serve every device.
    Disaggregated (`disagg` set): `sched` and `buckets` are the generation servers'."""

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
    disagg: DisaggSetup | None = None
    skew: object = None  # planner.skew.SkewSpec for random weights with --routing_skew

    @property
    def mode(self) -> str:
        return "colocated" if self.disagg is None else "disagg"


def _usage(msg: str):
    raise app.UsageError(msg)


def _parse_len(text: str) -> int:
    return int(text[:-1]) * 1024 if text.lower().endswith("k") else int(text)


def _ints(f, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in f[name].value)
    except ValueError:
        _usage(f"--{name} must be integers, got {','.join(f[name].value)}")


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


def _model_config(f):
    if f.checkpoint:
        if not os.path.isdir(f.checkpoint):
            _usage(f"--checkpoint={f.checkpoint}: not a directory")
        return config_lib.from_hf_json(f.checkpoint), os.path.basename(os.path.normpath(f.checkpoint))
    try:
        return config_lib.preset(f.preset), f.preset
    except config_lib.ConfigError as e:
        _usage(f"--preset: {e}")


def _check_mode_flags(f) -> None:
    """Flags of the other mode, given explicitly, are a mistake worth naming."""
    wrong = _COLOCATED_ONLY if f.mode == "disagg" else _DISAGG_ONLY
    given = [name for name in wrong if f[name].present]
    if given:
        other = "colocated" if f.mode == "disagg" else "disagg"
        _usage(f"--{given[0]} is a --mode={other} flag; this run has --mode={f.mode}")


def validate(f) -> Setup:
    """Checks the flags against each other and the visible devices; raises `app.UsageError` saying why."""
    _check_mode_flags(f)
    cfg, model_name = _model_config(f)
    visible = jax.devices()
    platform = visible[0].platform
    disagg = f.mode == "disagg"
    n = f.num_devices or (1 if f.strategy == "single" and not disagg else len(visible))
    if n > len(visible):
        hint = (" (on CPU, simulate more with XLA_FLAGS=--xla_force_host_platform_device_count=N)"
                if platform == "cpu" else "")
        _usage(f"--num_devices={n} but only {len(visible)} {platform} devices are visible{hint}")
    if n < 1:
        _usage(f"--num_devices must be >= 1, got {n}")
    g = f.group_size or n
    if not disagg:
        if f.strategy == "single" and n != 1:
            _usage(f"--strategy=single runs on one device, got --num_devices={n}")
        if f.strategy == "dwdp":
            if n % g:
                _usage(f"--group_size={g} must divide --num_devices={n}")
            if cfg.n_routed_experts % g:
                _usage(f"--group_size={g} must divide the {cfg.n_routed_experts} routed experts")
        if f.strategy == "dep" and cfg.n_routed_experts % n:
            _usage(f"DEP needs --num_devices={n} to divide the {cfg.n_routed_experts} routed experts")
    if f.expert_backend == "pallas" and platform != "gpu":
        _usage(f"--expert_backend=pallas needs GPUs (Mosaic GPU kernels); this run sees {platform} devices")
    if f.fetch in ("copy_engine", "copy_engine_stream") and platform != "gpu":
        _usage(f"--fetch={f.fetch} needs GPUs (cudaMemcpyPeerAsync through CuPy)")
    if f.prefetch_depth < 0:
        _usage(f"--prefetch_depth must be >= 0, got {f.prefetch_depth}")
    if f.staging_budget < 0 or (f.staging_budget and f.planner_policy == "none"):
        _usage(f"--staging_budget={f.staging_budget} needs a --planner_policy and must be >= 0")
    if f.planner_top_k < 0 or not 0.0 < f.planner_coverage <= 1.0:
        _usage(f"--planner_top_k must be >= 0 and --planner_coverage in (0, 1], got {f.planner_top_k}, "
               f"{f.planner_coverage}")
    if f.placement and not os.path.isfile(f.placement):
        _usage(f"--placement must be a placement JSON file; {f.placement!r} does not exist")
    if f.routing_skew < 0 or (f.routing_skew and f.checkpoint):
        _usage(f"--routing_skew={f.routing_skew} must be >= 0 and applies to random weights only (no --checkpoint)")
    if f.max_batch_size < 1:
        _usage(f"--max_batch_size must be >= 1, got {f.max_batch_size}")
    concurrency = _ints(f, "concurrency")
    ranks = 1 if disagg or f.strategy == "single" else n
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
    dtype = jnp.dtype(f.dtype or ("float32" if platform == "cpu" else "bfloat16"))
    if disagg:
        # generation steps are decode only: one row per slot, length 1
        buckets = Buckets.default(f.max_batch_size, 1, min_len=1)
        setup_disagg = _validate_disagg(f, cfg, n, platform, requests)
    else:
        if f.strategy == "dep" and f.expert_backend == "jnp" and platform == "gpu":
            warnings.warn("DEP with --expert_backend=jnp: the expert GEMMs are XLA ragged_dot, slower than the "
                          "Pallas kernels DWDP can use; compare both strategies with the same backend")
        buckets = Buckets.default(f.max_batch_size, min(budget, max_seq_len))
        setup_disagg = None
    skew = None
    if f.routing_skew > 0:  # calibrated on unit-spread logits; each built model's routers are rescaled to match
        skew = skew_lib.make_skew(cfg, exponent=f.routing_skew, num_tokens=4096, iters=100, seed=f.seed)
    return Setup(cfg, model_name, "disagg" if disagg else f.strategy, tuple(visible[:n]), g, dtype,
                 tuple(requests), concurrency, sched, buckets, setup_disagg, skew)


def _validate_disagg(f, cfg, n: int, platform: str, requests) -> DisaggSetup:
    if n < 2:
        _usage(f"--mode=disagg needs at least 2 devices (context and generation), got --num_devices={n}")
    context_devices = _ints(f, "context_devices") or (n // 2,)
    for c in context_devices:
        if not 1 <= c < n:
            _usage(f"--context_devices={c} must leave both roles at least one of the --num_devices={n} devices")
    strategies = tuple(f.context_strategy)
    for s in strategies:
        if s not in STRATEGIES:
            _usage(f"--context_strategy={s!r}: use one of {', '.join(STRATEGIES)}")
    if len(set(strategies)) != len(strategies) or len(set(context_devices)) != len(context_devices):
        _usage("--context_strategy and --context_devices must not repeat a value")
    roles = []
    for s, c in itertools.product(strategies, context_devices):
        try:
            ctx = disagg_lib.RoleSpec(s, c, f.context_group_size, name="context")
            gen = disagg_lib.RoleSpec(f.generation_strategy, n - c, f.generation_group_size, name="generation")
            ctx.check_experts(cfg.n_routed_experts)
            gen.check_experts(cfg.n_routed_experts)
        except ValueError as e:
            where = f" (at --context_devices={c} of --num_devices={n})" if len(context_devices) > 1 else ""
            _usage(f"--{e}{where}")
        roles.append((ctx, gen))
    if f.kv_transfer == "copy_engine" and platform != "gpu":
        _usage("--kv_transfer=copy_engine needs GPUs (cudaMemcpyPeerAsync through CuPy)")
    slots = f.context_max_batch_size or f.max_batch_size
    if slots < 1:
        _usage(f"--context_max_batch_size must be >= 1, got {slots}")
    prompt_len = max(r.prompt_len for r in requests) + 1  # the scheduler counts the first token too
    budgets = tuple(b or max(slots, f.token_budget or 2048) for b in _ints(f, "context_token_budget"))
    for b in budgets:
        if b < slots:
            _usage(f"--context_token_budget={b} must be >= the context slots per device ({slots}: "
                   "--context_max_batch_size, default --max_batch_size)")
    if len(set(budgets)) != len(budgets):
        _usage("--context_token_budget must not repeat a value")
    context = tuple(SchedulerConfig(slots, prompt_len, b, vocab_size=cfg.vocab_size) for b in budgets)
    # built for the largest budget; a smaller budget's steps use the smaller length buckets
    buckets = Buckets.default(slots, min(max(budgets), prompt_len))
    return DisaggSetup(tuple(roles), context, buckets, f.kv_transfer)


# ---------------------------------------------------------------------------------------------------------------
# Models and engines


def _full_model_fits(cfg, dtype) -> bool:
    weight_bytes = 1.0 if cfg.weight_block_size else jnp.dtype(dtype).itemsize
    return memory_per_device(cfg, 1, 0, weight_bytes)["total_bytes"] <= FULL_MODEL_MAX_BYTES


def _build_model(f, cfg, dtype, device, expert_ids=None, skew=None):
    """The model on `device`; with `expert_ids(layer)`, only those routed experts (a rank's shard); random
    weights get the routing skew `skew` (each router rescaled to unit logit spread, biases calibrated)."""
    if f.checkpoint:
        from dwdp_jax import load_model

        return load_model(f.checkpoint, dtype=dtype, with_mtp=False, expert_ids=expert_ids,
                          n_local_experts=None if expert_ids is None else len(expert_ids(cfg.first_k_dense_replace)),
                          device=device)
    with jax.default_device(device):
        n_local = None if expert_ids is None else len(expert_ids(cfg.first_k_dense_replace))
        model = init_model(cfg.replace(num_mtp_layers=0), seed=f.seed, dtype=dtype, n_local_experts=n_local)
        if skew is not None:
            skew_lib.apply_skew(model, skew, logit_std=1.0)
        return model


def _shared_model(f, setup: Setup, single_needed: bool = False):
    """The whole model on the first device when it is small (every engine is then built from the same weights),
    or when a single-device engine needs it; None otherwise (engines build their ranks' shards)."""
    full = f.checkpoint is None and _full_model_fits(setup.cfg, setup.dtype)
    return _build_model(f, setup.cfg, setup.dtype, setup.devices[0], skew=setup.skew) if full or single_needed else None


def _rank_models(f, setup, devices, placement):
    """One model per device holding the placement's experts (random presets: the same seed on every rank)."""
    cfg = setup.cfg

    def expert_ids(rank):
        first = cfg.first_k_dense_replace
        return lambda layer: (placement.local_experts(layer - first, rank)
                              if first <= layer < cfg.num_layers else None)

    return [_build_model(f, cfg, setup.dtype, d, expert_ids(r), setup.skew) for r, d in enumerate(devices)]


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


def _placement(f, cfg, group_size: int) -> Placement:
    """--placement: a placement file checked against the model and the group, or the contiguous split."""
    if not f.placement:
        return Placement.from_config(cfg, group_size)
    placement = Placement.load(f.placement)
    if placement.num_ranks != group_size or placement.num_layers != cfg.num_moe_layers \
            or placement.num_experts != cfg.n_routed_experts:
        _usage(f"--placement={f.placement} is for {placement.num_ranks} ranks x {placement.num_layers} MoE layers x "
               f"{placement.num_experts} experts; this run has DWDP groups of {group_size}, {cfg.num_moe_layers} MoE "
               f"layers and {cfg.n_routed_experts} experts")
    return placement


def _dwdp_groups(f, setup: Setup, model, devices: list, group_size: int, replicated: bool) -> list[DwdpGroup]:
    """DWDP groups of `group_size` over `devices` (replicated: DP ranks, every expert local, nothing fetched).
    The one place a DWDP group is configured, for both modes."""
    cfg = setup.cfg
    fetch = fetch_backend(f.fetch)
    groups = []
    for i in range(0, len(devices), group_size):
        group_devices = devices[i : i + group_size]
        if replicated:
            placement, dwdp = replicated_placement(cfg, group_size), DwdpConfig(group_size, 0, expert_backend=f.expert_backend)
        else:
            placement = _placement(f, cfg, group_size)
            policy = (None if f.planner_policy == "none" else
                      FetchPolicy(f.planner_policy, k=f.planner_top_k, coverage=f.planner_coverage,
                                  experts_per_token=cfg.num_experts_per_tok))
            dwdp = DwdpConfig(group_size, f.prefetch_depth, staggered=f.staggered, expert_backend=f.expert_backend,
                              policy=policy, staging_budget_experts=f.staging_budget or None,
                              merge_copy=f.merge_copy)
        if model is not None:
            groups.append(DwdpGroup(model, group_devices, placement, dwdp, fetch))
        else:
            groups.append(DwdpGroup.from_rank_models(_rank_models(f, setup, group_devices, placement), placement,
                                                     dwdp, fetch))
    return groups


def build_runners(f, setup: Setup, model, strategy: str, devices: list, group_size: int, sched: SchedulerConfig,
                  buckets: Buckets, seed: int) -> Engines:
    """Runners of one strategy over `devices`: one per device (dwdp: groups of `group_size`; dp), one per DEP
    group of `group_size` devices, or one single-device runner. `make_schedulers` gives colocated schedulers."""
    cfg = setup.cfg
    kw = dict(buckets=buckets, sampling=SamplingParams(temperature=f.temperature),
              attention=None if f.attention == "auto" else f.attention, num_pages=f.kv_pages or None)
    slots, max_len = sched.max_batch_size, sched.max_seq_len
    notes = dict(weights="random" if f.checkpoint is None else "checkpoint",
                 weights_built="whole model, split per rank" if model is not None else "per rank")

    if strategy == "single":
        if model is None:
            model = _build_model(f, cfg, setup.dtype, devices[0], skew=setup.skew)
        runner = ModelRunner(model, slots, max_len, device=devices[0],
                             executor=LocalExecutor(backend=f.expert_backend), seed=seed, **kw)
        return Engines([runner], lambda: [Scheduler(sched, page_table=runner.page_table)],
                       _bytes_on(runner.state, devices[0]), notes)

    if strategy == "dep":
        runners = []
        for i in range(0, len(devices), group_size):
            group = devices[i : i + group_size]
            if model is not None:
                dep = DepModel(model, group, backend=f.expert_backend)
            else:
                dep = DepModel.from_rank_models(
                    _rank_models(f, setup, group, Placement.from_config(cfg, len(group))), backend=f.expert_backend)
            runners.append(DepRunner(dep, slots, max_len, backend=f.expert_backend, seed=seed + i, **kw))
        make = lambda: [LockstepScheduler([Scheduler(sched, rank=r, page_table=r_.page_tables[r])
                                           for r in range(len(r_.group_devices))]) for r_ in runners]
        return Engines(runners, make, _bytes_on(runners[0].state, devices[0]), notes)

    # dwdp and dp: one rank per device, each with its own runner, scheduler and host thread
    g = group_size if strategy == "dwdp" else len(devices)
    groups = _dwdp_groups(f, setup, model, devices, g, replicated=strategy == "dp")
    ranks = [rank for group in groups for rank in group.ranks]
    runners = [DwdpRankRunner(rank, slots, max_len, seed=seed + r, **kw) for r, rank in enumerate(ranks)]
    rank0 = ranks[0]
    weights = _bytes_on([rank0.head_state] + [state for _, state in rank0.layers], rank0.device)
    notes["staging_bytes_per_device_est"] = memory_per_device(
        cfg, g, f.prefetch_depth, 1.0 if cfg.weight_block_size else setup.dtype.itemsize)["staging_bytes"] \
        if strategy == "dwdp" else 0
    make = lambda: [Scheduler(sched, rank=r, page_table=runners[r].page_table) for r in range(len(runners))]
    return Engines(runners, make, weights, notes)


def build_engines(f, setup: Setup) -> Engines:
    """The colocated engines of `setup.strategy` over every device."""
    model = _shared_model(f, setup, single_needed=setup.strategy == "single")
    g = setup.group_size if setup.strategy == "dwdp" else len(setup.devices)
    return build_runners(f, setup, model, setup.strategy, list(setup.devices), g, setup.sched, setup.buckets, f.seed)


def build_disagg(f, setup: Setup, model, roles) -> tuple[Engines, Engines]:
    """Context and generation runners of one (context, generation) `RoleSpec` pair."""
    ctx, gen = roles
    ctx_devices, gen_devices = disagg_lib.split_devices(setup.devices, ctx, gen)
    context = build_runners(f, setup, model, ctx.strategy, ctx_devices, ctx.group, setup.disagg.context[-1],
                            setup.disagg.context_buckets, f.seed)
    generation = build_runners(f, setup, model, gen.strategy, gen_devices, gen.group, setup.sched, setup.buckets,
                               f.seed + 1000)
    return context, generation


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
    """Each request pinned to its round-robin device, in the original order (a closed loop admits requests in
    this order: grouping them by device would give the first `concurrency` requests all to device 0)."""
    rank_of = {r.request_id: rank for rank, reqs in enumerate(workload_lib.split_by_rank(requests, num_devices))
               for r in reqs}
    return [dataclasses.replace(r, rank=rank_of[r.request_id]) for r in requests]


def serve(engines: Engines, requests, concurrency: int, strategy: str, num_devices: int, desc: str,
          progress: bool):
    """One colocated pass over `requests`. Returns (finished requests, step events, wall seconds)."""
    if strategy == "dep":
        requests = _pin(requests, num_devices)
    schedulers = engines.make_schedulers()
    per_engine, conc = _split_requests(requests, len(engines.runners), concurrency, strategy)
    bar = tqdm(total=sum(r.max_new_tokens for r in requests), desc=desc, unit="tok", disable=not progress,
               leave=False)
    clock = wall_clock()
    events: list[timeline.StepEvent] = []

    def engine(i):
        runner = engines.runners[i]
        step_fn = timeline.timed_step_fn(runner.step_fn, strategy, i, runner.group_devices, clock, events,
                                         timeline.fetch_wait_counter(runner))

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
    return finished, events, wall


def serve_disagg(engine: disagg_lib.DisaggEngine, requests, concurrency: int, desc: str,
                 progress: bool) -> disagg_lib.DisaggRun:
    """One disaggregated pass (the progress bar counts the output tokens of finished requests)."""
    bar = tqdm(total=sum(r.max_new_tokens for r in requests), desc=desc, unit="tok", disable=not progress,
               leave=False)
    run = engine.serve(requests, concurrency=concurrency or None, on_finish=lambda r: bar.update(r.num_output_tokens))
    bar.close()
    if run.rejected:
        raise RuntimeError(f"{len(run.rejected)} requests were rejected, e.g. {run.rejected[0]}")
    return run


def _warmup(f, engines: Engines, setup: Setup, concurrency: int) -> float:
    t0 = time.perf_counter()
    if f.warmup == "run":
        serve(engines, setup.requests, concurrency, setup.strategy, len(setup.devices), "warm-up", f.progress)
    elif f.warmup == "buckets":
        run_in_threads([lambda r=r: r.warmup() for r in engines.runners])
    return time.perf_counter() - t0


def _check_finished(finished, requests) -> None:
    short = [x.request_id for x in finished if x.finish_reason == "length" and x.num_output_tokens != x.max_new_tokens]
    if len(finished) != len(requests) or short:
        raise RuntimeError(f"{len(finished)}/{len(requests)} requests finished; short: {short[:4]}")


# ---------------------------------------------------------------------------------------------------------------
# Reporting


def _table(head, rows) -> str:
    lines = [" | ".join(f"{h:>14}" for h in head)]
    for cells in rows:
        lines.append(" | ".join(f"{c:>14.4g}" if isinstance(c, float) else f"{str(c):>14}" for c in cells))
    return "\n".join(lines)


def _summary_table(points) -> str:
    head = ("concurrency", "requests", "out tok/s", "tok/s/gpu", "tok/s/user", "TTFT p50 s", "TPOT p50 s",
            "step p50 max s", "wall s")
    return _table(head, [
        [p["concurrency"] or "all", p["metrics"]["num_requests"], p["metrics"]["output_tps"],
         p["metrics"]["output_tps_per_gpu"], p["metrics"]["tps_per_user_median"], p["metrics"]["ttft_median_s"],
         p["metrics"]["tpot_median_s"], p["metrics"].get("step_time_median_max_over_ranks_s"),
         p["metrics"]["wall_s"]] for p in points])


def _disagg_table(points) -> str:
    head = ("context", "ctx:gen gpus", "ctx budget", "concurrency", "tok/s/gpu", "tok/s/user", "TTFT p50 s",
            "TPOT p50 s", "hand-off p50 s", "wall s")
    return _table(head, [
        [p["context_strategy"], f"{p['context_devices']}:{p['generation_devices']}", p["context_token_budget"],
         p["concurrency"] or "all", p["metrics"]["output_tps_per_gpu"], p["metrics"]["tps_per_user_median"],
         p["metrics"]["ttft_median_s"], p["metrics"]["tpot_median_s"], p["metrics"]["handoff_median_s"],
         p["metrics"]["wall_s"]] for p in points])


def _device_kind(f, devices) -> str:
    if f.device_kind:
        return f.device_kind
    d = devices[0]
    if d.platform == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", d.device_kind.lower()).strip("-") + f"-x{len(devices)}"


def _clean(x):
    """JSON-ready: numpy scalars and arrays to Python, non-finite floats to None (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def make_record(f, setup: Setup, argv: list[str], config: dict, metrics: dict, rows: list) -> dict:
    """A results record with exactly the schema's keys, in order."""
    record = dict(part="e2e", date=datetime.date.today().isoformat(), commit=git_commit(),
                  command=shlex.join(["python", "-m", "experiments.launch", *argv[1:]]),
                  device_kind=_device_kind(f, setup.devices), num_devices=len(setup.devices),
                  jax_version=jax.__version__, config=config, metrics=metrics, rows=rows)
    assert tuple(record) == RECORD_KEYS
    return _clean(record)


def write_record(out_dir: str, record: dict, tag: str) -> str:
    """`e2e-<YYYYMMDD>-<device_kind>-<tag>.json` under out_dir (schema: results-schema.md)."""
    os.makedirs(out_dir, exist_ok=True)
    name = f"{record['part']}-{record['date'].replace('-', '')}-{record['device_kind']}-{tag}.json"
    path = os.path.join(out_dir, name)
    with open(path, "w") as fh:
        json.dump({k: record[k] for k in RECORD_KEYS}, fh, indent=1, allow_nan=False)
    return path


def _request_rows(finished, point: int) -> list[dict]:
    lat = metrics_lib.request_latencies(finished)
    return [dict(kind="request", point=point, request_id=x.request_id, rank=x.rank, prompt_len=x.prompt_len,
                 num_output_tokens=x.num_output_tokens, arrival_s=x.arrival_s, admitted_s=x.admitted_s,
                 first_token_s=x.first_token_s, last_token_s=x.last_token_s, ttft_s=lat.ttft_s[i],
                 tpot_s=lat.tpot_s[i], finish_reason=x.finish_reason) for i, x in enumerate(finished)]


def _outputs(finished, show: int) -> dict:
    return {x.request_id: list(x.output_tokens) for x in sorted(finished, key=lambda x: x.request_id)[:show]}


def _base_config(f, setup: Setup) -> dict:
    return dict(
        model=setup.model_name, checkpoint=f.checkpoint, mode=setup.mode, num_devices=len(setup.devices),
        fetch=f.fetch, expert_backend=f.expert_backend, prefetch_depth=f.prefetch_depth, staggered=f.staggered,
        merge_copy=f.merge_copy, planner_policy=f.planner_policy, planner_top_k=f.planner_top_k,
        planner_coverage=f.planner_coverage, staging_budget=f.staging_budget, placement=f.placement or "contiguous",
        routing_skew=f.routing_skew, dtype=setup.dtype.name,
        workload=f.workload, num_requests=len(setup.requests), input_len=f.input_len, output_len=f.output_len,
        concurrency=list(setup.concurrency), max_batch_size=setup.sched.max_batch_size,
        token_budget=setup.sched.token_budget, max_seq_len=setup.sched.max_seq_len, temperature=f.temperature,
        seed=f.seed, warmup=f.warmup, buckets=dataclasses.asdict(setup.buckets),
    )


def _dwdp_ranks(engines: Engines) -> list:
    return [r.rank for r in engines.runners if hasattr(r, "rank")]


def _fetch_metrics(engines: Engines) -> dict:
    """DWDP ranks' fetch counters over one pass (`DwdpRank.counters`), summed over ranks; {} for other strategies."""
    ranks = _dwdp_ranks(engines)
    if not ranks:
        return {}
    c = {k: sum(r.counters[k] for r in ranks) for k in ("prefetched_bytes", "miss_bytes", "miss_experts",
                                                        "routed_remote_experts", "fetch_wait_s")}
    return dict(fetch_prefetched_bytes=c["prefetched_bytes"], fetch_miss_bytes=c["miss_bytes"],
                fetch_miss_rate=c["miss_experts"] / c["routed_remote_experts"] if c["routed_remote_experts"] else None,
                fetch_wait_s=c["fetch_wait_s"])


def launch(f, argv: list[str]) -> dict:
    """Runs the configured sweep; returns the results record (with `path`, where it was written)."""
    setup = validate(f)
    if setup.disagg is not None:
        return launch_disagg(f, setup, argv)
    t0 = time.perf_counter()
    engines = build_engines(f, setup)
    build_s = time.perf_counter() - t0
    n = len(setup.devices)
    spec: PagedCacheSpec = engines.runners[0].spec
    print(f"{setup.strategy} | {setup.model_name} | {n} x {setup.devices[0].platform} | "
          f"{len(setup.requests)} requests | slots/rank {spec.num_slots} x {spec.max_len} tokens | "
          f"KV cache {spec.total_bytes / 2**20:.2f} MiB/device ({spec.bytes_per_token} B/token) | "
          f"weights {engines.weights_bytes_per_device / 2**20:.1f} MiB/device", flush=True)

    points = []
    for c in setup.concurrency:
        warm_s = _warmup(f, engines, setup, c) if f.warmup != "none" else 0.0
        for rank in _dwdp_ranks(engines):
            rank.reset_counters()
        finished, events, wall = serve(engines, setup.requests, c, setup.strategy, n, f"c={c or 'all'}",
                                       f.progress)
        _check_finished(finished, setup.requests)
        run = metrics_lib.summarize_run(finished, wall, num_gpus=n)
        out = metrics_lib.to_json(run, metrics_lib.step_time_stats(timeline.step_records(events)))
        points.append(dict(concurrency=c, warmup_s=warm_s, metrics=dict(out["metrics"], **_fetch_metrics(engines)),
                           ranks=out["rows"], finished=finished, events=events))

    if f.save_router_trace:
        os.makedirs(f.save_router_trace, exist_ok=True)
        for rank in _dwdp_ranks(engines):
            rank.router_stats.save(os.path.join(f.save_router_trace, f"router-rank{rank.rank}.npz"))
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
    rows = [dict(kind="point", point=i, concurrency=p["concurrency"], warmup_s=p["warmup_s"], **p["metrics"],
                 ranks=p["ranks"], outputs=_outputs(p["finished"], f.show_requests),
                 timeline=timeline.columns(p["events"]))
            for i, p in enumerate(points)]
    rows += [row for i, p in enumerate(points) for row in _request_rows(p["finished"], i)]
    config = dict(_base_config(f, setup), strategy=setup.strategy,
                  group_size=setup.group_size if setup.strategy == "dwdp" else None, **engines.notes)
    record = make_record(f, setup, argv, config, metrics, rows)
    tag = f.tag or f"{setup.strategy}-{setup.model_name}-g{n}"
    record["path"] = write_record(f.out, record, tag)
    print(f"wrote {record['path']}")
    return record


# ---------------------------------------------------------------------------------------------------------------
# Disaggregated sweep


def _dwdp_over_dep(points) -> dict:
    """Output TPS/GPU of DWDP context servers over DEP ones at equal (devices, budget, concurrency) points."""
    key = lambda p: (p["context_devices"], p["context_token_budget"], p["concurrency"])
    dep = {key(p): p for p in points if p["context_strategy"] == "dep"}
    pairs = []
    for p in points:
        q = dep.get(key(p))
        if p["context_strategy"] == "dwdp" and q is not None and q["metrics"]["output_tps_per_gpu"]:
            pairs.append(dict(context_devices=p["context_devices"], context_token_budget=p["context_token_budget"],
                              concurrency=p["concurrency"],
                              ratio=p["metrics"]["output_tps_per_gpu"] / q["metrics"]["output_tps_per_gpu"],
                              dwdp_tps_per_user=p["metrics"]["tps_per_user_median"],
                              dep_tps_per_user=q["metrics"]["tps_per_user_median"],
                              dwdp_ttft_median_s=p["metrics"]["ttft_median_s"],
                              dep_ttft_median_s=q["metrics"]["ttft_median_s"]))
    if not pairs:
        return {}
    ratios = [x["ratio"] for x in pairs]
    return dict(dwdp_over_dep_tps_per_gpu=float(np.median(ratios)), dwdp_over_dep_tps_per_gpu_best=max(ratios),
                dwdp_over_dep_points=pairs)


def launch_disagg(f, setup: Setup, argv: list[str]) -> dict:
    """The disaggregated sweep: per (context strategy, context devices) one build; per budget and concurrency
    one warm-up (as --warmup says) and one timed pass."""
    d = setup.disagg
    n = len(setup.devices)
    needs_single = any(r.strategy == "single" for pair in d.roles for r in pair)
    model = _shared_model(f, setup, single_needed=needs_single)
    transport = make_transport(d.kv_transfer)
    points, build_s = [], 0.0
    for roles in d.roles:
        ctx_role, gen_role = roles
        t0 = time.perf_counter()
        context, generation = build_disagg(f, setup, model, roles)
        build_s += time.perf_counter() - t0
        cspec, gspec = context.runners[0].spec, generation.runners[0].spec
        print(f"disagg | {setup.model_name} | context {ctx_role.strategy} x {ctx_role.num_devices} (group "
              f"{ctx_role.group}), generation {gen_role.strategy} x {gen_role.num_devices} (group {gen_role.group})"
              f" | {len(setup.requests)} requests | context slots {cspec.num_slots} x {cspec.max_len}, generation "
              f"slots {gspec.num_slots} x {gspec.max_len} | KV {cspec.bytes_per_token} B/token | kv_transfer "
              f"{transport.name}", flush=True)
        for sched in d.context:
            config = disagg_lib.DisaggConfig(sched, setup.sched)
            engine = disagg_lib.DisaggEngine(context.runners, generation.runners, config, transport,
                                             verify_handoff=f.verify_handoff)
            for c in setup.concurrency:
                desc = f"{ctx_role.strategy} {ctx_role.num_devices}:{gen_role.num_devices} b={sched.token_budget} " \
                       f"c={c or 'all'}"
                t1 = time.perf_counter()
                if f.warmup == "run":
                    serve_disagg(engine, setup.requests, c, "warm-up " + desc, f.progress)
                elif f.warmup == "buckets":
                    run_in_threads([lambda r=r: r.warmup() for r in context.runners + generation.runners])
                warm_s = time.perf_counter() - t1
                run = serve_disagg(engine, setup.requests, c, desc, f.progress)
                _check_finished(run.requests, setup.requests)
                summary = disagg_lib.summarize(run)
                steps = metrics_lib.step_time_stats(timeline.step_records(run.events))
                points.append(dict(
                    context_strategy=ctx_role.strategy, context_devices=ctx_role.num_devices,
                    context_group_size=ctx_role.group, generation_devices=gen_role.num_devices,
                    context_token_budget=sched.token_budget, concurrency=c, warmup_s=warm_s,
                    metrics=summary["metrics"], roles=summary["roles"], requests=summary["requests"],
                    ranks=metrics_lib.to_json(metrics_lib.summarize_run(run.requests, run.wall_s, n), steps)["rows"],
                    outputs=run.outputs(), events=run.events))
        del context, generation, engine  # free this point's devices before the next build

    best = max(points, key=lambda p: p["metrics"]["output_tps_per_gpu"] or 0.0)
    print()
    print(_disagg_table(points))
    print(f"\nfirst generated tokens ({best['context_strategy']} {best['context_devices']}:"
          f"{best['generation_devices']}, budget {best['context_token_budget']}, c={best['concurrency'] or 'all'}):")
    for rid, tokens in sorted(best["outputs"].items())[: f.show_requests]:
        print(f"  {rid}: {tokens[:8]}{' ...' if len(tokens) > 8 else ''}")

    point_keys = ("context_strategy", "context_devices", "context_group_size", "generation_devices",
                  "context_token_budget", "concurrency", "warmup_s")
    metrics = dict(best["metrics"], **{k: best[k] for k in point_keys}, build_s=build_s,
                   kv_bytes_per_token=cspec.bytes_per_token, **_dwdp_over_dep(points))
    rows = [dict(kind="point", point=i, **{k: p[k] for k in point_keys}, **p["metrics"], ranks=p["ranks"],
                 outputs=dict(sorted(p["outputs"].items())[: f.show_requests]), timeline=timeline.columns(p["events"]))
            for i, p in enumerate(points)]
    rows += [dict(kind="role", point=i, **role) for i, p in enumerate(points) for role in p["roles"]]
    rows += [dict(kind="request", point=i, **r) for i, p in enumerate(points) for r in p["requests"]]
    config = dict(_base_config(f, setup), strategy="disagg", context_strategy=list(f.context_strategy),
                  context_devices=sorted({r[0].num_devices for r in d.roles}),
                  context_group_size=f.context_group_size, generation_strategy=f.generation_strategy,
                  generation_group_size=f.generation_group_size,
                  context_token_budget=[s.token_budget for s in d.context],
                  context_max_batch_size=d.context[0].max_batch_size, context_max_seq_len=d.context[0].max_seq_len,
                  context_buckets=dataclasses.asdict(d.context_buckets), kv_transfer=d.kv_transfer,
                  verify_handoff=f.verify_handoff,
                  weights="random" if f.checkpoint is None else "checkpoint")
    record = make_record(f, setup, argv, config, metrics, rows)
    strategies = "-".join(f.context_strategy)
    tag = f.tag or f"disagg-{strategies}-{f.generation_strategy}-{setup.model_name}-g{n}"
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
