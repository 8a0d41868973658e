"""Where each routed expert lives in a DWDP group, and an optimizer that places experts by recorded load.

A `Placement` covers the MoE layers of a model, indexed 0..num_layers-1 in MoE-layer order (model layer
`first_k_dense_replace + i` is placement layer `i`). For each layer every expert has one *home* rank and may
have *replicas* on other ranks: redundant resident copies, which cost the holder memory, spare it the fetch and
give other ranks a second source. A rank holds its home experts plus its replicas; it must fetch every other
expert it routes to.

Nothing here assumes a group size of 8 or less: ranks are plain ints in [0, num_ranks).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np


class PlacementError(ValueError):
    """A placement is invalid; the message names the layer, expert or rank at fault."""


def _split_points(num_experts: int, num_ranks: int) -> np.ndarray:
    """Boundaries of the contiguous split: rank r holds [b[r], b[r+1]) (sizes differ by at most one)."""
    return np.array([r * num_experts // num_ranks for r in range(num_ranks + 1)])


@dataclasses.dataclass(frozen=True, eq=False)
class Placement:
    """Expert -> rank map for every MoE layer.

    home_le: [num_layers, num_experts] int, home rank of each expert.
    replicas: per layer, a tuple over experts of the sorted tuple of extra ranks holding a copy (never the home);
      `()` for no replicas. Empty `replicas` (the default) means none anywhere.
    max_experts_per_rank: optional capacity (experts per rank per layer, homes plus replicas), checked here.
    """

    num_ranks: int
    home_le: np.ndarray
    replicas: tuple[tuple[tuple[int, ...], ...], ...] = ()
    max_experts_per_rank: int | None = None

    def __post_init__(self):
        if not isinstance(self.num_ranks, (int, np.integer)) or self.num_ranks < 1:
            raise PlacementError(f"num_ranks must be a positive integer, got {self.num_ranks!r}")
        home = np.asarray(self.home_le)
        if home.ndim != 2 or home.shape[0] < 1 or home.shape[1] < 1:
            raise PlacementError(f"home_le must be [num_layers, num_experts], got shape {home.shape}")
        if not np.issubdtype(home.dtype, np.integer):
            raise PlacementError(f"home_le must hold integer ranks, got dtype {home.dtype}")
        bad = np.argwhere((home < 0) | (home >= self.num_ranks))
        if bad.size:
            layer, expert = bad[0]
            raise PlacementError(
                f"layer {layer} expert {expert}: home rank {home[layer, expert]} not in [0, {self.num_ranks})"
            )
        home = home.astype(np.int32)
        home.setflags(write=False)
        object.__setattr__(self, "home_le", home)
        num_layers, num_experts = home.shape
        if self.replicas:
            if len(self.replicas) != num_layers:
                raise PlacementError(f"replicas has {len(self.replicas)} layers, home_le has {num_layers}")
            normalized = []
            for layer, per_expert in enumerate(self.replicas):
                if len(per_expert) != num_experts:
                    raise PlacementError(
                        f"layer {layer}: replicas lists {len(per_expert)} experts, expected {num_experts}"
                    )
                row = []
                for expert, ranks in enumerate(per_expert):
                    ranks = tuple(sorted(int(r) for r in ranks))
                    for r in ranks:
                        if not 0 <= r < self.num_ranks:
                            raise PlacementError(
                                f"layer {layer} expert {expert}: replica rank {r} not in [0, {self.num_ranks})"
                            )
                    if len(set(ranks)) != len(ranks):
                        raise PlacementError(f"layer {layer} expert {expert}: duplicate replica ranks {ranks}")
                    if home[layer, expert] in ranks:
                        raise PlacementError(
                            f"layer {layer} expert {expert}: replica on its home rank {home[layer, expert]}"
                        )
                    row.append(ranks)
                normalized.append(tuple(row))
            object.__setattr__(self, "replicas", tuple(normalized))
        if self.max_experts_per_rank is not None:
            counts = self.experts_per_rank()
            over = np.argwhere(counts > self.max_experts_per_rank)
            if over.size:
                layer, rank = over[0]
                raise PlacementError(
                    f"layer {layer} rank {rank}: holds {counts[layer, rank]} experts, "
                    f"more than max_experts_per_rank={self.max_experts_per_rank}"
                )

    # Construction.
    @classmethod
    def contiguous(cls, num_layers: int, num_experts: int, num_ranks: int) -> "Placement":
        """Rank r holds experts [r*E//G, (r+1)*E//G) in every layer (the paper's default split)."""
        if num_ranks > num_experts:
            raise PlacementError(f"num_ranks={num_ranks} exceeds num_experts={num_experts}: a rank would be empty")
        bounds = _split_points(num_experts, num_ranks)
        row = np.searchsorted(bounds, np.arange(num_experts), side="right") - 1
        return cls(num_ranks=num_ranks, home_le=np.tile(row, (num_layers, 1)))

    @classmethod
    def from_config(cls, cfg, num_ranks: int) -> "Placement":
        """Contiguous placement for the MoE layers of a `ModelConfig`."""
        return cls.contiguous(cfg.num_moe_layers, cfg.n_routed_experts, num_ranks)

    # Shape.
    @property
    def num_layers(self) -> int:
        return self.home_le.shape[0]

    @property
    def num_experts(self) -> int:
        return self.home_le.shape[1]

    def _check(self, layer: int, rank: int | None = None, expert: int | None = None):
        if not 0 <= layer < self.num_layers:
            raise PlacementError(f"layer {layer} not in [0, {self.num_layers})")
        if rank is not None and not 0 <= rank < self.num_ranks:
            raise PlacementError(f"rank {rank} not in [0, {self.num_ranks})")
        if expert is not None and not 0 <= expert < self.num_experts:
            raise PlacementError(f"expert {expert} not in [0, {self.num_experts})")

    # Queries.
    def held_mask(self, layer: int) -> np.ndarray:
        """[num_ranks, num_experts] bool: rank r holds expert e (home or replica)."""
        self._check(layer)
        mask = np.zeros((self.num_ranks, self.num_experts), bool)
        mask[self.home_le[layer], np.arange(self.num_experts)] = True
        if self.replicas:
            for expert, ranks in enumerate(self.replicas[layer]):
                mask[list(ranks), expert] = True
        return mask

    def holders(self, layer: int, expert: int) -> tuple[int, ...]:
        """Ranks holding `expert` in `layer`: the home first, then replicas in increasing order."""
        self._check(layer, expert=expert)
        extra = self.replicas[layer][expert] if self.replicas else ()
        return (int(self.home_le[layer, expert]),) + extra

    def local_experts(self, layer: int, rank: int) -> np.ndarray:
        """Sorted int32 ids of the experts `rank` holds in `layer` (homes and replicas)."""
        self._check(layer, rank)
        return np.flatnonzero(self.held_mask(layer)[rank]).astype(np.int32)

    def home_experts(self, layer: int, rank: int) -> np.ndarray:
        """Sorted int32 ids of the experts whose home is `rank` in `layer`."""
        self._check(layer, rank)
        return np.flatnonzero(self.home_le[layer] == rank).astype(np.int32)

    def remote_experts(self, layer: int, rank: int) -> np.ndarray:
        """Sorted int32 ids of the experts `rank` does not hold in `layer` (what it may have to fetch)."""
        self._check(layer, rank)
        return np.flatnonzero(~self.held_mask(layer)[rank]).astype(np.int32)

    def experts_per_rank(self) -> np.ndarray:
        """[num_layers, num_ranks] int: experts held per rank (homes plus replicas)."""
        counts = np.stack([np.bincount(row, minlength=self.num_ranks) for row in self.home_le])
        if self.replicas:
            for layer, per_expert in enumerate(self.replicas):
                for ranks in per_expert:
                    counts[layer, list(ranks)] += 1
        return counts

    def memory_bytes(self, bytes_per_expert: float) -> np.ndarray:
        """[num_ranks] bytes of routed-expert weights each rank keeps resident, summed over layers."""
        return self.experts_per_rank().sum(0) * float(bytes_per_expert)

    @property
    def has_replicas(self) -> bool:
        return bool(self.replicas) and any(r for layer in self.replicas for r in layer)

    # Persistence.
    def to_json_dict(self) -> dict:
        return {
            "num_ranks": int(self.num_ranks),
            "home": self.home_le.tolist(),
            "replicas": [[list(r) for r in layer] for layer in self.replicas] if self.has_replicas else [],
            "max_experts_per_rank": self.max_experts_per_rank,
        }

    @classmethod
    def from_json_dict(cls, d: dict) -> "Placement":
        try:
            return cls(
                num_ranks=int(d["num_ranks"]),
                home_le=np.asarray(d["home"], dtype=np.int64),
                replicas=tuple(tuple(tuple(r) for r in layer) for layer in d.get("replicas") or ()),
                max_experts_per_rank=d.get("max_experts_per_rank"),
            )
        except KeyError as e:
            raise PlacementError(f"placement JSON is missing field {e.args[0]!r}") from None

    def save(self, path: str | os.PathLike):
        with open(path, "w") as f:
            json.dump(self.to_json_dict(), f)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Placement":
        with open(path) as f:
            return cls.from_json_dict(json.load(f))

    def __eq__(self, other) -> bool:
        if not isinstance(other, Placement):
            return NotImplemented
        return (
            self.num_ranks == other.num_ranks
            and np.array_equal(self.home_le, other.home_le)
            and self.to_json_dict()["replicas"] == other.to_json_dict()["replicas"]
            and self.max_experts_per_rank == other.max_experts_per_rank
        )

    __hash__ = None


# --------------------------------------------------------------------------------------------------------------
# Cost model and optimizer


@dataclasses.dataclass(frozen=True)
class PlacementCost:
    """Expected traffic of one placement under a per-rank expert load.

    remote: sum over ranks of the load on experts that rank does not hold (units of the load array; times
      bytes-per-expert-use it is expected remote bytes).
    max_served, mean_served: bytes each rank serves to peers (fetches split evenly over an expert's holders).
    objective: remote + balance_weight * (max_served - mean_served), what the optimizer minimizes.
    """

    remote: float
    max_served: float
    mean_served: float
    objective: float


def _served(load_ge: np.ndarray, held_ge: np.ndarray) -> np.ndarray:
    """[G] load each rank serves: every rank's demand for an expert it lacks, split evenly over the holders."""
    need = np.where(held_ge, 0.0, load_ge).sum(0)  # [E] demand from ranks lacking each expert
    return (held_ge * (need / held_ge.sum(0))[None, :]).sum(1)


def placement_cost(placement: Placement, load_lge: np.ndarray, balance_weight: float = 1.0) -> PlacementCost:
    """Cost of `placement` under load_lge [num_layers, num_ranks, num_experts] (>= 0), summed over layers.

    The load is whatever predicts fetched bytes: token counts, routed shares, or per-step use probabilities
    (the right choice for selective prefetch, where an expert is fetched when it is used at all).
    """
    load_lge = _check_load(load_lge, placement.num_layers, placement.num_ranks, placement.num_experts)
    remote = max_served = mean_served = 0.0
    for layer in range(placement.num_layers):
        held = placement.held_mask(layer)
        remote += float(np.where(held, 0.0, load_lge[layer]).sum())
        served = _served(load_lge[layer], held)
        max_served += float(served.max())
        mean_served += float(served.mean())
    return PlacementCost(remote, max_served, mean_served, remote + balance_weight * (max_served - mean_served))


def _check_load(load_lge, num_layers: int, num_ranks: int, num_experts: int) -> np.ndarray:
    load = np.asarray(load_lge, dtype=np.float64)
    if load.shape != (num_layers, num_ranks, num_experts):
        raise PlacementError(
            f"load must be [num_layers={num_layers}, num_ranks={num_ranks}, num_experts={num_experts}], "
            f"got {load.shape}"
        )
    if not np.all(np.isfinite(load)) or (load < 0).any():
        raise PlacementError("load must be finite and >= 0")
    return load


def _layer_objective(load_ge: np.ndarray, home_e: np.ndarray, balance_weight: float) -> float:
    held = np.zeros_like(load_ge, bool)
    held[home_e, np.arange(home_e.size)] = True
    served = _served(load_ge, held)
    return float(np.where(held, 0.0, load_ge).sum() + balance_weight * (served.max() - served.mean()))


def _max_excluding_pair(served_g: np.ndarray) -> np.ndarray:
    """[G, G]: largest served load among ranks other than a and b (-inf when none is left)."""
    g = served_g.size
    top = np.argsort(-served_g, kind="stable")[:3]
    a, b = np.arange(g)[:, None], np.arange(g)[None, :]
    out = np.full((g, g), -np.inf)
    for r in top[::-1]:  # the largest rank not excluded wins: assign from the third largest up
        out = np.where((a != r) & (b != r), served_g[r], out)
    return out


def _greedy_homes(load_ge: np.ndarray, capacity_g: np.ndarray) -> np.ndarray:
    """Each expert to the rank that uses it most, experts with the largest regret first, within capacity."""
    g, e = load_ge.shape
    order_ranks = np.argsort(-load_ge, axis=0, kind="stable")  # [G, E] ranks by preference per expert
    best = np.take_along_axis(load_ge, order_ranks[:1], 0)[0]
    second = np.take_along_axis(load_ge, order_ranks[1:2], 0)[0] if g > 1 else np.zeros(e)
    free = capacity_g.copy()
    home = np.empty(e, np.int32)
    for expert in np.argsort(-(best - second), kind="stable"):
        for rank in order_ranks[:, expert]:
            if free[rank] > 0:
                home[expert] = rank
                free[rank] -= 1
                break
    return home


def _swap_search(load_ge: np.ndarray, home_e: np.ndarray, balance_weight: float, max_swaps: int) -> np.ndarray:
    """Best-improvement search over swaps of two experts' homes (keeps every rank's expert count)."""
    g, e = load_ge.shape
    home = home_e.copy()
    total = load_ge.sum(0)  # [E]
    idx = np.arange(e)
    for _ in range(max_swaps):
        own = load_ge[home, idx]  # [E] load of each expert's home on it
        remote = float(total.sum() - own.sum())
        served = np.bincount(home, weights=total - own, minlength=g)  # [G]
        # Swap e (home a) with f (home b): e moves to b, f moves to a.
        a, b = home[:, None], home[None, :]
        d_remote = (own[:, None] - load_ge[b, idx[:, None]]) + (own[None, :] - load_ge[a, idx[None, :]])
        new_a = served[a] - (total[:, None] - own[:, None]) + (total[None, :] - load_ge[a, idx[None, :]])
        new_b = served[b] - (total[None, :] - own[None, :]) + (total[:, None] - load_ge[b, idx[:, None]])
        others = _max_excluding_pair(served)
        new_max = np.maximum(np.maximum(new_a, new_b), others[a, b])
        new_mean = (served.sum() + d_remote) / g
        new_obj = remote + d_remote + balance_weight * (new_max - new_mean)
        new_obj[a == b] = np.inf
        cur = remote + balance_weight * (served.max() - served.mean())
        i, j = np.unravel_index(np.argmin(new_obj), new_obj.shape)
        if not new_obj[i, j] < cur - 1e-9 * max(1.0, abs(cur)):
            break
        home[i], home[j] = home[j], home[i]
    return home


def optimize_placement(
    load_lge: np.ndarray,
    num_ranks: int,
    *,
    replica_budget: int = 0,
    balance_weight: float = 1.0,
    max_swaps: int | None = None,
) -> Placement:
    """Places experts to cut expected remote traffic and balance what each rank serves.

    load_lge: [num_layers, num_ranks, num_experts] >= 0, recorded load of each rank on each expert (e.g. summed
      `RouterStats` counts, or per-step use probabilities); layers are optimized independently.
    replica_budget: extra expert slots per rank per layer for redundant copies; each rank fills them with the
      experts it lacks and uses most.
    balance_weight: weight of (max - mean) served load against total remote load in the objective.
    max_swaps: cap on improving swaps per layer (default 4 * num_experts).

    Every rank gets the contiguous split's expert count (E//G or E//G+1) plus `replica_budget` replicas. Homes
    come from a regret-ordered greedy assignment refined by swap search, and also from contiguous refined the
    same way; the better is kept, so the result never costs more than the contiguous placement.
    """
    load_lge = np.asarray(load_lge, dtype=np.float64)
    if load_lge.ndim != 3:
        raise PlacementError(f"load must be [num_layers, num_ranks, num_experts], got shape {load_lge.shape}")
    num_layers, _, num_experts = load_lge.shape
    load_lge = _check_load(load_lge, num_layers, num_ranks, num_experts)
    if replica_budget < 0 or replica_budget > num_experts - -(-num_experts // num_ranks):
        raise PlacementError(f"replica_budget={replica_budget} out of range for {num_experts} experts")
    max_swaps = 4 * num_experts if max_swaps is None else max_swaps
    contiguous = Placement.contiguous(num_layers, num_experts, num_ranks)
    capacity = np.bincount(contiguous.home_le[0], minlength=num_ranks)
    homes = np.empty((num_layers, num_experts), np.int32)
    replicas = []
    for layer in range(num_layers):
        load = load_lge[layer]
        candidates = [
            _swap_search(load, _greedy_homes(load, capacity), balance_weight, max_swaps),
            _swap_search(load, contiguous.home_le[layer], balance_weight, max_swaps),
        ]
        costs = [_layer_objective(load, h, balance_weight) for h in candidates]
        homes[layer] = candidates[int(np.argmin(costs))]
        extra: list[list[int]] = [[] for _ in range(num_experts)]
        if replica_budget:
            for rank in range(num_ranks):
                lacking = np.flatnonzero(homes[layer] != rank)
                hottest = lacking[np.argsort(-load[rank, lacking], kind="stable")[:replica_budget]]
                for expert in hottest:
                    extra[expert].append(rank)
        replicas.append(tuple(tuple(r) for r in extra))
    return Placement(
        num_ranks=num_ranks,
        home_le=homes,
        replicas=tuple(replicas) if replica_budget else (),
        max_experts_per_rank=int(capacity.max()) + replica_budget,
    )

