"""What one device can do, measured in the benchmark's own run: the HBM copy rate and the dense matmul peaks,
the ceilings that `bench_engine`, `bench_kernels`, `bench_mla` and `bench_fp8_linear` divide by."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from experiments.timing import median_wall_s


def _torch_cuda():
    """torch when it is installed with a CUDA device, else None (the comparisons it gives are optional)."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _median_s(fn, repeats: int, inner: int, sync) -> float:
    """Median seconds per call of `fn`, timed `inner` calls at a time and synchronized by `sync(last result)`."""

    def run():
        out = None
        for _ in range(inner):
            out = fn()
        sync(out)

    return median_wall_s(run, repeats) / inner


def _xla_elementwise_gbps(nbytes: int, repeats: int) -> float:
    x = jnp.ones((nbytes // 4,), jnp.float32)  # freed on return
    double = jax.jit(lambda v: v * 2)
    return 2 * x.nbytes / _median_s(lambda: double(x), repeats, inner=3, sync=jax.block_until_ready) / 1e9


def hbm_copy_gbps(nbytes: int = 2 << 30, repeats: int = 5) -> tuple[float, dict]:
    """(the ceiling, {method: GB/s}) of device copies of `nbytes`, counted as bytes read + written (1e9 B/s): an
    XLA elementwise pass over float32 (`x * 2`: one read, one write per byte) and, with CUDA torch, `copy_`
    (the cudaMemcpy class). The ceiling is the best: XLA's elementwise passes fall short of a copy."""
    out = {"xla_elementwise": _xla_elementwise_gbps(nbytes, repeats)}
    torch = _torch_cuda()
    if torch is not None:
        src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda")
        dst = torch.empty_like(src)
        t = _median_s(lambda: dst.copy_(src), repeats, inner=3, sync=lambda _: torch.cuda.synchronize())
        out["torch_copy"] = 2 * nbytes / t / 1e9
        del src, dst
        torch.cuda.empty_cache()
    return max(out.values()), out


def matmul_peaks(n: int, repeats: int = 5) -> dict:
    """TFLOP/s of an [n, n] x [n, n] matmul (2 n^3 FLOPs) with float32 accumulation: XLA `dot_general` in bf16
    and in FP8 e4m3 (both operands K-major, the layout Hopper's FP8 MMA reads), plus cuBLAS through torch
    (bf16 `mm`, FP8 `_scaled_mm`) where CUDA torch is installed. `xla_fp8_gemm_in_hlo`: XLA compiled the FP8
    dot to a cuBLASLt FP8 GEMM (`xla_fp8_custom_calls` lists the compiled program's custom calls); the FP8 /
    bf16 time ratio is the other check (an upcast FP8 dot is no faster than bf16)."""
    flops = 2 * n**3
    dims = (((1,), (1,)), ((), ()))
    dot = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32))
    ka, kb = jax.random.split(jax.random.key(0))
    out = {}
    for name, dtype in (("bf16", jnp.bfloat16), ("fp8", jnp.float8_e4m3fn)):
        a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
        b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
        t = _median_s(lambda: dot(a, b), repeats, inner=5, sync=jax.block_until_ready)
        out[f"xla_{name}_tflops"] = flops / t / 1e12
        if name == "fp8":
            hlo = dot.lower(a, b).compile().as_text()
            out["xla_fp8_gemm_in_hlo"] = "cublas$lt$matmul$f8" in hlo
            out["xla_fp8_custom_calls"] = sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))
        del a, b
    out["xla_fp8_over_bf16"] = out["xla_fp8_tflops"] / out["xla_bf16_tflops"]
    torch = _torch_cuda()
    if torch is not None:
        sync = lambda _: torch.cuda.synchronize()
        a = torch.randn(n, n, device="cuda").to(torch.bfloat16)
        b = torch.randn(n, n, device="cuda").to(torch.bfloat16)
        out["torch_bf16_tflops"] = flops / _median_s(lambda: torch.mm(a, b), repeats, 5, sync) / 1e12
        try:
            a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
            one = torch.ones((), device="cuda")
            mm8 = lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
            out["torch_fp8_tflops"] = flops / _median_s(mm8, repeats, 5, sync) / 1e12
        except (RuntimeError, AttributeError) as e:  # no FP8 cuBLAS on this GPU or torch build
            print(f"torch FP8 matmul not measured: {e}", flush=True)
        del a, b
        torch.cuda.empty_cache()
    return out
