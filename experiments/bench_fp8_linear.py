"""FP8 linear layers at decode (a few rows): the one-group FP8 GEMM against split-K, on DeepSeek-R1's shapes.

At decode a linear is a weight stream: [N, K] e4m3 bytes read once for M <= 64 rows. The grouped GEMM's decode
tile is 64 x 256, so a layer has only N / 256 output tiles (q_a: 6, o_proj and the dense down: 28 on 132 SMs)
and most SMs idle; split-K (`grouped_gemm.fp8_matmul_split_k`) cuts K into slices that run as extra tiles and
sums them in f32. For every R1 linear and row count, CUPTI kernel times of one call:
  * `one_group`: `grouped_gemm_fp8` with one group (the engine's path before split-K),
  * `split_k`: `fp8_matmul_split_k` with `choose_k_splits`' slice count, the kernel quantizing the bf16 rows
    itself (`quantize_in_kernel`; the engine's path in session 9 only: slower, WORKSPACE Finding 24),
  * `split_k_xla_quant`: the same with the activations quantized by XLA before the kernel (the engine's path),
  * `xla_dequant`: the weight dequantized to bf16 by XLA, then a dot (the CPU path; no FP8 tensor cores),
each as the Mosaic kernel alone and as the whole call (activation quantization, the slices' sum), against the
weight bytes: GB/s and the fraction of the HBM copy rate measured in the same run. Outputs are checked against
`reference_fp8` (xla_dequant: the f32 product with unquantized activations), relative error <= 1e-2.

  python experiments/bench_fp8_linear.py --device_kind nvidia-h100-x1 [--rows 1,64]
  python experiments/bench_fp8_linear.py --smoke   # CPU: interpret mode, tiny shapes (checks the loops)
  python experiments/bench_fp8_linear.py --smoke --linears=tiny_a   # one linear (the tests' smoke run)
"""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import kernel_bench  # noqa: E402
from experiments.bench_kernels import hbm_ceiling  # noqa: E402
from pallas_kernels import _compat  # noqa: E402
from pallas_kernels import grouped_gemm as gg  # noqa: E402

# DeepSeek-R1's FP8 linears as (name, N = out, K = in); kv_a (576 rows) is not a multiple of 128: dequantized.
R1_LINEARS = (("q_a", 1536, 7168), ("q_b", 24576, 1536), ("o_proj", 7168, 16384),
              ("dense_gate_up", 36864, 7168), ("dense_down", 7168, 18432),
              ("shared_gate_up", 4096, 7168), ("shared_down", 7168, 2048))
SMOKE_LINEARS = (("tiny_a", 256, 1024), ("tiny_b", 512, 256))


