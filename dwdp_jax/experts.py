"""Routed-expert computation: the one narrow interface between the model and a parallel strategy.

The MoE layer routes tokens and then calls an `ExpertExecutor`:

    executor(x_td, expert_ids_tk, weights_tk, experts) -> y_td

with x_td [tokens, hidden], expert_ids_tk / weights_tk [tokens, top_k] (global expert ids, combine weights),
and `experts` the `ExpertWeights` that the layer holds on this device (all experts on a single device, the
local shard under DWDP). Strategies (single device, DWDP, DEP) differ only in the executor they plug in.

The jnp path sorts the (token, expert) pairs by expert and runs two grouped GEMMs (`jax.lax.ragged_dot`). With
split weights (DWDP) the pairs are sorted by (buffer, slot): each weight buffer's rows form one contiguous run
and each buffer is multiplied where it lies, never merged into one tensor.

FP8 experts are stored zero-padded to whole weight blocks (`fp8_expert_dims`), so the FP8 grouped GEMM's tiles
stay aligned whatever hidden and moe_intermediate_size are: the executors zero-pad the activations to the
weights' hidden width and drop the padded output columns.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol, Sequence

import jax
import jax.numpy as jnp

from dwdp_jax import quant


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertWeights:
    """Weights of a set of routed experts in one buffer.

    Unquantized: w_gate_up [E, hidden, 2 * inter] (gate columns first, then up), w_down [E, inter, hidden].
    FP8 (scales set): the checkpoint's [out, in] layout, which Hopper's FP8 tensor cores read K-major:
    w_gate_up [E, 2 * inter, hidden], w_down [E, hidden, inter] (float8_e4m3fn) with block scales
    s_gate_up [E, 2*inter/bo, hidden/bi], s_down [E, hidden/bo, inter/bi] (float32), block = (bo, bi). Here
    hidden and inter are the padded sizes of `fp8_expert_dims` (gate and up each padded, then concatenated).
    """

    w_gate_up: jax.Array
    w_down: jax.Array
    s_gate_up: jax.Array | None = None
    s_down: jax.Array | None = None
    block: tuple[int, int] | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def num_experts(self) -> int:
        return self.w_gate_up.shape[0]

    @property
    def hidden(self) -> int:
        """The hidden width the weights take and give (padded for FP8: >= the model's hidden size)."""
        return self.w_gate_up.shape[2] if self.s_gate_up is not None else self.w_gate_up.shape[1]

    def dequantized(self, dtype) -> "ExpertWeights":
        if self.s_gate_up is None:
            return ExpertWeights(self.w_gate_up.astype(dtype), self.w_down.astype(dtype))
        return ExpertWeights(
            jnp.swapaxes(quant.dequantize(self.w_gate_up, self.s_gate_up, self.block, dtype), 1, 2),
            jnp.swapaxes(quant.dequantize(self.w_down, self.s_down, self.block, dtype), 1, 2),
        )

    def nbytes(self) -> int:
        leaves = [self.w_gate_up, self.w_down, self.s_gate_up, self.s_down]
        return sum(int(a.size) * a.dtype.itemsize for a in leaves if a is not None)


def fp8_expert_dims(hidden: int, inter: int, block: tuple[int, int]) -> tuple[int, int]:
    """(hidden, moe_intermediate) of FP8 routed experts as stored: each rounded up to a multiple of both block
    dims, so gate/up [2*inter, hidden] and down [hidden, inter] are whole blocks (aligned kernel tiles).

    The padding is zeros (weights and scales) and changes no result: padded inter rows give silu(0) * 0 = 0,
    padded hidden columns meet zero-padded activations, padded output columns are dropped. ModelConfig keeps
    the true sizes; R1's (7168, 2048) with 128x128 blocks are unchanged."""
    m = math.lcm(*block)
    return -(-hidden // m) * m, -(-inter // m) * m


def _pad_cols(x, width: int):
    """x [M, d] zero-padded to [M, width] (the padded hidden width of FP8 experts)."""
    return x if x.shape[-1] == width else jnp.pad(x, ((0, 0), (0, width - x.shape[-1])))


class ExpertExecutor(Protocol):
    def __call__(
        self, x_td: jax.Array, expert_ids_tk: jax.Array, weights_tk: jax.Array, experts: ExpertWeights
    ) -> jax.Array: ...


def _swiglu_ffn(x_md, group_sizes, w: ExpertWeights, compute_dtype) -> jax.Array:
    """Grouped SwiGLU FFN over rows sorted by expert. x_md [M, hidden] -> [M, hidden] float32.

    Rows past sum(group_sizes) come out as zeros (ragged_dot leaves them unassigned to any group).
    """
    d = x_md.shape[-1]
    x_md = _pad_cols(x_md.astype(compute_dtype), w.hidden)
    w = w.dequantized(compute_dtype)
    h = jax.lax.ragged_dot(x_md, w.w_gate_up, group_sizes, preferred_element_type=jnp.float32)
    gate, up = jnp.split(h, 2, axis=-1)
    a = (jax.nn.silu(gate) * up).astype(compute_dtype)
    return jax.lax.ragged_dot(a, w.w_down, group_sizes, preferred_element_type=jnp.float32)[:, :d]


def gather_rows(x, rows) -> jax.Array:
    """x[rows] for x [n, d] and rows [m] int, gathered as 32-bit words when a row's bytes allow it (bitcasts,
    no copy). XLA's gather fusion moves one element per thread: the FP8 rows that each MoE layer replicates to
    its top_k (token, expert) pairs ran at ~0.5 of HBM as bytes (three 1.24 ms gathers in the 16K-token
    prefill profile, WORKSPACE A4), and 4-byte words move 4x fewer elements. Returns [m, d] of x's dtype."""
    n, d = x.shape
    per_word = 4 // x.dtype.itemsize if x.dtype.itemsize < 4 else 1
    if per_word == 1 or d % per_word:
        return x[rows]
    words = jax.lax.bitcast_convert_type(x.reshape(n, d // per_word, per_word), jnp.uint32)
    return jax.lax.bitcast_convert_type(words[rows], x.dtype).reshape(rows.shape[0], d)


def combine_sorted(y_sorted, order, weights_tk) -> jax.Array:
    """Routed output per token from per-(token, slot) rows sorted by `order` (a permutation of t*k).

    Un-sorts with a gather and sums the k slots in a fixed order, slot 0 first: deterministic on every backend
    (a scatter-add would use atomics on GPUs, whose order flips near-tie routing decisions between runs).
    Written as k products and sums, not an einsum, so that XLA fuses the gathers, the f32 products and the
    sum into one pass over y_sorted: as a dot, the gathered rows were materialized in f32 ([t, k, hidden],
    1.9 GB at 8K tokens) and multiplied at HIGHEST precision. Returns [t, hidden] float32."""
    t, k = weights_tk.shape
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    rows = inverse.reshape(t, k)
    w = weights_tk.astype(jnp.float32)
    out = y_sorted[rows[:, 0]].astype(jnp.float32) * w[:, :1]
    for j in range(1, k):
        out = out + y_sorted[rows[:, j]].astype(jnp.float32) * w[:, j : j + 1]
    return out


def _gemm_config(num_sms, m: int, groups: int, n: int, fp8: bool, swiglu: bool = False):
    """The grouped GEMM's default tiles on a persistent grid of `num_sms` CTAs (None: the kernel's own choice, one
    CTA per SM). swiglu: the FP8 gate/up GEMM with SwiGLU in its epilogue, n its output width."""
    if num_sms is None:
        return None
    from pallas_kernels import grouped_gemm as gg

    cfg = gg.default_swiglu_config(m, groups, n) if swiglu else gg.default_config(m, groups, n, fp8=fp8)
    return dataclasses.replace(cfg, num_sms=num_sms)


def pallas_sorted_ffn(x_sorted, sizes, buffers: Sequence[ExpertWeights], where, rows=None, num_sms=None,
                      interpret: bool = False) -> jax.Array:
    """GPU path: SwiGLU FFN over rows sorted by group with the Mosaic GPU grouped GEMMs of
    `pallas_kernels.grouped_gemm`, which read every weight buffer in place. where: [groups, 2] (buffer, slot).
    rows: [M] int32, when given, x_sorted holds one row per token and row r of the sorted input is
    x_sorted[rows[r]] (FP8 experts then quantize each token once, before the top_k replication, and gather the
    e4m3 rows). num_sms: the GEMMs' persistent CTAs (None: one per SM; fewer leave SMs to a kernel running beside
    them, e.g. the `pallas_async` fetch). interpret: the kernels in Mosaic GPU interpret mode (CPU tests). Rows past
    sum(sizes) come out as zeros. Returns [M, hidden] bfloat16."""
    from pallas_kernels import grouped_gemm as gg

    d = x_sorted.shape[-1]
    m, groups = (x_sorted.shape[0] if rows is None else rows.shape[0]), sizes.shape[0]
    x_sorted = _pad_cols(x_sorted.astype(jnp.bfloat16), buffers[0].hidden)
    if buffers[0].s_gate_up is not None:
        xq, xs = gg.quantize_activations(x_sorted)
        if rows is not None:
            xq, xs = gather_rows(xq, rows), xs[rows]
        # SwiGLU in the gate/up GEMM's epilogue: only the [M, I] bf16 product reaches HBM. Its quantization for
        # the down GEMM stays an XLA pass: the epilogue that also quantizes (quantize_output=True) measured slower
        # at prefill (kernels-20261206-nvidia-h100-x1-moe-ffn-swiglu.json, WORKSPACE Finding 22)
        inter = buffers[0].w_gate_up.shape[1] // 2
        a = gg.grouped_gemm_fp8_swiglu(xq, sizes, [b.w_gate_up for b in buffers], [b.s_gate_up for b in buffers],
                                       where, x_scale=xs, interpret=interpret,
                                       config=_gemm_config(num_sms, m, groups, inter, True, swiglu=True))
        # the down GEMM's activations are quantized by XLA at decode too: quantizing inside the kernel measured
        # slower on the H100, 166 against 158 us for one token (kernels-20261206-nvidia-h100-x1-moe-ffn-swiglu-s10.json,
        # WORKSPACE Finding 24)
        return gg.grouped_gemm_fp8(a, sizes, [b.w_down for b in buffers], [b.s_down for b in buffers], where,
                                   out_dtype=jnp.bfloat16, interpret=interpret,
                                   config=_gemm_config(num_sms, m, groups, buffers[0].w_down.shape[1], True))[:, :d]
    if rows is not None:
        x_sorted = gather_rows(x_sorted, rows)
    h = gg.grouped_gemm(x_sorted, sizes, [b.w_gate_up.astype(jnp.bfloat16) for b in buffers], where,
                        out_dtype=jnp.bfloat16, interpret=interpret,
                        config=_gemm_config(num_sms, m, groups, buffers[0].w_gate_up.shape[2], False))
    gate, up = jnp.split(h, 2, axis=-1)
    a = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(jnp.bfloat16)
    return gg.grouped_gemm(a, sizes, [b.w_down.astype(jnp.bfloat16) for b in buffers], where,
                           out_dtype=jnp.bfloat16, interpret=interpret,
                           config=_gemm_config(num_sms, m, groups, buffers[0].w_down.shape[2], False))[:, :d]


def _pallas_ffn(x_td, expert_ids_tk, weights_tk, buffers, expert_buffer, expert_slot, num_sms=None,
                interpret: bool = False) -> jax.Array:
    t, k = expert_ids_tk.shape
    flat_ids = expert_ids_tk.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)
    token_of_row = order // k
    sizes = jnp.zeros((expert_buffer.shape[0],), jnp.int32).at[flat_ids].add(1)
    where = jnp.stack([expert_buffer, expert_slot], axis=-1)
    y = pallas_sorted_ffn(x_td, sizes, buffers, where, rows=token_of_row, num_sms=num_sms, interpret=interpret)
    return combine_sorted(y, order, weights_tk).astype(x_td.dtype)


def split_weight_ffn(
    x_td: jax.Array,
    expert_ids_tk: jax.Array,
    weights_tk: jax.Array,
    buffers: Sequence[ExpertWeights],
    expert_buffer: jax.Array,
    expert_slot: jax.Array,
    compute_dtype=None,
    backend: str = "jnp",
    gemm_sms: int | None = None,
) -> jax.Array:
    """Routed-expert output with experts spread over several weight buffers.

    expert_buffer, expert_slot: [n_routed_experts] int32: global expert e lives in buffers[expert_buffer[e]]
    at index expert_slot[e]. Every routed expert must be present in some buffer (DWDP guarantees this by
    fetching misses on demand). backend: "jnp", "pallas" (the grouped GEMM kernels; GPU) or "pallas_interpret"
    (the same kernels in interpret mode: CPU tests). gemm_sms: the Pallas backend's GEMM grid
    (`pallas_sorted_ffn`'s num_sms).
    Returns y_td [tokens, hidden] in x's dtype.
    """
    if backend in ("pallas", "pallas_interpret"):
        return _pallas_ffn(x_td, expert_ids_tk, weights_tk, buffers, expert_buffer, expert_slot, gemm_sms,
                           interpret=backend == "pallas_interpret")
    if backend != "jnp":
        raise ValueError(f"expert backend must be 'jnp', 'pallas' or 'pallas_interpret', got {backend!r}")
    compute_dtype = compute_dtype or x_td.dtype
    t, k = expert_ids_tk.shape
    flat_ids = expert_ids_tk.reshape(-1)
    offsets = []
    total = 0
    for b in buffers:
        offsets.append(total)
        total += b.num_experts
    offsets_b = jnp.asarray(offsets, jnp.int32)
    key = offsets_b[expert_buffer[flat_ids]] + expert_slot[flat_ids]  # position in the virtual concatenation
    order = jnp.argsort(key, stable=True)
    token_of_row = order // k
    x_sorted = x_td[token_of_row]
    counts = jnp.zeros((total,), jnp.int32).at[key].add(1)
    y_sorted = jnp.zeros((t * k, x_td.shape[-1]), jnp.float32)
    for buf, start in zip(buffers, offsets):
        sizes = counts[start : start + buf.num_experts]
        row_start = jnp.sum(counts[:start]) if start else 0
        # Bring this buffer's run of rows to the front, multiply, and put the result back in place.
        x_b = jnp.roll(x_sorted, -row_start, axis=0) if start else x_sorted
        y_b = _swiglu_ffn(x_b, sizes, buf, compute_dtype)
        y_sorted = y_sorted + (jnp.roll(y_b, row_start, axis=0) if start else y_b)
    return combine_sorted(y_sorted, order, weights_tk).astype(x_td.dtype)


@dataclasses.dataclass(frozen=True)
class LocalExecutor:
    """All routed experts are in the layer's own buffer (single device, replicated DP)."""

    compute_dtype: object = None
    backend: str = "jnp"

    def __call__(self, x_td, expert_ids_tk, weights_tk, experts: ExpertWeights):
        n = experts.num_experts
        return split_weight_ffn(
            x_td, expert_ids_tk, weights_tk, [experts],
            jnp.zeros((n,), jnp.int32), jnp.arange(n, dtype=jnp.int32), self.compute_dtype, self.backend,
        )


def dense_reference(x_td, expert_ids_tk, weights_tk, experts: ExpertWeights) -> jax.Array:
    """Obviously-correct reference: gathers each (token, slot)'s expert weights. Small sizes only."""
    x = _pad_cols(x_td.astype(jnp.float32), experts.hidden)
    w = experts.dequantized(jnp.float32)
    wgu = w.w_gate_up[expert_ids_tk]  # [T, k, hidden, 2*inter]
    h = jnp.einsum("td,tkdn->tkn", x, wgu, precision=jax.lax.Precision.HIGHEST)
    gate, up = jnp.split(h, 2, axis=-1)
    a = jax.nn.silu(gate) * up
    y = jnp.einsum("tkn,tknd->tkd", a, w.w_down[expert_ids_tk], precision=jax.lax.Precision.HIGHEST)
    y = y[..., : x_td.shape[-1]]
    return jnp.einsum("tkd,tk->td", y, weights_tk.astype(jnp.float32)).astype(x_td.dtype)
