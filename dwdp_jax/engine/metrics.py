"""Serving metrics from request timestamps and step records (pure numpy).

Per request: TTFT = first_token_s - arrival_s; TPOT = (last_token_s - first_token_s) / (n_out - 1), undefined
(NaN, left out of statistics) for a single output token; end-to-end latency = last_token_s - arrival_s.
Per run: throughputs over the run's wall time, tokens/s per user = 1 / TPOT averaged over requests, and
percentiles of the latencies. Per rank: the step-time distribution, from `StepRecord`s.
All times are seconds on one clock (the run's), all rates per second.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple, Protocol

import numpy as np


class StepRecord(NamedTuple):
    """One executed engine step on one rank: [start_s, end_s) and the tokens it processed (prefill + decode)."""

    rank: int
    start_s: float
    end_s: float
    num_tokens: int


class RequestTiming(Protocol):
    """What metrics read from a finished request (`scheduler.FinishedRequest` has these)."""

    arrival_s: float
    first_token_s: float
    last_token_s: float
    prompt_len: int
    num_output_tokens: int


@dataclasses.dataclass(frozen=True)
class RequestLatencies:
    """Per-request latencies, float64 [num_requests] each; tpot_s is NaN where num_output_tokens == 1."""

    ttft_s: np.ndarray
    tpot_s: np.ndarray
    e2e_s: np.ndarray


def request_latencies(records: Sequence[RequestTiming]) -> RequestLatencies:
    arrival = np.array([r.arrival_s for r in records], dtype=np.float64)
    first = np.array([r.first_token_s for r in records], dtype=np.float64)
    last = np.array([r.last_token_s for r in records], dtype=np.float64)
    n_out = np.array([r.num_output_tokens for r in records], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        tpot = np.where(n_out > 1, (last - first) / (n_out - 1), np.nan)
    return RequestLatencies(ttft_s=first - arrival, tpot_s=tpot, e2e_s=last - arrival)


def _stats(values: np.ndarray) -> tuple[float, float, float]:
    """(median, p90, p99) over the finite values; NaNs when there are none."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return math.nan, math.nan, math.nan
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return float(p50), float(p90), float(p99)


@dataclasses.dataclass(frozen=True)
class RunMetrics:
    """Run summary. `*_tps` are tokens/s; `per_gpu` divides by `num_gpus`; per-user rates are 1 / TPOT."""

    num_requests: int
    num_gpus: int
    wall_s: float
    input_tokens: int
    output_tokens: int
    input_tps: float
    output_tps: float
    output_tps_per_gpu: float
    tps_per_user_mean: float
    tps_per_user_median: float
    ttft_median_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    tpot_median_s: float
    tpot_p90_s: float
    tpot_p99_s: float
    e2e_median_s: float
    e2e_p90_s: float
    e2e_p99_s: float


def summarize_run(records: Sequence[RequestTiming], wall_s: float, num_gpus: int) -> RunMetrics:
    """Run metrics of the finished `records`, served in `wall_s` seconds by `num_gpus` GPUs."""
    if wall_s <= 0 or num_gpus < 1:
        raise ValueError(f"summarize_run needs wall_s > 0 and num_gpus >= 1, got {wall_s}, {num_gpus}")
    lat = request_latencies(records)
    input_tokens = int(sum(r.prompt_len for r in records))
    output_tokens = int(sum(r.num_output_tokens for r in records))
    with np.errstate(divide="ignore"):
        per_user = 1.0 / lat.tpot_s
    per_user = per_user[np.isfinite(per_user)]
    ttft, tpot, e2e = _stats(lat.ttft_s), _stats(lat.tpot_s), _stats(lat.e2e_s)
    return RunMetrics(
        num_requests=len(records),
        num_gpus=num_gpus,
        wall_s=float(wall_s),
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        input_tps=input_tokens / wall_s,
        output_tps=output_tokens / wall_s,
        output_tps_per_gpu=output_tokens / wall_s / num_gpus,
        tps_per_user_mean=float(per_user.mean()) if per_user.size else math.nan,
        tps_per_user_median=float(np.median(per_user)) if per_user.size else math.nan,
        ttft_median_s=ttft[0],
        ttft_p90_s=ttft[1],
        ttft_p99_s=ttft[2],
        tpot_median_s=tpot[0],
        tpot_p90_s=tpot[1],
        tpot_p99_s=tpot[2],
        e2e_median_s=e2e[0],
        e2e_p90_s=e2e[1],
        e2e_p99_s=e2e[2],
    )


@dataclasses.dataclass(frozen=True)
class StepTimeStats:
    """One rank's step times. counts: int64 [num_bins] over the shared `edges_s` float64 [num_bins + 1]."""

    rank: int
    num_steps: int
    num_tokens: int
    busy_s: float
    mean_s: float
    median_s: float
    p90_s: float
    max_s: float
    counts: np.ndarray
    edges_s: np.ndarray


def step_time_stats(steps: Iterable[StepRecord | tuple], num_bins: int = 20) -> dict[int, StepTimeStats]:
    """Per-rank step-time statistics and histograms; every rank uses the same bin edges so they compare.

    steps: (rank, start_s, end_s, num_tokens) records, any order.
    """
    steps = [StepRecord(*s) for s in steps]
    if not steps:
        return {}
    durations = np.array([s.end_s - s.start_s for s in steps], dtype=np.float64)
    if (durations < 0).any():
        raise ValueError("a step record ends before it starts")
    lo, hi = float(durations.min()), float(durations.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-9, num_bins + 1)
    ranks = np.array([s.rank for s in steps])
    tokens = np.array([s.num_tokens for s in steps])
    out = {}
    for rank in sorted(set(ranks.tolist())):
        d = durations[ranks == rank]
        counts, _ = np.histogram(d, bins=edges)
        out[rank] = StepTimeStats(
            rank=rank,
            num_steps=int(d.size),
            num_tokens=int(tokens[ranks == rank].sum()),
            busy_s=float(d.sum()),
            mean_s=float(d.mean()),
            median_s=float(np.median(d)),
            p90_s=float(np.percentile(d, 90)),
            max_s=float(d.max()),
            counts=counts,
            edges_s=edges,
        )
    return out


def _json_value(x):
    if isinstance(x, np.ndarray):
        return [_json_value(v) for v in x.tolist()]
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def to_json(run: RunMetrics, steps: dict[int, StepTimeStats] | None = None) -> dict:
    """The `metrics` and `rows` parts of a results file (see results-schema.md); NaN becomes null.

    metrics: every `RunMetrics` field, plus the largest per-rank median step time and the longest step.
    rows: one object per rank with its step-time statistics and histogram.
    """
    metrics = {f.name: _json_value(getattr(run, f.name)) for f in dataclasses.fields(run)}
    rows = []
    if steps:
        metrics["step_time_median_max_over_ranks_s"] = max(s.median_s for s in steps.values())
        metrics["step_time_max_s"] = max(s.max_s for s in steps.values())
        for s in steps.values():
            rows.append({f.name: _json_value(getattr(s, f.name)) for f in dataclasses.fields(s)})
    return {"metrics": metrics, "rows": rows}
