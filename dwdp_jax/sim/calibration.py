"""Our JAX implementation on H200 as the performance model sees it: each parameter set once, from one measurement.

Rates measured on one operation at a time (not fitted to step times):
  * dense matmuls: `model.Linear` dequantizes FP8 weights and multiplies in bf16 through XLA, at 625 TFLOP/s
    (`/work/shared/device-facts.md`, probe 3: `a @ a` in jax) = 0.78 of cuBLAS's 799 (`Efficiency.gemm`);
  * routed experts: the FP8 Pallas grouped GEMM at prefill shapes (32 experts x 1024 rows; gate/up 2/3 of the
    FLOPs, down 1/3) in `experiments/results/kernels-20261122-nvidia-h200-quick.json`, as a fraction of
    cuBLAS FP8 (`Efficiency.grouped_gemm`, `kernel_grouped_gemm_efficiency`);
  * the copy-engine fetch: `hardware.H200_COPY_ENGINE_EFFICIENCY`.
Fitted on our step times, each on named points, every other point held out (`validate.py`):
  * `Efficiency.layer_overhead_s`, `score_passes` and `token_overhead_s` (`fit_compute`): one GPU running the
    engine (`engine-20261122-nvidia-h200.json`, bench_engine.py, commit 50e6e73) at its smallest decode batch (1
    request, 4096 cached tokens: 80% of that step is the per-layer overhead, 1.3 ms per layer, not understood
    beyond "many small XLA kernels per layer") and its smallest prefill (1 x 2048 tokens after 0 and 2048
    cached), and bench_dwdp's no-fetch step at 8192 tokens/rank in sequences of 1024 (`DWDP_FILE`). Our
    attention is XLA einsums: it scores every query against every key of its row, masked (the engine's slot
    cache: max_len + 1 = 4097 keys per query; bench_dwdp's plain forward: the 1024 of its sequence), and
    writes and reads those fp32 scores; the score passes (7.4) stand for that traffic. The two prefills'
    different keys per token separate it from the costs per token (0.36 us per token and layer: elementwise
    passes, activation quantization, routing gathers). Until 2026-12-06 this file counted causal key pairs
    and fitted 11.7 passes on the engine alone, which also under-predicted long-row prefills (issue 21);
  * `simulator.COPY_ENGINE_SLOWDOWN` (`fit_copy_engine_slowdown`): compute and copy slowing each other, from the
    DWDP step with the copy-engine fetch at 8192 tokens/rank in `dwdp-20261122-nvidia-h200-x2.json` (bench_dwdp,
    commit 6cd96a7), given that point's measured no-fetch step and fetch time (as `fit_slowdown` does for
    probe 4);
  * `OURS_DEP_A2A` (`fit_dep_all_to_all`): our DEP's dispatch + combine, from its balanced step in
    `dwdp-20261122-nvidia-h200-x2-devput-dep.json`. Our DEP sends fixed-capacity padded buffers
    (`DEPConfig.capacity_factor`) through XLA's all_to_all and scatters/gathers them around it; keeping probe
    3's 0.59 ms latency, the step fits an effective bandwidth of about a quarter of probe 3's: our DEP loses
    about 15 ms per MoE layer at 8192 tokens/rank to data movement that a tuned DEP would not pay.
  * `OURS_ENGINE_DEP_A2A` (`fit_engine_dep_all_to_all`): the serving engine's DEP (`DepRunner`: exact
    dispatch, no capacity, `e2e_strategy`'s capacity factor G), from the steps of `ENGINE_DEP_FILE`'s
    timeline at c=16: the latency from its decode-only steps (none: they already sit at the model's compute),
    the bandwidth from the steps whose device-0 plan prefills a full 8K-token chunk (medians matched). It is
    an effective rate: everything in those steps the compute model leaves out lands in it.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from dwdp_jax.config import ModelConfig, preset
from dwdp_jax.sim import costs
from dwdp_jax.sim.hardware import H200_HGX, AllToAll, Hardware
from dwdp_jax.sim.simulator import DEPConfig, DWDPConfig, RankBatch, dwdp_rank_step, step_costs

REPO = pathlib.Path(__file__).resolve().parents[2]
RESULTS = REPO / "experiments" / "results"
KERNELS_FILE = "kernels-20261122-nvidia-h200-quick.json"
ENGINE_FILE = "engine-20261122-nvidia-h200.json"
DWDP_FILE = "dwdp-20261122-nvidia-h200-x2.json"
DEP_FILE = "dwdp-20261122-nvidia-h200-x2-devput-dep.json"
ENGINE_DEP_FILE = "e2e-20261123-nvidia-h200-x2-sweep-4k32-48-depfix-dep.json"
ENGINE_DEP_CONCURRENCY = 16
XLA_BF16_GEMM_EFFICIENCY = 625.0 / 799.0

# The fitted values (tests/test_simulator.py refits them from the files above).
GROUPED_GEMM_EFFICIENCY = 0.4966
SCORE_PASSES = 7.413
LAYER_OVERHEAD_S = 1.332e-3
TOKEN_OVERHEAD_S = 3.627e-7
OURS_EFFICIENCY = costs.Efficiency(gemm=XLA_BF16_GEMM_EFFICIENCY, grouped_gemm=GROUPED_GEMM_EFFICIENCY,
                                   layer_overhead_s=LAYER_OVERHEAD_S, score_passes=SCORE_PASSES,
                                   token_overhead_s=TOKEN_OVERHEAD_S)
OURS_DENSE_MATMUL = "bf16"
OURS_DEP_A2A = AllToAll(latency_s=H200_HGX.all_to_all.latency_s, bw_gbps=88.21)
OURS_ENGINE_DEP_A2A = AllToAll(latency_s=0.0, bw_gbps=70.83)
# Calibration points: (file, comparison key) pairs whose residuals are fits, not validation.
CALIBRATION_POINTS = {
    (ENGINE_FILE, "engine prefill 1 x 2048"), (ENGINE_FILE, "engine decode 1 x 4096"),
    (DWDP_FILE, "step copy_engine T=8192"), (DWDP_FILE, "exposed copy_engine T=8192"),
    (DWDP_FILE, "fetch copy_engine"), (DWDP_FILE, "step_no_fetch T=8192"), (DEP_FILE, "dep balanced T=8192"),
}  # OURS_ENGINE_DEP_A2A fits step times that no comparison row shows; ENGINE_DEP_FILE's rows are then partly in-sample


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def cost_model(cfg: ModelConfig, hw: Hardware = H200_HGX, eff: costs.Efficiency = OURS_EFFICIENCY,
               expert_format: str = "fp8") -> costs.CostModel:
    """Our implementation's cost model (bf16 matmuls of dequantized dense weights)."""
    return costs.CostModel(cfg, hw, eff, expert_format=expert_format, dense_matmul_dtype=OURS_DENSE_MATMUL)


