"""Why `jit_step_fn` refuses an input as "not 256-byte aligned" (bench_engine decode, 2026-12-06 session 9).

Builds the model as bench_engine does (one jitted init), then reports each state leaf's device address modulo 256
and runs one decode step through `ModelRunner`, under the XLA flags of the environment.

  python experiments/diag/input_alignment.py --preset=r1-layers-2 --command_buffers=engine|off
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from absl import app, flags  # noqa: E402

from dwdp_jax import xla_flags  # noqa: E402

flags.DEFINE_string("preset", "r1-layers-2", "model preset")
flags.DEFINE_string("command_buffers", "engine", "engine | xla_default | off")
F = flags.FLAGS


def main(_):
    xla_flags.configure(F.command_buffers)
    import jax
    import numpy as np

    from dwdp_jax.config import preset
    from dwdp_jax.engine.runner import Buckets, ModelRunner
    from dwdp_jax.engine.scheduler import DecodeItem
    from dwdp_jax.experts import LocalExecutor
    from dwdp_jax.model import set_fp8_matmul
    from experiments.bench_engine import build_model

    cfg = preset(F.preset)
    model = set_fp8_matmul(build_model(cfg, 0), "pallas")
    from flax import nnx
    built = jax.tree.leaves(nnx.split(model)[1])
    print("built by the init jit: leaves not 256-aligned:", sum(x.unsafe_buffer_pointer() % 256 != 0 for x in built),
          "of", len(built), "; leaf 2 % 256 =", built[2].unsafe_buffer_pointer() % 256,
          "committed:", getattr(built[2], "committed", getattr(built[2], "_committed", "?")), flush=True)
    runner = ModelRunner(model, 1, 1024, executor=LocalExecutor(backend="pallas"), buckets=Buckets((1,), (1024,)))
    paths = jax.tree_util.tree_flatten_with_path(runner.state)[0]
    bad = []
    for i, ((p, _), leaf) in enumerate(zip(paths, runner._leaves)):
        off = leaf.unsafe_buffer_pointer() % 256
        if i < 4 or off:
            print(i, jax.tree_util.keystr(p), leaf.shape, leaf.dtype, "addr % 256 =", off, flush=True)
        if off:
            bad.append(i)
    print(f"{len(bad)} of {len(runner._leaves)} leaves not 256-byte aligned; pages % 256 =",
          runner.pages.unsafe_buffer_pointer() % 256 if hasattr(runner.pages, "unsafe_buffer_pointer") else "?")
    item = DecodeItem(request_id="d0", slot=0, token=1, position=1023)
    try:
        runner.decode([item])
        print("decode step: ok")
    except Exception as e:  # noqa: BLE001
        print("decode step FAILED:", type(e).__name__, str(e)[:300])
    ids, rest = jax.device_put(runner_step_pack_example(np), runner.device)
    print("device_put ids % 256 =", ids.unsafe_buffer_pointer() % 256, "rest % 256 =", rest.unsafe_buffer_pointer() % 256)


def runner_step_pack_example(np):
    return np.zeros((1, 1), np.int32), np.zeros((7,), np.int32)


if __name__ == "__main__":
    app.run(main)
