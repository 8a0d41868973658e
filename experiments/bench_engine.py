"""The engine's prefill and decode throughput on one GPU, against the HBM bandwidth and matmul peaks measured
in the same run; writes `engine-<date>-<device_kind>.json` (part "engine").

Model: `--preset` (r1-layers-N: real R1 layer shapes, FP8 routed experts and linears, random weights),
bf16 activations and cache, routed experts through `LocalExecutor(backend=--backend)`. Everything is timed
through the engine's `ModelRunner` (its bucketed prefill and decode programs on its paged cache):
  * baselines: HBM bandwidth (a large device copy, bytes read + written), dense matmul peaks in bf16 and FP8
    e4m3 (XLA dot with float32 accumulation; cuBLAS through torch where CUDA torch is installed; the best);
  * prefill: n requests of `--prefill_prompt_len` tokens, which the runner cuts into steps of n x
    `--prefill_chunk` tokens; model FLOPs (`roofline.prefill_flops`) / step time, against the bf16 peak, the
    FP8 peak, and the FLOP-weighted mix of both (routed experts FP8 on the Pallas path, the rest bf16): the
    mix is the headline `prefill_mfu` (each FLOP against the peak of its own dtype);
  * decode: B requests at context L (one absorbed-MLA step at position L - 1, cache max_len = L, random
    latents in the cache); bytes that must be read (`roofline.decode_bytes`: weights touched, the distinct
    routed experts the step's tokens select, L cached tokens per request) / step time / HBM bandwidth
    = `decode_hbm_frac`. The experts a step selects are counted inside the timed step program
    (`ModelRunner(expert_counts=True)`: one scatter-add of [B, top_k] ids per MoE layer), so no extra program
    is compiled for them. Step ahead (`step_ahead_s`, `decode_hbm_frac_step_ahead`): the same point as
    `run_engine(step_ahead=...)` serves it, each step dispatched before the previous step's tokens are read,
    its tokens fed from those samples (sampling and the host read included; the bytes from its own routing).
Times: median of `--repeats` steps after `--warmup` (each step blocks on its logits); the first call
(compile) is reported apart. `--time_budget_s` skips the points left when it runs out.
`--profile`: the headline prefill point (best MFU) and the typical decode point are also profiled for
`--profile_steps` steps (`experiments/engine_profile.py`): their rows (and the metrics) get a `breakdown` of a
step: GPU time per category (attention, kv_b projections, expert GEMMs, dense GEMMs, quantization, weight
dequantization, cache, router/MoE glue, other), GPU busy time, host wall and dispatch/idle; a failed profile
is recorded as the row's `breakdown_error`, and the run exits non-zero after writing the results.

GPU, one H200 (about 39 GB of weights; an H100 takes the same model with --prefill_prompt_len=2048, which
quarters the prefill's [rows, heads, chunk, max_len] attention scores):
  DWDP_COMMIT=<sha> PYTHONUNBUFFERED=1 PYTHONPATH=. python3 experiments/bench_engine.py --device_kind=nvidia-h200 \
      --profile --out=$OUT 2>&1 | tee $OUT/bench_engine.log
CPU smoke (tests/test_bench_engine.py): --preset=tiny --backend=jnp with tiny sizes.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import re
import statistics
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from dwdp_jax import xla_flags
from dwdp_jax.config import preset
from dwdp_jax.engine import roofline
from dwdp_jax.engine.runner import Buckets, ModelRunner
from dwdp_jax.engine.scheduler import PENDING, DecodeItem, PrefillChunk, StepPlan
from dwdp_jax.experts import LocalExecutor
from dwdp_jax.model import init_model, set_fp8_matmul
from experiments import engine_profile
from experiments.device_peaks import hbm_copy_gbps, matmul_peaks
from experiments.host_profile import host_profile
from experiments.random_cache import randomized_pages
from experiments.results_io import write_result
from experiments.timing import Budget

flags.DEFINE_string("preset", "r1-layers-4", "model preset (random weights)")
flags.DEFINE_enum("backend", "pallas", ["pallas", "jnp"], "routed-expert GEMMs (pallas: Mosaic GPU, GPU only)")
flags.DEFINE_enum("fp8_matmul", "pallas", ["pallas", "dequantize"], "FP8 linear layers: the block-scaled FP8 GEMM "
                  "(GPU only) or the weight dequantized to bf16 (the engine before issue 17)")
flags.DEFINE_list("prefill_requests", ["1", "2", "4"], "requests per prefill step (tokens/step = n x chunk); "
                  "empty: no prefill")
flags.DEFINE_integer("prefill_prompt_len", 4096, "prompt length; the cache's max_len for prefill")
flags.DEFINE_integer("prefill_chunk", 2048, "prefill chunk length (the runner's length bucket)")
flags.DEFINE_list("decode_batch", ["1", "8", "32", "64", "128"], "decode batch sizes")
flags.DEFINE_list("decode_context", ["1024", "4096"], "decode context lengths (tokens attended per request)")
flags.DEFINE_string("typical", "64x4096", "decode point (BATCHxCONTEXT) whose numbers are the headline")
flags.DEFINE_integer("repeats", 5, "timed steps per point (median)")
flags.DEFINE_integer("warmup", 1, "untimed steps after the first (compiling) call")
flags.DEFINE_float("time_budget_s", 240.0, "skip the points left after this many seconds of the run")
flags.DEFINE_integer("hbm_copy_mib", 4096, "size of the HBM bandwidth copy")
flags.DEFINE_integer("peak_matmul_size", 8192, "M = N = K of the dense matmul peaks")
flags.DEFINE_integer("seed", 0, "weights and inputs")
flags.DEFINE_bool("profile", False, "profile the headline prefill and decode points: a per-step breakdown "
                  "(GPU time per category, busy, dispatch/idle) in their rows (experiments/engine_profile.py)")
flags.DEFINE_bool("mla_decode_cluster", True, "decode points: the Pallas MLA decode kernel's clustered form "
                  "for one query per row (PagedAttention.decode_cluster, the engine's default)")
flags.DEFINE_bool("host_profile", True, "decode points: the host's share of a step under cProfile (the costliest "
                  "functions, in the row's `host_profile`; experiments/host_profile.py), after the timings")
flags.DEFINE_integer("profile_steps", 4, "engine steps profiled per point (prefill: whole calls of "
                     "prompt_len / chunk steps, at least this many steps)")
flags.DEFINE_string("profile_dir", "", "keep the profiles' traces under this directory (default: discarded)")
flags.DEFINE_enum("command_buffers", "engine", sorted(xla_flags.COMMAND_BUFFER_FLAGS),
                  "XLA command buffers (CUDA graphs) of the step programs: the engine's setting (dwdp_jax.xla_flags), "
                  "XLA's default, or off. --profile turns them off: a kernel inside a command buffer appears in a "
                  "profile as that buffer, not as its HLO instruction (jax 0.11.2, H100: the whole step "
                  "unattributed), so a profiled run's timed rows are without them too (config says so)")
flags.DEFINE_string("device_kind", "unknown", "the device tool's kind, for the results file")
flags.DEFINE_string("out", "experiments/results", "results directory")
flags.DEFINE_string("tag", "", "suffix of the results file name")
F = flags.FLAGS


def log(t0: float, msg: str) -> None:
    print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)


def host_return_time(fn, repeats: int) -> float:
    """Median seconds until `fn()` returns (the host's share of a step: packing, transfers, dispatch; the
    device work runs on asynchronously), each call then waited for."""
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        samples.append(time.perf_counter() - t)
        jax.block_until_ready(out)
    return statistics.median(samples)


def step_ahead_time(runner, items, steps: int, repeats: int) -> float:
    """Seconds per decode step as `run_engine(step_ahead=runner)` runs them: each step dispatched (its tokens
    fed on the device from the step before) before the previous step's sampled tokens are read on the host;
    median over `repeats` chains of `steps` steps, after one untimed chain. Sampling and the host read of every
    step's tokens are included (the blocking `step_s` has neither)."""
    ahead = StepPlan(0, 0, (), tuple(dataclasses.replace(d, token=PENDING) for d in items))
    first = StepPlan(0, 0, (), tuple(items))

    def chain():
        t = time.perf_counter()
        handle = runner.dispatch(first)
        for _ in range(steps):
            nxt = runner.dispatch(ahead, handle)
            runner.collect(handle)
            handle = nxt
        runner.collect(handle)
        return (time.perf_counter() - t) / (steps + 1)

    chain()
    return statistics.median(chain() for _ in range(repeats))


