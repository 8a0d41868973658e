"""Flag validation: the flags checked against each other and the visible devices, into a frozen `Setup`."""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import warnings

import jax
import jax.numpy as jnp
from absl import app

from dwdp_jax import config as config_lib
from dwdp_jax.engine import disagg as disagg_lib
from dwdp_jax.engine import workload as workload_lib
from dwdp_jax.engine.runner import Buckets
from dwdp_jax.engine.scheduler import SchedulerConfig
from dwdp_jax.planner import skew as skew_lib
from experiments.launch.options import COLOCATED_ONLY, DISAGG_ONLY, STRATEGIES


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
    Disaggregated (`disagg` set): `sched` and `buckets` are the generation servers'. `devices` are this process's;
    a multi-process run (`num_processes` > 1) spans `num_devices` devices, `len(devices)` in each process."""

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
    num_processes: int = 1

    @property
    def num_devices(self) -> int:
        """Devices of the whole run (every process)."""
        return len(self.devices) * self.num_processes

    @property
    def mode(self) -> str:
        return "colocated" if self.disagg is None else "disagg"


def usage_error(msg: str):
    """Stops the run with absl's usage error (the message names the flag)."""
    raise app.UsageError(msg)


def _parse_len(text: str) -> int:
    return int(text[:-1]) * 1024 if text.lower().endswith("k") else int(text)


def parse_ints(f, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in f[name].value)
    except ValueError:
        usage_error(f"--{name} must be integers, got {','.join(f[name].value)}")


def _workload(f, cfg) -> list[workload_lib.Request]:
    name = f.workload
    if name.endswith(".jsonl") or os.path.exists(name):
        if not os.path.exists(name):
            usage_error(f"--workload={name}: no such trace file")
        reqs = workload_lib.load_trace(name)
        return reqs[: f.num_requests] if f["num_requests"].present else reqs
    if f.num_requests < 1:
        usage_error(f"--num_requests must be >= 1, got {f.num_requests}")
    if f.input_len < 1 or f.output_len < 1:
        usage_error(f"--input_len and --output_len must be >= 1, got {f.input_len}, {f.output_len}")
    match = re.fullmatch(r"fixed(?:-(\d+k?)-(\d+k?))?", name, re.IGNORECASE)
    if match:
        i, o = (_parse_len(g) for g in match.groups()) if match.group(1) else (f.input_len, f.output_len)
        lengths = workload_lib.FixedLength(i), workload_lib.FixedLength(o)
    elif name == "lognormal":
        cap = f.max_seq_len // 2 if f.max_seq_len else 1 << 20
        lengths = (workload_lib.LognormalLength(f.input_len, f.lognormal_sigma, 1, cap),
                   workload_lib.LognormalLength(f.output_len, f.lognormal_sigma, 1, cap))
    else:
        usage_error(f"--workload={name!r}: use fixed, fixed-<I>-<O> (e.g. fixed-8k-1k), lognormal, or a .jsonl trace")
    spec = workload_lib.WorkloadSpec(f.num_requests, *lengths, vocab_size=cfg.vocab_size, seed=f.seed)
    return workload_lib.generate(spec)


def _model_config(f):
    if f.checkpoint:
        if not os.path.isdir(f.checkpoint):
            usage_error(f"--checkpoint={f.checkpoint}: not a directory")
        return config_lib.from_hf_json(f.checkpoint), os.path.basename(os.path.normpath(f.checkpoint))
    try:
        return config_lib.preset(f.preset), f.preset
    except config_lib.ConfigError as e:
        usage_error(f"--preset: {e}")


def _check_mode_flags(f) -> None:
    """Flags of the other mode, given explicitly, are a mistake worth naming."""
    wrong = COLOCATED_ONLY if f.mode == "disagg" else DISAGG_ONLY
    given = [name for name in wrong if f[name].present]
    if given:
        other = "colocated" if f.mode == "disagg" else "disagg"
        usage_error(f"--{given[0]} is a --mode={other} flag; this run has --mode={f.mode}")


