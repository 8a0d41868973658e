"""FP8 block-scaled linears at prefill: our FP8 GEMM kernel against cuBLASLt's DeepSeek-style block-scaled GEMM.

The engine's prefill profile has R1's FP8 linears at ~0.6 of the FP8 peak (WORKSPACE Finding 29): is that our
kernel, or what these shapes allow? For each FP8 linear of an R1 layer at `--rows` tokens (8192: the engine's prefill
step), with the activations quantized per token per 128 columns and the weight in 128x128 blocks (DeepSeek's
recipe), one run times
  * `ours`: the engine's `Linear` at prefill: XLA quantizes x, `grouped_gemm_fp8` with one group multiplies;
    the whole call and its Mosaic kernel alone (CUPTI);
  * `cublas_blockwise`: `torch._scaled_mm` with 1x128 activation and 128x128 weight scales (cuBLASLt's
    block-scaled FP8 GEMM, CUDA >= 12.9 on Hopper) on the same quantized values: a GEMM only, the
    like-for-like of our kernel alone. Scale layouts are tried until one runs and matches the reference;
    the row says which, or why none did.
TFLOP/s (2 M N K) against the FP8 peak of the same run (the better of XLA's and torch's per-tensor FP8 GEMM at
8192^3: no block scales, the ceiling). Every output is checked against the f32 product of the dequantized
operands (relative error <= 1e-2). (The kernel with its two warpgroups taking turns on the tensor cores,
`ours_pingpong`, ran 5-11% slower at every shape on an H100 in session 17 and was removed.)

  python experiments/bench_fp8_prefill.py --device_kind nvidia-h100-x1 [--rows 8192]
  python experiments/bench_fp8_prefill.py --smoke   # CPU: interpret mode, tiny shapes, no cuBLAS
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import device_peaks, kernel_bench  # noqa: E402
from experiments.bench_fp8_linear import SMOKE_LINEARS, fp8_reference, inputs  # noqa: E402
from pallas_kernels import grouped_gemm as gg  # noqa: E402

# The engine's FP8 `Linear`s of one R1 layer as (name, N = out, K = in, calls per layer): the attention
# projections (kv_a, 576 rows, is not a multiple of 128: dequantized, not here), the dense MLP of the first
# three layers and the shared expert of the MoE layers, gate and up as separate linears as the model has them.
R1_PREFILL_LINEARS = (("q_a", 1536, 7168, 1), ("q_b", 24576, 1536, 1), ("kv_b", 32768, 512, 1),
                      ("o_proj", 7168, 16384, 1), ("dense_gate_or_up", 18432, 7168, 2),
                      ("dense_down", 7168, 18432, 1), ("shared_gate_or_up", 2048, 7168, 2),
                      ("shared_down", 7168, 2048, 1))


def ours(m: int, n: int, interpret: bool):
    """The engine's FP8 `Linear` at prefill rows (model.Linear._fp8_kernel with one K slice): f(x, w, s)."""
    cfg = gg.default_config(m, 1, n, fp8=True)
    one, zero = np.full((1,), m, np.int32), np.zeros((1, 2), np.int32)
    return jax.jit(lambda x, w, s: gg.grouped_gemm_fp8(x, one, (w[None],), (s[None],), zero, config=cfg,
                                                       out_dtype=jnp.bfloat16, interpret=interpret))


def _to_torch(torch, a):
    """A JAX array as a CUDA torch tensor (through host memory; e4m3 as its bytes)."""
    host = np.asarray(a)
    if host.dtype == jnp.float8_e4m3fn:
        return torch.from_numpy(host.view(np.uint8)).cuda().view(torch.float8_e4m3fn)
    return torch.from_numpy(np.ascontiguousarray(host)).cuda()


def _scale_layouts(torch, xs, ws):
    """(name, scale_a, scale_b) candidates for torch._scaled_mm(xq [M, K], w.t() [K, N]): activation scales
    [M, K/128] row- or column-major, weight scales [N/128, K/128] as they are, transposed, or both."""
    a_forms = {"a_rowmajor": xs, "a_colmajor": xs.t().contiguous().t()}
    b_forms = {"b_nk": ws, "b_kn_view": ws.t(), "b_kn": ws.t().contiguous()}
    return [(f"{an}+{bn}", a, b) for an, a in a_forms.items() for bn, b in b_forms.items()]