def median_time(fn, repeats: int, warmup: int, inner: int = 1) -> tuple[float, float]:
    """(first call seconds, median over `repeats` of the mean of `inner` back-to-back calls) after `warmup`
    further calls; every timed group ends with block_until_ready."""
    t = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t
    for _ in range(warmup):
        jax.block_until_ready(fn())
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            out = fn()
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t) / inner)
    return first, statistics.median(samples)


# ---------------------------------------------------------------------------------------------------------------
# Baselines


# ---------------------------------------------------------------------------------------------------------------
# Model and runner helpers


def build_model(cfg, seed: int):
    """`init_model` as one jitted program: each weight is generated in place on the device."""
    return init_model(cfg, seed=seed, dtype=jnp.bfloat16, jitted=True)


def decoder_param_bytes(model) -> int:
    """Bytes of the model's arrays, MTP modules excluded (as `roofline.model_bytes`)."""
    _, state = nnx.split(model)
    return sum(leaf.size * leaf.dtype.itemsize for key, sub in state.items() if key != "mtp"
               for leaf in jax.tree.leaves(sub))


def device_memory_gib(device) -> dict | None:
    """The allocator's live and peak bytes (GiB) on `device`; None where the backend keeps no statistics (CPU)."""
    stats = (device or jax.devices()[0]).memory_stats()
    if not stats:
        return None
    return {k: round(stats[k] / 2**30, 2) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in stats}


