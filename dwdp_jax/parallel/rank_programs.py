"""The programs a DWDP rank dispatches each step, and their bodies (`dwdp.DwdpRank` builds and calls them).

A step is: the prologue (the embedding and the dense layers before the first MoE layer, one program), then one
program per MoE layer (the fetch points: the host issues the next layers' fetches between them), the last one
with the LM head. With planned fetches a MoE layer is two programs, attention + router and then the experts,
because the host reads the router's histogram between them. Every program takes a state's leaves (not a
GraphDef, which would be hashed on every call) and donates the layer's pages.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dwdp_jax.experts import ExpertWeights, split_weight_ffn
from dwdp_jax.model import Block, DeepseekV3
from dwdp_jax.routing import expert_histogram


def _executor(buffers, slots, backend: str, merge_copy: bool, gemm_sms: int | None = None):
    """The expert executor of a DWDP layer: local buffer (the layer's own) plus staged peer buffers."""

    def executor(x_td, ids, weights, local: ExpertWeights):
        parts = [local, *buffers]
        if merge_copy:  # ablation: one merged buffer, as without split-weight management
            offsets = jnp.asarray(np.cumsum([0] + [p.num_experts for p in parts[:-1]]), jnp.int32)
            merged = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *parts)
            return split_weight_ffn(x_td, ids, weights, [merged], jnp.zeros_like(slots.buffer),
                                    offsets[slots.buffer] + slots.slot, backend=backend, gemm_sms=gemm_sms)
        return split_weight_ffn(x_td, ids, weights, parts, slots.buffer, slots.slot, backend=backend,
                                gemm_sms=gemm_sms)

    return executor


def _attention(layer: Block, x, positions, pages, meta, absorbed):
    """The layer's attention half; with a paged cache (`meta` a `PagedKV` without pages) over `pages`.
    Returns (x, the updated pages or None)."""
    if meta is None:
        x, _ = layer.attention(x, positions, None, absorbed)
        return x, None
    x, kv = layer.attention(x, positions, meta.with_pages(pages), absorbed)
    return x, kv.pages


def layer_step(graphdef, state, buffers, slots, x, positions, pages, meta, absorbed, backend, merge_copy=False,
                gemm_sms=None):
    """One decoder layer on one rank (jit-compiled per layer shape; the layer's pages donated).
    Returns (x, pages, expert_counts)."""
    layer: Block = nnx.merge(graphdef, state)
    x, pages = _attention(layer, x, positions, pages, meta, absorbed)
    stats = {}
    if layer.is_moe:
        x = layer.ffn(x, _executor(buffers, slots, backend, merge_copy, gemm_sms), stats)
    else:
        x = layer.ffn(x, None)
    return x, pages, stats.get("expert_counts")


def route_step(graphdef, state, x, positions, pages, meta, absorbed):
    """Planned fetches, first half of a MoE layer: attention and the router.
    Returns (x [b, s, d], pages, expert_ids [b*s, k], weights [b*s, k], expert_counts [E])."""
    layer: Block = nnx.merge(graphdef, state)
    x, pages = _attention(layer, x, positions, pages, meta, absorbed)
    ids, weights = layer.route(x)
    return x, pages, ids, weights, expert_histogram(ids, layer.mlp.cfg.n_routed_experts)


def expert_step(graphdef, state, buffers, slots, x, ids, weights, backend, merge_copy, gemm_sms=None):
    """Planned fetches, second half: routed experts (local + staged buffers) and shared experts."""
    layer: Block = nnx.merge(graphdef, state)
    return layer.ffn_routed(x, ids, weights, _executor(buffers, slots, backend, merge_copy, gemm_sms))


