"""Checks the performance model against measurements, and predicts DWDP vs DEP on GB200 NVL72.

Validated now, against H200 numbers transcribed from /work/shared/device-facts.md into
`experiments/results/sim_calibration/` (no end-to-end GPU result of ours exists yet):
  * peer-copy contention (`device_facts_p2p.json`): the per-reader bandwidth of the ring (one reader per
    source) and of the hot source (3 readers on one source), predicted from the profile's copy-engine and
    all-ranks-pulling rates, which come from other rows;
  * the DWDP per-layer pipeline (`device_facts_probe4.json`, probe 4: 4 GPUs, 6 layers, prefetch depth 1):
    given the measured compute-only and fetch-only times, the overlapped per-layer time. The one free
    parameter, the symmetric slowdown of compute and copy while both run, is fitted on one token count
    (T=8192 or T=3072) and the other is predicted (hold-out, both ways), for the `device_put, same peer order`
    column, the mechanism the model describes: copies ordered on the device, no host synchronization.
    The `CuPy side stream` column (driven by host-side synchronization) and the `device_put, staggered`
    column (slower than same-order for reasons not understood) are reported as out of scope; the model
    misses them by 15-40%.
Calibration rows (fit residuals, not validation): fetch-only per-layer times against the profile's
all-ranks-pulling rate, which was read from them.

Pending on measurements (the comparisons below run on whatever files exist and skip the rest):
  * part `engine` (single GPU): step times of prefill and decode, to calibrate `costs.Efficiency`
    (gemm, grouped_gemm, attention, hbm, layer_overhead_s); until then those are guesses, and every
    absolute time and the compute/fetch balance rest on them;
  * part `dwdp`: per-layer or step times of our DWDP and DEP at given tokens per rank, and
    `imbalance_slowdown_dwdp/dep`;
  * part `e2e`: output TPS/GPU, TPS/user and TTFT of DWDP and DEP serving, and `dwdp_over_dep_tps_per_gpu`;
  * anything on GB200: the NVL72 profile is datasheet x H200 fractions, so `predict_nvl72` is unvalidated.

Fields the comparisons read (results schema, `experiments/results/*.json`):
  engine: config.preset; rows [{phase: 'prefill'|'decode', batch, seq_len | context_len, step_time_s}]
  dwdp:   config.preset, config.group_size (else num_devices), optional prefetch_depth, schedule,
          expert_format; rows [{strategy: 'dwdp'|'dep', tokens_per_rank, layer_time_s | step_time_s}];
          metrics imbalance_slowdown_dwdp/dep with config.tokens_per_rank
  e2e:    config.preset, group_size, input_len, output_len, optional length_cv, token_budget, max_batch,
          chunked_prefill, expert_format; rows [{strategy, concurrency, output_tps_per_gpu,
          optional tps_per_user, ttft_median_s}]; metrics dwdp_over_dep_tps_per_gpu
Run: `python -m dwdp_jax.sim.validate [--write experiments/results]` prints the table (and writes the
`simulator` results JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import pathlib
import subprocess
import sys
from typing import Literal

import numpy as np

from dwdp_jax.config import ModelConfig, preset
from dwdp_jax.sim import costs
from dwdp_jax.sim.hardware import GB200_NVL72, H200_HGX, Hardware
from dwdp_jax.sim.simulator import (DEPConfig, DWDPConfig, RankBatch, RunResult, SchedulerConfig, Workload,
                                    dwdp_rank_step, fetch_time_s, simulate, step_costs)

REPO = pathlib.Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "experiments" / "results"
PAPER_DWDP_OVER_DEP = 1.088  # +8.8% TPS/GPU, GB200 NVL72, R1, 8K/1K, 20-100 TPS/user
PAPER_CTX_ITERATION_SPEEDUP = 1319.85 / 1131.58  # TensorRT-LLM blog: context-only, 4 GPUs, iteration time
Kind = Literal["validation", "calibration", "out_of_scope"]


@dataclasses.dataclass(frozen=True)
class Comparison:
    name: str
    measured: float
    predicted: float
    unit: str
    kind: Kind
    source: str

    @property
    def rel_err(self) -> float:
        return self.predicted / self.measured - 1.0


@dataclasses.dataclass
class Report:
    comparisons: list[Comparison]
    skipped: list[str]  # files or fields that could not be compared, with the reason

    def max_rel_err(self, kinds: tuple[str, ...] = ("validation",)) -> float:
        errs = [abs(c.rel_err) for c in self.comparisons if c.kind in kinds]
        return max(errs) if errs else math.nan

    def table(self) -> str:
        lines = [f"{'comparison':64s} {'measured':>10s} {'predicted':>10s} {'unit':>6s} {'rel_err':>8s}  kind"]
        for c in self.comparisons:
            lines.append(f"{c.name:64s} {c.measured:10.4g} {c.predicted:10.4g} {c.unit:>6s} {c.rel_err:+8.1%}  {c.kind}")
        lines.append(f"validation_max_rel_err = {self.max_rel_err():.3f}   (all rows incl. out of scope: "
                     f"{self.max_rel_err(('validation', 'out_of_scope')):.3f})")
        lines += [f"skipped: {s}" for s in self.skipped]
        return "\n".join(lines)


def load_measurements(results_dir: pathlib.Path = RESULTS_DIR) -> list[dict]:
    """Every results JSON of part dwdp/e2e/engine under `results_dir` (recursively), with its `_path`."""
    records = []
    for path in sorted(pathlib.Path(results_dir).rglob("*.json")):
        with open(path) as f:
            record = json.load(f)
        if isinstance(record, dict) and record.get("part") in ("dwdp", "e2e", "engine"):
            record["_path"] = str(path.relative_to(REPO) if REPO in path.parents else path)
            records.append(record)
    return records


def profile_for(device_kind: str) -> Hardware | None:
    if device_kind.startswith("nvidia-h200"):
        return H200_HGX
    if "gb200" in device_kind.lower():
        return GB200_NVL72
    return None


# --------------------------------------------------------------------------------------------------------------
# Probe 4: the DWDP per-layer pipeline.

def _mid(pair) -> float:
    return (pair[0] + pair[1]) / 2


def probe4_layer_time_s(compute_s: float, fetch_s: float, slowdown: float, num_layers: int = 6,
                        depth: int = 1) -> float:
    """Per-layer time of a pass over `num_layers` identical layers (first fetch exposed), both slowed alike."""
    step = dwdp_rank_step([compute_s] * num_layers, [fetch_s] * num_layers, depth, slowdown, slowdown)
    return step.time_s / num_layers


def fit_slowdown(points: list[tuple[float, float, float]], num_layers: int = 6) -> float:
    """The slowdown minimizing the worst relative error over (compute_s, fetch_s, measured_s) points."""
    def worst(s: float) -> float:
        return max(abs(probe4_layer_time_s(c, f, s, num_layers) / m - 1) for c, f, m in points)

    lo, hi = 0.0, 3.0  # each error grows with s, so the worst one is unimodal: ternary search
    for _ in range(60):
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        lo, hi = (lo, b) if worst(a) <= worst(b) else (a, hi)
    return round((lo + hi) / 2, 4)


_PROBE4_COLUMNS = {  # column -> kind; see the module docstring for why
    "device_put_same_order_ms": "validation",
    "cupy_side_stream_ms": "out_of_scope",
    "device_put_staggered_ms": "out_of_scope",
}


def compare_probe4(record: dict, hw: Hardware = H200_HGX) -> list[Comparison]:
    src, rows = record["_path"], sorted(record["rows"], key=lambda r: -r["tokens"])
    layers = record["config"]["num_layers"]
    out = []
    for row in rows:
        predicted = fetch_time_s(record["config"]["fetch_bytes_per_layer"], record["config"]["group_size"], hw)
        out.append(Comparison(f"probe4 fetch-only per layer, T={row['tokens']} (fit of all_pull_frac)",
                              _mid(row["fetch_only_ms"]), predicted * 1e3, "ms", "calibration", src))
    points = {r["tokens"]: (_mid(r["compute_only_ms"]) / 1e3, _mid(r["fetch_only_ms"]) / 1e3) for r in rows}
    for column, kind in _PROBE4_COLUMNS.items():
        measured = {r["tokens"]: _mid(r[column]) / 1e3 for r in rows}
        for fit_t, test_t in ((rows[0]["tokens"], rows[1]["tokens"]), (rows[1]["tokens"], rows[0]["tokens"])):
            s = fit_slowdown([(*points[fit_t], measured[fit_t])], layers)
            predicted = probe4_layer_time_s(*points[test_t], s, layers)
            out.append(Comparison(f"probe4 {column[:-3]} T={test_t} (slowdown {s:.2f} fit at T={fit_t})",
                                  measured[test_t] * 1e3, predicted * 1e3, "ms", kind, src))
    return out


def probe4_default_slowdown(record: dict) -> float:
    """The slowdown fitted on both token counts of the in-scope column (DWDPConfig's default)."""
    rows = record["rows"]
    return fit_slowdown([(_mid(r["compute_only_ms"]) / 1e3, _mid(r["fetch_only_ms"]) / 1e3,
                          _mid(r["device_put_same_order_ms"]) / 1e3) for r in rows], record["config"]["num_layers"])


def compare_p2p(record: dict, hw: Hardware = H200_HGX) -> list[Comparison]:
    out = []
    for row in record["rows"]:
        if row.get("use") != "validation":
            continue
        rate = min(hw.fetch_in_gbps, hw.source_out_gbps / row["readers_per_source"])
        out.append(Comparison(f"p2p {row['name']} per-reader bandwidth", row["gbps"], rate, "GB/s", "validation",
                              record["_path"]))
    return out


# --------------------------------------------------------------------------------------------------------------
# Our future measurements (see the module docstring for the fields read).

def _prefill_batch(tokens: int, seq_len: int | None = None) -> RankBatch:
    seq_len = seq_len or tokens
    n = max(1, tokens // seq_len)
    return RankBatch(np.full(n, seq_len, np.int64), np.zeros(n, np.int64), n)


def compare_engine(record: dict, hw: Hardware) -> list[Comparison]:
    cfg = preset(record["config"]["preset"])
    cm = costs.CostModel(cfg, hw, expert_format=record["config"].get("expert_format", "fp8"))
    out = []
    for row in record.get("rows", []):
        b = row["batch"]
        if row["phase"] == "prefill":
            batch = RankBatch(np.full(b, row["seq_len"], np.int64), np.zeros(b, np.int64), b)
        else:
            batch = RankBatch(np.ones(b, np.int64), np.full(b, row["context_len"], np.int64), b)
        step = step_costs(cm, hw, DWDPConfig(group_size=1), [batch])[0]  # one GPU: no fetch, no all-to-all
        out.append(Comparison(f"engine {row['phase']} batch={b} step", row["step_time_s"], step.time_s, "s",
                              "validation", record["_path"]))
    return out


def _strategy(name: str, config: dict, group_size: int):
    if name == "dep":
        return DEPConfig(group_size=group_size)
    return DWDPConfig(group_size=group_size, prefetch_depth=config.get("prefetch_depth", 1),
                      schedule=config.get("schedule", "staggered"))


def compare_dwdp(record: dict, hw: Hardware) -> list[Comparison]:
    config = record["config"]
    cfg = preset(config["preset"])
    g = config.get("group_size", record.get("num_devices", 1))
    cm = costs.CostModel(cfg, hw, expert_format=config.get("expert_format", "fp8"))
    out = []
    for row in record.get("rows", []):
        if "strategy" not in row or "tokens_per_rank" not in row:
            continue
        steps = step_costs(cm, hw, _strategy(row["strategy"], config, g),
                           [_prefill_batch(row["tokens_per_rank"], config.get("seq_len"))] * g)
        step = max(s.time_s for s in steps)
        for key, scale in (("step_time_s", 1), ("layer_time_s", cfg.num_layers)):
            if key in row:
                out.append(Comparison(f"dwdp {row['strategy']} T={row['tokens_per_rank']} {key}", row[key],
                                      step / scale, "s", "validation", record["_path"]))
    metrics, tokens = record.get("metrics", {}), config.get("tokens_per_rank")
    for name in ("dwdp", "dep"):
        key = f"imbalance_slowdown_{name}"
        if key in metrics and tokens:
            strat = _strategy(name, config, g)
            normal = _prefill_batch(tokens, config.get("seq_len"))
            heavy = _prefill_batch(2 * tokens, config.get("seq_len"))
            balanced = step_costs(cm, hw, strat, [normal] * g)[-1].time_s
            skewed = step_costs(cm, hw, strat, [heavy] + [normal] * (g - 1))[-1].time_s
            out.append(Comparison(f"dwdp {key} T={tokens}", metrics[key], skewed / balanced, "x", "validation",
                                  record["_path"]))
    return out


def compare_e2e(record: dict, hw: Hardware) -> list[Comparison]:
    config = record["config"]
    cfg = preset(config["preset"])
    g = config.get("group_size", record.get("num_devices", 1))
    sched = SchedulerConfig(token_budget=config.get("token_budget", 8192), max_batch=config.get("max_batch", 128),
                            chunked_prefill=config.get("chunked_prefill", True))
    out, tps = [], {}
    for row in record.get("rows", []):
        workload = Workload(num_requests=max(4 * row["concurrency"], 32), input_len=config["input_len"],
                            output_len=config["output_len"], length_cv=config.get("length_cv", 0.0),
                            concurrency=row["concurrency"])
        run = simulate(cfg, hw, _strategy(row["strategy"], config, g), workload, sched,
                       expert_format=config.get("expert_format", "fp8"))
        tag = f"e2e {row['strategy']} concurrency={row['concurrency']}"
        tps[(row["strategy"], row["concurrency"])] = (row["output_tps_per_gpu"], run.output_tps_per_gpu)
        out.append(Comparison(f"{tag} output_tps_per_gpu", row["output_tps_per_gpu"], run.output_tps_per_gpu,
                              "tok/s", "validation", record["_path"]))
        for key, pred in (("tps_per_user", run.tps_per_user), ("ttft_median_s", run.ttft_median_s)):
            if key in row:
                out.append(Comparison(f"{tag} {key}", row[key], pred, "", "validation", record["_path"]))
    pairs = [(tps[("dwdp", c)], tps[("dep", c)]) for s, c in tps if s == "dwdp" and ("dep", c) in tps]
    if pairs:
        measured = float(np.median([m[0] / d[0] for m, d in pairs]))
        predicted = float(np.median([m[1] / d[1] for m, d in pairs]))
        out.append(Comparison("e2e dwdp_over_dep_tps_per_gpu (median over matched concurrency)", measured,
                              predicted, "x", "validation", record["_path"]))
    return out


def validate(results_dir: pathlib.Path = RESULTS_DIR) -> Report:
    """Compares the model with every measurement found; files it cannot use are listed in `skipped`."""
    comparisons, skipped = [], []
    for record in load_measurements(results_dir):
        rows, path = record.get("rows") or [{}], record["_path"]
        hw = profile_for(record.get("device_kind", ""))
        try:
            if "compute_only_ms" in rows[0]:
                comparisons += compare_probe4(record)
            elif "readers_per_source" in rows[0]:
                comparisons += compare_p2p(record)
            elif hw is None:
                skipped.append(f"{path}: no hardware profile for device_kind {record.get('device_kind')!r}")
            else:
                compare = {"engine": compare_engine, "dwdp": compare_dwdp, "e2e": compare_e2e}[record["part"]]
                found = compare(record, hw)
                comparisons += found
                if not found:
                    skipped.append(f"{path}: none of the fields the {record['part']} comparison reads")
        except (KeyError, TypeError, ValueError) as e:
            skipped.append(f"{path}: {type(e).__name__}: {e}")
    return Report(comparisons, skipped)


# --------------------------------------------------------------------------------------------------------------
# GB200 NVL72 prediction.

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
             f" depth {dwdp.prefetch_depth}, {dwdp.schedule} pulls, fetch_frac {dwdp.fetch_frac}, slowdowns"
             f" {dwdp.compute_slowdown}/{dwdp.copy_slowdown} (H200 probe 4)"),
            f"DEP dispatch {dep.dispatch_bytes:g} B/elem, combine {dep.combine_bytes:g} B/elem; uniform routing",
            f"input lognormal mean {input_len}, CV {length_cv}; whole prompts per step, budget from {token_budgets}",
            f"generation: DEP{gen_group_size} in both arms, no MTP, context {input_len + output_len // 2}",
            "compute efficiencies are uncalibrated defaults (costs.Efficiency)",
        ],
    }


