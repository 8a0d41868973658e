"""DEP baseline: attention data parallel + expert parallel, with an all-to-all dispatch and combine per MoE layer.

One SPMD program over a 1-D mesh of G devices (`jax.shard_map`): every device runs attention on its own
batch with replicated weights; each MoE layer sends every (token, expert) pair to the expert's home device
(contiguous split: device g holds experts [g*E/G, (g+1)*E/G)), computes the experts it holds, and sends the
results back. Both all-to-alls make every MoE layer wait for the slowest device: the cost DWDP removes.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dwdp_jax.experts import ExpertWeights, _swiglu_ffn, combine_sorted, pallas_sorted_ffn
from dwdp_jax.model import DeepseekV3, with_absorbed_kv_b

AXIS = "ep"


@dataclasses.dataclass(frozen=True)
class DepExecutor:
    """Expert executor for use inside `shard_map` over axis `AXIS`.

    capacity: rows each device may send to each peer per layer; None sends every pair (no token is ever
    dropped: capacity = tokens * top_k). A smaller capacity drops overflow pairs, as capacity-limited EP does.
    """

    group_size: int
    capacity: int | None = None
    backend: str = "jnp"  # expert GEMMs: 'jnp' (ragged_dot) or 'pallas' (Mosaic GPU grouped GEMM)

    def __call__(self, x_td, expert_ids_tk, weights_tk, local: ExpertWeights):
        t, k = expert_ids_tk.shape
        g, e_local = self.group_size, local.num_experts
        cap = self.capacity or t * k
        flat_ids = expert_ids_tk.reshape(-1)
        dest = flat_ids // e_local
        order = jnp.argsort(dest, stable=True)
        counts = jnp.zeros((g,), jnp.int32).at[dest].add(1)
        starts = jnp.cumsum(counts) - counts
        dest_sorted = dest[order]
        row = jnp.arange(t * k) - starts[dest_sorted]  # position of each pair in its destination's block
        send_x = jnp.zeros((g, cap, x_td.shape[-1]), x_td.dtype).at[dest_sorted, row].set(x_td[order // k], mode="drop")
        send_e = jnp.full((g, cap), -1, jnp.int32).at[dest_sorted, row].set(flat_ids[order] % e_local, mode="drop")
        recv_x = jax.lax.all_to_all(send_x, AXIS, 0, 0)
        recv_e = jax.lax.all_to_all(send_e, AXIS, 0, 0).reshape(-1)
        # Compute the received rows grouped by local expert; empty rows (-1) sort last and stay zero.
        key = jnp.where(recv_e < 0, e_local, recv_e)
        by_expert = jnp.argsort(key, stable=True)
        sizes = jnp.zeros((e_local + 1,), jnp.int32).at[key].add(1)[:e_local]
        rows = recv_x.reshape(g * cap, -1)[by_expert]
        if self.backend == "pallas":
            where = jnp.stack([jnp.zeros((e_local,), jnp.int32), jnp.arange(e_local, dtype=jnp.int32)], -1)
            y_sorted = pallas_sorted_ffn(rows, sizes, [local], where).astype(x_td.dtype)
        else:
            y_sorted = _swiglu_ffn(rows, sizes, local, x_td.dtype).astype(x_td.dtype)
        y = jnp.zeros_like(y_sorted).at[by_expert].set(y_sorted).reshape(g, cap, -1)
        back = jax.lax.all_to_all(y, AXIS, 0, 0)
        y_pairs = back[dest_sorted, jnp.minimum(row, cap - 1)] * (row < cap)[:, None]  # overflow pairs: 0
        return combine_sorted(y_pairs, order, weights_tk).astype(x_td.dtype)


def state_specs(state):
    """Routed-expert weights split along their expert axis; everything else replicated."""

    def spec(path, _):
        names = [getattr(p, "key", getattr(p, "name", None)) for p in path]
        return P(AXIS) if "experts" in names else P()

    return jax.tree_util.tree_map_with_path(spec, state)


class DepModel:
    """The whole model as one SPMD program over `devices`: `forward(token_ids [G*b, s]) -> logits`.

    Device g serves rows [g*b, (g+1)*b) of the batch (its own requests)."""

    def __init__(self, model: DeepseekV3, devices, capacity: int | None = None, backend: str = "jnp"):
        cfg = model.cfg
        g = len(devices)
        if cfg.n_routed_experts % g:
            raise ValueError(f"DEP needs n_routed_experts={cfg.n_routed_experts} divisible by {g} devices")
        self.mesh = Mesh(np.asarray(devices), (AXIS,))
        # decode reads kv_b dequantized once (not per step) where the checkpoint's kv_b is FP8
        self.graph, state = nnx.split(with_absorbed_kv_b(model, model.dtype))
        specs = state_specs(state)
        self.state = jax.device_put(state, jax.tree.map(lambda s: NamedSharding(self.mesh, s), specs))
        self._forward = self._compile(specs, DepExecutor(g, capacity, backend))

    def _compile(self, specs, executor: DepExecutor):
        """The SPMD forward: every device runs the whole model on its rows, experts through `executor`."""
        graph = self.graph

        def per_device(state, ids, positions):
            return nnx.merge(graph, state)(ids, positions, executor=executor)

        mapped = jax.shard_map(per_device, mesh=self.mesh, in_specs=(specs, P(AXIS), P(AXIS)), out_specs=P(AXIS),
                               check_vma=False)  # Pallas calls carry no varying-axis types
        return jax.jit(mapped)

    @classmethod
    def from_rank_models(cls, models, capacity: int | None = None, backend: str = "jnp") -> "DepModel":
        """DEP over per-device models that each hold a contiguous 1/G of the experts (e.g. the ranks of a
        DWDP group): the expert shards become one global array sharded over the mesh without any copy;
        the replicated weights are rank 0's."""
        self = cls.__new__(cls)
        devices = [next(iter(m.embed_tokens[...].devices())) for m in models]
        g = len(devices)
        self.mesh = Mesh(np.asarray(devices), (AXIS,))
        self.graph, state0 = nnx.split(models[0])
        specs = state_specs(state0)
        shards = [nnx.split(m)[1] for m in models]

        def place(spec, *leaves):
            sharding = NamedSharding(self.mesh, spec)
            if spec == P():
                return jax.device_put(leaves[0], sharding)
            shape = (leaves[0].shape[0] * g,) + leaves[0].shape[1:]
            return jax.make_array_from_single_device_arrays(shape, sharding, list(leaves))

        self.state = jax.tree.map(place, specs, *shards)
        self._forward = self._compile(specs, DepExecutor(g, capacity, backend))
        return self

    def forward(self, token_ids, positions=None):
        if positions is None:
            positions = np.broadcast_to(np.arange(token_ids.shape[1], dtype=np.int32), token_ids.shape)
        sharding = NamedSharding(self.mesh, P(AXIS))
        return self._forward(self.state, jax.device_put(token_ids, sharding), jax.device_put(positions, sharding))

    def lowered_text(self, token_ids) -> str:
        positions = jnp.broadcast_to(jnp.arange(token_ids.shape[1]), token_ids.shape)
        return self._forward.lower(self.state, token_ids, positions).compile().as_text()
