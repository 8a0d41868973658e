"""DWDP on real GPUs: fetch bandwidth, exposed fetch time, and a slow rank's effect, against DEP.

Random R1-shaped weights (`r1-layers-N`: real layer sizes, FP8 experts), every rank serving its own prefill
batch. Measured in one process, each figure next to its baseline:
  * copy-engine ceiling: cudaMemcpyPeerAsync (CuPy), every GPU pulling from a peer at once;
  * DWDP fetch: one MoE layer's remote expert buffers pulled by every rank at once through the fetch backend;
  * exposed fetch: the DWDP step with real fetches vs the same programs reading staged copies made once
    (`CachedFetch`): the difference is fetch time the prefetch did not hide;
  * imbalance: one rank gets 2x the tokens; the other rank's step time vs balanced (DWDP: independent
    programs; DEP: one SPMD program, so every rank computes the padded 2x shape and waits at each all-to-all).

Run on a 2+ GPU machine: python experiments/bench_dwdp.py --device_kind=nvidia-h200-x2 --out=$OUT
"""

from __future__ import annotations

import contextlib
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
from dwdp_jax.parallel.dep import DepModel  # noqa: E402
from dwdp_jax.parallel.dwdp import DwdpConfig, DwdpGroup  # noqa: E402
from dwdp_jax.parallel.fetch import CachedFetch, CopyEnginePull, fetch_backend  # noqa: E402
from pallas_kernels.profiling import copy_engine_gbps  # noqa: E402
from dwdp_jax.planner.placement import Placement  # noqa: E402
from experiments.gpu_clocks import ClockSampler  # noqa: E402
from experiments.results_io import write_result  # noqa: E402
from experiments.timing import median_wall_s  # noqa: E402

FLAGS = flags.DEFINE_string("preset", "r1-layers-4", "model preset (random weights)")
flags.DEFINE_integer("group_size", 0, "GPUs in the DWDP group (0: all)")
flags.DEFINE_list("tokens", ["4096", "8192", "16384"], "prefill tokens per rank per step")
flags.DEFINE_integer("seq", 1024, "sequence length of each prefill request")
flags.DEFINE_integer("repeats", 5, "timed repeats per point (median)")
flags.DEFINE_string("backend", "pallas", "expert GEMMs: pallas or jnp")
flags.DEFINE_string("device_kind", "unknown", "the device tool's kind, for the results file")
flags.DEFINE_string("out", "experiments/results", "results directory")
flags.DEFINE_bool("dep", True, "also measure DEP")
flags.DEFINE_list("fetch", ["device_put", "copy_engine"], "fetch backends to measure (device_put, copy_engine, "
                  "copy_engine_stream, pallas_pull, pallas_async)")
flags.DEFINE_integer("gemm_sms", 0, "persistent CTAs of the Pallas expert GEMMs (0: one per SM; with pallas_async "
                     "the SM count minus its 16 fetch CTAs)")
flags.DEFINE_bool("interference", True, "also run the no-fetch programs with the same copies running beside them, "
                  "never waited for (what the copies cost the compute, apart from any wait)")
flags.DEFINE_integer("prefetch_depth", 1, "MoE layers fetched ahead")
flags.DEFINE_bool("clocks", True, "sample SM clock and power with nvidia-smi during each timed phase")
flags.DEFINE_integer("ring_slots", 3, "copy engine: staging buffers per (device, peer); must exceed the depth")
F = flags.FLAGS


class CopiesBeside(CachedFetch):
    """Measurement control: the programs read staging copied once (as `CachedFetch`) while `copier` makes the
    real fetch's copies into its own staging, which nothing reads and nobody waits for (no host wait, no
    `consumed`, so its ring never blocks). The step time over `CachedFetch`'s is what the copies cost the
    compute they run beside (HBM and NVLink traffic, power), apart from any ordering wait."""

    name = "copies_beside"

    def __init__(self, copier):
        super().__init__()
        self.copier = copier

    def __call__(self, src, device):
        self.copier(src, device)
        return super().__call__(src, device)


