"""What the engine's decode step allocates at one (batch, context) point, compiled but not run: XLA's memory
analysis of the step program and the largest buffers of its buffer assignment, by HLO value.

Why: bench_engine's B=256 point at 16K context ran out of memory on an H100 (session 14) allocating 4.5 GiB in
`jit_step_fn`, exactly one layer's pages (256 x 16384 x 576 x 2 bytes), although the pages are donated and
written in place. This names the buffer (which instruction, temporary or output) without running the step.

    python3 experiments/diag/decode_memory.py --preset=r1-layers-4 --batch=256 --context=16384 \
        --device_kind=nvidia-h100-x1 --out=$OUT

Writes `engine-<date>-<device_kind>-decode-memory.json`: metrics `temp_bytes`, `alias_bytes`, `output_bytes`,
`argument_bytes`, `pages_bytes`; rows: buffers of at least `--min_mib`, largest first (allocation kind, HLO value,
shape). CPU (tests/test_decode_memory.py): --preset=tiny with small sizes.
"""

from __future__ import annotations

import glob
import os
import tempfile

from absl import app, flags

from experiments.diag.buffer_assignment import large_buffers

flags.DEFINE_string("preset", "r1-layers-4", "model preset")
flags.DEFINE_integer("batch", 256, "decode rows")
flags.DEFINE_integer("context", 16384, "tokens cached per row (the cache's max_len)")
flags.DEFINE_enum("fp8_matmul", "pallas", ["pallas", "dequantize"], "FP8 linear layers, as bench_engine's flag")
flags.DEFINE_float("min_mib", 256.0, "smallest buffer listed, MiB")
flags.DEFINE_string("device_kind", "cpu", "device kind for the results file name")
flags.DEFINE_string("out", "experiments/results", "results directory")
flags.DEFINE_string("tag", "decode-memory", "results file tag")
F = flags.FLAGS

def compile_decode_step(runner, items):
    """The runner's decode step for `items`, lowered and compiled with the step's real arguments, not run."""
    from dwdp_jax.engine.runner import model_step_program

    import jax

    compiled = {}

    class _Compiled(Exception):
        pass

    def compile_only(step, absorbed):  # stands in for the runner's `_call`: compiles where it would run
        program = model_step_program(runner.graph, runner._state_def, runner.executor, runner.attention, absorbed,
                                     runner.expert_counts)
        ids, rest = jax.device_put(step.pack(), runner.device)
        compiled["step"] = program.lower(runner._leaves, runner.pages, ids, rest).compile()
        raise _Compiled

    runner._call = compile_only
    try:
        runner.decode(items)
    except _Compiled:
        pass
    return compiled["step"]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    dump = tempfile.mkdtemp(prefix="decode-memory-")
    from dwdp_jax import xla_flags

    xla_flags.configure("engine")  # the engine's flags, before JAX starts; then the dump of the step only
    os.environ["XLA_FLAGS"] += f" --xla_dump_to={dump} --xla_dump_hlo_module_re=.*step_fn.*"
    import jax

    from dwdp_jax.config import preset
    from dwdp_jax.engine.runner import Buckets, ModelRunner
    from dwdp_jax.engine.scheduler import DecodeItem
    from dwdp_jax.model import init_model, set_fp8_matmul
    from experiments.results_io import write_result

    cfg = preset(F.preset)
    model = set_fp8_matmul(init_model(cfg, dtype=jax.numpy.bfloat16, jitted=True), F.fp8_matmul)  # as bench_engine
    b, ctx = F.batch, F.context
    runner = ModelRunner(model, b, ctx, buckets=Buckets((b,), (ctx,)))
    items = [DecodeItem(request_id=f"d{i}", slot=i, token=(7 * i + 3) % cfg.vocab_size, position=ctx - 1)
             for i in range(b)]
    analysis = compile_decode_step(runner, items).memory_analysis()
    pages_bytes = sum(p.nbytes for p in runner.pages)
    files = sorted(glob.glob(os.path.join(dump, "*step_fn*buffer-assignment.txt")))
    if not files:
        raise RuntimeError(f"no buffer assignment of the step program in {dump}")
    rows = large_buffers(open(files[-1]).read(), int(F.min_mib * 2**20))
    metrics = dict(temp_bytes=analysis.temp_size_in_bytes, alias_bytes=analysis.alias_size_in_bytes,
                   output_bytes=analysis.output_size_in_bytes, argument_bytes=analysis.argument_size_in_bytes,
                   pages_bytes=pages_bytes, layer_pages_bytes=runner.pages[0].nbytes)
    print({k: f"{v / 2**30:.2f} GiB" for k, v in metrics.items()}, flush=True)
    for r in rows[:20]:
        print(f"{r['bytes'] / 2**20:10.1f} MiB  {r['allocation_kind']:<18} {r['value']}  {r['shape']}", flush=True)
    config = dict(preset=F.preset, batch=b, context=ctx, min_mib=F.min_mib, fp8_matmul=F.fp8_matmul, attention=runner.attention.backend,
                  buffer_assignment=os.path.basename(files[-1]), xla_flags=os.environ["XLA_FLAGS"])
    path = write_result(F.out, "engine", F.device_kind, config, metrics, rows, F.tag)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    app.run(main)
