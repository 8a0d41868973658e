"""A disaggregated run (`--mode=disagg`): context and generation servers, one build per (context strategy,
context devices) point, one timed pass per budget and concurrency, the DWDP/DEP context comparison."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from dwdp_jax.engine import disagg as disagg_lib
from dwdp_jax.engine import metrics as metrics_lib
from dwdp_jax.engine import timeline
from dwdp_jax.engine.kv_transfer import make_transport
from dwdp_jax.parallel.threads import run_in_threads
from experiments.launch.engines import build_disagg, shared_model
from experiments.launch.records import base_config, disagg_table, make_record, write_record
from experiments.launch.serving import check_finished, serve_disagg
from experiments.launch.validation import Setup


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
    n = setup.num_devices
    needs_single = any(r.strategy == "single" for pair in d.roles for r in pair)
    model = shared_model(f, setup, single_needed=needs_single)
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
                check_finished(run.requests, setup.requests)
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
    print(disagg_table(points))
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
    config = dict(base_config(f, setup), strategy="disagg", context_strategy=list(f.context_strategy),
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
