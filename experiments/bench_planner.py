"""Prefetch policies on real GPUs: bytes fetched, miss rate and step time per policy, on a skewed router.

Random R1-shaped weights (`r1-layers-N`, FP8 experts), routers calibrated to a Zipf expert load
(`planner.skew`, exponent `--zipf`), one DWDP group over the visible GPUs, every rank serving its own batch
from its own thread. For each policy and each step size (tokens per rank per step), after `--warmup` steps
that fill the router statistics, `--steps` timed steps report:
  * fetched bytes per step (prefetched + fetched on demand) / what fetch-all moves (`fetched_bytes_over_fetch_all`);
  * `miss_rate`: routed remote experts that were not prefetched / routed remote experts;
  * step time (median over steps of the slowest rank), against whole-buffer fetch-all (`policy=none`, the
    default path with no host sync) and planned fetch-all (the same two-program layers as the policies).

  python experiments/bench_planner.py --device_kind=nvidia-h200-x2 --out=$OUT
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from dwdp_jax.config import preset  # noqa: E402
from dwdp_jax.model import init_model  # noqa: E402
from dwdp_jax.parallel.dwdp import DwdpConfig, DwdpGroup  # noqa: E402
from dwdp_jax.parallel.fetch import fetch_backend  # noqa: E402
from dwdp_jax.planner import FetchPolicy, Placement, skew  # noqa: E402
from experiments.results_io import write_result  # noqa: E402

flags.DEFINE_string("preset", "r1-layers-4", "model preset (random weights)")
flags.DEFINE_list("policies", ["none", "fetch_all", "top_k", "coverage-0.9", "coverage-0.7", "on_demand"],
                  "none (whole buffers), fetch_all, top_k, coverage-<p>, on_demand (prefetch_depth 0)")
flags.DEFINE_list("tokens", ["16x1", "64x1", "4x1024"], "step shapes per rank: <requests>x<tokens each>")
flags.DEFINE_float("zipf", 0.5, "Zipf exponent of the expert load (planner.skew)")
flags.DEFINE_integer("warmup", 3, "steps before timing (router statistics)")
flags.DEFINE_integer("steps", 4, "timed steps per point")
flags.DEFINE_string("backend", "pallas", "expert GEMMs: pallas or jnp")
flags.DEFINE_string("fetch", "copy_engine", "fetch backend: copy_engine, copy_engine_stream, pallas_pull or device_put")
flags.DEFINE_string("device_kind", "unknown", "the device tool's kind, for the results file")
flags.DEFINE_string("out", "experiments/results", "results directory")
F = flags.FLAGS


def make_policy(name: str, k: int) -> tuple[FetchPolicy | None, int]:
    """(policy, prefetch_depth) of a policy name."""
    if name == "none":
        return None, 1
    if name == "on_demand":
        return FetchPolicy("fetch_all", experts_per_token=k), 0
    if name.startswith("coverage-"):
        return FetchPolicy("coverage", coverage=float(name.split("-")[1]), experts_per_token=k), 1
    if name in ("fetch_all", "top_k"):
        return FetchPolicy(name, experts_per_token=k), 1
    raise ValueError(f"unknown policy {name!r}")


def main(_):
    cfg = preset(F.preset)
    devices = jax.devices()
    g = len(devices)
    if g < 2:
        raise SystemExit(f"bench_planner needs >= 2 devices, found {g}")
    t0 = time.perf_counter()
    models = []
    for dev in devices:
        with jax.default_device(dev):
            models.append(init_model(cfg, seed=0, dtype=jnp.bfloat16, n_local_experts=cfg.n_routed_experts // g))
    routers = np.stack([np.asarray(layer.mlp.router[...]) for layer in models[0].layers if layer.is_moe])
    spec = skew.make_skew(cfg, routers, exponent=F.zipf, num_tokens=4096, iters=100, seed=0)
    for m in models:
        skew.apply_skew(m, spec)
    print(f"[{time.perf_counter() - t0:6.1f}s] models built, skew Zipf({F.zipf}) calibrated "
          f"(max total variation {spec.max_total_variation:.3f})", flush=True)
    placement = Placement.from_config(cfg, g)
    fetch = fetch_backend(F.fetch)
    rng = np.random.RandomState(0)
    shapes = [tuple(map(int, s.split("x"))) for s in F.tokens]
    rows = []
    for name in F.policies:
        policy, depth = make_policy(name, cfg.num_experts_per_tok)
        group = DwdpGroup.from_rank_models(models, placement, DwdpConfig(
            g, prefetch_depth=depth, expert_backend=F.backend, policy=policy), fetch)
        for b, s in shapes:
            batches = [[rng.randint(0, cfg.vocab_size, (b, s)).astype(np.int32) for _ in range(g)]
                       for _ in range(F.warmup + F.steps)]

            def step(rank, ids):
                t = time.perf_counter()
                rank.forward(ids, last_only=True).block_until_ready()
                return time.perf_counter() - t

            for batch in batches[:F.warmup]:
                group.run_parallel(step, batch)
            for rank in group.ranks:
                rank.reset_counters()
            times = [max(group.run_parallel(step, batch)) for batch in batches[F.warmup:]]
            c = {k: sum(r.counters[k] for r in group.ranks) for k in
                 ("prefetched_bytes", "miss_bytes", "miss_experts", "routed_remote_experts", "fetch_wait_s")}
            fetch_all_bytes = (g * F.steps * cfg.num_moe_layers * (cfg.n_routed_experts - cfg.n_routed_experts // g)
                               * group.ranks[0].expert_bytes)
            row = dict(policy=name, requests=b, tokens_per_request=s, tokens_per_rank=b * s,
                       step_s=statistics.median(times), step_s_all=times,
                       fetched_bytes_per_step_per_rank=(c["prefetched_bytes"] + c["miss_bytes"]) / (g * F.steps),
                       fetched_bytes_over_fetch_all=(c["prefetched_bytes"] + c["miss_bytes"]) / fetch_all_bytes,
                       prefetched_bytes_over_fetch_all=c["prefetched_bytes"] / fetch_all_bytes,
                       miss_rate=(c["miss_experts"] / c["routed_remote_experts"]) if c["routed_remote_experts"] else None,
                       routed_remote_experts_per_layer=c["routed_remote_experts"] / (g * F.steps * cfg.num_moe_layers)
                       if policy is not None else None,
                       fetch_wait_s_per_step=c["fetch_wait_s"] / (g * F.steps))
            rows.append(row)
            print(f"[{time.perf_counter() - t0:6.1f}s] {name:13s} {b}x{s:<5d} step {row['step_s'] * 1e3:8.2f} ms  "
                  f"fetched {row['fetched_bytes_over_fetch_all']:.3f} of fetch-all  miss rate "
                  f"{row['miss_rate'] if row['miss_rate'] is not None else float('nan'):.3f}  host wait "
                  f"{row['fetch_wait_s_per_step'] * 1e3:.2f} ms/step", flush=True)
        group.close()
        del group

    # Headline: the best subset policy at the smallest step (decode-like), and at the largest (prefill).
    metrics = {}
    for b, s in (shapes[0], shapes[-1]):
        subset = [r for r in rows if r["requests"] == b and r["tokens_per_request"] == s
                  and r["policy"] not in ("none", "fetch_all", "on_demand")]
        if subset:
            best = min(subset, key=lambda r: r["fetched_bytes_over_fetch_all"])
            metrics[f"{b}x{s}"] = dict(policy=best["policy"], fetched_bytes_over_fetch_all=best[
                "fetched_bytes_over_fetch_all"], miss_rate=best["miss_rate"], step_s=best["step_s"])
    first = metrics.get(f"{shapes[0][0]}x{shapes[0][1]}", {})
    metrics["fetched_bytes_over_fetch_all"] = first.get("fetched_bytes_over_fetch_all")
    metrics["miss_rate"] = first.get("miss_rate")
    config = dict(preset=F.preset, group_size=g, zipf=F.zipf, skew_max_total_variation=spec.max_total_variation,
                  policies=F.policies, tokens=F.tokens, warmup=F.warmup, steps=F.steps, backend=F.backend,
                  fetch=F.fetch, experts="fp8 random, skewed routers")
    print("wrote", write_result(F.out, "planner", F.device_kind, config, metrics, rows))


if __name__ == "__main__":
    app.run(main)