def extra_per_moe_layer(step_s, cached_s, cfg):
    """Per rank: the step time over the no-fetch step spread over the MoE layers (s), a layer's time
    estimate (no-fetch step / layers, s), and the largest ratio of the two over the ranks."""
    per_layer = [(a - b) / cfg.num_moe_layers for a, b in zip(step_s, cached_s)]
    layer_s = [b / cfg.num_layers for b in cached_s]
    return per_layer, layer_s, max(p / m for p, m in zip(per_layer, layer_s))


timed = median_wall_s


def concurrent_step_times(group, batches, repeats):
    """Each rank runs `repeats` forward steps on its own batch, from its own thread; median step time per rank."""

    def loop(rank, ids):
        rank.forward(ids, last_only=True).block_until_ready()
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            rank.forward(ids, last_only=True).block_until_ready()
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    return group.run_parallel(loop, batches)


def main(_):
    cfg = preset(F.preset)
    devices = jax.devices()[: F.group_size or jax.device_count()]
    g = len(devices)
    if g < 2:
        raise SystemExit(f"bench_dwdp needs >= 2 GPUs, found {jax.device_count()}")
    e_local = cfg.n_routed_experts // g
    rows, metrics = [], {}

    try:
        ce = copy_engine_gbps(devices)
    except ImportError:  # CPU smoke runs: no CuPy, no copy engine
        ce = float("nan")
    print(f"copy engine (cudaMemcpyPeerAsync, {g} GPUs pulling at once): {ce:.1f} GB/s per GPU", flush=True)

    models = []
    for r, dev in enumerate(devices):
        with jax.default_device(dev):
            models.append(init_model(cfg, seed=0, dtype=jnp.bfloat16, n_local_experts=e_local))
    placement = Placement.from_config(cfg, g)
    if F.ring_slots <= F.prefetch_depth:
        raise SystemExit(f"--ring_slots={F.ring_slots} must exceed --prefetch_depth={F.prefetch_depth}")
    dw = DwdpConfig(g, prefetch_depth=F.prefetch_depth, staggered=True, expert_backend=F.backend,
                    gemm_sms=F.gemm_sms or None)
    cached = DwdpGroup.from_rank_models(models, placement, dw, CachedFetch())
    moe_layer = cfg.first_k_dense_replace
    layer_bytes = (g - 1) * cached.ranks[0].local_experts(moe_layer).nbytes()
    metrics["copy_engine_gbps"] = ce
    base = int(F.tokens[len(F.tokens) // 2])
    # Host (numpy) batches: each rank copies its own to its own device.
    batches = {t: [np.random.RandomState(r).randint(0, cfg.vocab_size, (t // F.seq, F.seq)).astype(np.int32)
                   for r in range(g)] for t in set(map(int, F.tokens)) | {base}}
    heavy = [np.random.RandomState(9).randint(0, cfg.vocab_size, (2 * base // F.seq, F.seq)).astype(np.int32)]
    heavy += batches[base][1:]
    clocks = ClockSampler() if F.clocks else None
    phase = clocks.phase if clocks else (lambda name: contextlib.nullcontext())

    def sampled_step_times(name, grp, batch):
        """concurrent_step_times, after a warm-up outside the sampled phase (so compiles and idle GPUs
        do not dilute the clock and power samples)."""
        if clocks:
            concurrent_step_times(grp, batch, 1)
        with phase(name):
            return concurrent_step_times(grp, batch, F.repeats)

    t_cached = {t: sampled_step_times(f"no fetch T={t}", cached, batches[t]) for t in batches}
    bal_cached = t_cached[base]
    imb_cached = concurrent_step_times(cached, heavy, F.repeats)
    metrics["imbalance_slowdown_no_fetch"] = statistics.mean(imb_cached[1:]) / statistics.mean(bal_cached[1:])
    rows.append(dict(kind="imbalance", strategy="dwdp-cached", tokens_per_rank=base, balanced_step_s=bal_cached,
                     imbalanced_step_s=imb_cached))
    print(f"no fetch (cached staging): normal ranks {statistics.mean(bal_cached[1:]) * 1e3:.2f} ms balanced,"
          f" {statistics.mean(imb_cached[1:]) * 1e3:.2f} ms when rank 0 has 2x", flush=True)

    outputs = {}
    for name in F.fetch:
        fetch = fetch_backend(name, slots=F.ring_slots)
        group = DwdpGroup.from_rank_models(models, placement, dw, fetch)
        probe = batches[min(batches)]
        outputs[name] = [group.run_parallel(lambda rank, ids: np.asarray(rank.forward(ids[:1])), probe)
                         for _ in range(2)]

        def fetch_all_ranks():
            def one(rank, _):
                jax.block_until_ready(rank.fetch.ready_all(rank.issue_fetch(moe_layer)))
                rank.fetch.sync(rank.device)

            group.run_parallel(one, [None] * g)

        with phase(f"{name} fetch alone"):
            t_fetch = timed(fetch_all_ranks, F.repeats)
        gbps = layer_bytes / t_fetch / 1e9
        metrics[f"fetch_gbps_per_gpu_{name}"] = gbps
        metrics[f"fetch_frac_of_copy_engine_{name}"] = gbps / ce
        print(f"[{name}] fetch, all ranks at once: {layer_bytes / 1e9:.2f} GB/layer in {t_fetch * 1e3:.2f} ms ="
              f" {gbps:.1f} GB/s per GPU ({gbps / ce:.2f} of cudaMemcpyPeerAsync)", flush=True)
        exposed = {}
        for tokens in map(int, F.tokens):
            t_real = sampled_step_times(f"{name} T={tokens}", group, batches[tokens])
            frac = [(a - b) / a for a, b in zip(t_real, t_cached[tokens])]
            per_layer, moe_layer_s, exposed[str(tokens)] = extra_per_moe_layer(t_real, t_cached[tokens], cfg)
            rows.append(dict(kind="prefill", fetch=name, tokens_per_rank=tokens, step_s=t_real,
                             step_cached_s=t_cached[tokens], exposed_per_moe_layer_s=per_layer,
                             layer_s_estimate=moe_layer_s, fetch_per_layer_s=t_fetch))
            print(f"[{name}] T={tokens:6d}: step {max(t_real) * 1e3:8.2f} ms (no fetch {max(t_cached[tokens]) * 1e3:8.2f}"
                  f" ms): exposed {max(per_layer) * 1e3:6.2f} ms per MoE layer = {exposed[str(tokens)] * 100:5.1f}%"
                  f" of a layer; {max(frac) * 100:5.1f}% of the step (fetch alone {t_fetch * 1e3:.2f} ms)", flush=True)
        metrics[f"exposed_fetch_frac_{name}"] = exposed
        bal = concurrent_step_times(group, batches[base], F.repeats)
        imb = concurrent_step_times(group, heavy, F.repeats)
        slow = statistics.mean(imb[1:]) / statistics.mean(bal[1:])
        metrics[f"imbalance_slowdown_dwdp_{name}"] = slow
        rows.append(dict(kind="imbalance", strategy="dwdp", fetch=name, tokens_per_rank=base, balanced_step_s=bal,
                         imbalanced_step_s=imb))
        print(f"[{name}] DWDP normal ranks: {statistics.mean(bal[1:]) * 1e3:.2f} ms balanced,"
              f" {statistics.mean(imb[1:]) * 1e3:.2f} ms when rank 0 has 2x: slowdown {slow:.3f}", flush=True)
        group.close()
        del group
    if F.interference and any(n.startswith("copy_engine") for n in F.fetch):
        beside = DwdpGroup.from_rank_models(models, placement, dw, CopiesBeside(CopyEnginePull(slots=F.ring_slots)))
        for tokens in map(int, F.tokens):
            t_beside = sampled_step_times(f"copies beside T={tokens}", beside, batches[tokens])
            per_layer, _, frac = extra_per_moe_layer(t_beside, t_cached[tokens], cfg)
            metrics.setdefault("interference_frac", {})[str(tokens)] = frac
            rows.append(dict(kind="interference", tokens_per_rank=tokens, step_s=t_beside,
                             step_cached_s=t_cached[tokens], slowdown_per_moe_layer_s=per_layer))
            print(f"[copies beside, never waited] T={tokens:6d}: step {max(t_beside) * 1e3:8.2f} ms: compute slowed"
                  f" {max(per_layer) * 1e3:6.2f} ms per MoE layer = {frac * 100:5.1f}% of a layer", flush=True)
        beside.close()
        del beside
    rel = lambda a, b: max(float(np.abs(x - y).max() / np.abs(y).max()) for x, y in zip(a, b))
    for name, (first, second) in outputs.items():
        metrics[f"rerun_rel_diff_{name}"] = rel(first, second)
        print(f"logits, {name} run twice: max rel diff {rel(first, second):.3g} (must be 0: ordered combine)")
    names = list(outputs)
    for name in names[1:]:
        d = rel(outputs[name][0], outputs[names[0]][0])
        metrics[f"{name}_vs_{names[0]}_rel_diff"] = d
        print(f"logits, {name} vs {names[0]}: max rel diff {d:.3g}", flush=True)
    best = min(F.fetch, key=lambda n: max(metrics[f"exposed_fetch_frac_{n}"].values()))  # the best backend
    metrics["best_fetch_backend"] = best
    metrics["fetch_frac_of_copy_engine"] = metrics[f"fetch_frac_of_copy_engine_{best}"]
    metrics["exposed_fetch_frac"] = metrics[f"exposed_fetch_frac_{best}"]
    metrics["imbalance_slowdown_dwdp"] = metrics[f"imbalance_slowdown_dwdp_{best}"]

    if F.dep:
        cap = int(2 * base * cfg.num_experts_per_tok / g)
        dep = DepModel.from_rank_models(models, capacity=cap, backend=F.backend)
        ids_bal = np.concatenate(batches[base])
        ids_imb = np.concatenate([heavy[0]] + [np.concatenate([n, n]) for n in batches[base][1:]])  # SPMD pads
        dep_cap2 = DepModel.from_rank_models(models, capacity=2 * cap, backend=F.backend)
        t_bal = timed(lambda: dep.forward(ids_bal).block_until_ready(), F.repeats)
        t_imb = timed(lambda: dep_cap2.forward(ids_imb).block_until_ready(), F.repeats)
        metrics["imbalance_slowdown_dep"] = t_imb / t_bal
        metrics["dep_step_s"] = t_bal
        rows.append(dict(kind="imbalance", strategy="dep", tokens_per_rank=base, balanced_step_s=t_bal,
                         imbalanced_step_s=t_imb))
        print(f"DEP: step {t_bal * 1e3:.2f} ms balanced, {t_imb * 1e3:.2f} ms when one rank has 2x "
              f"(SPMD: every rank runs the padded shape and waits at each all-to-all): slowdown {t_imb / t_bal:.3f}",
              flush=True)

    if clocks and clocks.summary():
        metrics["clocks"] = clocks.summary()
        print(clocks.table(), flush=True)

    config = dict(preset=F.preset, group_size=g, prefetch_depth=F.prefetch_depth, ring_slots=F.ring_slots,
                  staggered=True, backend=F.backend,
                  fetch_backends=F.fetch, seq=F.seq, tokens=F.tokens, repeats=F.repeats, experts="fp8 random")
    path = write_result(F.out, "dwdp", F.device_kind, config, metrics, rows)
    print("wrote", path)


if __name__ == "__main__":
    app.run(main)
