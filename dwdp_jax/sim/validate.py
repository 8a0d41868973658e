"""Checks the performance model against our measurements, and predicts DWDP vs DEP on GB200 NVL72.

Every results JSON of part dwdp, e2e or engine under `experiments/results/` (recursively) is compared with what
the model predicts for the same setting; each comparison is one row with its relative error and a kind:
  validation    a prediction of something no parameter was fitted to (`validation_max_rel_err` is their worst);
  calibration   the residual of a fit (`calibration.py` names the points; the profile's single-pair copy rates
                and all-to-all come from device-facts rows, shown here as calibration rows too);
  difference    a small difference of two measured steps (exposed fetch per MoE layer: a few ms between two
                steps of 60-240 ms, with ranks 20-50% apart): shown, not counted in the maximum;
  out_of_scope  measurements of mechanisms the model does not describe, with the reason in the name.

What is read:
  * `sim_calibration/device_facts_p2p.json`, `device_facts_probe4.json`: device-facts rows transcribed by hand
    (peer copies at several sizes and reader counts, the all-to-all of probe 3, probe 4's naive DWDP pipeline
    of 6 layers on 4 GPUs: compute-only, fetch-only and overlapped per-layer times). Probe 4's overlap is
    predicted from its measured compute-only and fetch-only times with the slowdown fitted at the other token
    count (hold-out both ways), for the `device_put, same peer order` column; its CuPy and staggered columns
    are out of scope (host-side synchronization; an order effect not understood).
  * part `dwdp` written by `experiments/bench_dwdp.py` (config `fetch_backends`): fetch bandwidth per backend
    and the copy-engine ceiling, the no-fetch step and the step with fetch at each tokens/rank, the exposed
    fetch per MoE layer, imbalance slowdowns of DWDP, of its no-fetch control and of DEP, DEP's step time. A run
    whose no-fetch control shows the ranks coupled (its imbalance slowdown off 1 by more than 5%: WORKSPACE
    Finding 1) has its DWDP step rows out of scope; `device_put` steps are out of scope (copies wait for the
    source GPU's queue, Finding 2, not modelled).
  * part `e2e` written by `experiments/launch.py` (colocated, on GPUs): output TPS/GPU, TPS/user and TTFT per
    concurrency, simulated with the same requests (the recorded lengths), scheduler limits, strategy, closed
    loops and pinning, and padded program shapes (`engine_shapes`), and DWDP/DEP at equal concurrency. Sweep
    summaries of `experiments/e2e_sweep.py` repeat their arms' files and are not read.
  * part `engine` written by `experiments/bench_engine.py` (one GPU, Pallas experts): prefill and decode steps.
Compute of our implementation on H200 is `calibration.OURS_EFFICIENCY` (see there for what is fitted).

The NVL72 prediction itself (`predict_nvl72` and its parts) is in `disagg_prediction.py`.

Run: `python -m dwdp_jax.sim.validate [--write experiments/results]` prints the table and the NVL72
prediction of `gb200.py`'s scenario (and writes the `simulator` results JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import pathlib
import re
import subprocess
import sys
from typing import Literal

import numpy as np

from dwdp_jax.config import preset
from dwdp_jax.sim import calibration
from dwdp_jax.sim.disagg_prediction import PAPER_DWDP_OVER_DEP, predict_nvl72  # noqa: F401 (predict_nvl72 re-exported)
from dwdp_jax.sim.hardware import GB200_NVL72, H200_HGX, Hardware
from dwdp_jax.sim.simulator import (DEVICE_PUT_SLOWDOWN, DEPConfig, DWDPConfig, EngineShapes, RunResult,
                                    SchedulerConfig, Workload, dwdp_rank_step, fetch_time_s, simulate, step_costs)

REPO = pathlib.Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "experiments" / "results"
COUPLED_CONTROL_TOL = 0.05  # a no-fetch control's imbalance slowdown further than this from 1: ranks coupled
Kind = Literal["validation", "calibration", "difference", "out_of_scope"]


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
        lines = [f"{'comparison':72s} {'measured':>10s} {'predicted':>10s} {'unit':>5s} {'rel_err':>8s}  kind  source"]
        for c in self.comparisons:
            lines.append(f"{c.name:72s} {c.measured:10.4g} {c.predicted:10.4g} {c.unit:>5s} {c.rel_err:+8.1%}  "
                         f"{c.kind}  {pathlib.Path(c.source).name}")
        lines.append(f"validation_max_rel_err = {self.max_rel_err():.3f} over "
                     f"{sum(c.kind == 'validation' for c in self.comparisons)} rows   (with differences and out of "
                     f"scope: {self.max_rel_err(('validation', 'difference', 'out_of_scope')):.3f})")
        lines += [f"skipped: {s}" for s in self.skipped]
        return "\n".join(lines)


def load_measurements(results_dir: pathlib.Path = RESULTS_DIR) -> list[dict]:
    """Every results JSON of part dwdp/e2e/engine under `results_dir` (recursively), with its `_path`; records
    marked `superseded` (a bug found after the run made them wrong; the field says which) are left out."""
    records = []
    for path in sorted(pathlib.Path(results_dir).rglob("*.json")):
        with open(path) as f:
            record = json.load(f)
        if isinstance(record, dict) and record.get("part") in ("dwdp", "e2e", "engine") and not record.get("superseded"):
            record["_path"] = str(path.relative_to(REPO) if REPO in path.parents else path)
            records.append(record)
    return records


def profile_for(device_kind: str) -> Hardware | None:
    if device_kind.startswith("nvidia-h200"):
        return H200_HGX
    if "gb200" in device_kind.lower():
        return GB200_NVL72
    return None


def _kind(record: dict, key: str, default: Kind = "validation") -> Kind:
    return "calibration" if (pathlib.Path(record["_path"]).name, key) in calibration.CALIBRATION_POINTS else default


# --------------------------------------------------------------------------------------------------------------
# device-facts: peer copies, the all-to-all, probe 4.

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
    config = record["config"]
    layers = config["num_layers"]
    out = []
    predicted = fetch_time_s(config["fetch_bytes_per_layer"], config["group_size"], hw, "staggered", "device_put")
    for row in rows:
        out.append(Comparison(f"probe4 fetch-only per layer, T={row['tokens']} (3 device_puts, 0.70 GB each)",
                              _mid(row["fetch_only_ms"]), predicted * 1e3, "ms", "validation", src))
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
    """The slowdown fitted on both token counts of the in-scope column (simulator.DEVICE_PUT_SLOWDOWN)."""
    rows = record["rows"]
    return fit_slowdown([(_mid(r["compute_only_ms"]) / 1e3, _mid(r["fetch_only_ms"]) / 1e3,
                          _mid(r["device_put_same_order_ms"]) / 1e3) for r in rows], record["config"]["num_layers"])


def compare_p2p(record: dict, hw: Hardware = H200_HGX) -> list[Comparison]:
    """Peer copies (device_put unless the row says memcpy) and probe 3's all-to-all."""
    out = []
    for row in record["rows"]:
        kind = "validation" if row.get("use") == "validation" else "calibration"
        if "readers_per_source" in row:
            copy = hw.copy_engine if "memcpy" in row["name"] else hw.device_put
            if "memcpy" in row["name"]:
                copy = dataclasses.replace(copy, efficiency=1.0)  # the raw copy: the profile's link rate itself
            seconds = copy.time_s(row["bytes"], hw.peer_copy_gbps / row["readers_per_source"])
            out.append(Comparison(f"p2p {row['name']} per-reader bandwidth", row["gbps"], row["bytes"] / seconds / 1e9,
                                  "GB/s", kind, record["_path"]))
        elif "tokens_per_rank" in row:
            out_bytes = 0.75 * row["tokens_per_rank"] * 8 * 7168 * 2
            out.append(Comparison(f"p2p {row['name']} (4 GPUs)", row["ms"], hw.all_to_all.time_s(out_bytes) * 1e3,
                                  "ms", kind, record["_path"]))
    return out