def prefill_batch(tokens: int, seq_len: int) -> RankBatch:
    """A bench prefill batch: tokens / seq_len sequences of seq_len new tokens, no context, one logit row each.
    The model's plain forward (no cache) scores every query against all seq_len keys of its sequence, masked."""
    n = max(1, tokens // seq_len)
    return RankBatch(np.full(n, seq_len, np.int64), np.zeros(n, np.int64), n, np.full(n, seq_len, np.int64))


def no_fetch_step_s(cm: costs.CostModel, tokens: int, seq_len: int) -> float:
    """A rank's prefill step computing alone (DWDP with the peers' experts already staged)."""
    return step_costs(cm, cm.hw, DWDPConfig(group_size=1), [prefill_batch(tokens, seq_len)])[0].time_s


def layer_compute_s(cm: costs.CostModel, tokens: int, seq_len: int) -> np.ndarray:
    """Per-layer compute of one rank's prefill step, [num_layers] (the LM head counted in the last layer)."""
    cfg, batch = cm.cfg, prefill_batch(tokens, seq_len)
    step = step_costs(cm, cm.hw, DWDPConfig(group_size=1), [batch])[0]
    attn = (cm.attention_s(batch.new_tokens, batch.context, batch.row_len) + cm.eff.layer_overhead_s
            + cm.eff.token_overhead_s * batch.tokens)
    out = np.array([attn + (cm.shared_expert_s(tokens) + cm.routed_experts_s(tokens * cfg.num_experts_per_tok,
                                                                             cm.experts_touched(tokens))
                            if cfg.is_moe_layer(layer) else cm.dense_mlp_s(tokens))
                    for layer in range(cfg.num_layers)])
    out[-1] += cm.head_s(batch.sampled)
    assert abs(out.sum() - step.time_s) <= 1e-9 * step.time_s, (out.sum(), step.time_s)
    return out


def kernel_grouped_gemm_efficiency(record: dict, hw: Hardware = H200_HGX) -> float:
    """FP8 grouped GEMM TFLOP/s of an R1 expert (gate/up then down) at prefill shapes / the profile's FP8 rate."""
    rows = {r["shape"]: r for r in record["rows"] if r["regime"] == "prefill"}
    t = sum(rows[s]["time_s"]["fp8"] for s in ("gate_up", "down"))
    return sum(rows[s]["flops"] for s in ("gate_up", "down")) / t / 1e12 / hw.fp8_tflops


def _prefill_rows(record: dict) -> dict[int, dict]:
    return {r["tokens_per_rank"]: r for r in record["rows"] if r.get("kind") == "prefill"}


def engine_key(row: dict) -> str:
    """'engine prefill 2 x 2048' (requests x chunk) or 'engine decode 64 x 4096' (batch x context)."""
    if row["regime"] == "prefill":
        return f"engine prefill {row['requests']} x {row['chunk']}"
    return f"engine decode {row['batch']} x {row['context']}"


def engine_step_s(cm: costs.CostModel, row: dict) -> float:
    """One GPU's step of a bench_engine row: a prefill row's mean over its chunks (chunk k after k chunks
    cached), or a decode row (one new token per request after `context`)."""
    one = DWDPConfig(group_size=1)
    if row["regime"] == "prefill":  # the slot cache's rows: max_len = prompt_len, plus a scratch position
        n, chunk, rows = row["requests"], row["chunk"], np.full(row["requests"], row["prompt_len"] + 1)
        batches = [RankBatch(np.full(n, chunk), np.full(n, k * chunk), n, rows)
                   for k in range(row["prompt_len"] // chunk)]
    else:  # max_len = context
        b = row["batch"]
        batches = [RankBatch(np.ones(b, np.int64), np.full(b, row["context"]), b, np.full(b, row["context"] + 1))]
    return float(np.mean([step_costs(cm, cm.hw, one, [batch])[0].time_s for batch in batches]))


def fit_compute(engine: dict, bench: dict, base: costs.Efficiency) -> tuple[float, float, float]:
    """(score_passes, layer_overhead_s, token_overhead_s) putting the model on three steps: a bench_engine
    record's smallest prefill (rows of prompt_len + 1 keys per query) and smallest decode batch, and a bench_dwdp
    record's no-fetch step at its middle token count (sequences of `seq` keys per query). The two prefills'
    different keys per token separate costs per attention score from costs per token. All three parameters
    enter the step time linearly."""
    cfg = preset(engine["config"]["preset"])
    ok = [r for r in engine["rows"] if "step_s" in r]
    rows = [min((r for r in ok if r["regime"] == "prefill"), key=lambda r: r["requests"]),
            min((r for r in ok if r["regime"] == "decode"), key=lambda r: r["batch"])]
    points = [(cfg, lambda cm, row=row: engine_step_s(cm, row), row["step_s"]) for row in rows]
    bench_cfg, seq, prefill = preset(bench["config"]["preset"]), bench["config"]["seq"], _prefill_rows(bench)
    tokens = sorted(prefill)[len(prefill) // 2]
    points.append((bench_cfg, lambda cm: no_fetch_step_s(cm, tokens, seq),
                   float(np.mean(prefill[tokens]["step_cached_s"]))))
    unit = [dict(score_passes=1.0), dict(layer_overhead_s=1.0), dict(token_overhead_s=1.0)]
    zero = dict(score_passes=0.0, layer_overhead_s=0.0, token_overhead_s=0.0)
    a, y = [], []
    for c, step, measured in points:
        b0 = step(cost_model(c, eff=dataclasses.replace(base, **zero)))
        a.append([step(cost_model(c, eff=dataclasses.replace(base, **dict(zero, **u)))) - b0 for u in unit])
        y.append(measured - b0)
    passes, layer, token = np.linalg.solve(np.array(a), np.array(y))
    return float(passes), float(layer), float(token)


def measured_compute_s(record: dict, tokens: int, cm: costs.CostModel | None = None) -> np.ndarray:
    """Per-layer compute at `tokens`: the measured no-fetch step (mean over ranks) split like the model's layers."""
    cfg, seq = preset(record["config"]["preset"]), record["config"]["seq"]
    model = layer_compute_s(cm or cost_model(cfg), tokens, seq)
    return model * float(np.mean(_prefill_rows(record)[tokens]["step_cached_s"])) / model.sum()


def overlap_step_s(compute_s: np.ndarray, fetch_s: float, cfg: ModelConfig, depth: int, slowdown: float) -> float:
    """A rank's step: `compute_s` per layer, each MoE layer's fetch `fetch_s`, both slowed alike while they overlap."""
    fetch = np.where([cfg.is_moe_layer(layer) for layer in range(cfg.num_layers)], fetch_s, 0.0)
    return dwdp_rank_step(compute_s, fetch, depth, slowdown, slowdown).time_s


def fit_copy_engine_slowdown(record: dict, tokens: int | None = None) -> float:
    """The symmetric slowdown putting the step with the copy-engine fetch on the measured one at `tokens`
    (default: the middle point), given that point's measured no-fetch step and fetch time."""
    cfg, rows = preset(record["config"]["preset"]), _prefill_rows(record)
    tokens = tokens or sorted(rows)[len(rows) // 2]
    row = rows[tokens]
    compute = measured_compute_s(record, tokens)
    target = float(np.mean(row["step_s"]))
    lo, hi = 0.0, 2.0  # the step grows with the slowdown: bisection
    for _ in range(60):
        mid = (lo + hi) / 2
        step = overlap_step_s(compute, row["fetch_per_layer_s"], cfg, record["config"]["prefetch_depth"], mid)
        lo, hi = (mid, hi) if step < target else (lo, mid)
    return round((lo + hi) / 2, 4)


def bench_dep_config(group_size: int, a2a: AllToAll | None) -> DEPConfig:
    """bench_dwdp's DEP: capacity sized for a 2x imbalance, i.e. buffers of 2x the mean rows per peer."""
    return DEPConfig(group_size=group_size, capacity_factor=2.0, all_to_all=a2a)


def dep_step_s(record: dict, tokens: int, a2a: AllToAll | None) -> float:
    cfg, seq, g = preset(record["config"]["preset"]), record["config"]["seq"], record["config"]["group_size"]
    cm = cost_model(cfg)
    return step_costs(cm, cm.hw, bench_dep_config(g, a2a), [prefill_batch(tokens, seq)] * g)[0].time_s


def fit_dep_all_to_all(record: dict) -> AllToAll:
    """Our DEP's effective all-to-all: probe 3's latency, the bandwidth putting the balanced DEP step on the
    measured one."""
    row = next(r for r in record["rows"] if r.get("kind") == "imbalance" and r.get("strategy") == "dep")
    latency = H200_HGX.all_to_all.latency_s
    lo, hi = 1.0, 10000.0  # GB/s; the step falls as the bandwidth grows: bisection on a log scale
    for _ in range(80):
        mid = (lo * hi) ** 0.5
        step = dep_step_s(record, row["tokens_per_rank"], AllToAll(latency, mid))
        lo, hi = (mid, hi) if step > row["balanced_step_s"] else (lo, mid)
    return AllToAll(latency, round((lo * hi) ** 0.5, 2))


def engine_dep_steps(record: dict, concurrency: int, prefill: bool) -> tuple[list, np.ndarray]:
    """The steps of a DEP launcher record's pass at `concurrency` in which no device prefills (`prefill`
    False: decode-only steps) or device 0 prefills a full 8K-token chunk (`prefill` True):
    (per-device RankBatch lists, measured durations in s). Prefill tokens are taken as
    whole fresh prompts of the fixed workload's `input_len` (no cached context), a decode token as having the
    prompt length of context."""
    config = record["config"]
    row = next(r for r in record["rows"] if r.get("concurrency") == concurrency and "timeline" in r)
    t = row["timeline"]
    by_start: dict = {}
    for i, start in enumerate(t["start_s"]):
        by_start.setdefault(start, []).append(i)
    batches, durations = [], []
    for idx in by_start.values():
        idx = sorted(idx, key=lambda i: t["group"][i])
        if (t["prefill_tokens"][idx[0]] < 8000) if prefill else any(t["prefill_tokens"][i] for i in idx):
            continue
        step = []
        for i in idx:
            p, d, n = t["prefill_tokens"][i], t["decode_tokens"][i], config["input_len"]
            chunks = [n] * (p // n) + ([p % n] if p % n else [])  # whole prompts of a fixed workload
            new = chunks + [1] * d
            ctx = [0] * len(chunks) + [n] * d
            rows = np.full(max(1, len(new)), config["max_seq_len"] + 1)  # the slot cache's whole rows
            step.append(RankBatch(np.array(new or [1], np.int64), np.array(ctx or [0], np.int64), max(1, len(new)),
                                  rows))
        batches.append(step)
        durations.append(t["end_s"][idx[0]] - t["start_s"][idx[0]])
    return batches, np.array(durations)


def engine_dep_step_s(cfg: ModelConfig, batches: list, a2a: AllToAll, group_size: int) -> np.ndarray:
    cm = cost_model(cfg)
    strategy = DEPConfig(group_size=group_size, capacity_factor=float(group_size), all_to_all=a2a)
    return np.array([step_costs(cm, cm.hw, strategy, b)[0].time_s for b in batches])


def fit_engine_dep_all_to_all(record: dict, concurrency: int = ENGINE_DEP_CONCURRENCY) -> AllToAll:
    """The serving engine's DEP all-to-all: the latency putting the median modelled decode-only step on the
    measured one (given a large bandwidth: decode moves a few KB), then the bandwidth doing the same for the
    8K-prefill steps (`engine_dep_steps`). Bisection on log scales."""
    cfg, g = preset(record["config"]["model"]), record["num_devices"]

    def bisect(steps, make, lo, hi):
        batches, measured = steps
        if not batches:
            raise ValueError(f"a step class is missing at concurrency {concurrency} in the record's timeline")
        target = float(np.median(measured))
        for _ in range(80):
            mid = (lo * hi) ** 0.5
            step = float(np.median(engine_dep_step_s(cfg, batches, make(mid), g)))
            lo, hi = (mid, hi) if step > target else (lo, mid)  # the step falls as mid grows
        return (lo * hi) ** 0.5

    decode = engine_dep_steps(record, concurrency, False)
    no_comm = float(np.median(engine_dep_step_s(cfg, decode[0], AllToAll(0.0, 1e5), g)))
    if no_comm >= float(np.median(decode[1])):
        latency = 0.0  # the decode steps are already at (or under) the model's compute: no latency to give
    else:  # bisect on 1/latency (the step falls as it grows)
        latency = 1.0 / bisect(decode, lambda x: AllToAll(1.0 / x, 1e5), 1.0, 1e7)
    bw = bisect(engine_dep_steps(record, concurrency, True), lambda x: AllToAll(latency, x), 1.0, 1e5)
    return AllToAll(float(f"{latency:.4g}"), round(bw, 2))
