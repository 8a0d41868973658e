"""One step of a group's ranks in the simulator (`simulator.py`), per rank and per layer.

From per-layer times to a step: `dwdp_rank_step` (one rank alone: prefetch overlapped with compute, `fetch_time_s`
for the pulls) and `dep_step` (all ranks in lockstep: every MoE layer waits for the slowest rank); each returns a
`RankStep` breakdown. From a rank's batch (`RankBatch`) to those per-layer times: `step_costs`, through
`costs.CostModel`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dwdp_jax.sim import costs
from dwdp_jax.sim.hardware import Hardware
from dwdp_jax.sim.strategies import DEPConfig, Strategy


# --------------------------------------------------------------------------------------------------------------
# 2. One step, from per-layer times.

@dataclasses.dataclass
class RankStep:
    """Where one rank's step time went (seconds). time_s = compute + interference + exposed_fetch + comm + wait."""

    time_s: float
    compute_s: float
    interference_s: float = 0.0  # compute slowed by copies beside it
    exposed_fetch_s: float = 0.0  # compute waiting for a fetch (prefetch late, or on-demand misses)
    comm_s: float = 0.0  # all-to-all
    wait_s: float = 0.0  # waiting for the slowest rank at DEP barriers


def fetch_time_s(bytes_: float, group_size: int, hw: Hardware, schedule: str = "staggered",
                 backend: str = "copy_engine") -> float:
    """Time for one rank to pull `bytes_` evenly from its G-1 peers, one copy per peer in turn, while every rank
    of the group pulls.

    staggered: at any moment each source has one reader (round-robin offsets), so a copy gets the source's whole
    outbound rate. same_order: all ranks read the same source at once, so G-1 readers share it. Each copy also
    pays the backend's fixed cost (`Hardware.fetch_backend(backend)`).
    """
    if bytes_ <= 0 or group_size <= 1:
        return 0.0
    readers = 1 if schedule == "staggered" else group_size - 1
    copy = hw.fetch_backend(backend)
    return (group_size - 1) * copy.time_s(bytes_ / (group_size - 1), hw.peer_copy_gbps / readers)


def dwdp_rank_step(compute_s, fetch_s, depth: int = 1, compute_slowdown: float = 0.0,
                   copy_slowdown: float = 0.0, miss_s=None) -> RankStep:
    """One rank's pass over its layers: a compute chain and a copy-engine chain, coupled by two rules.

    compute_s[l]: layer l's compute at full speed; fetch_s[l]: its expert prefetch alone (0: nothing to fetch);
    miss_s[l]: on-demand pulls after layer l's routing, on the critical path.
    Rules: layer l computes once its fetch is done; layer l's fetch starts once the copy engine is free and
    layer l-depth's compute has started (there are depth+1 staging buffers). While both run, each is slowed.
    """
    compute_s = np.asarray(compute_s, dtype=np.float64).tolist()  # plain floats: this loop is the hot path
    fetch_s = np.asarray(fetch_s, dtype=np.float64).tolist()
    miss_s = [0.0] * len(compute_s) if miss_s is None else np.asarray(miss_s, dtype=np.float64).tolist()
    num_layers = len(compute_s)
    t = interference = exposed = 0.0
    ci, c_left, m_left, started = 0, None, None, -1  # compute chain: layer, work left, miss left, last started
    fi, f_left = 0, None  # copy chain: layer being (or next to be) fetched; layers < fi are fetched
    while ci < num_layers:
        if f_left is None:
            while fi < num_layers and fetch_s[fi] <= 0:
                fi += 1
        if c_left is None and m_left is None and ci < fi:
            c_left, started = compute_s[ci], ci
        if f_left is None and fi < num_layers and fi - depth <= started:
            f_left = fetch_s[fi]
        c_rate = 1.0 / (1.0 + compute_slowdown) if f_left is not None else 1.0
        f_rate = 1.0 / (1.0 + copy_slowdown) if c_left is not None else 1.0
        # Advance to the next completion. Something always runs: layer ci waits only for fetch ci, which may
        # start because layer ci-1 >= ci-depth has started.
        dt = min(x for x in (c_left and c_left / c_rate, m_left, f_left and f_left / f_rate) if x is not None)
        if c_left is not None:
            interference += dt * (1.0 - c_rate)
            c_left -= dt * c_rate
        else:
            exposed += dt  # waiting for a fetch, or doing an on-demand one
            if m_left is not None:
                m_left -= dt
        if f_left is not None:
            f_left -= dt * f_rate
        t += dt
        eps = 1e-15 + 1e-12 * t
        if f_left is not None and f_left <= eps:
            f_left, fi = None, fi + 1
        if c_left is not None and c_left <= eps:
            c_left = None
            if miss_s[ci] > 0:
                m_left = miss_s[ci]
            else:
                ci += 1
        elif m_left is not None and m_left <= eps:
            m_left, ci = None, ci + 1
    return RankStep(time_s=t, compute_s=sum(compute_s), interference_s=interference, exposed_fetch_s=exposed)