# --------------------------------------------------------------------------------------------------------------
# bench_dwdp: our DWDP and DEP on GPUs.

def _mean(x) -> float:
    return float(np.mean(x))


def compare_bench_dwdp(record: dict, hw: Hardware) -> list[Comparison]:
    config, metrics, src = record["config"], record.get("metrics", {}), record["_path"]
    cfg, seq, g = preset(config["preset"]), config["seq"], config["group_size"]
    depth = config.get("prefetch_depth", 1)
    cm = calibration.cost_model(cfg, hw)
    moe = [cfg.is_moe_layer(layer) for layer in range(cfg.num_layers)]
    n_moe = sum(moe)
    control = metrics.get("imbalance_slowdown_no_fetch")
    coupled = control is not None and abs(control - 1) > COUPLED_CONTROL_TOL
    why_coupled = f" (out: ranks coupled, no-fetch control {control:.2f})" if coupled else ""
    out = []

    def add(name, key, measured, predicted, unit, kind=None):
        out.append(Comparison(name, measured, predicted, unit, kind or _kind(record, key), src))

    if math.isfinite(metrics.get("copy_engine_gbps", math.nan)):
        add(f"dwdp G={g} cudaMemcpyPeerAsync, all ranks pulling (profile: one pair)", "copy engine ceiling",
            metrics["copy_engine_gbps"], hw.peer_copy_gbps, "GB/s")
    prefill = [r for r in record["rows"] if r.get("kind") == "prefill"]
    for backend in config.get("fetch_backends", []):
        rows = [r for r in prefill if r["fetch"] == backend]
        if rows and f"fetch_gbps_per_gpu_{backend}" in metrics:
            gbps = metrics[f"fetch_gbps_per_gpu_{backend}"]
            layer_bytes = gbps * 1e9 * rows[0]["fetch_per_layer_s"]
            predicted = layer_bytes / fetch_time_s(layer_bytes, g, hw, "staggered", sim_backend(backend)) / 1e9
            add(f"dwdp G={g} fetch per GPU, {backend}, all ranks pulling {layer_bytes / 1e9:.2f} GB",
                f"fetch {backend}", gbps, predicted, "GB/s")
    for tokens in sorted({r["tokens_per_rank"] for r in prefill}):
        cached = next(r["step_cached_s"] for r in prefill if r["tokens_per_rank"] == tokens)
        add(f"dwdp step without fetch, T={tokens}{why_coupled}", f"step_no_fetch T={tokens}", _mean(cached),
            calibration.no_fetch_step_s(cm, tokens, seq), "s", "out_of_scope" if coupled else None)
    for row in prefill:
        tokens, backend = row["tokens_per_rank"], row["fetch"]
        strategy = DWDPConfig(group_size=g, prefetch_depth=depth, fetch_backend=sim_backend(backend))
        step = step_costs(cm, hw, strategy, [calibration.prefill_batch(tokens, seq)] * g)[0]
        scope = None
        note = why_coupled
        if coupled:
            scope = "out_of_scope"
        elif backend == "device_put":
            scope, note = "out_of_scope", " (out: copies ordered on the source)"
        add(f"dwdp step with fetch, {backend}, T={tokens}{note}", f"step {backend} T={tokens}", _mean(row["step_s"]),
            step.time_s, "s", scope)
        predicted_exposed = (step.time_s - step.compute_s) / n_moe
        key = f"exposed {backend} T={tokens}"
        add(f"dwdp exposed fetch per MoE layer, {backend}, T={tokens}{note}", key,
            _mean(row["exposed_per_moe_layer_s"]), predicted_exposed, "s", scope or _kind(record, key, "difference"))
    copy_s = next((r["fetch_per_layer_s"] for r in prefill if sim_backend(r["fetch"]) == "copy_engine"), None)
    for row in (r for r in record["rows"] if r.get("kind") == "interference"):
        if copy_s is None or coupled:
            continue
        # Copies beside the no-fetch programs, never waited for: the model slows compute by
        # `compute_slowdown` while a copy is in flight, i.e. for min(copy, layer) of each MoE layer.
        tokens = row["tokens_per_rank"]
        layer_s = _mean(row["step_cached_s"]) / cfg.num_layers
        predicted = DWDPConfig().compute_slowdown * min(copy_s, layer_s)
        key = f"interference T={tokens}"
        add(f"dwdp compute slowed per MoE layer by copies beside it (nothing waits), T={tokens}", key,
            _mean(row["slowdown_per_moe_layer_s"]), predicted, "s", _kind(record, key, "difference"))
    for row in (r for r in record["rows"] if r.get("kind") == "imbalance"):
        tokens = row["tokens_per_rank"]
        if row["strategy"] in ("dwdp", "dwdp-cached"):
            # The normally loaded ranks (1..G-1) run their own programs: the model has no coupling, so 1.
            measured = _mean(row["imbalanced_step_s"][1:]) / _mean(row["balanced_step_s"][1:])
            what = "no-fetch control" if row["strategy"] == "dwdp-cached" else row.get("fetch", "")
            scope = "out_of_scope" if coupled else None
            add(f"dwdp imbalance slowdown of normal ranks, DWDP {what}, T={tokens}{why_coupled}",
                f"imbalance {row['strategy']}", measured, 1.0, "x", scope)
        elif row["strategy"] == "dep":
            # SPMD: the light ranks are padded to the heavy shape, so every rank runs 2T tokens.
            a2a = calibration.OURS_DEP_A2A
            balanced = calibration.dep_step_s(record, tokens, a2a)
            heavy = calibration.dep_step_s(record, 2 * tokens, a2a)
            add(f"dep step, balanced, T={tokens}", f"dep balanced T={tokens}", row["balanced_step_s"], balanced, "s")
            add(f"dep step, one rank 2x (all padded to {2 * tokens})", f"dep imbalanced T={tokens}",
                row["imbalanced_step_s"], heavy, "s")
            add(f"dep imbalance slowdown (padded), T={tokens}", f"dep slowdown T={tokens}",
                row["imbalanced_step_s"] / row["balanced_step_s"], heavy / balanced, "x")
    return out


