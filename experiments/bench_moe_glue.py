"""The MoE layer's two row gathers in XLA at prefill, element by element against 32-bit words; and the FP8
activation quantization before every FP8 GEMM, with and without a barrier before its scales' transpose.

The 8K-token prefill profile (WORKSPACE Finding 27) spends ~1.2 ms a MoE layer in each of two XLA gathers that
move rows of R1's hidden width (7168) at ~1/3 of HBM:
  * `replicate`: the quantized activations [T, 7168] e4m3, each token's row once per routed expert, in expert
    order (`x[rows]`, [8T, 7168]: the grouped GEMM's sorted input);
  * `combine`: the down GEMM's bf16 rows [8T, 7168] gathered back per token, weighted and summed, plus the
    residual (as XLA fuses `combine_sorted` into the layer's residual add).
Variants: `element` (as the engine ran until session 11: `x[rows]`, `experts.combine_sorted`), `word` (the rows
gathered as uint32 words, bitcast around the gather: `experts.gather_rows`; for the combine, each uint32 word
holds two bf16 and the products are taken on the pairs), `promise` (the element gathers with
`mode="promise_in_bounds"`, which drops the per-element index wrap and clamp). Every variant must equal
`element` bit for bit. Per token count: CUPTI time of the call, its bytes (the gathered rows written or read
once, plus the source / residual / output) over that time against the HBM copy rate of the same run.
  * `quantize`: bf16 activations [T, 7168] -> e4m3 rows and their per-128-column scales transposed to [K/128, M]
    (what `grouped_gemm_fp8` does before its kernel: the prefill profile's `loop_transpose_fusion`s, ~0.18 ms
    each at 8K tokens, ~1/3 of HBM). `fused` as the kernel wrapper does it; `barrier`: an optimization barrier
    on the scales before the transpose, so that XLA need not emit the whole quantization as one transpose
    fusion (a guess from the fusion's name, to be measured). Bytes: x read, e4m3 written.

  python experiments/bench_moe_glue.py --device_kind nvidia-h100-x1 [--tokens 8192,16384]
  python experiments/bench_moe_glue.py --smoke   # CPU: tiny shapes (checks the variants agree)
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dwdp_jax.experts import combine_sorted, gather_rows  # noqa: E402
from pallas_kernels.grouped_gemm import quantize_activations  # noqa: E402
from experiments import kernel_bench  # noqa: E402
from experiments.bench_kernels import hbm_ceiling  # noqa: E402

R1 = dict(hidden=7168, top_k=8, experts=256)
SMOKE = dict(hidden=256, top_k=4, experts=16)


def routing(tokens: int, experts: int, top_k: int, seed: int):
    """(order [t*k] sorting the (token, slot) pairs by expert, token_of_row [t*k], weights [t, k] f32)."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)]).astype(np.int32)
    order = np.argsort(ids.reshape(-1), kind="stable").astype(np.int32)
    weights = rng.uniform(0.05, 1.0, (tokens, top_k)).astype(np.float32)
    return jnp.asarray(order), jnp.asarray(order // top_k), jnp.asarray(weights)


def combine_words(y_sorted, order, weights_tk):
    """`combine_sorted` with its gathers on uint32 words (two bf16 each): the same products in the same order."""
    t, k = weights_tk.shape
    n, d = y_sorted.shape
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype)).reshape(t, k)
    words = jax.lax.bitcast_convert_type(y_sorted.reshape(n, d // 2, 2), jnp.uint32)
    w = weights_tk.astype(jnp.float32)[:, :, None, None]
    pair = lambda j: jax.lax.bitcast_convert_type(words[inverse[:, j]], y_sorted.dtype).astype(jnp.float32)
    out = pair(0) * w[:, 0]
    for j in range(1, k):
        out = out + pair(j) * w[:, j]
    return out.reshape(t, d)


def combine_promise(y_sorted, order, weights_tk):
    """`combine_sorted` with in-bounds gathers (no per-element index wrap or clamp)."""
    t, k = weights_tk.shape
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype)).reshape(t, k)
    w = weights_tk.astype(jnp.float32)
    rows = lambda j: y_sorted.at[inverse[:, j]].get(mode="promise_in_bounds").astype(jnp.float32)
    out = rows(0) * w[:, :1]
    for j in range(1, k):
        out = out + rows(j) * w[:, j:j + 1]
    return out


