"""Records of a disaggregated run (`disagg.py`) and their metrics.

`RequestRecord`: one finished request with its context, hand-off and generation times; `DisaggRun`: what one
`DisaggEngine.serve` call observed; `summarize`: output TPS/GPU over the GPUs of both roles, TTFT, TPOT and
TPS/user per request, and per role: context prefill throughput and busy fraction, hand-off time and bytes,
generation throughput.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from dwdp_jax.engine import metrics as metrics_lib
from dwdp_jax.engine import timeline

# ---------------------------------------------------------------------------------------------------------------
# Records


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    """A finished request of a disaggregated run. Hand-off fields are NaN / -1 / 0 for a request that finished
    on its context engine. Times in seconds on the run's clock; `first_token_s` is when the first token was
    delivered (generation admission after the hand-off), `context_first_token_s` when it was sampled."""

    request_id: str
    prompt_len: int
    max_new_tokens: int
    output_tokens: tuple[int, ...]
    finish_reason: str
    arrival_s: float
    context_engine: int
    context_device: int
    context_admitted_s: float
    context_first_token_s: float
    handoff_start_s: float
    handoff_source_done_s: float
    handoff_end_s: float
    kv_len: int  # positions copied
    kv_bytes: int  # bytes copied
    generation_engine: int
    generation_device: int
    generation_admitted_s: float
    first_token_s: float
    last_token_s: float
    token_times_s: tuple[float, ...]

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_tokens)

    @property
    def handed_off(self) -> bool:
        return self.generation_engine >= 0

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    def to_json(self) -> dict:
        """A results row: the fields (no token lists) plus derived latencies; NaN becomes None."""
        row = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("output_tokens", "token_times_s")}
        n = self.num_output_tokens
        row.update(
            num_output_tokens=n,
            ttft_s=self.ttft_s,
            context_queue_s=self.context_admitted_s - self.arrival_s,
            context_ttft_s=self.context_first_token_s - self.arrival_s,
            handoff_wait_s=self.handoff_start_s - self.context_first_token_s,
            handoff_s=self.handoff_end_s - self.handoff_start_s,
            tpot_s=(self.last_token_s - self.first_token_s) / (n - 1) if n > 1 else math.nan,
        )
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


@dataclasses.dataclass(frozen=True)
class DisaggRun:
    """What `DisaggEngine.serve` observed: its span, finished requests, every step on every device (role
    "context" or "generation"), rejected (request_id, reason), and the GPUs of each role."""

    start_s: float
    end_s: float
    requests: tuple[RequestRecord, ...]
    events: tuple[timeline.StepEvent, ...]
    rejected: tuple[tuple[str, str], ...]
    num_context_gpus: int
    num_generation_gpus: int

    @property
    def wall_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def num_gpus(self) -> int:
        return self.num_context_gpus + self.num_generation_gpus

    def outputs(self) -> dict[str, list[int]]:
        return {r.request_id: list(r.output_tokens) for r in self.requests}


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def _median(values) -> float:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    return float(np.median(v)) if v.size else math.nan


def _p90(values) -> float:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    return float(np.percentile(v, 90)) if v.size else math.nan


def _role_steps(events, role: str, wall_s: float, num_gpus: int) -> dict:
    """Step statistics of one role's devices; tokens_per_step_mean: prefill tokens (context) or decode rows
    (generation) per device and step, over the devices that had work in it."""
    ev = [e for e in events if e.role == role]
    worked = [e.prefill_tokens if role == "context" else e.decode_tokens for e in ev]
    worked = [w for w in worked if w]
    return dict(
        num_steps=len({(e.engine, e.start_s) for e in ev}),
        busy_frac=sum(e.end_s - e.start_s for e in ev) / (wall_s * num_gpus) if wall_s > 0 else math.nan,
        step_median_s=_median([e.end_s - e.start_s for e in ev]),
        tokens_per_step_mean=float(np.mean(worked)) if worked else math.nan,
    )


def summarize(run: DisaggRun) -> dict:
    """{"metrics": flat run metrics, "roles": one row per role}. Overall metrics are those of
    `metrics.summarize_run` over all GPUs of both roles (TTFT includes queueing, prefill and hand-off);
    `context_*`, `handoff_*` and `generation_*` describe the roles. NaN where undefined."""
    reqs, wall = list(run.requests), run.wall_s
    if not reqs:
        raise ValueError("summarize: the run finished no requests")
    overall = metrics_lib.summarize_run(reqs, wall, num_gpus=run.num_gpus)
    metrics = {f.name: getattr(overall, f.name) for f in dataclasses.fields(overall)}
    rows = [r.to_json() for r in reqs]
    handed = [r for r in rows if r["generation_engine"] >= 0]
    ctx = _role_steps(run.events, "context", wall, run.num_context_gpus)
    gen = _role_steps(run.events, "generation", wall, run.num_generation_gpus)
    context = dict(
        role="context", num_gpus=run.num_context_gpus,
        input_tps_per_gpu=overall.input_tokens / wall / run.num_context_gpus,
        ttft_median_s=_median([r["context_ttft_s"] for r in rows]),
        queue_median_s=_median([r["context_queue_s"] for r in rows]), **ctx,
    )
    gbps = [r["kv_bytes"] / r["handoff_s"] / 1e9 for r in handed if r["handoff_s"]]
    handoff = dict(
        role="handoff", count=len(handed), bytes_total=int(sum(r["kv_bytes"] for r in handed)),
        median_s=_median([r["handoff_s"] for r in handed]), p90_s=_p90([r["handoff_s"] for r in handed]),
        gbps_median=_median(gbps), wait_median_s=_median([r["handoff_wait_s"] for r in handed]),
    )
    generation = dict(
        role="generation", num_gpus=run.num_generation_gpus,
        output_tps_per_gpu=sum(r.num_output_tokens - 1 for r in reqs if r.handed_off) / wall
        / run.num_generation_gpus,
        tpot_median_s=overall.tpot_median_s, **gen,
    )
    for role in (context, handoff, generation):
        metrics.update({f"{role['role']}_{k}": v for k, v in role.items() if k != "role"})
    metrics.update(num_context_gpus=run.num_context_gpus, num_generation_gpus=run.num_generation_gpus,
                   num_rejected=len(run.rejected))
    clean = lambda d: {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}
    return {"metrics": clean(metrics), "roles": [clean(context), clean(handoff), clean(generation)],
            "requests": rows}