@dataclasses.dataclass(frozen=True)
class Sweep:
    """The measured points, validated before any device work. Prefill: `requests` prompts of `prompt_len`
    tokens per call, run as steps of requests x `chunk` tokens. Decode: every (batch, context) pair."""

    prefill_requests: tuple[int, ...]
    prompt_len: int
    chunk: int
    decode_batch: tuple[int, ...]
    decode_context: tuple[int, ...]
    typical: tuple[int, int]  # (batch, context) of the headline decode point
    repeats: int
    warmup: int

    def __post_init__(self):
        for name in ("prefill_requests", "decode_batch", "decode_context"):
            values = getattr(self, name)
            if values and min(values) < 1:
                raise ValueError(f"--{name} must be positive integers, got {values}")
        if not self.prefill_requests and not (self.decode_batch and self.decode_context):
            raise ValueError("nothing to measure: --prefill_requests and --decode_batch (or --decode_context) "
                             "are both empty")
        if min(self.prompt_len, self.chunk) < 1 or self.prompt_len % self.chunk:
            raise ValueError(f"--prefill_prompt_len={self.prompt_len} must be a positive multiple of "
                             f"--prefill_chunk={self.chunk}")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"--repeats must be >= 1 and --warmup >= 0, got {self.repeats}, {self.warmup}")

    @classmethod
    def from_flags(cls) -> Sweep:
        def ints(name):
            try:
                return tuple(int(v) for v in F[name].value)
            except ValueError as e:
                raise ValueError(f"--{name} must be integers, got {F[name].value}") from e

        try:
            typical = tuple(int(v) for v in F.typical.lower().split("x"))
        except ValueError as e:
            raise ValueError(f"--typical must be BATCHxCONTEXT, got {F.typical!r}") from e
        if len(typical) != 2:
            raise ValueError(f"--typical must be BATCHxCONTEXT, got {F.typical!r}")
        return cls(ints("prefill_requests"), F.prefill_prompt_len, F.prefill_chunk, ints("decode_batch"),
                   ints("decode_context"), typical, F.repeats, F.warmup)