# --------------------------------------------------------------------------------------------------------------
# bench_engine: one GPU, prefill and decode steps.

def compare_engine(record: dict, hw: Hardware) -> list[Comparison]:
    config = record["config"]
    cm = calibration.cost_model(preset(config["preset"]), hw)
    scope = None if config.get("backend", "pallas") == "pallas" else "out_of_scope"
    note = "" if scope is None else " (out: XLA ragged_dot experts)"
    out = []
    for row in record.get("rows", []):
        if "step_s" not in row or row.get("regime") not in ("prefill", "decode"):
            continue
        key = calibration.engine_key(row)
        out.append(Comparison(key + note, row["step_s"], calibration.engine_step_s(cm, row), "s",
                              scope or _kind(record, key), record["_path"]))
    return out


# --------------------------------------------------------------------------------------------------------------
# launch: end-to-end serving.

def _lengths(config: dict) -> tuple[int, int, float] | None:
    """(input_len, output_len, length CV) of a launcher workload; None for a trace."""
    workload = config.get("workload", "fixed")
    match = re.fullmatch(r"fixed(?:-(\d+k?)-(\d+k?))?", workload, re.IGNORECASE)
    if match:
        if match.group(1) is None:
            return config["input_len"], config["output_len"], 0.0
        n = [int(x[:-1]) * 1024 if x.lower().endswith("k") else int(x) for x in match.groups()]
        return n[0], n[1], 0.0
    if workload == "lognormal":
        sigma = config.get("lognormal_sigma", 0.5)
        return config["input_len"], config["output_len"], math.sqrt(math.expm1(sigma * sigma))
    return None


