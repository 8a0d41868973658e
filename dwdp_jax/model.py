"""DeepSeek-V3/R1 in Flax NNX: MLA attention, DeepSeekMoE, dense first layers, YaRN RoPE, FP8 weights, MTP.

Weights are stored as [in, out] (y = x @ w). A linear layer's FP8 weight carries a block `scale`; everything
else (embeddings, norms, router, LM head) stays unquantized, as in the published checkpoints.

The routed experts are reached only through an `ExpertExecutor` (see `experts.py`), passed down with each
call: the single-device path, DWDP and DEP plug different executors into this same model.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dwdp_jax import quant, rope
from dwdp_jax.config import ModelConfig
from dwdp_jax.experts import ExpertExecutor, ExpertWeights, LocalExecutor, fp8_expert_dims
from dwdp_jax.routing import expert_histogram, route

INIT_STD = 0.02
# Most bytes of float32 attention scores [b, heads, queries, keys] one attention call materializes: longer
# query blocks are split into query chunks run one after another (exact: softmax is per query row). Without
# it a 4K-token prefill chunk against 20K-token cache rows needs ~40 GB of scores (seen on an H200).
ATTENTION_SCORE_BYTES = 2 << 30


def _normal(rngs: nnx.Rngs, shape, dtype, std=INIT_STD):
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype)


def _quantized_normal(rngs: nnx.Rngs, shape, block, std=INIT_STD):
    """Random FP8 weight with uniform block scales: values ~ N(0, 1) in e4m3, scale = std."""
    value = jax.random.normal(rngs.params(), shape, jnp.bfloat16).astype(quant.FP8)
    nk, nn = -(-shape[-2] // block[0]), -(-shape[-1] // block[1])
    return value, jnp.full(shape[:-2] + (nk, nn), std, jnp.float32)


def _pad_last2(a, rows: int, cols: int):
    """a [..., r, c] zero-padded to [..., rows, cols]."""
    return jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, rows - a.shape[-2]), (0, cols - a.shape[-1])])


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...].astype(jnp.float32) * xf.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)


FP8_MATMULS = ("dequantize", "pallas", "pallas_interpret")


# FP8 linears of at most DECODE_ROWS rows (the grouped GEMM's decode regime) cut K into slices when their output
# tiles would not fill the GPU's SMs (`pallas_kernels.grouped_gemm.fp8_matmul_split_k`); in interpret mode
# (CPU) the choice is made for INTERPRET_SMS, so that CPU tests take the split path too.
DECODE_ROWS = 64
INTERPRET_SMS = 8


class Linear(nnx.Module):
    """y = x @ W with W [in, out].

    Unquantized: `kernel` [in, out]. FP8 (`block` set): `kernel` [out, in] float8_e4m3fn with block `scale`
    [ceil(out/bo), ceil(in/bi)]: the checkpoint's layout, which Hopper's FP8 tensor cores read K-major.
    `fp8_matmul` (static) says how an FP8 layer multiplies: "dequantize" (the weight dequantized to the
    activation dtype, then a dense dot: the reference and the CPU path) or "pallas" (the block-scaled FP8
    grouped GEMM of one group, `pallas_kernels.grouped_gemm_fp8`, split along K for a few rows: activations
    quantized per token per 128 columns, as DeepSeek's inference does; layers whose dims are not multiples of
    128, e.g. R1's 576-wide kv_a_proj_with_mqa, dequantize); "pallas_interpret" runs the kernel in interpret mode (CPU tests). Set it
    model-wide with `set_fp8_matmul`.
    """

    def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs, dtype, block: tuple[int, int] | None = None):
        self.block = block
        self.fp8_matmul = "dequantize"
        if block is None:
            self.kernel = nnx.Param(_normal(rngs, (d_in, d_out), dtype))
            self.scale = None
        else:
            value, scale = _quantized_normal(rngs, (d_out, d_in), block)
            self.kernel = nnx.Param(value)
            self.scale = nnx.Param(scale)

    def weight(self, dtype):
        """The [in, out] weight in `dtype` (dequantized if FP8)."""
        if self.scale is None:
            return self.kernel[...].astype(dtype)
        return quant.dequantize(self.kernel[...], self.scale[...], self.block, dtype).T

    def fp8_kernel_applies(self) -> bool:
        """Whether the FP8 grouped GEMM can take this layer: 128x128 blocks, both dims multiples of 128."""
        return self.scale is not None and self.block == (128, 128) and not any(
            d % 128 for d in self.kernel.shape)

    def __call__(self, x):
        with jax.named_scope("linear"):  # named scopes: the profile's categories (experiments/engine_profile.py)
            if self.fp8_matmul != "dequantize" and self.fp8_kernel_applies():
                return self._fp8_kernel(x, interpret=self.fp8_matmul == "pallas_interpret")
            return jnp.dot(x, self.weight(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)

    def _fp8_kernel(self, x, interpret: bool):
        from pallas_kernels import _compat
        from pallas_kernels import grouped_gemm as gg

        d_out, d_in = self.kernel.shape
        x2 = x.reshape(-1, d_in).astype(jnp.bfloat16)
        m = x2.shape[0]
        cfg = gg.default_config(m, 1, d_out, fp8=True)
        splits = 1
        if m <= DECODE_ROWS:  # a few rows: N / block_n output tiles would leave most SMs idle
            splits = gg.choose_k_splits(d_out, d_in, INTERPRET_SMS if interpret else _compat.num_sms(),
                                        cfg.block_n)
        # activations quantized by XLA, not inside the kernel (`quantize_in_kernel`): on the H100 the in-kernel
        # quantization made every decode linear slower, 0.51 against 0.70 of HBM at one row
        # (kernels-20261206-nvidia-h100-x1-fp8-linear-decode-s10.json; WORKSPACE Finding 24)
        if splits > 1:
            y = gg.fp8_matmul_split_k(x2, self.kernel[...], self.scale[...], splits, config=cfg,
                                      out_dtype=jnp.bfloat16, interpret=interpret)
        else:
            # numpy group sizes: the tile schedule is a constant of the program
            y = gg.grouped_gemm_fp8(x2, np.full((1,), m, np.int32), (self.kernel[...][None],),
                                    (self.scale[...][None],), np.zeros((1, 2), np.int32), config=cfg,
                                    out_dtype=jnp.bfloat16, interpret=interpret)
        return y.reshape(*x.shape[:-1], d_out).astype(x.dtype)


def set_fp8_matmul(model: nnx.Module, mode: str) -> nnx.Module:
    """Sets `Linear.fp8_matmul` on every FP8 linear layer of `model` (in place; returns it). The routed experts
    are not linears: their executor picks their kernels."""
    if mode not in FP8_MATMULS:
        raise ValueError(f"fp8_matmul must be one of {FP8_MATMULS}, got {mode!r}")
    for _, module in nnx.iter_graph(model):
        if isinstance(module, Linear) and module.scale is not None:
            module.fp8_matmul = mode
    return model


class MLP(nnx.Module):
    """SwiGLU feed-forward: dense layers and shared experts."""

    def __init__(self, d_model: int, d_inter: int, *, rngs, dtype, block):
        self.gate_proj = Linear(d_model, d_inter, rngs=rngs, dtype=dtype, block=block)
        self.up_proj = Linear(d_model, d_inter, rngs=rngs, dtype=dtype, block=block)
        self.down_proj = Linear(d_inter, d_model, rngs=rngs, dtype=dtype, block=block)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class RoutedExperts(nnx.Module):
    """Routed expert weights held by this device (see `ExpertWeights` for the layouts).

    Unquantized: [E, hidden, 2*inter] and [E, inter, hidden]. FP8: the checkpoint's [out, in] layout,
    [E, 2*inter_pad, hidden_pad] and [E, hidden_pad, inter_pad], with block scales, where (hidden_pad, inter_pad)
    = `fp8_expert_dims(hidden, inter, block)`: the true sizes zero-padded to whole blocks (`hidden_pad`,
    `inter_pad` here; equal to the true sizes when they are block multiples, as in R1).
    """

    def __init__(self, n_experts: int, d_model: int, d_inter: int, *, rngs, dtype, block):
        self.block = block
        if block is None:
            self.hidden_pad, self.inter_pad = d_model, d_inter
            shapes = dict(w_gate_up=(n_experts, d_model, 2 * d_inter), w_down=(n_experts, d_inter, d_model))
            for name, shape in shapes.items():
                setattr(self, name, nnx.Param(_normal(rngs, shape, dtype)))
                setattr(self, "s_" + name[2:], None)
            return
        self.hidden_pad, self.inter_pad = fp8_expert_dims(d_model, d_inter, block)
        # Random values on the true sizes, zero-padded like a loaded checkpoint (gate and up padded separately).
        bo, bi = block
        for name, (out, inp, out_pad, in_pad, parts) in dict(
            w_gate_up=(d_inter, d_model, self.inter_pad, self.hidden_pad, 2),
            w_down=(d_model, d_inter, self.hidden_pad, self.inter_pad, 1),
        ).items():
            value, scale = _quantized_normal(rngs, (n_experts, parts, out, inp), block)
            value = _pad_last2(value, out_pad, in_pad).reshape(n_experts, parts * out_pad, in_pad)
            scale = _pad_last2(scale, out_pad // bo, in_pad // bi).reshape(n_experts, parts * out_pad // bo, -1)
            setattr(self, name, nnx.Param(value))
            setattr(self, "s_" + name[2:], nnx.Param(scale))

    def weights(self) -> ExpertWeights:
        get = lambda p: None if p is None else p[...]
        return ExpertWeights(
            self.w_gate_up[...], self.w_down[...], get(self.s_gate_up), get(self.s_down), self.block
        )


class MoE(nnx.Module):
    """DeepSeekMoE: shared experts plus routed experts chosen by the bias-corrected group-limited router."""

    def __init__(self, cfg: ModelConfig, *, rngs, dtype, block, n_local_experts: int | None = None):
        self.cfg = cfg
        e, d = cfg.n_routed_experts, cfg.hidden_size
        self.router = nnx.Param(_normal(rngs, (d, e), jnp.float32))  # HF `gate.weight` transposed
        self.bias = nnx.Param(jnp.zeros((e,), jnp.float32))  # `e_score_correction_bias`
        self.experts = RoutedExperts(
            e if n_local_experts is None else n_local_experts, d, cfg.moe_intermediate_size,
            rngs=rngs, dtype=dtype, block=block,
        )
        self.shared = (
            MLP(d, cfg.moe_intermediate_size * cfg.n_shared_experts, rngs=rngs, dtype=dtype, block=block)
            if cfg.n_shared_experts
            else None
        )

    def route(self, x_td):
        with jax.named_scope("router"):
            return route(x_td, self.router[...], self.bias[...], self.cfg)

    def apply(self, x_bsd, expert_ids_tk, weights_tk, executor: ExpertExecutor):
        """Routed experts (as already routed: [b*s, k] ids and weights) plus shared experts: [b, s, d]."""
        b, s, d = x_bsd.shape
        x_td = x_bsd.reshape(b * s, d)
        with jax.named_scope("routed_experts"):
            y = executor(x_td, expert_ids_tk, weights_tk, self.experts.weights())
        if self.shared is not None:
            y = y + self.shared(x_td)
        return y.reshape(b, s, d)

    def __call__(self, x_bsd, executor: ExpertExecutor, stats: dict | None = None):
        expert_ids, weights = self.route(x_bsd.reshape(-1, x_bsd.shape[-1]))
        if stats is not None:
            stats["expert_counts"] = expert_histogram(expert_ids, self.cfg.n_routed_experts)
        return self.apply(x_bsd, expert_ids, weights, executor)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerKV:
    """One layer's MLA cache: the compressed latent and the rope key of every cached token.

    latent: [batch, max_len, kv_lora_rank] (after kv_a_layernorm); k_pe: [batch, max_len, qk_rope_head_dim]
    (rotated, interleaved layout). Cache index = token position.
    """

    latent: jax.Array
    k_pe: jax.Array


def query_chunk(batch: int, heads: int, queries: int, keys: int, score_bytes: int = 0) -> int:
    """Queries per chunk so that one chunk's float32 scores [batch, heads, chunk, keys] fit in `score_bytes`
    (default `ATTENTION_SCORE_BYTES`): all queries if they fit, else the largest power of two that fits
    (at least 1)."""
    per_query = batch * heads * keys * 4
    budget = score_bytes or ATTENTION_SCORE_BYTES
    if queries * per_query <= budget:
        return queries
    chunk = 1
    while chunk * 2 * per_query <= budget:
        chunk *= 2
    return chunk


def over_query_chunks(rows, q_parts, mask, heads: int):
    """rows(*q_parts, mask) -> [b, q, h, v] computed over query chunks (`query_chunk`) in a `lax.map`.

    q_parts: arrays [b, q, ...]; mask [b, q, k]. The queries are padded to a multiple of the chunk (padded
    rows attend to nothing and are dropped)."""
    b, s_q, s_k = mask.shape
    chunk = query_chunk(b, heads, s_q, s_k)
    if chunk >= s_q:
        return rows(*q_parts, mask)
    n = -(-s_q // chunk)
    pad = n * chunk - s_q

    def split(a):  # [b, q, ...] -> [n, b, chunk, ...]
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape(b, n, chunk, *a.shape[2:]), 1, 0)

    def one(args):
        *parts, m = args
        # A fully masked padded row would give NaN (softmax of -inf only): let it see key 0; it is dropped.
        m = m.at[:, :, 0].set(m[:, :, 0] | ~m.any(-1))
        return rows(*parts, m)

    out = jax.lax.map(one, tuple(split(a) for a in q_parts) + (split(mask),))  # [n, b, chunk, h, v]
    return jnp.moveaxis(out, 0, 1).reshape(b, n * chunk, *out.shape[3:])[:, :s_q]


class MLA(nnx.Module):
    """Multi-head latent attention (DeepSeek-V2/V3)."""

    def __init__(self, cfg: ModelConfig, *, rngs, dtype, block):
        self.cfg = cfg
        d, h = cfg.hidden_size, cfg.num_heads
        lin = lambda i, o: Linear(i, o, rngs=rngs, dtype=dtype, block=block)
        if cfg.q_lora_rank is None:
            self.q_proj = lin(d, h * cfg.qk_head_dim)
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = lin(d, cfg.q_lora_rank)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = lin(cfg.q_lora_rank, h * cfg.qk_head_dim)
        self.kv_a_proj_with_mqa = lin(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = lin(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        self.o_proj = lin(h * cfg.v_head_dim, d)
        self.kv_b_absorbed = nnx.data(None)  # `with_absorbed_kv_b`: the FP8 kv_b dequantized once, for decode

    def _queries(self, x, cos, sin):
        """(q [b, s, heads, nope + rope] as projected, its rope columns not rotated; q_nope, its first columns;
        the rotated q_pe [b, s, heads, rope])."""
        cfg = self.cfg
        q = self.q_proj(x) if self.q_proj is not None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(*x.shape[:2], cfg.num_heads, cfg.qk_head_dim)
        q_nope, q_pe = q[..., : cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim :]
        return q, q_nope, rope.apply_rope(q_pe, cos, sin)

    def _latent(self, x, cos, sin):
        cfg = self.cfg
        kv = self.kv_a_proj_with_mqa(x)
        latent = self.kv_a_layernorm(kv[..., : cfg.kv_lora_rank])
        k_pe = rope.apply_rope(kv[..., None, cfg.kv_lora_rank :], cos, sin)[..., 0, :]
        return latent, k_pe

    def _kv_b(self, dtype):
        """kv_b weight as [kv_lora, heads, nope + v]: the copy `with_absorbed_kv_b` made when it is in `dtype`,
        else the weight dequantized here (for FP8: on every call)."""
        if self.kv_b_absorbed is not None and self.kv_b_absorbed[...].dtype == jnp.dtype(dtype):
            return self.kv_b_absorbed[...]
        cfg = self.cfg
        return self.kv_b_proj.weight(dtype).reshape(cfg.kv_lora_rank, cfg.num_heads, -1)

    def _attend_expanded(self, q_nope, q_pe, latent, k_pe, mask):
        """Expanded form: keys/values up-projected from the latent. mask [b, s_q, s_k] (True = attend).
        Matmuls in the activation dtype with float32 accumulation; softmax in float32."""
        cfg = self.cfg
        dt = q_nope.dtype
        with jax.named_scope("kv_b"):
            kv = jnp.einsum("bkc,chn->bkhn", latent, self._kv_b(dt), preferred_element_type=jnp.float32).astype(dt)
        k_nope, v = kv[..., : cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim :]

        def rows(q_nope, q_pe, mask):
            scores = jnp.einsum("bqhn,bkhn->bhqk", q_nope, k_nope, preferred_element_type=jnp.float32)
            scores += jnp.einsum("bqhr,bkr->bhqk", q_pe, k_pe.astype(dt), preferred_element_type=jnp.float32)
            probs = self._softmax(scores, mask).astype(dt)
            return jnp.einsum("bhqk,bkhv->bqhv", probs, v, preferred_element_type=jnp.float32)

        return over_query_chunks(rows, (q_nope, q_pe), mask, cfg.num_heads)

    def _attend_absorbed(self, q_nope, q_pe, latent, k_pe, mask):
        """Weight-absorbed form (decode): queries projected into the latent space, attention over the latent."""
        cfg = self.cfg
        dt = q_nope.dtype
        with jax.named_scope("kv_b"):
            w = self._kv_b(dt)
            w_k, w_v = w[..., : cfg.qk_nope_head_dim], w[..., cfg.qk_nope_head_dim :]
            q_lat = jnp.einsum("bqhn,chn->bqhc", q_nope, w_k, preferred_element_type=jnp.float32).astype(dt)
        lat = latent.astype(dt)

        def rows(q_lat, q_pe, mask):
            scores = jnp.einsum("bqhc,bkc->bhqk", q_lat, lat, preferred_element_type=jnp.float32)
            scores += jnp.einsum("bqhr,bkr->bhqk", q_pe, k_pe.astype(dt), preferred_element_type=jnp.float32)
            probs = self._softmax(scores, mask).astype(dt)
            # "bhqk,bkc->bhqc" rather than "->bqhc": XLA's CPU backend has no bf16 x bf16 -> f32 dot for the latter.
            out_lat = jnp.einsum("bhqk,bkc->bhqc", probs, lat, preferred_element_type=jnp.float32).astype(dt)
            with jax.named_scope("kv_b"):
                return jnp.einsum("bhqc,chv->bqhv", out_lat, w_v, preferred_element_type=jnp.float32)

        return over_query_chunks(rows, (q_lat, q_pe), mask, cfg.num_heads)

    def _softmax(self, scores, mask):
        scores = jnp.where(mask[:, None], scores * self.cfg.softmax_scale, -jnp.inf)
        return jax.nn.softmax(scores, axis=-1)

    def __call__(self, x_bsd, positions_bs, kv=None, absorbed: bool = False):
        """Attention over x's own tokens (kv None, causal by position), or over a cache that x's tokens are
        first written into at their positions (then every cached position <= the query's is attended): whole
        rows (`LayerKV`) or pages (`dwdp_jax.paged_attention.PagedKV`, which also picks the kernels).

        Returns (output [b, s, hidden], the updated cache or None).
        """
        cos, sin = rope.cos_sin(self.cfg, positions_bs)
        q, q_nope, q_pe = self._queries(x_bsd, cos, sin)
        latent, k_pe = self._latent(x_bsd, cos, sin)
        if kv is not None and not isinstance(kv, LayerKV):  # a paged cache (`dwdp_jax.paged_attention`)
            kv = kv.write(latent, k_pe, positions_bs)
            with jax.named_scope("attend"):
                out = kv.attend(self, q_nope, q_pe, positions_bs, absorbed, q_projected=q).astype(x_bsd.dtype)
            return self.o_proj(out.reshape(*x_bsd.shape[:2], -1)), kv
        if kv is None:
            mask = positions_bs[:, None, :] <= positions_bs[:, :, None]
        else:
            rows = jnp.arange(x_bsd.shape[0])[:, None]
            with jax.named_scope("kv_cache"):
                kv = LayerKV(
                    kv.latent.at[rows, positions_bs].set(latent.astype(kv.latent.dtype)),
                    kv.k_pe.at[rows, positions_bs].set(k_pe.astype(kv.k_pe.dtype)),
                )
            latent, k_pe = kv.latent, kv.k_pe
            mask = jnp.arange(latent.shape[1])[None, None, :] <= positions_bs[:, :, None]
        attend = self._attend_absorbed if absorbed else self._attend_expanded
        with jax.named_scope("attend"):
            out = attend(q_nope, q_pe, latent, k_pe, mask).astype(x_bsd.dtype)
        return self.o_proj(out.reshape(*x_bsd.shape[:2], -1)), kv


class Block(nnx.Module):
    """One decoder layer: pre-norm MLA and pre-norm dense MLP or MoE, both residual."""

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs, dtype, n_local_experts=None):
        block = cfg.weight_block_size
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, rngs=rngs, dtype=dtype, block=block)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(layer):
            self.mlp = MoE(cfg, rngs=rngs, dtype=dtype, block=block, n_local_experts=n_local_experts)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, rngs=rngs, dtype=dtype, block=block)
        self.is_moe = cfg.is_moe_layer(layer)

    def attention(self, x, positions, kv=None, absorbed=False):
        """Residual attention half. Returns (x after attention, updated cache)."""
        h, kv = self.self_attn(self.input_layernorm(x), positions, kv, absorbed)
        return x + h, kv

    def ffn(self, x, executor: ExpertExecutor, stats: dict | None = None):
        """Residual MLP/MoE half."""
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, executor, stats) if self.is_moe else self.mlp(h))

    def route(self, x):
        """MoE layers: the router's choice for the FFN half's input x [b, s, d]: ([b*s, k] ids, weights)."""
        h = self.post_attention_layernorm(x)
        return self.mlp.route(h.reshape(-1, h.shape[-1]))

    def ffn_routed(self, x, expert_ids_tk, weights_tk, executor: ExpertExecutor):
        """MoE layers: the residual FFN half with the routing already decided (`route`)."""
        return x + self.mlp.apply(self.post_attention_layernorm(x), expert_ids_tk, weights_tk, executor)

    def __call__(self, x, positions, executor, kv=None, absorbed=False, stats=None):
        x, kv = self.attention(x, positions, kv, absorbed)
        return self.ffn(x, executor, stats), kv


class MTP(nnx.Module):
    """Multi-token prediction module: from the main model's hidden state at i and the embedding of token i+1,
    predicts token i+2 (DeepSeek-V3 §2.2). Shares the embedding with the main model."""

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs, dtype):
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        # Unquantized: published checkpoints differ on whether eh_proj is FP8; the loader dequantizes if so.
        self.eh_proj = Linear(2 * d, d, rngs=rngs, dtype=dtype)
        self.block = Block(cfg, layer, rngs=rngs, dtype=dtype)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.head = Linear(d, cfg.vocab_size, rngs=rngs, dtype=dtype)

    def __call__(self, hidden_bsd, next_embed_bsd, positions, executor):
        x = jnp.concatenate([self.enorm(next_embed_bsd), self.hnorm(hidden_bsd)], axis=-1)
        x, _ = self.block(self.eh_proj(x), positions, executor)
        return self.head(self.norm(x))


class DeepseekV3(nnx.Module):
    """The whole model. `model(token_ids [b, s]) -> logits [b, s, vocab]` (float32)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.bfloat16, n_local_experts: int | None = None):
        self.cfg = cfg
        self.dtype = dtype
        self.embed_tokens = nnx.Param(_normal(rngs, (cfg.vocab_size, cfg.hidden_size), dtype))
        self.layers = nnx.List(
            [Block(cfg, i, rngs=rngs, dtype=dtype, n_local_experts=n_local_experts) for i in range(cfg.num_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, rngs=rngs, dtype=dtype)
        self.mtp = nnx.List(
            [MTP(cfg, cfg.num_layers + i, rngs=rngs, dtype=dtype) for i in range(cfg.num_mtp_layers)]
        )

    def embed(self, token_ids):
        return self.embed_tokens[...][token_ids]

    def logits(self, hidden_bsd):
        return self.lm_head(self.norm(hidden_bsd)).astype(jnp.float32)

    def hidden(self, token_ids, positions=None, executor: ExpertExecutor | None = None):
        """Final hidden states before the last norm: [b, s, hidden]."""
        executor = executor or LocalExecutor()
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(token_ids.shape[1]), token_ids.shape)
        x = self.embed(token_ids)
        for layer in self.layers:
            x, _ = layer(x, positions, executor)
        return x

    def __call__(self, token_ids, positions=None, executor: ExpertExecutor | None = None):
        return self.logits(self.hidden(token_ids, positions, executor))

    def mtp_logits(self, hidden_bsd, next_token_ids, positions=None, executor=None, depth: int = 0):
        """Logits of MTP module `depth` for token i+2+depth from hidden[i] and token i+1+depth."""
        executor = executor or LocalExecutor()
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(next_token_ids.shape[1]), next_token_ids.shape)
        module = self.mtp[depth]
        return module(hidden_bsd, self.embed(next_token_ids), positions, executor).astype(jnp.float32)


class AbsorbedKvB(nnx.Variable):
    """kv_b_proj's FP8 weight dequantized once, [kv_lora, heads, nope + v]: derived for serving, not a
    checkpoint parameter."""


def with_absorbed_kv_b(module, dtype):
    """A copy of `module` (a `DeepseekV3` or a decoder `Block`; the arrays are shared) whose attention layers
    with an FP8 kv_b also hold that weight dequantized to `dtype` (the activation dtype), which the
    weight-absorbed decode form and the einsum attention then read instead of dequantizing kv_b in every step
    (1 byte read and 2 written per weight, then the 2 read). Costs heads * (nope + v) * kv_lora_rank * 2 bytes a
    layer in bf16: 33.5 MB for R1, 2 GB over its 61 layers (SGLang keeps the same bf16 copy). The runners
    apply it; a model without FP8 kv_b comes back as an unchanged copy."""
    copy = nnx.merge(*nnx.split(module))
    blocks = list(copy.layers) + [m.block for m in copy.mtp] if isinstance(copy, DeepseekV3) else [copy]
    for block in blocks:
        mla = block.self_attn
        if mla.kv_b_proj.scale is not None:
            mla.kv_b_absorbed = AbsorbedKvB(_dequantized_kv_b(mla.kv_b_proj.kernel[...], mla.kv_b_proj.scale[...],
                                                              mla.kv_b_proj.block, mla.cfg, jnp.dtype(dtype)))
    return copy


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _dequantized_kv_b(kernel, scale, block, cfg, dtype):
    return quant.dequantize(kernel, scale, block, dtype).T.reshape(cfg.kv_lora_rank, cfg.num_heads, -1)


def init_model(cfg: ModelConfig, *, seed: int = 0, dtype=jnp.bfloat16, n_local_experts=None,
               jitted: bool = False) -> DeepseekV3:
    """Random model for tests and benchmarks (FP8 weights with uniform block scales when the config asks).

    jitted: build every weight in one compiled program (on `jax.default_device`). Eagerly, the bf16 normal
    behind each FP8 expert tensor is materialized first: 7 GiB for one R1 MoE layer's [256, 2048, 7168] up
    projection, which ran a GPU holding R1-sized layers out of memory."""
    def build():
        return DeepseekV3(cfg, rngs=nnx.Rngs(seed), dtype=dtype, n_local_experts=n_local_experts)

    if not jitted:
        return build()
    graph, _ = nnx.split(nnx.eval_shape(build))
    return nnx.merge(graph, jax.jit(lambda: nnx.split(build())[1])())