def cublas_blockwise(x, w, s, want, repeats: int):
    """(seconds per GEMM, rel err, layout name) of torch._scaled_mm with DeepSeek's block scales on our
    quantized operands, or (None, None, why not)."""
    torch = device_peaks._torch_cuda()
    if torch is None:
        return None, None, "no CUDA torch"
    xq, xs = gg.quantize_activations(x)
    tx, tw = _to_torch(torch, xq), _to_torch(torch, w)
    txs, tws = _to_torch(torch, xs.astype(jnp.float32)), _to_torch(torch, s.astype(jnp.float32))
    want = np.asarray(want, np.float32)
    errors = []
    for name, sa, sb in _scale_layouts(torch, txs, tws):
        try:
            mm = lambda: torch._scaled_mm(tx, tw.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
            out = mm().float().cpu().numpy()
        except (RuntimeError, ValueError, TypeError) as e:
            errors.append(f"{name}: {str(e).splitlines()[0][:160]}")
            continue
        err = float(np.linalg.norm(out - want) / np.linalg.norm(want))
        if not err <= 1e-2:
            errors.append(f"{name}: ran, rel err {err:.2e}")
            continue
        t = device_peaks._median_s(mm, repeats, 5, lambda _: torch.cuda.synchronize())
        return t, err, name
    return None, None, "; ".join(errors)


def main(argv=None):
    a, interpret = kernel_bench.parse_args(
        __doc__.split("\n")[0], "fp8-prefill", ("--rows", "8192", "tokens per call (the engine's prefill step)"),
        argv)
    peaks = {} if interpret else device_peaks.matmul_peaks(8192)
    fp8_peak = max(peaks.get("xla_fp8_tflops", 0.0), peaks.get("torch_fp8_tflops", 0.0))
    print(f"FP8 peak {fp8_peak:.0f} TFLOP/s {peaks}")
    rows_out = []
    linears = [(*SMOKE_LINEARS[1], 1)] if a.smoke else R1_PREFILL_LINEARS  # smoke: one tiny (interpret is slow)
    for name, n, k, calls in linears:
        m = int(a.rows)
        x, w, s = inputs(n, k, m, seed=n + k)
        want = fp8_reference(x, w, s)
        fns = {"ours": ours(m, n, interpret)}
        flops = 2 * m * n * k
        row = dict(linear=name, n=n, k=k, rows=m, flops=flops, calls_per_layer=calls, rel_err={
            v: float(jnp.linalg.norm(f(x, w, s).astype(jnp.float32) - want) / jnp.linalg.norm(want))
            for v, f in fns.items()}, tflops={})
        if not interpret:
            for v, f in fns.items():
                call_s, kernel_s, kernels = kernel_bench.cupti_times(f, x, w, s)
                row.update({f"{v}_call_s": call_s, f"{v}_kernel_s": kernel_s, f"{v}_kernels_us": kernels})
                row["tflops"].update({f"{v}_call": flops / call_s / 1e12, f"{v}_kernel": flops / kernel_s / 1e12})
            t, err, layout = cublas_blockwise(x, w, s, want, repeats=5)
            row.update(cublas_s=t, cublas_layout=layout)
            if t is not None:
                row["rel_err"]["cublas_blockwise"] = err
                row["tflops"]["cublas_blockwise"] = flops / t / 1e12
            row["frac_of_fp8_peak"] = {v: tf / fp8_peak for v, tf in row["tflops"].items()}
            print(f"{name:15s} N={n:6d} K={k:6d} M={m} | " + "  ".join(
                f"{v} {tf:6.0f} TF/s ({row['frac_of_fp8_peak'][v]:.2f})" for v, tf in row["tflops"].items())
                + ("" if t is not None else f" | cuBLAS blockwise: {layout[:300]}"), flush=True)
        bad = {v: e for v, e in row["rel_err"].items() if not e <= 1e-2}
        if bad:
            raise SystemExit(f"{name} M={m}: outputs off the FP8 reference: {bad}")
        rows_out.append(row)
    metrics = {}
    if not interpret:
        flops = sum(r["flops"] * r["calls_per_layer"] for r in rows_out)
        for v in ("ours_call", "ours_kernel", "cublas_blockwise"):
            timed = [r for r in rows_out if v in r["tflops"]]
            if len(timed) == len(rows_out):  # every linear as often as a layer calls it, FLOP-weighted
                seconds = sum(r["flops"] * r["calls_per_layer"] / r["tflops"][v] / 1e12 for r in timed)
                metrics[f"fp8_prefill_{v}_frac_of_fp8_peak"] = flops / seconds / 1e12 / fp8_peak
        if "fp8_prefill_cublas_blockwise_frac_of_fp8_peak" in metrics:
            metrics["fp8_prefill_ours_kernel_over_cublas"] = (metrics["fp8_prefill_ours_kernel_frac_of_fp8_peak"]
                                                              / metrics["fp8_prefill_cublas_blockwise_frac_of_fp8_peak"])
        metrics.update(fp8_peak_tflops=fp8_peak, matmul_peaks=peaks)
    config = dict(rows=a.rows, interpret=interpret, linears=[r["linear"] for r in rows_out])
    kernel_bench.write(a, config, metrics, rows_out, 0.0, {})


if __name__ == "__main__":
    main()