def sim_backend(name: str) -> str:
    """The simulator's copy profile of one of our fetch backends: the host- and device-ordered copy-engine
    pulls move the same bytes with the same engine."""
    return "copy_engine" if name in ("copy_engine", "copy_engine_stream") else name


def e2e_strategy(config: dict, num_devices: int) -> tuple[DWDPConfig | DEPConfig, int]:
    """The simulator's strategy for a launcher run, and how many independent groups it has."""
    strategy = config["strategy"]
    if strategy == "dep":  # DepExecutor without capacity sends tokens * top_k rows to every peer: G x the mean
        return DEPConfig(group_size=num_devices, capacity_factor=float(num_devices),
                         all_to_all=calibration.OURS_ENGINE_DEP_A2A), 1
    if strategy == "dp":
        return DWDPConfig(group_size=num_devices, fetch_frac=0.0), 1
    if strategy == "dwdp":
        g = config.get("group_size") or num_devices
        backend = sim_backend(config.get("fetch", "copy_engine"))
        slow = {} if backend == "copy_engine" else dict(compute_slowdown=DEVICE_PUT_SLOWDOWN,
                                                        copy_slowdown=DEVICE_PUT_SLOWDOWN)
        return DWDPConfig(group_size=g, prefetch_depth=max(1, config.get("prefetch_depth", 1)),
                          fetch_backend=backend, **slow), num_devices // g
    raise ValueError(f"strategy {strategy!r} has no simulator counterpart")


