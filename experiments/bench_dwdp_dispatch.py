"""The host's cost of a DWDP rank's per-layer programs (issue 17, item 5), on one device: the same model and
decode points through the single-program `ModelRunner` and through a `DwdpRankRunner` of a group of one (every
expert local, so no fetch: what differs is only that the rank dispatches one program per layer, plus the
embedding and the head, from a host loop). Writes `engine-<date>-<device_kind>-dwdp-dispatch.json`.

Per decode point (B requests at context L, each runner on a cache of its own):
  * `host_s`: median seconds until a decode call returns (packing, transfers, dispatch of every program; the
    device runs on), each call then waited for;
  * `step_s`: median blocking step; `step_ahead_s`: steps dispatched before the previous step's tokens are read
    (as `run_engine(step_ahead=...)` serves), sampling included;
  * `programs_per_step`: the rank's prologue (embedding + leading dense layers) + one program per MoE layer +
    the head (`DwdpRank.programs_per_step`), against the runner's one;
  * `host_profile`: the step's host time under cProfile, costliest functions first (`--host_profile`);
  * `host_trace`: JAX's and XLA's host events of a step (jit dispatch per program, PjRt execute phases, thunk and
    command-buffer launches) summed by name, and the device kernels per program (`--host_trace`,
    `experiments/host_trace.py`): what a program's host cost is made of.
Metrics: `dwdp_dispatch_us_per_program` = (rank host_s - runner host_s) / (extra programs), at the typical
point, and `dwdp_step_ahead_over_single` (1.0: the per-layer dispatch is hidden behind the device).

The rank's programs are compiled as `DwdpConfig.cuda_graphs` says (default: without command buffers, whatever
`--command_buffers` gives the single program); `--rank_cuda_graphs=both` measures the rank both ways.
Flags: `--host_trace` (default on), `--rank_cuda_graphs`, and bench_engine's (`--preset`, `--backend`, `--fp8_matmul`, `--decode_batch`, `--decode_context`,
`--typical`, `--repeats`, `--warmup`, `--command_buffers`, `--device_kind`, `--out`, `--tag`; its prefill and
profile flags are ignored).
GPU: python3 experiments/bench_dwdp_dispatch.py --device_kind=nvidia-h100-x1 --backend=pallas \
         --fp8_matmul=pallas --decode_batch=1,64 --decode_context=4096 --typical=1x4096 --out=$OUT
CPU smoke (tests/test_bench_dwdp_dispatch.py): --preset=tiny --backend=jnp with tiny sizes.
"""

from __future__ import annotations

import functools
import gc
import time

import jax
import numpy as np
from absl import app, flags

from dwdp_jax import xla_flags
from dwdp_jax.config import preset
from dwdp_jax.engine.runner import Buckets, DwdpRankRunner, ModelRunner
from dwdp_jax.engine.scheduler import DecodeItem
from dwdp_jax.experts import LocalExecutor
from dwdp_jax.model import set_fp8_matmul
from dwdp_jax.parallel.dwdp import DwdpConfig, DwdpGroup
from dwdp_jax.planner import Placement
from experiments import bench_engine as be
from experiments.host_profile import host_profile
from experiments.host_trace import host_trace
from experiments.random_cache import randomized_pages
from experiments.results_io import write_result

F = be.F
flags.DEFINE_bool("host_trace", True, "per point and runner: the host trace of a few steps (experiments/host_trace.py)")
flags.DEFINE_enum("rank_cuda_graphs", "off", ["off", "on", "both"],
                  "the rank's programs without / with the process's command buffers (`DwdpConfig.cuda_graphs`); "
                  "both: the rank twice, the second as row key `dwdp_rank_cuda_graphs`")
RANK_MODES = {"off": (False,), "on": (True,), "both": (False, True)}


def time_decode(runner, items, repeats: int, warmup: int) -> dict:
    """Seconds of one decode point on `runner`: first call, blocking step, host return, step ahead."""
    step = functools.partial(runner.decode, items)
    first, step_s = be.median_time(step, repeats, warmup)
    return dict(first_call_s=first, step_s=step_s, host_s=be.host_return_time(step, repeats),
                step_ahead_s=be.step_ahead_time(runner, items, 8, repeats),
                host_profile=host_profile(step, repeats) if F.host_profile else None,
                host_trace=host_trace(step, repeats) if F.host_trace else None)


