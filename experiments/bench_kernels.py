"""Benchmark the grouped expert GEMM against XLA's ragged_dot, jax's example Mosaic GPU ragged_dot
and a dense matmul of equal FLOPs, on DeepSeek-R1 expert shapes; writes a results JSON (part "kernels").

  python experiments/bench_kernels.py --device_kind nvidia-h200 --out experiments/results/kernels-...json

All ratios are measured in the same run as their baselines. Times: median over repeats of the mean of
back-to-back calls after warm-up (block_until_ready); weights are far larger than L2, so no rotation.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pallas_kernels import grouped_gemm as gg  # noqa: E402
from pallas_kernels import profiling  # noqa: E402
from experiments.device_peaks import hbm_copy_gbps  # noqa: E402

SHAPES = {"gate_up": (7168, 4096), "down": (2048, 7168)}  # (K, N) of DeepSeek-R1's experts


REPS, INNER, WARMUP = 5, 5, 2
# FP8 variants timed on every case; `fp8_over_bf16` uses the fastest one that passes its check.
FP8_VARIANTS = {
    "fp8_64x256_nsplit": gg.FP8_DECODE_CONFIG,
    "fp8_128x128_msplit": gg.FP8_PREFILL_CONFIG,
    "fp8_128x128_msplit_overlap": gg.FP8_PREFILL_OVERLAP_CONFIG,
    "fp8_64x256_nsplit_overlap": dataclasses.replace(gg.FP8_DECODE_CONFIG,
                                                     fp8_overlap_promotion=True),
}
FP8_MAX_REL_ERR = 1e-2  # vs reference_fp8, bf16 output (tests/test_grouped_gemm.py's bound)


def bench(f, *args, reps=None, inner=None, warmup=None):
  reps, inner, warmup = reps or REPS, inner or INNER, WARMUP if warmup is None else warmup
  if REPS == 1:  # smoke mode
    reps, inner, warmup = 1, 1, 0
  for _ in range(warmup):
    jax.block_until_ready(f(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = f(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / inner)
  return statistics.median(times)


def kernel_times(f, *args, iterations=5):
  """GPU only (CUPTI): (Mosaic GPU kernel seconds, all kernels' seconds) of one call of the jitted `f`,
  medians over `iterations` calls. Separates the grouped-GEMM kernel from the XLA ops around it (tile
  schedule, FP8 activation quantization) and from host dispatch, which wall-clock times include."""
  calls = profiling.kernel_calls(f, *args, iterations=iterations)
  mosaic = profiling.median_per_call(calls, lambda ks: sum(t for name, t in ks if profiling.is_mosaic(name)))
  return mosaic, profiling.median_per_call(calls, lambda ks: sum(t for _, t in ks))


def extreme(rows, key, pick):
  """pick (max or min) of row[key] over the rows that have it; None if none do."""
  return pick((r[key] for r in rows if key in r), default=None)


def hbm_ceiling(small=False):
  """HBM ceiling for the memory-bound ratio (`device_peaks.hbm_copy_gbps`): (GB/s, detail) of a 2 GiB copy, or
  of 32 MiB in smoke mode."""
  return hbm_copy_gbps(32 << 20 if small else 2 << 30)


def make_case(key, groups, tokens, k, n, fp8):
  kx, kw, ks = jax.random.split(key, 3)
  m = groups * tokens
  x = jax.random.normal(kx, (m, k), jnp.bfloat16)
  sizes = jnp.full((groups,), tokens, jnp.int32)
  half = max(groups // 2, 1)
  if fp8:
    w = jax.random.normal(kw, (groups, n, k), jnp.float32).astype(jnp.float8_e4m3fn)
    s = jax.random.uniform(ks, (groups, n // 128, k // 128), jnp.float32, 0.5, 2.0) / np.sqrt(k)
  else:
    w = (jax.random.normal(kw, (groups, k, n), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
    s = None
  # Two buffers (e.g. local experts and experts fetched from a peer), as the executors use it.
  bufs = (w[:half], w[half:]) if groups > 1 else (w,)
  sbufs = None if s is None else ((s[:half], s[half:]) if groups > 1 else (s,))
  g = jnp.arange(groups, dtype=jnp.int32)
  slot = jnp.stack([jnp.where(g < half, 0, 1), jnp.where(g < half, g, g - half)], axis=1)
  if groups == 1:
    slot = jnp.zeros((1, 2), jnp.int32)
  return x, sizes, w, s, bufs, sbufs, slot


def rel_err(out, ref):
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def fp8_check_rows(x, w, s, groups, tokens, ref_groups=4, ref_tokens=128):
  """(row indices, f32 reference) for the first `ref_tokens` rows of the first `ref_groups` groups,
  computed as `gg.reference_fp8` does (the kernel's activation quantization, weights dequantized,
  f32 matmul) but per group: reference_fp8 gathers a [K, N] weight per row, too large here."""
  ref_groups, ref_tokens = min(ref_groups, groups), min(ref_tokens, tokens)
  rows = (np.arange(ref_groups)[:, None] * tokens + np.arange(ref_tokens)[None]).reshape(-1)
  xq, xs = gg.quantize_activations(x[rows])
  xd = (gg.fp8_to_f32(xq).reshape(len(rows), -1, gg.FP8_BLOCK) * xs[..., None]).reshape(len(rows), -1)
  wd = gg.dequantize_weight(w[:ref_groups], s[:ref_groups])  # [g, N, K] f32
  ref = jnp.einsum("gtk,gnk->gtn", xd.reshape(ref_groups, ref_tokens, -1), wd,
                   precision=jax.lax.Precision.HIGHEST)
  return rows, ref.reshape(len(rows), -1)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--device_kind", required=True)
  p.add_argument("--out", default="")
  p.add_argument("--quick", action="store_true", help="a few cases only")
  p.add_argument("--tag", default="")
  p.add_argument("--smoke", action="store_true", help="CPU: tiny shapes in interpret mode")
  p.add_argument("--regime", default="both", choices=["both", "decode", "prefill"],
                 help="run one regime only (a full run of both can exceed the device tool's 10 min per call)")
  p.add_argument("--fp8_variants", default=",".join(FP8_VARIANTS),
                 help="comma-separated FP8 variants to time (default: all)")
  args = p.parse_args()
  shapes, interp = SHAPES, False
  global REPS
  if args.smoke:
    REPS = 1
    shapes, interp = {"tiny": (256, 256)}, True

  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

  copy_gbps, copy_detail = hbm_ceiling(small=args.smoke)
  print(f"HBM copy (read+write): {copy_gbps:.0f} GB/s {copy_detail}", flush=True)

  decode = [(8, 8), (32, 1), (32, 8), (32, 32), (256, 8)]
  prefill = [(32, 256), (8, 1024), (32, 1024), (8, 4096), (32, 4096)]
  if args.quick:
    decode, prefill = [(32, 8), (256, 8)], [(32, 1024)]
  if args.smoke:
    decode, prefill = [(3, 8)], [(2, 128)]
  if args.regime == "decode":
    prefill = []
  elif args.regime == "prefill":
    decode = []
  fp8_variants = {kk: FP8_VARIANTS[kk] for kk in args.fp8_variants.split(",")}
  cfg_variants = {
      "ws_decode": gg.DECODE_CONFIG,
      "ws_prefill": gg.PREFILL_CONFIG,
      "ws_prefill_msplit": gg.PREFILL_M_SPLIT_CONFIG,
      "simple_128x128": gg.GroupedGemmConfig(block_m=128, block_n=128, block_k=64,
                                             max_concurrent_steps=4, num_compute_wgs=1,
                                             warp_specialized=False),
  }
  rows = []
  key = jax.random.key(1)
  for regime, cases in (("decode", decode), ("prefill", prefill)):
    for shape_name, (k, n) in shapes.items():
      for groups, tokens in cases:
        key, sub = jax.random.split(key)
        x, sizes, w, _, bufs, _, slot = make_case(sub, groups, tokens, k, n, fp8=False)
        m = groups * tokens
        flops = 2 * m * k * n
        wbytes = groups * k * n * 2
        row = dict(regime=regime, shape=shape_name, groups=groups, tokens_per_group=tokens, m=m,
                   k=k, n=n, flops=flops, weight_bytes=wbytes)
        variants = {}
        for name, cfg in cfg_variants.items():
          if args.smoke:
            cfg = dataclasses.replace(cfg, block_n=128, max_concurrent_steps=2)
          if regime == "decode" and name.startswith("ws_prefill"):
            continue
          if regime == "prefill" and name == "ws_decode":
            continue
          variants[name] = jax.jit(lambda x, s, b, sl, cfg=cfg: gg.grouped_gemm(x, s, b, sl, config=cfg,
                                                                         interpret=interp))
        results = {}
        for name, f in variants.items():
          try:
            t = bench(f, x, sizes, bufs, slot)
            results[name] = t
          except Exception as e:  # a config that fails must not hide the others
            print(f"  {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            results[name] = None
        try:
          if args.smoke:
            raise RuntimeError("GPU only")
          rd = jax.jit(lambda x, w, s: ragged_dot_mgpu.ragged_dot(
              x, w, group_sizes=s, block_m=128, block_n=128, block_k=64, max_concurrent_steps=4,
              grid_block_n=1))
          results["jax_ragged_dot_mgpu"] = bench(rd, x, w, sizes)
        except Exception as e:
          print(f"  jax_ragged_dot_mgpu failed: {str(e)[:200]}", flush=True)
          results["jax_ragged_dot_mgpu"] = None
        if flops <= 3e11:
          xla = jax.jit(lambda x, w, s: jax.lax.ragged_dot(x, w, s))
          results["xla_ragged_dot"] = bench(xla, x, w, sizes, reps=3, inner=2)
        dense = jax.jit(lambda x, b: x @ b)  # [M, K] @ [K, N]: the same FLOPs
        results["dense"] = bench(dense, x, w[0])
        # Correctness of the best config on this case (rows of 4 groups vs the f32 reference).
        best = min((v, kname) for kname, v in results.items()
                   if v is not None and kname in variants)
        out = variants[best[1]](x, sizes, bufs, slot)
        ref_rows = min(m, 4 * tokens)
        ref = jnp.einsum("gtk,gkn->gtn", x[:ref_rows].astype(jnp.float32).reshape(-1, tokens, k),
                         w[:ref_rows // tokens].astype(jnp.float32)).reshape(ref_rows, n)
        row["rel_err_best"] = rel_err(out[:ref_rows], ref)
        # FP8 on the same case (weights [G, N, K] e4m3 with 128x128 block scales): every variant
        # timed, then checked against the reference that quantizes activations as the kernel
        # does (what is left: bf16 output rounding ~2e-3, f32 summation order, the tensor core's
        # FP8 accumulation; CPU interpret mode, 8 groups x 8 tokens, K=256: 1.6e-3).
        key, sub = jax.random.split(key)
        _, _, fw, fs, fbufs, fsbufs, _ = make_case(sub, groups, tokens, k, n, fp8=True)
        check_rows, want = fp8_check_rows(x, fw, fs, groups, tokens)
        del fw, fs
        fp8_ok = []
        for name, cfg in fp8_variants.items():
          if args.smoke:
            cfg = dataclasses.replace(cfg, max_concurrent_steps=2)
          try:
            f8 = lambda x, s, b, sb, sl, cfg=cfg: gg.grouped_gemm_fp8(
                x, s, b, sb, sl, config=cfg, interpret=interp)
            if not args.smoke:  # interpret mode: the FP8 kernel can hang inside an outer jit
              f8 = jax.jit(f8)
            results[name] = bench(f8, x, sizes, fbufs, fsbufs, slot)
            if not interp:
              row.setdefault("fp8_kernel_s", {})[name] = kernel_times(f8, x, sizes, fbufs, fsbufs, slot)
            err = rel_err(f8(x, sizes, fbufs, fsbufs, slot)[check_rows], want)
            row.setdefault("fp8_rel_err", {})[name] = err
            if err <= FP8_MAX_REL_ERR:
              fp8_ok.append(name)
            else:
              print(f"  {name} WRONG: rel err {err:.2e} > {FP8_MAX_REL_ERR}", flush=True)
          except Exception as e:
            print(f"  {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            results[name] = None
        del fbufs, fsbufs, want
        fp8_best = min(fp8_ok, key=lambda kk: results[kk], default=None)
        row["fp8_best_variant"] = fp8_best
        results["fp8"] = results[fp8_best] if fp8_best else None
        row["time_s"] = results
        ours = {kk: v for kk, v in results.items() if kk in variants and v is not None}
        best_name, best_t = min(ours.items(), key=lambda kv: kv[1]) if ours else (None, None)
        row["best_variant"] = best_name
        if best_t:
          row["ours_tflops"] = flops / best_t / 1e12
          row["dense_tflops"] = flops / results["dense"] / 1e12
          row["frac_of_dense"] = results["dense"] / best_t
          row["weight_gbps"] = wbytes / best_t / 1e9
          row["frac_of_hbm"] = wbytes / best_t / 1e9 / copy_gbps
          if results.get("fp8"):
            row["fp8_over_bf16"] = best_t / results["fp8"]
            row["fp8_weight_gbps"] = wbytes / 2 / results["fp8"] / 1e9
            row["fp8_over_bf16_by_variant"] = {kk: best_t / results[kk] for kk in fp8_ok}
          for base in ("jax_ragged_dot_mgpu", "xla_ragged_dot"):
            if results.get(base):
              row[f"speedup_vs_{base}"] = results[base] / best_t
        if best_t and not interp:  # the same ratios from kernel durations (CUPTI)
          bk, bop = kernel_times(variants[best_name], x, sizes, bufs, slot)
          dense_k = kernel_times(dense, x, w[0])[1]
          row["kernel_s"] = dict(bf16=bk, bf16_op=bop, dense=dense_k)
          row["frac_of_dense_kernel"] = dense_k / bk
          row["frac_of_hbm_kernel"] = wbytes / bk / 1e9 / copy_gbps
          fk = {kk: v for kk, v in row.get("fp8_kernel_s", {}).items() if kk in fp8_ok}
          if fk:
            kname = min(fk, key=lambda kk: fk[kk][0])
            row["kernel_s"].update(fp8=fk[kname][0], fp8_op=fk[kname][1], fp8_variant=kname)
            row["fp8_over_bf16_kernel"] = bk / fk[kname][0]  # kernel vs kernel
            row["fp8_over_bf16_op"] = bop / fk[kname][1]  # incl. activation quantization, schedule
        rows.append(row)
        fmt = lambda v: "-" if v is None else f"{v * 1e3:8.3f}"
        print(f"{regime:7s} {shape_name:7s} G={groups:3d} T={tokens:4d} "
              + " ".join(f"{kk}={fmt(v)}ms" for kk, v in results.items())
              + f" | best {best_name} {row.get('ours_tflops', 0):.0f} TF/s"
              f" dense {row.get('frac_of_dense', 0):.2f} hbm {row.get('frac_of_hbm', 0):.2f}"
              f" fp8x {row.get('fp8_over_bf16', 0):.2f} err {row['rel_err_best']:.1e}"
              f" | kernels: dense {row.get('frac_of_dense_kernel', 0):.2f} hbm {row.get('frac_of_hbm_kernel', 0):.2f}"
              f" fp8x {row.get('fp8_over_bf16_kernel', 0):.2f} (op {row.get('fp8_over_bf16_op', 0):.2f})", flush=True)
        del x, w, bufs

  dec = [r for r in rows if r["regime"] == "decode" and "frac_of_hbm" in r]
  pre = [r for r in rows if r["regime"] == "prefill" and "frac_of_dense" in r]
  metrics = {
      "hbm_copy_gbps": copy_gbps,
      "hbm_copy_detail_gbps": copy_detail,
      "grouped_gemm_bf16_frac_of_dense": max((r["frac_of_dense"] for r in pre), default=None),
      "grouped_gemm_bf16_frac_of_dense_median": statistics.median([r["frac_of_dense"] for r in pre]) if pre else None,
      "grouped_gemm_bf16_frac_of_hbm": max((r["frac_of_hbm"] for r in dec), default=None),
      "grouped_gemm_bf16_frac_of_hbm_median": statistics.median([r["frac_of_hbm"] for r in dec]) if dec else None,
      "grouped_gemm_fp8_over_bf16": max((r.get("fp8_over_bf16", 0) for r in pre), default=None),
      # The goal holds only if every compute-bound shape meets it: the worst shape.
      "grouped_gemm_fp8_over_bf16_min": min((r.get("fp8_over_bf16", 0) for r in pre), default=None),
      # Per FP8 variant: its best prefill ratio (all variants, checked ones only).
      "grouped_gemm_fp8_over_bf16_by_variant": {
          kk: max((r["fp8_over_bf16_by_variant"][kk] for r in pre
                   if kk in r.get("fp8_over_bf16_by_variant", {})), default=None)
          for kk in FP8_VARIANTS},
      # From CUPTI kernel durations (GPU): the grouped-GEMM kernels alone; `_op` includes the XLA ops
      # the call runs around the kernel (for FP8: the activation quantization).
      "grouped_gemm_bf16_frac_of_dense_kernel": extreme(pre, "frac_of_dense_kernel", max),
      "grouped_gemm_bf16_frac_of_hbm_kernel": extreme(dec, "frac_of_hbm_kernel", max),
      "grouped_gemm_bf16_frac_of_hbm_kernel_min": extreme(dec, "frac_of_hbm_kernel", min),
      "grouped_gemm_fp8_over_bf16_kernel": extreme(pre, "fp8_over_bf16_kernel", max),
      "grouped_gemm_fp8_over_bf16_kernel_min": extreme(pre, "fp8_over_bf16_kernel", min),
      "grouped_gemm_fp8_over_bf16_op_min": extreme(pre, "fp8_over_bf16_op", min),
      "fp8_variants_failing_check": sorted({kk for r in rows for kk, e in r.get("fp8_rel_err", {}).items()
                                            if e > FP8_MAX_REL_ERR}),
      "max_rel_err": max((r["rel_err_best"] for r in rows), default=None),
      "max_rel_err_fp8": max((e for r in rows for e in r.get("fp8_rel_err", {}).values()), default=None),
  }
  print("\n== summary ==")
  print(f"{'regime':8s}{'shape':8s}{'G':>5s}{'T':>6s}{'best':>18s}{'TF/s':>7s}{'dense':>7s}{'hbm':>6s}"
        f"{'fp8x':>6s}{'best fp8':>28s}  fp8 ms by variant")
  for r in rows:
    fp8_ms = " ".join(f"{kk[4:]}={r['time_s'][kk] * 1e3:.3f}" if r["time_s"].get(kk) else f"{kk[4:]}=-"
                      for kk in FP8_VARIANTS)
    print(f"{r['regime']:8s}{r['shape']:8s}{r['groups']:5d}{r['tokens_per_group']:6d}"
          f"{str(r.get('best_variant')):>18s}{r.get('ours_tflops', 0):7.0f}"
          f"{r.get('frac_of_dense', 0):7.2f}{r.get('frac_of_hbm', 0):6.2f}{r.get('fp8_over_bf16', 0):6.2f}"
          f"{str(r.get('fp8_best_variant')):>28s}  {fp8_ms}")
  print(json.dumps(metrics, indent=1))
  commit = os.environ.get("GIT_COMMIT")
  if not commit:
    try:
      commit = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except Exception:
      commit = "unknown"
  result = {
      "part": "kernels",
      "date": datetime.date.today().isoformat(),
      "commit": commit,
      "command": " ".join(["python"] + sys.argv),
      "device_kind": args.device_kind,
      "num_devices": jax.device_count(),
      "jax_version": jax.__version__,
      "config": {"shapes": shapes, "decode_cases": decode, "prefill_cases": prefill,
                 "configs": {kk: dataclasses.asdict(v) for kk, v in cfg_variants.items()},
                 "fp8_configs": {kk: dataclasses.asdict(v) for kk, v in fp8_variants.items()},
                 "fp8_max_rel_err": FP8_MAX_REL_ERR, "weight_buffers": 2},
      "metrics": metrics,
      "rows": rows,
  }
  out = args.out or (f"experiments/results/kernels-{datetime.date.today():%Y%m%d}-{args.device_kind}"
                     + (f"-{args.tag}" if args.tag else "") + ".json")
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w") as fh:
    json.dump(result, fh, indent=1)
  print("wrote", out)


if __name__ == "__main__":
  main()