@dataclasses.dataclass(frozen=True)
class Profiling:
    """`--profile`: how many engine steps a profiled point runs, and where traces are kept ("": discarded)."""

    steps: int
    trace_dir: str = ""

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"--profile_steps must be >= 1, got {self.steps}")

    def point(self, point: str, runner, call, steps_per_call: int, row: dict, budget, t0) -> None:
        """Profiles whole calls of `call` (each `steps_per_call` engine steps) on `runner`; adds the per-step
        breakdown to `row` (or the error, as `breakdown_error`)."""
        if not budget.allows(f"profile {point}"):
            log(t0, f"{point}: profile skipped (time budget)")
            return
        calls = -(-self.steps // steps_per_call)
        trace_dir = os.path.join(self.trace_dir, re.sub(r"\W+", "_", point)) if self.trace_dir else None
        t = time.perf_counter()
        try:
            b = engine_profile.profile_steps(runner, call, calls, steps_per_call, trace_dir)
        except Exception as e:  # noqa: BLE001 (keep the measurements; main exits non-zero after writing them)
            row["breakdown_error"] = f"{type(e).__name__}: {str(e)[:2000]}"
            log(t0, f"{point}: PROFILE FAILED: {row['breakdown_error']}")
            return
        row["breakdown"] = engine_profile.with_unprofiled(b, row["step_s"])
        log(t0, f"{point}: profiled {b['steps']} steps ({time.perf_counter() - t:.1f} s): GPU busy "
                f"{b['gpu_busy_s'] * 1e3:.2f} ms of {b['wall_s'] * 1e3:.2f} ms wall per step (unprofiled step "
                f"{row['step_s'] * 1e3:.2f} ms)" + "".join(f"; WARNING: {w}" for w in b["warnings"]))


# ---------------------------------------------------------------------------------------------------------------
# Prefill and decode


def run_prefill(model, cfg, executor, sweep: Sweep, peaks: dict, routed_fp8: bool, budget, t0, rng,
                linears_fp8: bool = False, profiling: Profiling | None = None) -> list[dict]:
    """One row per request count: n prompts per `runner.prefill` call, which runs them in prompt_len / chunk
    steps of n x chunk tokens (the cache's max_len is the prompt length). peaks: TFLOP/s by dtype. profiling:
    also profile the row of the best MFU (the headline)."""
    if not sweep.prefill_requests:
        return []
    chunk, prompt_len = sweep.chunk, sweep.prompt_len
    rounds = prompt_len // chunk
    runner = ModelRunner(model, max(sweep.prefill_requests), prompt_len, executor=executor,
                         buckets=Buckets(tuple(sorted(set(sweep.prefill_requests))), (chunk,)))
    bf16_peak, fp8_peak = peaks["bf16"] * 1e12, peaks["fp8"] * 1e12
    rows, calls = [], {}
    for n in sweep.prefill_requests:
        point = f"prefill n={n} x {chunk}"
        if not budget.allows(point):
            log(t0, f"{point}: skipped (time budget)")
            continue
        prompts = [rng.randint(0, cfg.vocab_size, prompt_len).astype(np.int32) for _ in range(n)]
        chunks = [PrefillChunk(request_id=f"p{i}", slot=i, start=0, tokens=p, is_last=True)
                  for i, p in enumerate(prompts)]
        row = dict(regime="prefill", requests=n, chunk=chunk, prompt_len=prompt_len, tokens_per_step=n * chunk,
                   steps_per_call=rounds)
        calls[n] = functools.partial(runner.prefill, chunks)
        start = time.perf_counter()
        try:
            first, call_s = median_time(calls[n], sweep.repeats, sweep.warmup)
        except Exception as e:  # noqa: BLE001 (e.g. out of memory at the largest step: keep the other points)
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            rows.append(row)
            log(t0, f"{point}: FAILED {row['error']}")
            continue
        finally:
            budget.record(time.perf_counter() - start)
        flops = roofline.prefill_flops(cfg, [(r * chunk, chunk) for r in range(rounds)] * n, routed_fp8,
                                       linears_fp8)
        row.update(first_call_s=first, call_s=call_s, step_s=call_s / rounds,
                   input_tokens_per_s=n * prompt_len / call_s,
                   layer_tokens_per_s=n * prompt_len / call_s * cfg.num_layers,
                   flops_bf16=flops.bf16, flops_fp8=flops.fp8,
                   tflops=flops.total / call_s / 1e12,
                   mfu_mixed=flops.ideal_time_s(bf16_peak, fp8_peak) / call_s,
                   mfu_bf16_peak=flops.total / call_s / bf16_peak,
                   mfu_fp8_peak=flops.total / call_s / fp8_peak,
                   mixed_peak_tflops=flops.mixed_peak_flops(bf16_peak, fp8_peak) / 1e12)
        rows.append(row)
        log(t0, f"{point}: step {row['step_s'] * 1e3:8.2f} ms, {row['input_tokens_per_s']:9.0f} tok/s, "
                f"{row['tflops']:6.1f} TFLOP/s: MFU {row['mfu_mixed']:.3f} of the mixed peak "
                f"({row['mfu_bf16_peak']:.3f} bf16, {row['mfu_fp8_peak']:.3f} FP8); compile+first {first:.1f} s")
    best = max((r for r in rows if "error" not in r), key=lambda r: r["mfu_mixed"], default=None)
    if profiling is not None and best is not None:
        profiling.point(f"prefill n={best['requests']} x {chunk}", runner, calls[best["requests"]], rounds, best,
                        budget, t0)
    del runner, calls
    gc.collect()
    return rows


def run_decode(model, cfg, executor, sweep: Sweep, hbm_gbps: float, budget, t0, rng, seed: int,
               profiling: Profiling | None = None) -> list[dict]:
    """One row per (batch, context), the typical point first (a short time budget still measures it).
    profiling: also profile the typical point."""
    typ_b, typ_l = sweep.typical
    batches = sorted(sweep.decode_batch, key=lambda b: b != typ_b)
    rows = []
    for ctx in sorted(sweep.decode_context, key=lambda l: l != typ_l):
        if budget.allows(f"decode L={ctx}"):
            rows += decode_at_context(model, cfg, executor, sweep, batches, ctx, hbm_gbps, budget, t0, rng, seed,
                                      profiling)
            gc.collect()  # the runner's cache, before the next context's
        else:
            log(t0, f"decode L={ctx}: skipped (time budget)")
    return rows


def distinct_experts(runner, cfg, b: int) -> list[int]:
    """Experts hit per MoE layer by the runner's last call (`expert_counts`), checked to cover b rows."""
    counts = np.asarray(runner.last_expert_counts)  # [MoE layers, experts]
    if counts.shape[0] != cfg.num_moe_layers or (counts.sum(1) != b * cfg.num_experts_per_tok).any():
        raise RuntimeError(f"expert counts {counts.shape} do not cover {cfg.num_moe_layers} MoE layers x {b} rows "
                           f"x top-{cfg.num_experts_per_tok}")
    return [int(n) for n in (counts > 0).sum(1)]


def decode_at_context(model, cfg, executor, sweep: Sweep, batches, ctx: int, hbm_gbps: float, budget, t0, rng,
                      seed: int, profiling: Profiling | None = None) -> list[dict]:
    """Steps of b requests at position ctx - 1 (ctx tokens attended) for each b in `batches`, each on a cache of
    its own (b slots of max_len = ctx, filled with random latents): a cache sized for the largest batch would
    hold 256 x 16K tokens (19 GB at r1-layers-4) while B=1 is measured."""
    tokens = rng.randint(cfg.vocab_size, size=max(batches))  # request i's token at every point
    rows = []
    for b in batches:
        point = f"decode B={b} L={ctx}"
        if not budget.allows(point):
            log(t0, f"{point}: skipped (time budget)")
            continue
        start = time.perf_counter()
        try:
            rows.append(decode_point(model, cfg, executor, sweep, b, ctx, tokens[:b], hbm_gbps, budget, t0, seed,
                                     profiling))
        finally:
            gc.collect()  # the point's cache, before the next point's
            budget.record(time.perf_counter() - start)
    return rows


def decode_point(model, cfg, executor, sweep: Sweep, b: int, ctx: int, tokens, hbm_gbps: float, budget, t0,
                 seed: int, profiling: Profiling | None) -> dict:
    """One decode row: b requests with `tokens` at position ctx - 1, on a cache of b slots x ctx tokens."""
    point = f"decode B={b} L={ctx}"
    items = [DecodeItem(request_id=f"d{i}", slot=i, token=int(t), position=ctx - 1) for i, t in enumerate(tokens)]
    row = dict(regime="decode", batch=b, context=ctx)
    try:  # the cache's allocation may fail too (out of memory): the point's error, not the run's
        # expert_counts: each step program also counts the tokens routed to each expert (a scatter-add per MoE
        # layer, in the timed program), from which the bytes a step must read follow
        runner = ModelRunner(model, b, ctx, executor=executor, buckets=Buckets((b,), (ctx,)), expert_counts=True)
        if not F.mla_decode_cluster:  # before the first call builds the step programs
            runner.attention = dataclasses.replace(runner.attention, decode_cluster=False)
        runner.pages = randomized_pages(runner.pages, jax.random.key(seed))
        jax.block_until_ready(runner.pages)
        row["memory_gib_before"] = device_memory_gib(runner.device)
        step = functools.partial(runner.decode, items)
        first, step_s = median_time(step, sweep.repeats, sweep.warmup)
    except Exception as e:  # noqa: BLE001 (keep the other points)
        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        row["memory_gib_at_error"] = device_memory_gib(runner.device if "runner" in locals() else None)
        log(t0, f"{point}: FAILED {row['error']}; device memory {row['memory_gib_at_error']}")
        return row
    # the step's own high-water mark: its donated pages are written in place, so the peak should not rise
    # above the live bytes before it by more than the step's temporaries (WORKSPACE Finding 34)
    row["memory_gib_after"] = device_memory_gib(runner.device)
    distinct = distinct_experts(runner, cfg, b)  # of the timed steps (the same tokens every step)
    need = roofline.decode_bytes(cfg, b, b * ctx, distinct, itemsize=2, cache_itemsize=2)
    host_s = host_return_time(step, sweep.repeats)
    ahead_s = step_ahead_time(runner, items, 8, sweep.repeats)
    # the chained steps feed sampled tokens: their routing is their own (the last step's, as a sample)
    distinct_ahead = distinct_experts(runner, cfg, b)
    need_ahead = roofline.decode_bytes(cfg, b, b * ctx, distinct_ahead, itemsize=2, cache_itemsize=2)
    row.update(first_call_s=first, step_s=step_s, host_return_s=host_s, output_tokens_per_s=b / step_s,
               distinct_experts_per_moe_layer=distinct, bytes=need.as_dict(),
               achieved_gbps=need.total / step_s / 1e9, hbm_frac=need.total / step_s / 1e9 / hbm_gbps,
               step_ahead_s=ahead_s, output_tokens_per_s_step_ahead=b / ahead_s,
               distinct_experts_step_ahead=distinct_ahead, bytes_step_ahead=need_ahead.total,
               hbm_frac_step_ahead=need_ahead.total / ahead_s / 1e9 / hbm_gbps)
    log(t0, f"{point}: step {step_s * 1e3:7.2f} ms, {row['output_tokens_per_s']:8.0f} tok/s, "
            f"{need.total / 1e9:6.2f} GB needed ({sum(distinct)} experts hit) -> "
            f"{row['achieved_gbps']:6.0f} GB/s = {row['hbm_frac']:.3f} of HBM; host returns after "
            f"{host_s * 1e3:.2f} ms; step ahead {ahead_s * 1e3:.2f} ms = {row['hbm_frac_step_ahead']:.3f} of "
            f"HBM; compile+first {first:.1f} s; device memory (GiB) before {row['memory_gib_before']}, after "
            f"{row['memory_gib_after']}")
    if F.host_profile:
        hp = row["host_profile"] = host_profile(step, sweep.repeats)
        log(t0, f"{point}: host under cProfile {hp['host_s_per_call'] * 1e3:.2f} ms a step; costliest: "
                + ", ".join(f"{e['function']} {e['own_us_per_call']:.0f} us" for e in hp["top"][:4]))
    if profiling is not None and (b, ctx) == sweep.typical:
        profiling.point(point, runner, step, 1, row, budget, t0)
    return row


# ---------------------------------------------------------------------------------------------------------------


# DeepSeek's published prefill profile as the SGLang team quotes it (../shared/anchors.md): 62.7K input tokens/s
# per 8-GPU H800 node at 16K tokens per device and 4K inputs, the full 61-layer R1 (EP across nodes, two
# micro-batches overlapping communication): 62.7K / 8 GPUs x 61 layers. Ours: one GPU, r1-layers-N, no EP.
DEEPSEEK_PREFILL_LAYER_TPS = 62.7e3 / 8 * 61
DEEPSEEK_PREFILL_SOURCE = ("deepseek-ai/open-infra-index 202502OpenSourceWeek day 6 profile, as quoted by the SGLang "
                           "team: 62.7K tokens/s per H800 node (8 GPUs) at 16K tokens/device, 4K inputs; x 61 layers "
                           "/ 8 GPUs")


def headline(prefill_rows, decode_rows, sweep: Sweep, hbm_gbps: float) -> dict:
    ok_p = [r for r in prefill_rows if "error" not in r]
    ok_d = [r for r in decode_rows if "error" not in r]
    typ = next((r for r in ok_d if (r["batch"], r["context"]) == sweep.typical), None)
    best_p = max(ok_p, key=lambda r: r["mfu_mixed"], default=None)
    best_d = max(ok_d, key=lambda r: r["hbm_frac"], default=None)
    get = lambda row, key: None if row is None else row[key]
    return {
        "prefill_breakdown": None if best_p is None else best_p.get("breakdown"),
        "decode_breakdown": None if typ is None else typ.get("breakdown"),
        "decode_hbm_frac": get(typ, "hbm_frac"),
        # the same point as run_engine(step_ahead=...) serves it: sampling and the token read included
        "decode_hbm_frac_step_ahead": get(typ, "hbm_frac_step_ahead"),
        "decode_typical_point": "{}x{}".format(*sweep.typical),
        "decode_output_tps_typical": get(typ, "output_tokens_per_s"),
        "decode_step_s_typical": get(typ, "step_s"),
        "decode_hbm_frac_best": get(best_d, "hbm_frac"),
        "decode_best_point": None if best_d is None else f"{best_d['batch']}x{best_d['context']}",
        "decode_output_tps_best": max((r["output_tokens_per_s"] for r in ok_d), default=None),
        "prefill_mfu": get(best_p, "mfu_mixed"),
        "prefill_mfu_peak": "FLOP-weighted mix of the measured bf16 and FP8 peaks (routed experts FP8 on the "
                            "Pallas path, the rest bf16); the same row against each peak alone beside it",
        "prefill_mfu_bf16_peak": get(best_p, "mfu_bf16_peak"),
        "prefill_mfu_fp8_peak": get(best_p, "mfu_fp8_peak"),
        "prefill_best_tokens_per_step": get(best_p, "tokens_per_step"),
        "prefill_input_tps_best": max((r["input_tokens_per_s"] for r in ok_p), default=None),
        # input tokens/s x decoder layers: comparable across model depths (../shared/anchors.md)
        "prefill_layer_tps_best": max((r["layer_tokens_per_s"] for r in ok_p), default=None),
        "deepseek_prefill_layer_tps_per_gpu": DEEPSEEK_PREFILL_LAYER_TPS,
        "deepseek_prefill_source": DEEPSEEK_PREFILL_SOURCE,
        "hbm_gbps": hbm_gbps,
    }


def print_table(prefill_rows, decode_rows) -> None:
    print("\n== prefill ==")
    print(f"{'req':>4s}{'tok/step':>9s}{'step ms':>9s}{'tok/s':>9s}{'TFLOP/s':>9s}{'mfu mix':>8s}{'bf16':>7s}"
          f"{'fp8':>7s}")
    for r in prefill_rows:
        if "error" in r:
            print(f"{r['requests']:4d}{r['tokens_per_step']:9d}  failed: {r['error'][:60]}")
            continue
        print(f"{r['requests']:4d}{r['tokens_per_step']:9d}{r['step_s'] * 1e3:9.2f}{r['input_tokens_per_s']:9.0f}"
              f"{r['tflops']:9.1f}{r['mfu_mixed']:8.3f}{r['mfu_bf16_peak']:7.3f}{r['mfu_fp8_peak']:7.3f}")
    print("\n== decode ==")
    print(f"{'B':>5s}{'L':>7s}{'step ms':>9s}{'tok/s':>9s}{'GB':>8s}{'experts':>8s}{'GB/s':>7s}{'hbm':>7s}"
          f"{'ahead ms':>9s}{'hbm':>7s}")
    for r in sorted(decode_rows, key=lambda r: (r["context"], r["batch"])):
        if "error" in r:
            print(f"{r['batch']:5d}{r['context']:7d}  failed: {r['error'][:60]}")
            continue
        print(f"{r['batch']:5d}{r['context']:7d}{r['step_s'] * 1e3:9.2f}{r['output_tokens_per_s']:9.0f}"
              f"{r['bytes']['total'] / 1e9:8.2f}{sum(r['distinct_experts_per_moe_layer']):8d}"
              f"{r['achieved_gbps']:7.0f}{r['hbm_frac']:7.3f}{r['step_ahead_s'] * 1e3:9.2f}"
              f"{r['hbm_frac_step_ahead']:7.3f}")


def print_breakdowns(prefill_rows, decode_rows) -> None:
    columns = {}
    for r in prefill_rows + decode_rows:
        label = (f"prefill {r['requests']}x{r['chunk']}" if r["regime"] == "prefill"
                 else f"decode {r['batch']}x{r['context']}")
        if "breakdown" in r:
            columns[label] = r["breakdown"]
        elif "breakdown_error" in r:
            print(f"\n{label}: PROFILE FAILED: {r['breakdown_error']}")
    if columns:
        print("\n== per-step breakdown (profile; GPU time per category, % of GPU busy) ==")
        print(engine_profile.format_table(columns))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    t0 = time.perf_counter()
    command_buffers = "off" if F.profile else F.command_buffers
    xla_flags_used = xla_flags.configure(command_buffers)  # before the first device use
    try:
        sweep = Sweep.from_flags()
        profiling = Profiling(F.profile_steps, F.profile_dir) if F.profile else None
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    cfg = preset(F.preset)
    if F.backend == "pallas" and jax.default_backend() != "gpu":
        raise app.UsageError("--backend=pallas needs a GPU (Mosaic GPU kernels); use --backend=jnp on CPU")
    device = jax.devices()[0]
    log(t0, f"{device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, preset {F.preset}, "
            f"experts {F.backend}")

    hbm_gbps, hbm = hbm_copy_gbps(F.hbm_copy_mib << 20)
    log(t0, f"HBM copy (read + write): {hbm_gbps:.0f} GB/s {hbm}")
    mm = matmul_peaks(F.peak_matmul_size)
    peaks = {"bf16": max(v for k, v in mm.items() if k.endswith("bf16_tflops")),
             "fp8": max(v for k, v in mm.items() if k.endswith("fp8_tflops"))}
    log(t0, f"matmul peaks {F.peak_matmul_size}^3: bf16 {peaks['bf16']:.0f}, FP8 {peaks['fp8']:.0f} TFLOP/s "
            f"(XLA FP8 / bf16 = {mm['xla_fp8_over_bf16']:.2f}) {mm}")

    model = set_fp8_matmul(build_model(cfg, F.seed), F.fp8_matmul)
    accounted, actual = roofline.model_bytes(cfg, 2), decoder_param_bytes(model)
    log(t0, f"model built: {actual / 1e9:.2f} GB of parameters"
            + ("" if accounted == actual else f"; MISMATCH: the roofline accounting says {accounted / 1e9:.2f} GB"))
    executor = LocalExecutor(backend=F.backend)
    routed_fp8 = F.backend == "pallas" and cfg.weight_block_size is not None
    linears_fp8 = F.fp8_matmul == "pallas" and cfg.weight_block_size is not None
    budget = Budget(t0, F.time_budget_s)
    rng = np.random.RandomState(F.seed)
    prefill_rows = run_prefill(model, cfg, executor, sweep, peaks, routed_fp8, budget, t0, rng, linears_fp8,
                               profiling)
    decode_rows = run_decode(model, cfg, executor, sweep, hbm_gbps, budget, t0, rng, F.seed, profiling)

    metrics = headline(prefill_rows, decode_rows, sweep, hbm_gbps)
    metrics.update(hbm_detail_gbps=hbm, matmul_peaks_tflops=mm, bf16_peak_tflops=peaks["bf16"],
                   fp8_peak_tflops=peaks["fp8"], param_bytes=actual, param_bytes_accounted=accounted,
                   skipped_points=budget.skipped, wall_s=time.perf_counter() - t0)
    config = dict(preset=F.preset, backend=F.backend, activations="bfloat16", cache_dtype="bfloat16",
                  weights="random (init_model): FP8 linears and experts with block scales, bf16 embedding/head",
                  routed_flops_fp8=routed_fp8, linear_flops_fp8=linears_fp8, fp8_matmul=F.fp8_matmul, sweep=dataclasses.asdict(sweep), time_budget_s=F.time_budget_s,
                  hbm_copy_mib=F.hbm_copy_mib, peak_matmul_size=F.peak_matmul_size, seed=F.seed,
                  device=device.device_kind, profile=F.profile, profile_steps=F.profile_steps,
                  command_buffers=command_buffers, xla_flags=xla_flags_used, mla_decode_cluster=F.mla_decode_cluster)
    print_table(prefill_rows, decode_rows)
    print_breakdowns(prefill_rows, decode_rows)
    print({k: v for k, v in metrics.items() if not isinstance(v, dict)}, flush=True)
    path = write_result(F.out, "engine", F.device_kind, config, metrics, prefill_rows + decode_rows, F.tag)
    log(t0, f"wrote {path}")
    failed = [r["breakdown_error"] for r in prefill_rows + decode_rows if "breakdown_error" in r]
    if failed:
        raise SystemExit(f"--profile: {len(failed)} profile(s) failed (results written): {failed[0][:500]}")


if __name__ == "__main__":
    app.run(main)
