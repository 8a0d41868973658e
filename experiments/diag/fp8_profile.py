"""Diagnosis: FP8 block-scaled grouped GEMM reaches 1.40x our bf16 kernel on the down projection but only
1.19x on gate/up, and the overlapped-promotion preset is 15-20% slower than the plain one. One kernel
variant per run, so `ncu` can profile exactly one launch, and `MOSAIC_GPU_DUMP_PTXAS=1` shows registers,
spills and serialized-wgmma warnings per variant.

python experiments/diag/fp8_profile.py --variant=fp8_128x128_msplit --proj=gate_up
"""
import argparse
import time

import jax

from experiments.bench_kernels import FP8_VARIANTS, make_case
from pallas_kernels import grouped_gemm as gg

SHAPES = {"gate_up": (7168, 4096), "down": (2048, 7168)}  # (K, N), DeepSeek-R1 experts

p = argparse.ArgumentParser()
p.add_argument("--variant", default="fp8_128x128_msplit", choices=["bf16", *FP8_VARIANTS])
p.add_argument("--proj", default="gate_up", choices=list(SHAPES))
p.add_argument("--groups", type=int, default=32)
p.add_argument("--tokens", type=int, default=1024)
p.add_argument("--reps", type=int, default=10)
p.add_argument("--cupti", action="store_true", help="also list every kernel of one call with its CUPTI duration")
args = p.parse_args()

k, n = SHAPES[args.proj]
fp8 = args.variant != "bf16"
x, sizes, _, _, bufs, sbufs, slot = make_case(jax.random.key(0), args.groups, args.tokens, k, n, fp8=fp8)
if fp8:
    cfg = FP8_VARIANTS[args.variant]
    f = jax.jit(lambda x, s, b, sb, sl: gg.grouped_gemm_fp8(x, s, b, sb, sl, config=cfg))
    call = lambda: f(x, sizes, bufs, sbufs, slot)
else:
    cfg = gg.default_config(x.shape[0], args.groups, n)
    f = jax.jit(lambda x, s, b, sl: gg.grouped_gemm(x, s, b, sl, config=cfg))
    call = lambda: f(x, sizes, bufs, slot)
jax.block_until_ready(call())
times = []
for _ in range(args.reps):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - t0)
t = sorted(times)[len(times) // 2]
flops = 2 * x.shape[0] * k * n
print(f"{args.variant} {args.proj} {args.groups}x{args.tokens}: {t * 1e3:.3f} ms = {flops / t / 1e12:.0f} TFLOP/s"
      f" (config {cfg})")
if args.cupti:  # where the op's time goes: the grouped-GEMM kernel vs the XLA ops around it
    from jax.experimental.mosaic.gpu import profiler

    _, timings = profiler.measure(lambda: call(), aggregate=False, iterations=5)()
    last = timings[-1]
    total = sum(ms for _, ms in last)
    gemm = sum(ms for name, ms in last if "mosaic" in name)
    print(f"  CUPTI, one call: {total:.3f} ms in {len(last)} kernels; grouped GEMM kernel {gemm:.3f} ms"
          f" = {flops / gemm / 1e9:.0f} TFLOP/s")
    for name, ms in last:
        print(f"    {ms:8.3f} ms  {name[:90]}")