def dep_step(local_s, expert_s, comm_s) -> list[RankStep]:
    """All ranks in lockstep. local_s, expert_s: [ranks, layers]; comm_s: [layers] (dispatch + combine).

    A layer with comm_s > 0 is a MoE layer: every rank waits for the slowest one's local work (attention, and
    any layers since the last barrier), exchanges tokens, waits for the slowest expert compute, combines.
    """
    local_s = np.atleast_2d(np.asarray(local_s, dtype=np.float64))
    expert_s = np.atleast_2d(np.asarray(expert_s, dtype=np.float64))
    comm_s = np.asarray(comm_s, dtype=np.float64)
    since_barrier = np.zeros(local_s.shape[0])
    t = 0.0
    for layer in range(local_s.shape[1]):
        since_barrier += local_s[:, layer]
        if comm_s[layer] > 0:
            t += since_barrier.max() + expert_s[:, layer].max() + comm_s[layer]
            since_barrier[:] = 0.0
    t += since_barrier.max()
    comm = float(comm_s.sum())
    busy = local_s.sum(axis=1) + expert_s.sum(axis=1)
    return [RankStep(time_s=t, compute_s=float(b), comm_s=comm, wait_s=t - float(b) - comm) for b in busy]


# --------------------------------------------------------------------------------------------------------------
# 3. From a rank's batch to per-layer times.

@dataclasses.dataclass(frozen=True)
class RankBatch:
    """One rank's work in one step: request i processes new_tokens[i] tokens after context[i] cached ones."""

    new_tokens: np.ndarray  # [n]
    context: np.ndarray  # [n]
    sampled: int  # tokens emitted this step (LM head rows)
    row_len: np.ndarray | None = None  # [n] cache positions each query reads (None: context + new; see costs)

    @property
    def tokens(self) -> int:
        return int(self.new_tokens.sum())


def _local_layer_times(cm: costs.CostModel, batch: RankBatch) -> tuple[float, float]:
    """(dense layer, MoE layer without routed experts) time of one rank's batch."""
    if batch.tokens == 0:
        return 0.0, 0.0
    attn = (cm.attention_s(batch.new_tokens, batch.context, batch.row_len) + cm.eff.layer_overhead_s
            + cm.eff.token_overhead_s * batch.tokens)
    return attn + cm.dense_mlp_s(batch.tokens), attn + cm.shared_expert_s(batch.tokens)


def step_costs(cm: costs.CostModel, hw: Hardware, strategy: Strategy, batches: list[RankBatch]) -> list[RankStep]:
    """Per-rank step breakdown for the batches of one group's ranks (for DWDP each rank is independent)."""
    cfg = cm.cfg
    is_moe = np.array([cfg.is_moe_layer(layer) for layer in range(cfg.num_layers)])
    k, e, g = cfg.num_experts_per_tok, cfg.n_routed_experts, strategy.group_size
    local = np.zeros((len(batches), cfg.num_layers))
    for r, b in enumerate(batches):
        dense_s, moe_s = _local_layer_times(cm, b)
        local[r] = np.where(is_moe, moe_s, dense_s)
        local[r, -1] += cm.head_s(b.sampled)
    if isinstance(strategy, DEPConfig):
        tokens = np.array([b.tokens for b in batches], dtype=np.float64)
        # Uniform routing spreads every rank's tokens over all experts: expert load is the group mean.
        expert_s = cm.routed_experts_s(tokens.sum() * k / g, cm.experts_touched(tokens.sum()) / g)
        a2a, pad = strategy.all_to_all or hw.all_to_all, strategy.capacity_factor or 1.0
        comm = sum(a2a.time_s(pad * costs.dep_a2a_bytes(cfg, tokens.max(), g, b, strategy.per_rank_rows))
                   for b in (strategy.dispatch_bytes, strategy.combine_bytes))
        return dep_step(local, np.where(is_moe, expert_s, 0.0)[None, :].repeat(len(batches), 0),
                        np.where(is_moe, comm, 0.0))
    steps = []
    for r, b in enumerate(batches):
        if b.tokens == 0:
            steps.append(RankStep(time_s=0.0, compute_s=0.0))
            continue
        touched = cm.experts_touched(b.tokens)
        if strategy.prefetch_per_peer is not None:
            fetch_bytes = (g - 1) * strategy.prefetch_per_peer * cm.expert_bytes
        else:
            fetched = touched if strategy.fetch_frac is None else strategy.fetch_frac * e
            fetch_bytes = costs.dwdp_fetch_bytes(cfg, g, fetched, cm.expert_format)
        fetch = fetch_time_s(fetch_bytes, g, hw, strategy.schedule, strategy.fetch_backend)
        miss_bytes = costs.dwdp_fetch_bytes(cfg, g, strategy.miss_rate * touched, cm.expert_format)
        miss = fetch_time_s(miss_bytes, g, hw, "staggered", strategy.fetch_backend)
        compute = local[r] + np.where(is_moe, cm.routed_experts_s(b.tokens * k, touched), 0.0)
        steps.append(dwdp_rank_step(compute, np.where(is_moe, fetch, 0.0), strategy.prefetch_depth,
                                    strategy.compute_slowdown, strategy.copy_slowdown, np.where(is_moe, miss, 0.0)))
    return steps