def validate(f, num_processes: int = 1) -> Setup:
    """Checks the flags against each other and the visible devices; raises `app.UsageError` saying why. With
    `num_processes` > 1 (a joined multi-process run) --num_devices counts every process's devices, split evenly."""
    _check_mode_flags(f)
    cfg, model_name = _model_config(f)
    visible = jax.local_devices()
    platform = visible[0].platform
    disagg = f.mode == "disagg"
    n = f.num_devices or (1 if f.strategy == "single" and not disagg else len(visible) * num_processes)
    if n % num_processes:
        usage_error(f"--num_devices={n} must split evenly over the {num_processes} processes")
    if n // num_processes > len(visible):
        hint = (" (on CPU, simulate more with XLA_FLAGS=--xla_force_host_platform_device_count=N)"
                if platform == "cpu" else "")
        per = " per process" if num_processes > 1 else ""
        usage_error(f"--num_devices={n} needs {n // num_processes} devices{per} but only {len(visible)} {platform} "
                    f"devices are visible{hint}")
    if n < 1:
        usage_error(f"--num_devices must be >= 1, got {n}")
    g = f.group_size or n
    if not disagg:
        if f.strategy == "single" and n != 1:
            usage_error(f"--strategy=single runs on one device, got --num_devices={n}")
        if f.strategy == "dwdp":
            if n % g:
                usage_error(f"--group_size={g} must divide --num_devices={n}")
            if cfg.n_routed_experts % g:
                usage_error(f"--group_size={g} must divide the {cfg.n_routed_experts} routed experts")
        if f.strategy == "dep" and cfg.n_routed_experts % n:
            usage_error(f"DEP needs --num_devices={n} to divide the {cfg.n_routed_experts} routed experts")
    if f.expert_backend == "auto":  # the Pallas grouped GEMMs on GPUs (the jnp path dequantizes every expert)
        f.expert_backend = "pallas" if platform == "gpu" else "jnp"
    if f.expert_backend == "pallas" and platform != "gpu":
        usage_error(f"--expert_backend=pallas needs GPUs (Mosaic GPU kernels); this run sees {platform} devices")
    if f.fetch in ("copy_engine", "copy_engine_stream", "pallas_async") and platform != "gpu":
        usage_error(f"--fetch={f.fetch} needs GPUs (CUDA streams through CuPy)")
    if f.gemm_sms < 0:
        usage_error(f"--gemm_sms must be >= 0, got {f.gemm_sms}")
    if f.prefetch_depth < 0:
        usage_error(f"--prefetch_depth must be >= 0, got {f.prefetch_depth}")
    if f.staging_budget < 0 or (f.staging_budget and f.planner_policy == "none"):
        usage_error(f"--staging_budget={f.staging_budget} needs a --planner_policy and must be >= 0")
    if f.planner_top_k < 0 or not 0.0 < f.planner_coverage <= 1.0:
        usage_error(f"--planner_top_k must be >= 0 and --planner_coverage in (0, 1], got {f.planner_top_k}, "
                    f"{f.planner_coverage}")
    if f.placement and not os.path.isfile(f.placement):
        usage_error(f"--placement must be a placement JSON file; {f.placement!r} does not exist")
    if f.routing_skew < 0 or (f.routing_skew and f.checkpoint):
        usage_error(f"--routing_skew={f.routing_skew} must be >= 0 and applies to random weights only "
                    "(no --checkpoint)")
    if f.max_batch_size < 1:
        usage_error(f"--max_batch_size must be >= 1, got {f.max_batch_size}")
    concurrency = parse_ints(f, "concurrency")
    ranks = 1 if disagg or f.strategy == "single" else n
    for c in concurrency:
        if c < 0 or 0 < c < ranks:
            usage_error(f"--concurrency={c}: use 0 (all queued) or at least one request per rank ({ranks})")
    requests = _workload(f, cfg)
    if not requests:
        usage_error("the workload has no requests")
    longest = max(r.prompt_len + r.max_new_tokens for r in requests)
    max_seq_len = f.max_seq_len or longest
    if longest > max_seq_len:
        too_long = sum(r.prompt_len + r.max_new_tokens > max_seq_len for r in requests)
        usage_error(f"--max_seq_len={max_seq_len}: {too_long} requests need up to {longest} tokens (prompt + output)")
    budget = f.token_budget or max(f.max_batch_size, 2048)
    if budget < f.max_batch_size:
        usage_error(f"--token_budget={budget} must be >= --max_batch_size={f.max_batch_size}")
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
    return Setup(cfg, model_name, "disagg" if disagg else f.strategy, tuple(visible[: n // num_processes]), g, dtype,
                 tuple(requests), concurrency, sched, buckets, setup_disagg, skew, num_processes)


def _validate_disagg(f, cfg, n: int, platform: str, requests) -> DisaggSetup:
    if n < 2:
        usage_error(f"--mode=disagg needs at least 2 devices (context and generation), got --num_devices={n}")
    context_devices = parse_ints(f, "context_devices") or (n // 2,)
    for c in context_devices:
        if not 1 <= c < n:
            usage_error(f"--context_devices={c} must leave both roles at least one of the --num_devices={n} devices")
    strategies = tuple(f.context_strategy)
    for s in strategies:
        if s not in STRATEGIES:
            usage_error(f"--context_strategy={s!r}: use one of {', '.join(STRATEGIES)}")
    if len(set(strategies)) != len(strategies) or len(set(context_devices)) != len(context_devices):
        usage_error("--context_strategy and --context_devices must not repeat a value")
    roles = []
    for s, c in itertools.product(strategies, context_devices):
        try:
            ctx = disagg_lib.RoleSpec(s, c, f.context_group_size, name="context")
            gen = disagg_lib.RoleSpec(f.generation_strategy, n - c, f.generation_group_size, name="generation")
            ctx.check_experts(cfg.n_routed_experts)
            gen.check_experts(cfg.n_routed_experts)
        except ValueError as e:
            where = f" (at --context_devices={c} of --num_devices={n})" if len(context_devices) > 1 else ""
            usage_error(f"--{e}{where}")
        roles.append((ctx, gen))
    if f.kv_transfer == "copy_engine" and platform != "gpu":
        usage_error("--kv_transfer=copy_engine needs GPUs (cudaMemcpyPeerAsync through CuPy)")
    slots = f.context_max_batch_size or f.max_batch_size
    if slots < 1:
        usage_error(f"--context_max_batch_size must be >= 1, got {slots}")
    prompt_len = max(r.prompt_len for r in requests) + 1  # the scheduler counts the first token too
    budgets = tuple(b or max(slots, f.token_budget or 2048) for b in parse_ints(f, "context_token_budget"))
    for b in budgets:
        if b < slots:
            usage_error(f"--context_token_budget={b} must be >= the context slots per device ({slots}: "
                        "--context_max_batch_size, default --max_batch_size)")
    if len(set(budgets)) != len(budgets):
        usage_error("--context_token_budget must not repeat a value")
    context = tuple(SchedulerConfig(slots, prompt_len, b, vocab_size=cfg.vocab_size) for b in budgets)
    # built for the largest budget; a smaller budget's steps use the smaller length buckets
    buckets = Buckets.default(slots, min(max(budgets), prompt_len))
    return DisaggSetup(tuple(roles), context, buckets, f.kv_transfer)
