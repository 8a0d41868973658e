"""Reporting: summary tables, and the results record (one JSON per run, the schema of
../shared/results-schema.md) with its config, metrics, per-point and per-request rows."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import shlex

import jax
import numpy as np

from dwdp_jax.engine import metrics as metrics_lib
from experiments.launch.engines import Engines
from experiments.launch.validation import Setup
from experiments.results_io import git_commit

# The keys of a results file, in order (../shared/results-schema.md).
RECORD_KEYS = ("part", "date", "commit", "command", "device_kind", "num_devices", "jax_version", "config", "metrics",
               "rows")


def table(head, rows) -> str:
    lines = [" | ".join(f"{h:>14}" for h in head)]
    for cells in rows:
        lines.append(" | ".join(f"{c:>14.4g}" if isinstance(c, float) else f"{str(c):>14}" for c in cells))
    return "\n".join(lines)


def summary_table(points) -> str:
    head = ("concurrency", "requests", "out tok/s", "tok/s/gpu", "tok/s/user", "TTFT p50 s", "TPOT p50 s",
            "step p50 max s", "wall s")
    return table(head, [
        [p["concurrency"] or "all", p["metrics"]["num_requests"], p["metrics"]["output_tps"],
         p["metrics"]["output_tps_per_gpu"], p["metrics"]["tps_per_user_median"], p["metrics"]["ttft_median_s"],
         p["metrics"]["tpot_median_s"], p["metrics"].get("step_time_median_max_over_ranks_s"),
         p["metrics"]["wall_s"]] for p in points])


def disagg_table(points) -> str:
    head = ("context", "ctx:gen gpus", "ctx budget", "concurrency", "tok/s/gpu", "tok/s/user", "TTFT p50 s",
            "TPOT p50 s", "hand-off p50 s", "wall s")
    return table(head, [
        [p["context_strategy"], f"{p['context_devices']}:{p['generation_devices']}", p["context_token_budget"],
         p["concurrency"] or "all", p["metrics"]["output_tps_per_gpu"], p["metrics"]["tps_per_user_median"],
         p["metrics"]["ttft_median_s"], p["metrics"]["tpot_median_s"], p["metrics"]["handoff_median_s"],
         p["metrics"]["wall_s"]] for p in points])


def device_kind(f, setup: Setup) -> str:
    if f.device_kind:
        return f.device_kind
    d = setup.devices[0]
    if d.platform == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", d.device_kind.lower()).strip("-") + f"-x{setup.num_devices}"


def clean(x):
    """JSON-ready: numpy scalars and arrays to Python, non-finite floats to None (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return clean(x.tolist())
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
                  device_kind=device_kind(f, setup), num_devices=setup.num_devices,
                  jax_version=jax.__version__, config=config, metrics=metrics, rows=rows)
    assert tuple(record) == RECORD_KEYS
    return clean(record)


def write_record(out_dir: str, record: dict, tag: str) -> str:
    """`e2e-<YYYYMMDD>-<device_kind>-<tag>.json` under out_dir (schema: results-schema.md)."""
    os.makedirs(out_dir, exist_ok=True)
    name = f"{record['part']}-{record['date'].replace('-', '')}-{record['device_kind']}-{tag}.json"
    path = os.path.join(out_dir, name)
    with open(path, "w") as fh:
        json.dump({k: record[k] for k in RECORD_KEYS}, fh, indent=1, allow_nan=False)
    return path


def request_rows(finished, point: int) -> list[dict]:
    lat = metrics_lib.request_latencies(finished)
    return [dict(kind="request", point=point, request_id=x.request_id, rank=x.rank, prompt_len=x.prompt_len,
                 num_output_tokens=x.num_output_tokens, arrival_s=x.arrival_s, admitted_s=x.admitted_s,
                 first_token_s=x.first_token_s, last_token_s=x.last_token_s, ttft_s=lat.ttft_s[i],
                 tpot_s=lat.tpot_s[i], finish_reason=x.finish_reason) for i, x in enumerate(finished)]


def outputs(finished, show: int) -> dict:
    return {x.request_id: list(x.output_tokens) for x in sorted(finished, key=lambda x: x.request_id)[:show]}


def base_config(f, setup: Setup) -> dict:
    return dict(
        model=setup.model_name, checkpoint=f.checkpoint, mode=setup.mode, num_devices=setup.num_devices,
        fetch=f.fetch, expert_backend=f.expert_backend, prefetch_depth=f.prefetch_depth, staggered=f.staggered,
        merge_copy=f.merge_copy, gemm_sms=f.gemm_sms, planner_policy=f.planner_policy, planner_top_k=f.planner_top_k,
        planner_coverage=f.planner_coverage, staging_budget=f.staging_budget, placement=f.placement or "contiguous",
        routing_skew=f.routing_skew, dtype=setup.dtype.name,
        workload=f.workload, num_requests=len(setup.requests), input_len=f.input_len, output_len=f.output_len,
        concurrency=list(setup.concurrency), max_batch_size=setup.sched.max_batch_size,
        token_budget=setup.sched.token_budget, max_seq_len=setup.sched.max_seq_len, temperature=f.temperature,
        seed=f.seed, warmup=f.warmup, buckets=dataclasses.asdict(setup.buckets), step_ahead=f.step_ahead,
        command_buffers=f.command_buffers, xla_flags=os.environ.get("XLA_FLAGS", ""),
    )


def dwdp_ranks(engines: Engines) -> list:
    return [r.rank for r in engines.runners if hasattr(r, "rank")]


def fetch_counters(engines: Engines) -> dict | None:
    """DWDP ranks' fetch counters over one pass (`DwdpRank.counters`), summed over this process's ranks; None
    for other strategies."""
    ranks = dwdp_ranks(engines)
    if not ranks:
        return None
    return {k: sum(r.counters[k] for r in ranks) for k in ("prefetched_bytes", "miss_bytes", "miss_experts",
                                                           "routed_remote_experts", "fetch_wait_s")}


def fetch_metrics(counters: dict | None) -> dict:
    """The pass's fetch metrics from `fetch_counters` (summed over every rank); {} for other strategies."""
    if counters is None:
        return {}
    c = counters
    return dict(fetch_prefetched_bytes=c["prefetched_bytes"], fetch_miss_bytes=c["miss_bytes"],
                fetch_miss_rate=c["miss_experts"] / c["routed_remote_experts"] if c["routed_remote_experts"] else None,
                fetch_wait_s=c["fetch_wait_s"])
