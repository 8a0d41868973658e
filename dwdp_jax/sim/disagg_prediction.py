"""Predicted DWDP vs DEP output TPS/GPU in the paper's disaggregated setting (GB200 NVL72 by default).

Context servers (DWDP or DEP groups, prompts batched whole) are sized against DEP generation servers:
`context_capacity` finds a context group's best token budget, `decode_point` the generation batch that meets a
TPS/user target, and `disaggregated_tps_per_gpu` combines the two; `predict_nvl72` runs the whole comparison,
next to the paper's published numbers (`PAPER_*`). `gb200.py` sets up the paper's scenario; `validate.py`
prints its prediction (and re-exports these names).
"""

from __future__ import annotations

import math

import numpy as np

from dwdp_jax.config import ModelConfig, preset
from dwdp_jax.sim import costs
from dwdp_jax.sim.hardware import GB200_NVL72, Hardware
from dwdp_jax.sim.simulator import (DEPConfig, DWDPConfig, RankBatch, RunResult, SchedulerConfig, Workload, simulate,
                                    step_costs)

PAPER_DWDP_OVER_DEP = 1.088  # +8.8% TPS/GPU, GB200 NVL72, R1, 8K/1K, 20-100 TPS/user
PAPER_CTX_ITERATION_SPEEDUP = 1319.85 / 1131.58  # TensorRT-LLM blog: context-only, 4 GPUs, iteration time


def decode_point(cfg: ModelConfig, hw: Hardware, tps_per_user: float, context_len: int, group_size: int = 16,
                 eff: costs.Efficiency = costs.Efficiency(), expert_format: str = "nvfp4",
                 dep: DEPConfig | None = None, max_batch: int = 1024) -> tuple[int, float] | None:
    """Generation server (DEP, balanced): the largest batch per rank whose step gives `tps_per_user`.

    Returns (batch per rank, output tokens/s per GPU), or None if even batch 1 is too slow.
    """
    dep = dep or DEPConfig(group_size=group_size, dispatch_bytes=1.0)
    cm = costs.CostModel(cfg, hw, eff, expert_format=expert_format)

    def step_s(b: int) -> float:
        batch = RankBatch(np.ones(b, np.int64), np.full(b, context_len, np.int64), b)
        return step_costs(cm, hw, dep, [batch] * dep.group_size)[0].time_s

    if 1.0 / step_s(1) < tps_per_user:
        return None
    lo, hi = 1, max_batch
    while lo < hi:  # step time grows with the batch
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if 1.0 / step_s(mid) >= tps_per_user else (lo, mid - 1)
    return lo, lo / step_s(lo)