def measure_point(model, cfg, b: int, ctx: int, seed: int) -> dict:
    """Both runners at one point (B=b at context ctx), each on its own randomized cache, one after the other."""
    items = [DecodeItem(request_id=f"d{i}", slot=i, token=(7 * i + 3) % cfg.vocab_size, position=ctx - 1)
             for i in range(b)]
    buckets = Buckets((b,), (ctx,))
    row = dict(batch=b, context=ctx)
    single = ModelRunner(model, b, ctx, executor=LocalExecutor(backend=F.backend), buckets=buckets)
    single.pages = randomized_pages(single.pages, jax.random.key(seed))
    row["single"] = dict(time_decode(single, items, F.repeats, F.warmup), programs_per_step=1)
    reference = np.asarray(single.decode(items), np.float32)  # the same step on the same cache values
    del single
    gc.collect()
    for i, cuda_graphs in enumerate(RANK_MODES[F.rank_cuda_graphs]):
        # the model as rank 0's own weights (a group of one holds every expert): no copy of the experts, which
        # `DwdpGroup(model, ...)` would gather (33 GB more at r1-layers-4)
        group = DwdpGroup.from_rank_models([model], Placement.from_config(cfg, 1),
                                           DwdpConfig(group_size=1, expert_backend=F.backend, cuda_graphs=cuda_graphs))
        rank = DwdpRankRunner(group.ranks[0], b, ctx, buckets=buckets)
        rank.pages = randomized_pages(rank.pages, jax.random.key(seed))
        name = "dwdp_rank" if i == 0 else "dwdp_rank_cuda_graphs"
        row[name] = dict(time_decode(rank, items, F.repeats, F.warmup),
                         programs_per_step=group.ranks[0].programs_per_step, cuda_graphs=cuda_graphs)
        if i == 0:  # both runners compute the same step (per-layer programs fuse differently: not bit-equal)
            logits = np.asarray(rank.decode(items), np.float32)
            row["logits_rel_diff"] = float(np.abs(logits - reference).max() / np.abs(reference).max())
        else:
            row["step_ahead_over_single_cuda_graphs"] = row[name]["step_ahead_s"] / row["single"]["step_ahead_s"]
        del rank, group
        gc.collect()
    s, d = row["single"], row["dwdp_rank"]
    row["dispatch_us_per_program"] = (d["host_s"] - s["host_s"]) / (d["programs_per_step"] - 1) * 1e6
    row["step_over_single"] = d["step_s"] / s["step_s"]
    row["step_ahead_over_single"] = d["step_ahead_s"] / s["step_ahead_s"]
    return row


def _metrics(rows: list[dict], typical_point: tuple[int, int]) -> dict:
    """The results file's metrics: the typical point's row (else the first measured)."""
    typical = next((r for r in rows if (r["batch"], r["context"]) == typical_point), rows[0])
    return dict(dwdp_dispatch_us_per_program=typical["dispatch_us_per_program"],
                dwdp_step_over_single=typical["step_over_single"],
                dwdp_step_ahead_over_single=typical["step_ahead_over_single"],
                dwdp_host_ms_per_step=typical["dwdp_rank"]["host_s"] * 1e3,
                single_host_ms_per_step=typical["single"]["host_s"] * 1e3,
                typical_point="{}x{}".format(typical["batch"], typical["context"]))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    t0 = time.perf_counter()
    xla_flags_used = xla_flags.configure(F.command_buffers)  # before the first device use
    try:
        sweep = be.Sweep.from_flags()
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    if not (sweep.decode_batch and sweep.decode_context):
        raise app.UsageError("--decode_batch and --decode_context must name at least one point")
    if F.backend == "pallas" and jax.default_backend() != "gpu":
        raise app.UsageError("--backend=pallas needs a GPU (Mosaic GPU kernels); use --backend=jnp on CPU")
    cfg = preset(F.preset)
    model = set_fp8_matmul(be.build_model(cfg, F.seed), F.fp8_matmul)
    be.log(t0, f"{jax.devices()[0].device_kind}, jax {jax.__version__}, preset {F.preset}: {cfg.num_layers} "
               f"layers ({cfg.first_k_dense_replace} dense first)")
    config = dict(preset=F.preset, backend=F.backend, fp8_matmul=F.fp8_matmul, repeats=F.repeats,
                  warmup=F.warmup, seed=F.seed, command_buffers=F.command_buffers, xla_flags=xla_flags_used,
                  rank_cuda_graphs=F.rank_cuda_graphs,
                  dwdp="group of one (every expert local, no fetch), prefetch depth 1",
                  device=jax.devices()[0].device_kind)
    rows = []
    for ctx in sweep.decode_context:
        for b in sweep.decode_batch:
            row = measure_point(model, cfg, b, ctx, F.seed)
            rows.append(row)
            s, d = row["single"], row["dwdp_rank"]
            be.log(t0, f"decode B={b} L={ctx}: host {s['host_s'] * 1e3:.2f} -> {d['host_s'] * 1e3:.2f} ms "
                       f"({row['dispatch_us_per_program']:.0f} us per extra program); step "
                       f"{s['step_s'] * 1e3:.2f} -> {d['step_s'] * 1e3:.2f} ms; step ahead "
                       f"{s['step_ahead_s'] * 1e3:.2f} -> {d['step_ahead_s'] * 1e3:.2f} ms "
                       f"(x{row['step_ahead_over_single']:.2f}); logits differ by {row['logits_rel_diff']:.1e}")
            if "dwdp_rank_cuda_graphs" in row:
                be.log(t0, f"  the rank with command buffers: step ahead "
                           f"{row['dwdp_rank_cuda_graphs']['step_ahead_s'] * 1e3:.2f} ms "
                           f"(x{row['step_ahead_over_single_cuda_graphs']:.2f}), host "
                           f"{row['dwdp_rank_cuda_graphs']['host_s'] * 1e3:.2f} ms")
            for name in ("single", "dwdp_rank"):
                for fn in (row[name]["host_profile"] or {}).get("top", [])[:4]:
                    be.log(t0, f"  host profile {name}: {fn}")
                trace = row[name]["host_trace"]
                if trace:
                    be.log(t0, f"  host trace {name}: kernels per step {trace['kernels_per_call']:.0f} "
                               f"{trace['kernels_per_call_by_module']}")
                    for event in trace["host_events"][:10]:
                        be.log(t0, f"    {event['us_per_call']:8.1f} us  x{event['count_per_call']:.1f}  "
                                   f"{event['name'][:90]}")
            # written after every point: a run stopped by its time limit keeps the points it measured
            path = write_result(F.out, "engine", F.device_kind, config, _metrics(rows, sweep.typical), rows,
                                F.tag or "dwdp-dispatch")
    print(_metrics(rows, sweep.typical), flush=True)
    be.log(t0, f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
