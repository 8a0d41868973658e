"""How many Mosaic GPU kernels the engine's step programs hold, and how many distinct ones (the kernels that must
be compiled), from lowering them for CUDA on a machine without a GPU (abstract weights: nothing is allocated).

  PYTHONPATH=. python experiments/diag/mosaic_kernel_count.py --preset=r1-layers-4 --out=experiments/results

Writes `engine-<date>-cpu-mosaic-kernels.json`: per program (prefill 4 x 2048 tokens, decode 64 x 1), the lowering
time, the Mosaic custom calls and the distinct `kernel_hash`es among them (WORKSPACE Finding 14)."""

from __future__ import annotations

import argparse
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import export

from pallas_kernels import _compat

H100_SMS = 132


def count(text: str) -> tuple[int, int]:
    """(Mosaic GPU custom calls, distinct kernel hashes) in a lowered module's text."""
    hashes = re.findall(r'custom_call @mosaic_gpu_v2\(.*?kernel_hash = "((?:[^"\\]|\\.)*)"', text)
    return len(hashes), len(set(hashes))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="r1-layers-4")
    p.add_argument("--out", default="experiments/results")
    args = p.parse_args()
    _compat.num_sms = lambda: H100_SMS  # the kernels' persistent grids ask the device; there is none here

    from dwdp_jax.config import preset
    from dwdp_jax.engine.runner import model_step_program
    from dwdp_jax.engine.step_block import StepArrays
    from dwdp_jax.experts import LocalExecutor
    from dwdp_jax.model import init_model, set_fp8_matmul
    from dwdp_jax.paged_attention import PagedAttention
    from experiments.results_io import write_result

    cfg = preset(args.preset)
    model = nnx.eval_shape(lambda: set_fp8_matmul(init_model(cfg), "pallas"))
    graph, state = nnx.split(model)
    leaves, state_def = jax.tree.flatten(state)
    leaves = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    attention = PagedAttention(latent_width=cfg.kv_lora_rank, backend="pallas")
    rows = []
    for name, n, length, pages_per_row, absorbed in [("prefill 4x2048", 4, 2048, 64, False),
                                                     ("decode 64x1", 64, 1, 64, True)]:
        program = model_step_program(graph, state_def, LocalExecutor(backend="pallas"), attention, absorbed)
        pages = [jax.ShapeDtypeStruct((n * pages_per_row + 1, 64, width), jnp.bfloat16)
                 for _ in range(cfg.num_layers)]
        zeros = lambda *s: np.zeros(s, np.int32)  # noqa: E731
        ids, rest = (jax.ShapeDtypeStruct(a.shape, a.dtype) for a in StepArrays(  # `StepArrays.pack`'s two arrays
            zeros(n, length), zeros(n, length), zeros(n), zeros(n), zeros(n, pages_per_row)).pack())
        t = time.perf_counter()
        text = export.export(program, platforms=["cuda"])(leaves, pages, ids, rest).mlir_module()
        calls, distinct = count(text)
        rows.append(dict(program=name, lower_s=time.perf_counter() - t, mosaic_calls=calls,
                         distinct_kernels=distinct))
        print(rows[-1], flush=True)
    path = write_result(args.out, "engine", "cpu", dict(preset=args.preset, lowered_for="cuda", sms=H100_SMS),
                        dict(distinct_mosaic_kernels_max=max(r["distinct_kernels"] for r in rows)), rows,
                        "mosaic-kernels")
    print("wrote", path)


if __name__ == "__main__":
    main()
