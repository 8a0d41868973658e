"""FP8 linear layers: the checkpoint's [out, in] layout, the dequantizing reference path and the block-scaled FP8
GEMM path (Mosaic GPU interpret mode on CPU, natively on a GPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dwdp_jax.config import TINY
from dwdp_jax.model import Linear, init_model, set_fp8_matmul
from pallas_kernels import _compat
from pallas_kernels import grouped_gemm as gg

PALLAS = "pallas" if _compat.on_gpu() else "pallas_interpret"


def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_fp8_gemm_path_matches_the_quantized_reference():
    lin = Linear(256, 384, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, block=(128, 128))
    assert lin.kernel.shape == (384, 256) and lin.scale.shape == (3, 2)  # [out, in], as in the checkpoint
    lin.scale[...] = jax.random.uniform(jax.random.key(1), (3, 2), jnp.float32, 0.01, 0.03)  # unequal blocks
    x = jax.random.normal(jax.random.key(2), (3, 5, 256), jnp.float32).astype(jnp.bfloat16)
    ref = lin(x)  # "dequantize": bf16 weights, unquantized activations
    set_fp8_matmul(lin, PALLAS)
    got = lin(x)
    assert got.shape == (3, 5, 384) and got.dtype == jnp.bfloat16
    # Against the same math in f32 (activations quantized per token per 128 columns, as the kernel does):
    want = gg.reference_fp8(x.reshape(15, 256), jnp.array([15], jnp.int32), (lin.kernel[...][None],),
                            (lin.scale[...][None],), jnp.zeros((1, 2), jnp.int32), out_dtype=jnp.float32)
    assert rel_err(got.reshape(15, 384), want) <= 1e-2
    assert rel_err(got, ref) <= 6e-2  # the activation quantization itself: e4m3 has 3 mantissa bits


def test_decode_rows_take_the_split_k_path(monkeypatch):
    """A few rows of a layer with one output tile: K is cut into slices (four here, for the 8 SMs interpret mode
    plans for; R1's q_a gets 28 on an H100), same result as the quantized reference."""
    lin = Linear(1024, 256, rngs=nnx.Rngs(4), dtype=jnp.bfloat16, block=(128, 128))
    lin.scale[...] = jax.random.uniform(jax.random.key(5), (2, 8), jnp.float32, 0.01, 0.03)
    x = jax.random.normal(jax.random.key(6), (5, 1024), jnp.float32).astype(jnp.bfloat16)
    set_fp8_matmul(lin, PALLAS)
    sms = _compat.num_sms() if PALLAS == "pallas" else 8
    splits = gg.choose_k_splits(256, 1024, sms, 256)
    assert splits == 4  # slices of two 128-wide blocks
    want = gg.reference_fp8(x, jnp.array([5], jnp.int32), (lin.kernel[...][None],), (lin.scale[...][None],),
                            jnp.zeros((1, 2), jnp.int32), out_dtype=jnp.float32)
    calls = []
    split_k = gg.fp8_matmul_split_k
    monkeypatch.setattr(gg, "fp8_matmul_split_k", lambda *a, **k: calls.append(a[3]) or split_k(*a, **k))
    assert rel_err(lin(x), want) <= 1e-2  # bf16 output rounding
    assert calls == [splits]


def test_layers_the_kernel_cannot_take_dequantize():
    lin = Linear(128, 576, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, block=(128, 128))  # R1's kv_a_proj_with_mqa
    x = jax.random.normal(jax.random.key(3), (4, 128), jnp.bfloat16)
    ref = lin(x)
    set_fp8_matmul(lin, PALLAS)
    assert not lin.fp8_kernel_applies()
    np.testing.assert_array_equal(np.asarray(lin(x), np.float32), np.asarray(ref, np.float32))


def test_set_fp8_matmul_reaches_every_fp8_linear_only():
    model = init_model(TINY.replace(weight_block_size=(16, 16), n_routed_experts=8, n_group=4,
                                    num_experts_per_tok=2, moe_intermediate_size=32), dtype=jnp.float32)
    set_fp8_matmul(model, "pallas")
    linears = [m for _, m in nnx.iter_graph(model) if isinstance(m, Linear)]
    assert all(m.fp8_matmul == ("pallas" if m.scale is not None else "dequantize") for m in linears)
    assert any(m.scale is not None for m in linears) and model.lm_head.scale is None
    with pytest.raises(ValueError, match="fp8_matmul"):
        set_fp8_matmul(model, "cublas")


@pytest.mark.skipif(_compat.on_gpu(), reason="checks the benchmark's loops in interpret mode on CPU; the GPU runs "
                    "the benchmark itself (interpret mode there took minutes)")
def test_bench_fp8_linear_smoke(tmp_path):
    """experiments/bench_fp8_linear.py on CPU (interpret mode, tiny shapes): every variant checked against its
    reference, one row per (linear, rows), the split count the engine would use. One row count and one linear
    (interpret is slow: ~4 s a kernel call): tiny_a, the split-K one (4 slices); the one-slice kernel path is
    test_fp8_gemm_path_matches_the_quantized_reference's, the --linears selection test_bench_fp8_linear_flags'."""
    import json

    from experiments import bench_fp8_linear

    bench_fp8_linear.main(["--smoke", f"--out_dir={tmp_path}", "--rows=3", "--linears=tiny_a"])
    (path,) = tmp_path.iterdir()
    result = json.loads(path.read_text())
    assert result["config"]["linears"] == ["tiny_a"]
    rows = result["rows"]
    assert [(r["linear"], r["rows"], r["splits"]) for r in rows] == [("tiny_a", 3, 4)]
    assert all(max(r["rel_err"].values()) <= 1e-2 for r in rows)


def test_bench_fp8_linear_flags():
    from experiments import bench_fp8_linear

    with pytest.raises(SystemExit, match="--linears: a comma list of tiny_a, tiny_b"):
        bench_fp8_linear.main(["--smoke", "--linears=tiny_a,q_a"])


@pytest.mark.skipif(_compat.on_gpu(), reason="checks the benchmark's loop in interpret mode on CPU")
def test_bench_fp8_prefill_smoke(tmp_path):
    """experiments/bench_fp8_prefill.py on CPU: our kernel's output checked against the f32 reference (the cuBLAS
    comparison needs a GPU)."""
    import json

    from experiments import bench_fp8_prefill

    bench_fp8_prefill.main(["--smoke", f"--out_dir={tmp_path}", "--rows=8"])
    (path,) = tmp_path.iterdir()
    rows = json.loads(path.read_text())["rows"]
    assert [(r["linear"], r["rows"]) for r in rows] == [("tiny_b", 8)]
    assert all(0 < r["rel_err"]["ours"] <= 1e-2 for r in rows)