REPLICATE = {
    "element": lambda x, rows: x[rows],
    "word": gather_rows,
    "promise": lambda x, rows: x.at[rows].get(mode="promise_in_bounds"),
}
COMBINE = {"element": combine_sorted, "word": combine_words, "promise": combine_promise}


def quantize_fused(x):
    """`grouped_gemm_fp8`'s activation quantization: e4m3 rows and the row scales as [K/128, M]."""
    xq, xs = quantize_activations(x)
    return xq, xs.T


def quantize_barrier(x):
    """The same, with the scales materialized before their transpose."""
    xq, xs = quantize_activations(x)
    return xq, jax.lax.optimization_barrier(xs).T


QUANTIZE = {"fused": quantize_fused, "barrier": quantize_barrier}


def with_residual(combine):
    return lambda y, order, w, residual: (residual + combine(y, order, w).astype(residual.dtype))


def main(argv=None):
    a, interpret = kernel_bench.parse_args(__doc__.split("\n")[0], "moe-glue",
                                           ("--tokens", "8192,16384", "comma list of token counts"), argv)
    shape = SMOKE if a.smoke else R1
    d, k, e = shape["hidden"], shape["top_k"], shape["experts"]
    hbm, hbm_detail = (0.0, {}) if interpret else hbm_ceiling(small=False)
    print(f"HBM copy {hbm:.0f} GB/s {hbm_detail}")
    rows_out = []
    for t in (int(v) for v in a.tokens.split(",")):
        order, token_of_row, weights = routing(t, e, k, seed=t)
        kx, ky, kr = jax.random.split(jax.random.key(t), 3)
        x = jax.random.normal(kx, (t, d), jnp.float32).astype(jnp.float8_e4m3fn)
        y = jax.random.normal(ky, (t * k, d), jnp.float32).astype(jnp.bfloat16)
        residual = jax.random.normal(kr, (t, d), jnp.float32).astype(jnp.bfloat16)
        # bytes: the gathered rows once, the source (replicate) or the residual and the output (combine)
        nbytes = dict(replicate=t * k * d + t * d, combine=t * k * d * 2 + 2 * t * d * 2, quantize=3 * t * d)
        ops = dict(replicate={v: (jax.jit(f), (x, token_of_row)) for v, f in REPLICATE.items()},
                   combine={v: (jax.jit(with_residual(f)), (y, order, weights, residual)) for v, f in COMBINE.items()},
                   quantize={v: (jax.jit(f), (residual,)) for v, f in QUANTIZE.items()})
        for op, fns in ops.items():
            outs = {v: f(*args) for v, (f, args) in fns.items()}
            first = next(iter(outs))
            want = [np.asarray(o.astype(jnp.float32)) for o in jax.tree.leaves(outs[first])]
            for v, out in outs.items():
                got = [np.asarray(o.astype(jnp.float32)) for o in jax.tree.leaves(out)]
                if not all(np.array_equal(g, w) for g, w in zip(got, want, strict=True)):
                    raise SystemExit(f"{op} T={t}: {v} differs from {first}")
            row = dict(op=op, tokens=t, bytes=nbytes[op], time_s={}, gbps={}, frac_of_hbm={})
            if not interpret:
                for v, (f, args) in fns.items():
                    total, _, _ = kernel_bench.cupti_times(f, *args)
                    row["time_s"][v] = total
                    row["gbps"][v] = nbytes[op] / total / 1e9
                    row["frac_of_hbm"][v] = row["gbps"][v] / hbm
                print(f"{op:9s} T={t:6d} | " + "  ".join(
                    f"{v} {row['time_s'][v] * 1e6:8.1f} us ({row['frac_of_hbm'][v]:.2f} of HBM)" for v in fns))
            rows_out.append(row)
    metrics = {}
    if not interpret:
        for r in rows_out:
            for v in r["time_s"]:
                metrics[f"{r['op']}_{v}_frac_of_hbm_t{r['tokens']}"] = r["frac_of_hbm"][v]
    kernel_bench.write(a, dict(shape=shape, tokens=a.tokens, interpret=interpret), metrics, rows_out, hbm, hbm_detail)


if __name__ == "__main__":
    main()