def inputs(n: int, k: int, m: int, seed: int):
  keys = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(keys[0], (m, k), jnp.float32).astype(jnp.bfloat16)
  w = jax.random.normal(keys[1], (n, k)).astype(jnp.float8_e4m3fn)
  s = jax.random.uniform(keys[2], (n // 128, k // 128), jnp.float32, 0.5, 2.0) / math.sqrt(k)
  return x, w, s


def variants(n: int, k: int, m: int, num_sms: int, interpret: bool):
  """{name: jitted f(x, w, s)} and the split count."""
  cfg = gg.default_config(m, 1, n, fp8=True)
  splits = gg.choose_k_splits(n, k, num_sms, cfg.block_n)
  qx_cfg = gg.bf16_x_config(cfg)
  one = np.full((1,), m, np.int32)  # numpy: the tile schedule is a constant, as in the engine's Linear
  zero = np.zeros((1, 2), np.int32)
  fns = {
      "one_group": jax.jit(lambda x, w, s: gg.grouped_gemm_fp8(x, one, (w[None],), (s[None],), zero, config=cfg,
                                                               interpret=interpret)),
      "split_k": jax.jit(lambda x, w, s: gg.fp8_matmul_split_k(x, w, s, splits, config=qx_cfg,
                                                               interpret=interpret, quantize_in_kernel=True)),
      "split_k_xla_quant": jax.jit(lambda x, w, s: gg.fp8_matmul_split_k(x, w, s, splits, config=cfg,
                                                                         interpret=interpret)),
      "xla_dequant": jax.jit(lambda x, w, s: jnp.dot(
          x, gg.dequantize_weight(w[None], s[None])[0].T.astype(jnp.bfloat16),
          preferred_element_type=jnp.float32).astype(jnp.bfloat16)),
  }
  return fns, splits


def fp8_reference(x, w, s):
  """f32 product of the activations quantized as the FP8 kernels quantize them with the dequantized weight
  [N, K]. One dense matmul: the grouped reference's per-row weight gather needs M x N x K floats (28 GiB for
  o_proj at 64 rows)."""
  wd = gg.dequantize_weight(w[None], s[None])[0]
  return jnp.dot(gg.dequantized_activations(x), wd.T, precision=jax.lax.Precision.HIGHEST)


def references(x, w, s):
  """(`fp8_reference`: the FP8 kernels' reference, the f32 product of the activations as given with the
  dequantized weight: xla_dequant's)."""
  wd = gg.dequantize_weight(w[None], s[None])[0]
  return fp8_reference(x, w, s), jnp.dot(x.astype(jnp.float32), wd.T, precision=jax.lax.Precision.HIGHEST)


def main(argv=None):
  a, interpret = kernel_bench.parse_args(__doc__.split("\n")[0], "fp8-linear-decode",
                                         ("--rows", "1,64", "comma list of row counts (decode batch sizes)"), argv,
                                         extra=(("--linears", "", "comma list of the linears to run (default: "
                                                                  "all of the shape set)"),))
  shapes = SMOKE_LINEARS if a.smoke else R1_LINEARS
  if a.linears:
    names = a.linears.split(",")
    if not set(names) <= {name for name, _, _ in shapes}:
      raise SystemExit(f"--linears: a comma list of {', '.join(name for name, _, _ in shapes)}; got {a.linears!r}")
    shapes = tuple(lin for lin in shapes if lin[0] in names)
  num_sms = 8 if interpret else _compat.num_sms()
  hbm, hbm_detail = hbm_ceiling(small=a.smoke)  # the kernel benchmarks' HBM ceiling (XLA and torch copies)
  print(f"HBM copy {hbm:.0f} GB/s {hbm_detail}, {num_sms} SMs")
  rows_out = []
  for name, n, k in shapes:
    for m in (int(r) for r in a.rows.split(",")):
      x, w, s = inputs(n, k, m, seed=n + k + m)
      want, want_unquantized = references(x, w, s)
      fns, splits = variants(n, k, m, num_sms, interpret)
      weight_bytes = n * k + s.size * 4
      row = dict(linear=name, n=n, k=k, rows=m, splits=splits, weight_bytes=weight_bytes, time_s={},
                 kernel_s={}, gbps={}, frac_of_hbm={}, rel_err={}, kernels_us={})
      for variant, f in fns.items():
        out = f(x, w, s)
        ref = want_unquantized if variant == "xla_dequant" else want
        err = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
        row["rel_err"][variant] = err
        if interpret:
          continue
        # kernels_us: every kernel of the call with the median total: what the glue around the GEMM costs
        total, row["kernel_s"][variant], row["kernels_us"][variant] = kernel_bench.cupti_times(f, x, w, s)
        row["time_s"][variant] = total
        row["gbps"][variant] = weight_bytes / total / 1e9
        row["frac_of_hbm"][variant] = row["gbps"][variant] / hbm
      bad = {v: e for v, e in row["rel_err"].items() if not e <= 1e-2}
      if bad:
        raise SystemExit(f"{name} M={m}: outputs off the FP8 reference: {bad}")
      rows_out.append(row)
      if not interpret:
        print(f"{name:15s} N={n:6d} K={k:6d} M={m:3d} S={splits:3d} | " + "  ".join(
            f"{v} {row['time_s'][v] * 1e6:7.1f} us ({row['frac_of_hbm'][v]:.2f} of HBM)" for v in fns))
  metrics = {}
  if not interpret:
    for m in sorted({r["rows"] for r in rows_out}):
      rs = [r for r in rows_out if r["rows"] == m]
      nbytes = sum(r["weight_bytes"] for r in rs)
      for v in ("one_group", "split_k", "split_k_xla_quant", "xla_dequant"):
        # all seven linears streamed once, as a decode step does per layer
        metrics[f"fp8_linear_frac_of_hbm_m{m}_{v}"] = nbytes / sum(r["time_s"][v] for r in rs) / 1e9 / hbm
  config = dict(rows=a.rows, num_sms=num_sms, interpret=interpret, linears=[r[0] for r in shapes])
  kernel_bench.write(a, config, metrics, rows_out, hbm, hbm_detail)


if __name__ == "__main__":
  main()