def context_capacity(cfg: ModelConfig, hw: Hardware, strategy: DWDPConfig | DEPConfig, input_len: int = 8192,
                     length_cv: float = 0.2, token_budgets: tuple[int, ...] = (16384, 32768), num_requests: int = 192,
                     eff: costs.Efficiency = costs.Efficiency(), expert_format: str = "nvfp4",
                     seed: int = 0) -> tuple[SchedulerConfig, RunResult]:
    """A context server group kept full (closed loop, prompts batched whole): its best budget and run."""
    best = None
    for budget in token_budgets:
        sched = SchedulerConfig(token_budget=budget, chunked_prefill=False)
        work = Workload(num_requests=num_requests, input_len=input_len, length_cv=length_cv, prefill_only=True,
                        concurrency=strategy.group_size * (budget // input_len + 2), seed=seed)
        run = simulate(cfg, hw, strategy, work, sched, eff, expert_format)
        if best is None or run.input_tps_per_gpu > best[1].input_tps_per_gpu:
            best = (sched, run)
    return best


def disaggregated_tps_per_gpu(gen_tps_per_gpu: float, ctx_requests_per_s_per_gpu: float, output_len: int) -> float:
    """Output tokens/s per GPU of context and generation servers sized to each other."""
    return 1.0 / (1.0 / gen_tps_per_gpu + 1.0 / (output_len * ctx_requests_per_s_per_gpu))


def predict_nvl72(cfg: ModelConfig | None = None, hw: Hardware = GB200_NVL72, group_size: int = 4,
                  expert_format: str = "nvfp4", input_len: int = 8192, output_len: int = 1024,
                  length_cv: float = 0.2, token_budgets: tuple[int, ...] = (8192, 16384, 32768),
                  tps_per_user: tuple[float, ...] = (20, 30, 40, 50, 60, 70, 80, 90, 100),
                  gen_group_size: int = 16, num_requests: int = 768, dwdp: DWDPConfig | None = None,
                  dep: DEPConfig | None = None, eff: costs.Efficiency = costs.Efficiency(), seed: int = 0) -> dict:
    """Predicted DWDP/DEP output TPS/GPU for R1 8K/1K on `hw`, in the paper's disaggregated setting.

    Context servers (groups of `group_size` GPUs, prompts batched whole under a token budget) run DWDP or DEP;
    generation servers run DEP in both arms (the paper's DWDP is context-only), so per-GPU output throughput
    at a TPS/user point u is `disaggregated_tps_per_gpu(gen_tps(u), ctx requests/s/GPU)`. Each strategy's
    context servers use the token budget that maximizes its own throughput; TTFT (context side only) is
    measured with Poisson arrivals at 80% of DEP's context capacity. TPS/user points that the generation
    servers cannot reach (no MTP in the model) are left out.
    """
    cfg = cfg or preset("deepseek-r1")
    dwdp = dwdp or DWDPConfig(group_size=group_size)
    dep = dep or DEPConfig(group_size=group_size, dispatch_bytes=1.0)
    ctx = {}
    for strat in (dep, dwdp):
        sched, run = context_capacity(cfg, hw, strat, input_len, length_cv, token_budgets, num_requests, eff,
                                      expert_format, seed)
        ctx[strat.name] = {"sched": sched, "run": run, "requests_per_s_per_gpu": run.input_tps_per_gpu / input_len}
    rate = 0.8 * ctx["dep"]["requests_per_s_per_gpu"] * group_size
    for strat in (dep, dwdp):
        work = Workload(num_requests=num_requests, input_len=input_len, length_cv=length_cv, prefill_only=True,
                        arrival="poisson", rate_per_s=rate, seed=seed + 1)
        run = simulate(cfg, hw, strat, work, ctx[strat.name]["sched"], eff, expert_format)
        ctx[strat.name]["ttft_median_s"] = run.ttft_median_s
    ratios, gen = {}, {}
    for u in tps_per_user:
        point = decode_point(cfg, hw, u, input_len + output_len // 2, gen_group_size, eff, expert_format)
        if point is None:
            continue
        gen[u] = point
        per_gpu = {k: disaggregated_tps_per_gpu(point[1], v["requests_per_s_per_gpu"], output_len)
                   for k, v in ctx.items()}
        ratios[u] = per_gpu["dwdp"] / per_gpu["dep"]
    dep_run, dwdp_run = ctx["dep"]["run"], ctx["dwdp"]["run"]
    return {
        "nvl72_dwdp_over_dep": float(np.median(list(ratios.values()))) if ratios else math.nan,
        "ratio_by_tps_per_user": ratios,
        "paper_dwdp_over_dep": PAPER_DWDP_OVER_DEP,
        "ctx_dwdp_over_dep": ctx["dwdp"]["requests_per_s_per_gpu"] / ctx["dep"]["requests_per_s_per_gpu"],
        "paper_ctx_iteration_speedup": PAPER_CTX_ITERATION_SPEEDUP,
        "ctx_token_budget": {k: v["sched"].token_budget for k, v in ctx.items()},
        "ctx_ttft_median_s": {k: v["ttft_median_s"] for k, v in ctx.items()},
        "ctx_breakdown_frac": {"dep": dep_run.breakdown_frac(), "dwdp": dwdp_run.breakdown_frac()},
        "gen_batch_and_tps_per_gpu": gen,
        "fits_memory": dwdp_run.fits_memory,
        "assumptions": [
            (f"{hw.name}: datasheet rates x H200 achieved fractions; all-to-all"
             f" {hw.all_to_all.latency_s * 1e6:.0f} us + bytes / {hw.all_to_all.bw_gbps:.0f} GB/s (assumed)"),
            (f"routed experts {expert_format}, other weights fp8; context groups of {group_size} GPUs; DWDP prefetch"
             f" depth {dwdp.prefetch_depth}, {dwdp.schedule} {dwdp.fetch_backend} pulls at"
             f" {hw.fetch_backend(dwdp.fetch_backend).efficiency:.3f} of {hw.peer_copy_gbps:.0f} GB/s,"
             f" fetch_frac {dwdp.fetch_frac}, slowdowns {dwdp.compute_slowdown}/{dwdp.copy_slowdown} (our H200 run)"),
            f"DEP dispatch {dep.dispatch_bytes:g} B/elem, combine {dep.combine_bytes:g} B/elem; uniform routing",
            f"input lognormal mean {input_len}, CV {length_cv}; whole prompts per step, budget from {token_budgets}",
            f"generation: DEP{gen_group_size} in both arms, no MTP, context {input_len + output_len // 2}",
            ("compute: costs.Efficiency defaults for an optimized stack (fused attention, FP8 GEMMs), not our JAX"
             " implementation's calibrated ones (calibration.OURS_EFFICIENCY)"),
        ],
    }
