"""The routed experts' FFN on the GPU with SwiGLU in the gate/up GEMM's epilogue, against the separate pass.

One MoE layer's expert computation at DeepSeek-R1's shapes (256 FP8 experts, hidden 7168, I 2048, top-8,
random routing), as `experts.pallas_sorted_ffn` runs it (activations quantized once per token, the rows gathered
in expert order, gate/up, down):
  * `engine`: `experts.pallas_sorted_ffn` as the engine calls it: the SwiGLU epilogue storing [M, I] bf16,
    quantized by XLA for the down GEMM (session 9's in-kernel quantization at decode measured slower in
    session 10 and was dropped; this variant then equals `swiglu_bf16` but for the call's wrapping);
  * `swiglu_quantized`: `grouped_gemm_fp8_swiglu(quantize_output=True)` stores silu(gate) * up as e4m3 [M, I]
    with per-tile row scales, which the down GEMM reads as they are;
  * `swiglu_bf16`: the SwiGLU epilogue storing [M, I] bf16, quantized by XLA for the down GEMM;
  * `separate`: the gate/up GEMM stores [M, 2I] bf16 and an XLA fusion computes silu(gate) * up (the path
    before 2026-12-06).
(`swiglu_bf16_pingpong`, both GEMMs' two compute warpgroups taking turns on the tensor cores, measured 9.29 ms
against 7.95 at 8192 tokens on an H100 in session 17; removed with the kernel option.)
Per token count: CUPTI time of the whole call and of its Mosaic kernels, the weight bytes of the experts the
routing touches over the call's time (decode: a weight stream, against the HBM copy rate measured in the same
run) and TFLOP/s (prefill). The variants must agree within 3e-2 relative error: `separate` rounds gate and up
to bf16 before their product, so some of the down GEMM's e4m3 activations round the other way (1.3% measured
on the CPU smoke shapes); each kernel's exactness is tests/test_grouped_gemm.py's.

  python experiments/bench_moe_ffn.py --device_kind nvidia-h100-x1 [--tokens 1,64,128,8192]
  python experiments/bench_moe_ffn.py --smoke   # CPU: interpret mode, tiny shapes (checks the loops)
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import kernel_bench  # noqa: E402
from experiments.bench_kernels import hbm_ceiling  # noqa: E402
from dwdp_jax.experts import ExpertWeights, pallas_sorted_ffn  # noqa: E402
from pallas_kernels import grouped_gemm as gg  # noqa: E402
from pallas_kernels.grouped_gemm import FP8_BLOCK  # noqa: E402

R1 = dict(experts=256, hidden=7168, inter=2048, top_k=8)
SMOKE = dict(experts=8, hidden=256, inter=128, top_k=2)


def expert_weights(experts: int, hidden: int, inter: int, seed: int):
  """Random FP8 gate/up [E, 2I, hidden] and down [E, hidden, I] with block scales (never zeros)."""
  keys = jax.random.split(jax.random.key(seed), 4)

  def fp8(key, e, n, k):  # one expert at a time: no f32 copy of all
    return jnp.concatenate([jax.random.normal(kk, (1, n, k), jnp.float32).astype(jnp.float8_e4m3fn)
                            for kk in jax.random.split(key, e)])

  wgu, wd = fp8(keys[0], experts, 2 * inter, hidden), fp8(keys[1], experts, hidden, inter)
  sgu = jax.random.uniform(keys[2], (experts, 2 * inter // 128, hidden // 128), jnp.float32, 0.5, 2.0)
  sd = jax.random.uniform(keys[3], (experts, hidden // 128, inter // 128), jnp.float32, 0.5, 2.0)
  return wgu, sgu / np.sqrt(hidden), wd, sd / np.sqrt(inter)


def routed_rows(tokens: int, experts: int, top_k: int, seed: int):
  """(rows [T*k] token of each row in expert order, sizes [E]) of a random top-k routing."""
  rng = np.random.default_rng(seed)
  ids = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)])
  flat = ids.reshape(-1)
  order = np.argsort(flat, kind="stable")
  sizes = np.bincount(flat, minlength=experts).astype(np.int32)
  return jnp.asarray(order // top_k, jnp.int32), jnp.asarray(sizes)


def variants(interpret: bool):
  where_of = lambda e: jnp.stack([jnp.zeros((e,), jnp.int32), jnp.arange(e, dtype=jnp.int32)], axis=1)

  def front(x, rows):
    xq, xs = gg.quantize_activations(x)
    return xq[rows], xs[rows]

  def down(a, sizes, wd, sd):
    return gg.grouped_gemm_fp8(a, sizes, (wd,), (sd,), where_of(sizes.shape[0]), interpret=interpret)

  def swiglu_quantized(x, rows, sizes, wgu, sgu, wd, sd):
    xq, xs = front(x, rows)
    a = gg.grouped_gemm_fp8_swiglu(xq, sizes, (wgu,), (sgu,), where_of(sizes.shape[0]), x_scale=xs,
                                   quantize_output=True, interpret=interpret)
    return down(a, sizes, wd, sd)

  def swiglu_bf16(x, rows, sizes, wgu, sgu, wd, sd):
    xq, xs = front(x, rows)
    a = gg.grouped_gemm_fp8_swiglu(xq, sizes, (wgu,), (sgu,), where_of(sizes.shape[0]), x_scale=xs,
                                   interpret=interpret)
    return down(a, sizes, wd, sd)

  def separate(x, rows, sizes, wgu, sgu, wd, sd):
    xq, xs = front(x, rows)
    h = gg.grouped_gemm_fp8(xq, sizes, (wgu,), (sgu,), where_of(sizes.shape[0]), x_scale=xs, interpret=interpret)
    gate, up = jnp.split(h, 2, axis=-1)
    a = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(jnp.bfloat16)
    return down(a, sizes, wd, sd)

  def engine(x, rows, sizes, wgu, sgu, wd, sd):
    weights = ExpertWeights(wgu, wd, sgu, sd, (FP8_BLOCK, FP8_BLOCK))
    return pallas_sorted_ffn(x, sizes, [weights], where_of(sizes.shape[0]), rows=rows)

  fns = {"engine": jax.jit(engine), "swiglu_quantized": jax.jit(swiglu_quantized),
         "swiglu_bf16": jax.jit(swiglu_bf16), "separate": jax.jit(separate)}
  if interpret:  # the engine's path calls the kernels natively (its CPU check is tests/test_experts.py): in
    fns["engine"] = fns["swiglu_bf16"]  # interpret mode it is swiglu_bf16, the same function (run once in main)
  return fns


def main(argv=None):
  a, interpret = kernel_bench.parse_args(__doc__.split("\n")[0], "moe-ffn-swiglu",
                                         ("--tokens", "1,64,128,8192", "comma list of token counts (rows = tokens x "
                                          "top_k)"), argv)
  shape = SMOKE if a.smoke else R1
  e, d, inter, top_k = shape["experts"], shape["hidden"], shape["inter"], shape["top_k"]
  hbm, hbm_detail = (0.0, {}) if interpret else hbm_ceiling(small=False)
  print(f"HBM copy {hbm:.0f} GB/s {hbm_detail}")
  wgu, sgu, wd, sd = expert_weights(e, d, inter, seed=0)
  expert_bytes = (wgu[0].size + wd[0].size) + (sgu[0].size + sd[0].size) * 4
  fns = variants(interpret)
  rows_out = []
  for t in (int(v) for v in a.tokens.split(",")):
    rows, sizes = routed_rows(t, e, top_k, seed=t)
    x = jax.random.normal(jax.random.key(t), (t, d), jnp.float32).astype(jnp.bfloat16)
    active = int((np.asarray(sizes) > 0).sum())
    row = dict(tokens=t, rows=t * top_k, active_experts=active, weight_bytes=active * expert_bytes,
               flops=2 * t * top_k * 3 * d * inter, time_s={}, kernel_s={}, kernels_us={}, frac_of_hbm={},
               tflops={})
    outs = {}
    for v, f in fns.items():  # a function two variants share (engine in interpret mode) runs once
      same = next((u for u in outs if fns[u] is f), None)
      outs[v] = outs[same] if same else f(x, rows, sizes, wgu, sgu, wd, sd)
    ref = outs["separate"].astype(jnp.float32)
    row["rel_err_vs_separate"] = {v: float(jnp.linalg.norm(o.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
                                  for v, o in outs.items() if v != "separate"}
    if not all(e <= 3e-2 for e in row["rel_err_vs_separate"].values()):
      raise SystemExit(f"T={t}: the variants disagree: {row['rel_err_vs_separate']}")
    if not interpret:
      for v, f in fns.items():
        total, row["kernel_s"][v], row["kernels_us"][v] = kernel_bench.cupti_times(f, x, rows, sizes, wgu, sgu, wd,
                                                                                   sd)
        row["time_s"][v] = total
        row["frac_of_hbm"][v] = row["weight_bytes"] / total / 1e9 / hbm
        row["tflops"][v] = row["flops"] / total / 1e12
      print(f"T={t:5d} experts={active:3d} | " + "  ".join(
          f"{v} {row['time_s'][v] * 1e6:8.1f} us (kernels {row['kernel_s'][v] * 1e6:8.1f}; "
          f"{row['frac_of_hbm'][v]:.2f} of HBM, {row['tflops'][v]:.0f} TF/s)" for v in fns)
          + f" | speedup {row['time_s']['separate'] / row['time_s']['engine']:.3f}")
    rows_out.append(row)
  metrics = {}
  if not interpret:
    for r in rows_out:
      metrics[f"moe_ffn_engine_speedup_t{r['tokens']}"] = r["time_s"]["separate"] / r["time_s"]["engine"]
      metrics[f"moe_ffn_frac_of_hbm_t{r['tokens']}"] = r["frac_of_hbm"]["engine"]
  kernel_bench.write(a, dict(shape=shape, tokens=a.tokens, interpret=interpret), metrics, rows_out, hbm, hbm_detail)


if __name__ == "__main__":
  main()