# --------------------------------------------------------------------------------------------------------------

def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=pathlib.Path, default=RESULTS_DIR)
    parser.add_argument("--write", type=pathlib.Path, default=None, help="directory for the simulator results JSON")
    args = parser.parse_args(argv)
    report = validate(args.results)
    print(report.table())
    nvl72 = predict_nvl72()
    print(f"\nnvl72_dwdp_over_dep = {nvl72['nvl72_dwdp_over_dep']:.3f} (paper {PAPER_DWDP_OVER_DEP:.3f}); "
          f"by TPS/user: " + ", ".join(f"{u:g}: {r:.3f}" for u, r in nvl72["ratio_by_tps_per_user"].items()))
    if args.write:
        today = datetime.date.today()
        record = {
            "part": "simulator", "date": today.isoformat(), "commit": _git_commit(),
            "command": " ".join([sys.executable, "-m", "dwdp_jax.sim.validate", *(argv or sys.argv[1:])]),
            "device_kind": "cpu", "num_devices": 0, "jax_version": None,
            "config": {"nvl72_assumptions": nvl72["assumptions"]},
            "metrics": {"validation_max_rel_err": report.max_rel_err(),
                        "validation_max_rel_err_incl_out_of_scope": report.max_rel_err(("validation", "out_of_scope")),
                        "nvl72_dwdp_over_dep": nvl72["nvl72_dwdp_over_dep"]},
            "rows": [dict(dataclasses.asdict(c), rel_err=c.rel_err) for c in report.comparisons],
        }
        path = args.write / f"simulator-{today:%Y%m%d}-cpu.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
