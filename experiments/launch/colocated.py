"""A colocated run: one strategy on every device (single, DWDP, replicated DP, DEP), one timed pass per
`--concurrency` value, one results record."""

from __future__ import annotations

import os
import time

from dwdp_jax.engine import metrics as metrics_lib
from dwdp_jax.engine import timeline
from dwdp_jax.engine.paged_cache import PagedCacheSpec
from experiments.launch.engines import Engines, build_engines
from experiments.launch.records import (base_config, dwdp_ranks, fetch_counters, fetch_metrics, make_record, outputs,
                                        request_rows, summary_table, write_record)
from experiments.launch.serving import check_finished, serve, warmup
from experiments.launch.validation import Setup


def launch_colocated(f, setup: Setup, argv: list[str]) -> dict:
    """Runs the colocated sweep; returns the results record (with `path`, where it was written)."""
    t0 = time.perf_counter()
    engines = build_engines(f, setup)
    build_s = time.perf_counter() - t0
    print_header(setup, engines)
    points = [serve_point(f, setup, engines, c) for c in setup.concurrency]
    save_router_traces(f, engines)
    return report(f, setup, argv, engines, [summarize_point(p, setup) for p in points], build_s)


def print_header(setup: Setup, engines: Engines) -> None:
    spec: PagedCacheSpec = engines.runners[0].spec
    print(f"{setup.strategy} | {setup.model_name} | {setup.num_devices} x {setup.devices[0].platform} | "
          f"{len(setup.requests)} requests | slots/rank {spec.num_slots} x {spec.max_len} tokens | "
          f"KV cache {spec.total_bytes / 2**20:.2f} MiB/device ({spec.bytes_per_token} B/token) | "
          f"weights {engines.weights_bytes_per_device / 2**20:.1f} MiB/device", flush=True)


def serve_point(f, setup: Setup, engines: Engines, concurrency: int, before_clock=None) -> dict:
    """A warm-up (as --warmup says) and one timed pass at `concurrency` of this process's engines: the pass's
    finished requests, events, span and fetch counters."""
    warm_s = warmup(f, engines, setup, concurrency) if f.warmup != "none" else 0.0
    for rank in dwdp_ranks(engines):
        rank.reset_counters()
    run = serve(engines, setup.requests, concurrency, setup.strategy, setup.num_devices,
                f"c={concurrency or 'all'}", f.progress, before_clock, step_ahead=f.step_ahead)
    return dict(concurrency=concurrency, warmup_s=warm_s, finished=run.finished, events=run.events,
                start_s=run.start_s, end_s=run.end_s, counters=fetch_counters(engines))


def summarize_point(point: dict, setup: Setup) -> dict:
    """A pass of every engine of the run (`serve_point`, or every process's merged) with its metrics and per-rank
    step statistics."""
    check_finished(point["finished"], setup.requests)
    run = metrics_lib.summarize_run(point["finished"], point["end_s"] - point["start_s"], num_gpus=setup.num_devices)
    out = metrics_lib.to_json(run, metrics_lib.step_time_stats(timeline.step_records(point["events"])))
    return dict(point, metrics=dict(out["metrics"], **fetch_metrics(point["counters"])), ranks=out["rows"])


def save_router_traces(f, engines: Engines) -> None:
    """--save_router_trace: each DWDP rank's router statistics, `router-rank<r>.npz`."""
    if f.save_router_trace:
        os.makedirs(f.save_router_trace, exist_ok=True)
        for rank in dwdp_ranks(engines):
            rank.flush_router_stats().save(os.path.join(f.save_router_trace, f"router-rank{rank.rank}.npz"))


def report(f, setup: Setup, argv: list[str], engines: Engines, points: list[dict], build_s: float,
           config: dict | None = None, tag: str = "") -> dict:
    """Prints the summary and writes the run's record; `config` adds to the record's config, `tag` to its default
    file-name tag."""
    spec: PagedCacheSpec = engines.runners[0].spec
    best = max(points, key=lambda p: p["metrics"]["output_tps_per_gpu"] or 0.0)
    print()
    print(summary_table(points))
    print(f"\nfirst generated tokens (c={best['concurrency'] or 'all'}):")
    for x in sorted(best["finished"], key=lambda x: x.request_id)[: f.show_requests]:
        print(f"  {x.request_id} rank {x.rank}: prompt {x.prompt_len} -> {x.num_output_tokens} tokens "
              f"{list(x.output_tokens[:8])}{' ...' if x.num_output_tokens > 8 else ''}")

    metrics = dict(best["metrics"], concurrency=best["concurrency"], kv_cache_bytes_per_gpu=spec.total_bytes,
                   kv_bytes_per_token=spec.bytes_per_token, weights_bytes_per_gpu=engines.weights_bytes_per_device,
                   build_s=build_s, warmup_s=best["warmup_s"])
    rows = [dict(kind="point", point=i, concurrency=p["concurrency"], warmup_s=p["warmup_s"], **p["metrics"],
                 ranks=p["ranks"], outputs=outputs(p["finished"], f.show_requests),
                 timeline=timeline.columns(p["events"]))
            for i, p in enumerate(points)]
    rows += [row for i, p in enumerate(points) for row in request_rows(p["finished"], i)]
    config = dict(base_config(f, setup), strategy=setup.strategy,
                  group_size=setup.group_size if setup.strategy == "dwdp" else None, **engines.notes, **(config or {}))
    record = make_record(f, setup, argv, config, metrics, rows)
    default_tag = f"{setup.strategy}-{setup.model_name}-g{setup.num_devices}{tag}"
    record["path"] = write_record(f.out, record, f.tag or default_tag)
    print(f"wrote {record['path']}")
    return record
