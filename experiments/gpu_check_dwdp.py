"""GPU correctness of DWDP: every (expert backend, fetch backend) against the single-GPU model, and reruns.

Random R1-shaped weights (`r1-layers-N`, FP8 experts, bf16 activations). The single-GPU model holds every
expert; the DWDP group splits them over the GPUs and fetches the rest. For each combination, each rank
serves its own batch from its own thread, twice, and we report:
  * rel diff vs the single-GPU model with the same expert backend: max |a - b| / max |b| over the logits
    (bf16; per-layer programs fuse differently from the whole-model program, so not exactly 0);
  * greedy agreement: share of positions whose argmax equals the single-GPU model's;
  * rerun diff: the same step twice (must be exactly 0: the combine is deterministic).
Pass/fail thresholds are printed with the table.

  python experiments/gpu_check_dwdp.py --preset=r1-layers-3 --device_kind=nvidia-h200-x2 --out=$OUT
"""

from __future__ import annotations

import functools
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from dwdp_jax.config import preset  # noqa: E402
from dwdp_jax.experts import LocalExecutor  # noqa: E402
from dwdp_jax.model import init_model  # noqa: E402
from dwdp_jax.parallel.dwdp import DwdpConfig, DwdpGroup  # noqa: E402
from dwdp_jax.parallel.fetch import fetch_backend  # noqa: E402
from experiments.results_io import write_result  # noqa: E402

flags.DEFINE_string("preset", "r1-layers-3", "model preset (random weights)")
flags.DEFINE_integer("batch", 2, "requests per rank")
flags.DEFINE_integer("seq", 256, "tokens per request")
flags.DEFINE_list("backends", ["jnp", "pallas"], "expert backends")
flags.DEFINE_list("fetch", ["device_put", "copy_engine", "copy_engine_stream"], "fetch backends")
flags.DEFINE_float("max_rel_diff", 0.05, "pass threshold: DWDP vs single-GPU logits, relative to max |logit|")
flags.DEFINE_float("min_agreement", 0.97, "pass threshold: greedy agreement with the single-GPU model")
flags.DEFINE_string("device_kind", "unknown", "the device tool's kind, for the results file")
flags.DEFINE_string("out", "", "results directory for dwdp-<date>-<kind>-correctness.json (optional)")
F = flags.FLAGS


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def main(_):
    cfg = preset(F.preset)
    devices = jax.devices()
    g = len(devices)
    if g < 2:
        raise SystemExit(f"gpu_check_dwdp needs >= 2 devices, found {g}")
    with jax.default_device(devices[0]):
        model = init_model(cfg, seed=0, dtype=jnp.bfloat16)
    batches = [np.random.RandomState(r).randint(0, cfg.vocab_size, (F.batch, F.seq)).astype(np.int32)
               for r in range(g)]
    graph, state = nnx.split(model)  # weights as arguments: a closure would embed them as constants

    @functools.partial(jax.jit, static_argnames="backend")
    def single_gpu(state, ids, backend):
        return nnx.merge(graph, state)(ids, executor=LocalExecutor(backend=backend)).astype(jnp.float32)

    refs = {b: [np.asarray(single_gpu(state, jax.device_put(ids, devices[0]), b)) for ids in batches]
            for b in F.backends}
    rows = [dict(check="single jnp vs single pallas", rel_diff=max(
        rel_diff(a, b) for a, b in zip(refs[F.backends[-1]], refs[F.backends[0]])))] if len(refs) > 1 else []
    ok = True
    for backend in F.backends:
        for fetch_name in F.fetch:
            fetch = fetch_backend(fetch_name)
            group = DwdpGroup(model, devices, dwdp=DwdpConfig(g, expert_backend=backend), fetch=fetch)
            run = lambda: group.run_parallel(
                lambda rank, ids: np.asarray(rank.forward(ids).astype(jnp.float32)), batches)
            first, second = run(), run()
            diff = max(rel_diff(a, b) for a, b in zip(first, refs[backend]))
            agree = float(np.mean([(a.argmax(-1) == b.argmax(-1)).mean() for a, b in zip(first, refs[backend])]))
            rerun = max(rel_diff(a, b) for a, b in zip(second, first))
            passed = diff <= F.max_rel_diff and agree >= F.min_agreement and rerun == 0.0
            ok &= passed
            rows.append(dict(check=f"dwdp {backend} {fetch_name}", rel_diff=diff, greedy_agreement=agree,
                             rerun_rel_diff=rerun, passed=passed))
            group.close()
            del group
    print(f"\n== DWDP GPU correctness ({F.preset}, {g} GPUs, {F.batch}x{F.seq} tokens per rank) ==")
    print(f"pass: rel diff <= {F.max_rel_diff}, greedy agreement >= {F.min_agreement}, rerun diff == 0")
    for r in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    print("ALL PASS" if ok else "SOME FAILED")
    if F.out:
        config = dict(preset=F.preset, batch=F.batch, seq=F.seq, backends=F.backends, fetch=F.fetch,
                      max_rel_diff=F.max_rel_diff, min_agreement=F.min_agreement)
        worst = max((r["rel_diff"] for r in rows if "passed" in r), default=None)
        print("wrote", write_result(F.out, "dwdp", F.device_kind, config,
                                    dict(passed=ok, max_rel_diff_vs_single_gpu=worst), rows, tag="correctness"))


if __name__ == "__main__":
    app.run(main)
