"""Split-weight expert computation against the gather reference (random inputs, odd sizes)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwdp_jax.experts import ExpertWeights, LocalExecutor, dense_reference, split_weight_ffn
from dwdp_jax.quant import quantize_blocks_np

E, D, I, K = 12, 32, 16, 3


def _weights(rng, n, fp8=False):
    gu = rng.randn(n, D, 2 * I).astype(np.float32) * 0.2
    dn = rng.randn(n, I, D).astype(np.float32) * 0.2
    if not fp8:
        return ExpertWeights(jnp.asarray(gu), jnp.asarray(dn))
    # FP8 experts are stored [E, out, in] with block scales.
    v1, s1 = quantize_blocks_np(np.swapaxes(gu, 1, 2), (8, 8))
    v2, s2 = quantize_blocks_np(np.swapaxes(dn, 1, 2), (8, 8))
    return ExpertWeights(jnp.asarray(v1), jnp.asarray(v2), jnp.asarray(s1), jnp.asarray(s2), (8, 8))


def _split(full: ExpertWeights, groups):
    """Cuts the expert axis into buffers holding the given expert ids; returns buffers and the slot map."""
    take = lambda a, ids: None if a is None else a[np.asarray(ids)]
    buffers = [ExpertWeights(take(full.w_gate_up, g), take(full.w_down, g), take(full.s_gate_up, g),
                             take(full.s_down, g), full.block) for g in groups]
    buf, slot = np.zeros(E, np.int32), np.zeros(E, np.int32)
    for b, g in enumerate(groups):
        buf[g], slot[g] = b, np.arange(len(g))
    return buffers, jnp.asarray(buf), jnp.asarray(slot)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("tokens", [1, 7, 33])
def test_split_buffers_match_reference(fp8, tokens):
    rng = np.random.RandomState(tokens)
    full = _weights(rng, E, fp8)
    x = jnp.asarray(rng.randn(tokens, D).astype(np.float32))
    ids = jnp.asarray(np.stack([rng.choice(E - 2, K, replace=False) for _ in range(tokens)]).astype(np.int32))
    w = jnp.asarray(rng.rand(tokens, K).astype(np.float32))
    ref = dense_reference(x, ids, w, full)  # experts E-2, E-1 are never routed: empty groups
    perm = rng.permutation(E)
    for groups in ([perm], [perm[:5], perm[5:]], [perm[:1], perm[1:9], perm[9:]]):
        buffers, buf, slot = _split(full, groups)
        out = split_weight_ffn(x, ids, w, buffers, buf, slot)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(LocalExecutor()(x, ids, w, full)), np.asarray(ref), rtol=2e-5, atol=2e-5)


def test_combine_is_deterministic_under_jit():
    rng = np.random.RandomState(0)
    full = _weights(rng, E)
    x = jnp.asarray(rng.randn(64, D).astype(np.float32))
    ids = jnp.asarray(rng.randint(0, E, (64, K)).astype(np.int32))
    w = jnp.asarray(rng.rand(64, K).astype(np.float32))
    f = jax.jit(lambda x: LocalExecutor()(x, ids, w, full))
    np.testing.assert_array_equal(np.asarray(f(x)), np.asarray(f(x)))


@pytest.mark.parametrize("dtype, width", [(jnp.float8_e4m3fn, 200), (jnp.bfloat16, 70), (jnp.bfloat16, 5),
                                          (jnp.float32, 3)])
def test_gather_rows_is_exact(dtype, width):
    """The word-wise row gather returns x[rows] bit for bit: FP8 and bf16 rows as 32-bit words (widths that are
    and are not whole words), f32 directly; repeated, unsorted rows."""
    from dwdp_jax.experts import gather_rows

    rng = np.random.RandomState(1)
    x = jnp.asarray(rng.randn(13, width) * 3).astype(dtype)
    rows = jnp.asarray(rng.randint(0, 13, 40).astype(np.int32))
    got = jax.jit(gather_rows)(x, rows)
    assert got.dtype == x.dtype and got.shape == (40, width)
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(x[rows].astype(jnp.float32)))


@pytest.mark.skipif(__import__("pallas_kernels._compat", fromlist=["on_gpu"]).on_gpu(),
                    reason="checks the benchmark's loops in interpret mode on CPU; the GPU runs the benchmark itself")
def test_bench_moe_ffn_smoke(tmp_path):
    """experiments/bench_moe_ffn.py on CPU (interpret mode, tiny shapes): the variants agree."""
    import json

    from experiments import bench_moe_ffn

    bench_moe_ffn.main(["--smoke", f"--out_dir={tmp_path}", "--tokens=6"])
    (path,) = tmp_path.iterdir()
    rows = json.loads(path.read_text())["rows"]
    assert [(r["tokens"], r["rows"]) for r in rows] == [(6, 12)]
    assert all(max(r["rel_err_vs_separate"].values()) <= 3e-2 for r in rows)


@pytest.mark.skipif(__import__("pallas_kernels._compat", fromlist=["on_gpu"]).on_gpu(),
                    reason="checks the benchmark's variants on CPU; the GPU runs the benchmark itself")
def test_bench_moe_glue_smoke(tmp_path):
    """experiments/bench_moe_glue.py on CPU (tiny shapes): every gather variant equals the element gathers, and
    the quantization with a barrier equals the fused one."""
    import json

    from experiments import bench_moe_glue

    bench_moe_glue.main(["--smoke", f"--out_dir={tmp_path}", "--tokens=5,37"])
    (path,) = tmp_path.iterdir()
    rows = json.loads(path.read_text())["rows"]
    assert [(r["op"], r["tokens"]) for r in rows] == [(op, t) for t in (5, 37)
                                                       for op in ("replicate", "combine", "quantize")]


@pytest.mark.parametrize("tokens", [5, 150])
def test_pallas_path_in_interpret_mode(tokens):
    """The engine's FP8 expert path with its kernels in interpret mode (CPU): activations quantized once per token,
    the gate/up kernel with SwiGLU in its epilogue, the down kernel on the SwiGLU rows quantized by XLA (decode,
    5 tokens, and prefill, 150 tokens x top-4 = 600 rows over 8 experts), over two weight buffers (a DWDP split), against a gather reference that rounds the activations as the kernels do (each token's input
    and each row's bf16 SwiGLU output to e4m3 per 128 columns; 1e-2), and the unquantized one (~4.5% here)."""
    e, d, inter, k = 8, 256, 128, 4
    rng = np.random.RandomState(tokens)
    gu = rng.randn(e, d, 2 * inter).astype(np.float32) / np.sqrt(d)
    dn = rng.randn(e, inter, d).astype(np.float32) / np.sqrt(inter)
    v1, s1 = quantize_blocks_np(np.swapaxes(gu, 1, 2), (128, 128))
    v2, s2 = quantize_blocks_np(np.swapaxes(dn, 1, 2), (128, 128))
    full = ExpertWeights(jnp.asarray(v1), jnp.asarray(v2), jnp.asarray(s1), jnp.asarray(s2), (128, 128))
    x = jnp.asarray(rng.randn(tokens, d).astype(np.float32)).astype(jnp.bfloat16)
    ids = jnp.asarray(np.stack([rng.choice(e - 1, k, replace=False) for _ in range(tokens)]).astype(np.int32))
    w = jnp.asarray(rng.rand(tokens, k).astype(np.float32))
    ref = np.asarray(dense_reference(x, ids, w, full), np.float32)  # expert e-1 never routed: an empty group
    perm = rng.permutation(e)
    take = lambda a, g: a[np.asarray(g)]  # noqa: E731
    groups = [perm[:3], perm[3:]]
    buffers = [ExpertWeights(take(full.w_gate_up, g), take(full.w_down, g), take(full.s_gate_up, g),
                             take(full.s_down, g), full.block) for g in groups]
    buf, slot = np.zeros(e, np.int32), np.zeros(e, np.int32)
    for b, g in enumerate(groups):
        buf[g], slot[g] = b, np.arange(len(g))
    # under jit, as the engine calls it (one compile, not one per op of the eager call)
    ffn = jax.jit(functools.partial(split_weight_ffn, backend="pallas_interpret"))
    out = np.asarray(ffn(x, ids, w, buffers, jnp.asarray(buf), jnp.asarray(slot)), np.float32)
    assert out.shape == ref.shape and np.isfinite(out).all()
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) <= 6e-2
    # the same gather with the kernels' activation rounding
    from pallas_kernels import grouped_gemm as gg

    wd = full.dequantized(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    xq = gg.dequantized_activations(x.astype(jnp.float32))
    gate, up = jnp.split(jnp.einsum("td,tkdn->tkn", xq, wd.w_gate_up[ids], precision=hi), 2, axis=-1)
    a = (jax.nn.silu(gate) * up).astype(jnp.bfloat16).astype(jnp.float32).reshape(-1, inter)
    aq = gg.dequantized_activations(a).reshape(tokens, k, inter)
    ref_q = np.asarray(jnp.einsum("tkn,tknd,tk->td", aq, wd.w_down[ids], w, precision=hi), np.float32)
    assert np.linalg.norm(out - ref_q) / np.linalg.norm(ref_q) <= 1e-2
    with pytest.raises(ValueError, match="pallas_interpret"):
        split_weight_ffn(x, ids, w, buffers, jnp.asarray(buf), jnp.asarray(slot), backend="triton")