PAGED_CACHE_SINCE = "2026-12-06"  # commit 7317dec: the engine's slot cache replaced by the paged cache


def engine_shapes(record: dict) -> EngineShapes | None:
    """The launcher run's padded program shapes (its config's `buckets`); runs of the slot-cache engine (dated
    before PAGED_CACHE_SINCE) read whole cache rows of max_seq_len + 1 positions per query. None when the
    record does not say its buckets."""
    config = record["config"]
    buckets = config.get("buckets")
    if not buckets:
        return None
    slot_cache = record.get("date", PAGED_CACHE_SINCE) < PAGED_CACHE_SINCE
    return EngineShapes(tuple(buckets["batch"]), tuple(buckets["length"]),
                        config["max_seq_len"] + 1 if slot_cache else None)


def recorded_lengths(record: dict, concurrency: int) -> list[tuple[int, int]] | None:
    """(prompt_len, num_output_tokens) of a launcher pass's requests in submission order (request ids are
    numbered in the order the workload lists them); None when the record keeps no request rows."""
    point = next((r.get("point") for r in _point_rows(record) if r["concurrency"] == concurrency), None)
    rows = [r for r in record.get("rows") or [] if r.get("kind") == "request" and r.get("point") == point]
    if point is None or not rows:
        return None
    return [(r["prompt_len"], r["num_output_tokens"]) for r in sorted(rows, key=lambda r: r["request_id"])]