def layer_programs(graphdef, state_def, backend: str, merge_copy: bool, gemm_sms: int | None = None,
                    head=None, jit=jax.jit) -> dict:
    """Jitted programs of one layer with its graph and static options closed over: a call passes the state's
    leaves and hashes only arrays (a static GraphDef argument is hashed on every call, ~0.1 ms a layer).
    Keys: ("layer", absorbed), ("route", absorbed), "expert"; with head = (head graph, leaves -> head state),
    also ("layer_head", absorbed): the layer and the LM head in one program (the last layer's: one program less
    a step), which also stacks the step's router histograms (the earlier MoE layers' [E] arrays and its own) into
    one [MoE layers, E] array: one device-to-host copy a step instead of one a layer. The layer's pages (argument 5) are donated.
    jit: `jax.jit` or a partial of it with the rank's compile options."""
    state = lambda leaves: jax.tree.unflatten(state_def, leaves)

    # named functions, not lambdas: a program's name (`jit_layer`, `PjitFunction(layer)`) shows in traces
    def layer(leaves, buffers, slots, x, positions, pages, meta, absorbed):
        return layer_step(graphdef, state(leaves), buffers, slots, x, positions, pages, meta, absorbed, backend,
                          merge_copy, gemm_sms)

    def layer_head(leaves, buffers, slots, x, positions, pages, meta, head_leaves, last_at, earlier_counts,
                   last_only, absorbed):
        x, pages, counts = layer(leaves, buffers, slots, x, positions, pages, meta, absorbed)
        head_graph, head_of = head
        step_counts = jnp.stack([*earlier_counts, counts])
        return head_logits(head_graph, head_of(head_leaves), x, last_at, last_only), pages, step_counts

    def route(leaves, x, positions, pages, meta, absorbed):
        return route_step(graphdef, state(leaves), x, positions, pages, meta, absorbed)

    def expert(leaves, buffers, slots, x, ids, weights):
        return expert_step(graphdef, state(leaves), buffers, slots, x, ids, weights, backend, merge_copy, gemm_sms)

    programs = {"expert": jit(expert)}
    for absorbed in (False, True):
        programs["layer", absorbed] = jit(functools.partial(layer, absorbed=absorbed), donate_argnums=5)
        if head is not None:
            programs["layer_head", absorbed] = jit(functools.partial(layer_head, absorbed=absorbed),
                                                   donate_argnums=5, static_argnames=("last_only",))
        programs["route", absorbed] = jit(functools.partial(route, absorbed=absorbed), donate_argnums=3)
    return programs


def prologue_step(head_graph, head_state, layer_graphs, layer_states, ids, positions, pages, meta, absorbed,
                   backend):
    """The step up to the first MoE layer as one program: the embedding and the leading dense layers (no fetch
    point lies between them). pages: one per dense layer (donated). Returns (x [b, s, d], [pages])."""
    x = nnx.merge(head_graph, head_state).embed(ids)
    out_pages = []
    for graph, state, layer_pages in zip(layer_graphs, layer_states, pages):
        x, layer_pages, _ = layer_step(graph, state, [], None, x, positions, layer_pages, meta, absorbed, backend)
        out_pages.append(layer_pages)
    return x, out_pages


def head_logits(graph, state, hidden, last_at=None, last_only: bool = False):
    """Logits of `hidden` [b, s, d]: [b, s, vocab]; last_only: of the last column, [b, 1, vocab]; with last_at [b],
    of column last_at[b] of each row only: [b, vocab] (the runner's shape, so that no slicing program runs after
    the head)."""
    if last_at is not None:
        return nnx.merge(graph, state).logits(hidden[jnp.arange(hidden.shape[0]), last_at][:, None])[:, 0]
    return nnx.merge(graph, state).logits(hidden[:, -1:] if last_only else hidden)




class Head(nnx.Module):
    """The replicated non-layer weights: embedding, final norm, LM head."""

    def __init__(self, model: DeepseekV3):
        self.embed_tokens = model.embed_tokens
        self.norm = model.norm
        self.lm_head = model.lm_head

    def embed(self, ids):
        return self.embed_tokens[...][ids]

    def logits(self, hidden):
        return self.lm_head(self.norm(hidden)).astype(jnp.float32)