def simulate_e2e_point(record: dict, concurrency: int, hw: Hardware) -> RunResult:
    """One launcher pass in the simulator: one group, its share of the requests and of the concurrency.

    As `experiments/launch.py` serves them: request i is pinned to rank i mod G; DWDP and DP ranks each run their
    own closed loop over their share (concurrency apportioned over the ranks), DEP's lockstep engine one loop
    over the group. The requests' lengths are the recorded ones when the record keeps them (a lognormal
    workload drawn again would be another sample)."""
    config = record["config"]
    lengths = _lengths(config)
    if lengths is None:
        raise ValueError(f"workload {config.get('workload')!r}: traces are not simulated")
    strategy, groups = e2e_strategy(config, record["num_devices"])
    requests = max(1, config["num_requests"] // groups)
    recorded = recorded_lengths(record, concurrency)
    if recorded is not None:  # group 0's share: the requests pinned to its ranks
        g = strategy.group_size
        recorded = tuple(x for i, x in enumerate(recorded) if i % record["num_devices"] < g)
        requests = len(recorded)
    work = Workload(num_requests=requests, input_len=lengths[0], output_len=lengths[1], length_cv=lengths[2],
                    concurrency=max(1, (concurrency or config["num_requests"]) // groups), seed=config.get("seed", 0),
                    lengths=recorded, routing="round_robin",
                    closed_loop="group" if isinstance(strategy, DEPConfig) else "rank")
    sched = SchedulerConfig(token_budget=config["token_budget"], max_batch=config["max_batch_size"],
                            shapes=engine_shapes(record))
    cfg = preset(config["model"])
    return simulate(cfg, hw, strategy, work, sched, calibration.OURS_EFFICIENCY,
                    dense_matmul_dtype=calibration.OURS_DENSE_MATMUL)


def _point_rows(record: dict) -> list[dict]:
    return [r for r in record.get("rows") or [] if r.get("kind", "point") == "point" and "output_tps_per_gpu" in r
            and "concurrency" in r and "context_strategy" not in r]


def compare_e2e(record: dict, hw: Hardware, tps: dict | None = None) -> list[Comparison]:
    """Each timed pass of a colocated launcher run; `tps[(workload, strategy, concurrency)]` collects
    (measured, predicted) output TPS/GPU for the DWDP/DEP ratio."""
    config, src = record["config"], record["_path"]
    if config.get("mode", "colocated") != "colocated" or "strategy" not in config:
        raise ValueError("only colocated launcher runs are simulated")
    key = tuple(config.get(k) for k in ("model", "workload", "input_len", "output_len", "num_requests",
                                         "max_batch_size", "token_budget")) + (record["num_devices"],)
    out = []
    for row in _point_rows(record):
        run = simulate_e2e_point(record, row["concurrency"], hw)
        tag = f"e2e {config['strategy']} {config['model']} c={row['concurrency'] or 'all'}"
        out.append(Comparison(f"{tag} output TPS/GPU", row["output_tps_per_gpu"], run.wall_output_tps_per_gpu,
                              "tok/s", "validation", src))
        for field, predicted, unit in (("tps_per_user_median", run.tps_per_user, "tok/s"),
                                       ("ttft_median_s", run.ttft_median_s, "s")):
            if row.get(field):
                out.append(Comparison(f"{tag} {field}", row[field], predicted, unit, "validation", src))
        if tps is not None:
            tps[(key, config["strategy"], row["concurrency"])] = (row["output_tps_per_gpu"],
                                                                  run.wall_output_tps_per_gpu, src)
    return out


def compare_e2e_ratio(tps: dict) -> list[Comparison]:
    """DWDP/DEP output TPS/GPU at equal workload and concurrency: median over the concurrencies."""
    out = []
    for key in sorted({k[0] for k in tps}, key=str):
        pairs = [(tps[(key, "dwdp", c)], tps[(key, "dep", c)]) for (k, s, c) in tps
                 if k == key and s == "dwdp" and (key, "dep", c) in tps]
        if pairs:
            measured = float(np.median([a[0] / b[0] for a, b in pairs]))
            predicted = float(np.median([a[1] / b[1] for a, b in pairs]))
            out.append(Comparison(f"e2e dwdp/dep output TPS/GPU, {key[0]}, median over {len(pairs)} concurrencies",
                                  measured, predicted, "x", "validation", pairs[0][0][2]))
    return out


def validate(results_dir: pathlib.Path = RESULTS_DIR) -> Report:
    """Compares the model with every measurement found; files it cannot use are listed in `skipped`."""
    comparisons, skipped, tps = [], [], {}
    for record in load_measurements(results_dir):
        rows, path = record.get("rows") or [{}], record["_path"]
        config = record.get("config", {})
        hw = profile_for(record.get("device_kind", ""))
        try:
            if "compute_only_ms" in rows[0]:
                found = compare_probe4(record)
            elif "readers_per_source" in rows[0]:
                found = compare_p2p(record)
            elif record["part"] == "e2e" and "arms" in config:
                continue  # an e2e_sweep summary: its arms' launcher files are compared
            elif hw is None:
                skipped.append(f"{path}: no hardware profile for device_kind {record.get('device_kind')!r}")
                continue
            elif record["part"] == "dwdp" and "fetch_backends" in config:
                found = compare_bench_dwdp(record, hw)
            elif record["part"] == "engine":
                found = compare_engine(record, hw)
            elif record["part"] == "e2e":
                found = compare_e2e(record, hw, tps)
            else:
                found = []
            comparisons += found
            if not found:
                skipped.append(f"{path}: none of the fields the {record['part']} comparison reads")
        except (KeyError, TypeError, ValueError) as e:
            skipped.append(f"{path}: {type(e).__name__}: {e}")
    comparisons += compare_e2e_ratio(tps)
    return Report(comparisons, skipped)


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
    from dwdp_jax.sim import gb200  # the paper's scenario (gb200 imports this module lazily)

    nvl72 = gb200.e2e_prediction()
    print(f"\nnvl72_dwdp_over_dep = {nvl72['nvl72_dwdp_over_dep']:.3f} (paper {PAPER_DWDP_OVER_DEP:.3f}); "
          f"by TPS/user: " + ", ".join(f"{u:g}: {r:.3f}" for u, r in nvl72["ratio_by_tps_per_user"].items()))
    if args.write:
        today = datetime.date.today()
        record = {
            "part": "simulator", "date": today.isoformat(), "commit": _git_commit(),
            "command": " ".join([sys.executable, "-m", "dwdp_jax.sim.validate", *(argv or sys.argv[1:])]),
            "device_kind": "cpu", "num_devices": 0, "jax_version": None,
            "config": {"results": str(args.results), "nvl72_assumptions": nvl72["assumptions"],
                       "ours_h200": {"efficiency": dataclasses.asdict(calibration.OURS_EFFICIENCY),
                                     "dense_matmul_dtype": calibration.OURS_DENSE_MATMUL,
                                     "dep_all_to_all": dataclasses.asdict(calibration.OURS_DEP_A2A),
                                     "engine_dep_all_to_all": dataclasses.asdict(calibration.OURS_ENGINE_DEP_A2A),
                                     "copy_engine_slowdown": DWDPConfig().compute_slowdown},
                       "h200_peer_copy": {"peer_copy_gbps": H200_HGX.peer_copy_gbps,
                                          "copy_engine": dataclasses.asdict(H200_HGX.copy_engine),
                                          "device_put": dataclasses.asdict(H200_HGX.device_put)}},
            "metrics": {"validation_max_rel_err": report.max_rel_err(),
                        "validation_rows": sum(c.kind == "validation" for c in report.comparisons),
                        "validation_rows_within_15pct": sum(c.kind == "validation" and abs(c.rel_err) <= 0.15
                                                            for c in report.comparisons),
                        "validation_max_rel_err_incl_difference_and_out_of_scope":
                            report.max_rel_err(("validation", "difference", "out_of_scope")),
                        "nvl72_dwdp_over_dep": nvl72["nvl72_dwdp_over_dep"],
                        "nvl72_ratio_by_tps_per_user": {str(u): r for u, r in nvl72["ratio_by_tps_per_user"].items()},
                        "nvl72_ctx_dwdp_over_dep": nvl72["ctx_dwdp_over_dep"],
                        "paper_dwdp_over_dep": PAPER_DWDP_OVER_DEP},
            "skipped": report.skipped,
            "rows": [dict(dataclasses.asdict(c), rel_err=c.rel_err) for c in report.comparisons],
        }
        path = args.write / f"simulator-{today:%Y%m%d}-cpu.json"
        path.write_text(json.dumps(record, indent=2, default=lambda x: x.item() if hasattr(x, "item") else str(x))
                        + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
