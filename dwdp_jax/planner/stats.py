"""Router statistics of one rank: decayed per-expert token counts for prediction, and a trace for offline study.

The engine computes each MoE layer's histogram on the device (`routing.expert_histogram`), reads it back to the
host asynchronously, and hands the numpy array to `RouterStats.update`. Nothing here touches a device.

Decay: `decayed[l] <- decay**(step - last_step[l]) * decayed[l] + counts`, so a count seen n steps ago weighs
`decay**n`; several updates of one layer within a step add up (micro-batches). The effective memory is about
`1 / (1 - decay)` steps.

Files are `.npz` written with `allow_pickle=False`: arrays `rank`, `step`, `layer` [N] and `counts` [N, E] for
the trace, plus the decayed state; `Trace.load` reads one file or concatenates several (e.g. one per rank).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

_FORMAT = 1


@dataclasses.dataclass(frozen=True, eq=False)
class Trace:
    """Per-(rank, step, layer) expert token counts.

    rank, step, layer: [N] int64; counts: [N, num_experts] int64 (tokens routed to each expert, top-k slots).
    """

    rank: np.ndarray
    step: np.ndarray
    layer: np.ndarray
    counts: np.ndarray

    def __post_init__(self):
        n = len(self.rank)
        if not (len(self.step) == len(self.layer) == n) or self.counts.ndim != 2 or self.counts.shape[0] != n:
            raise ValueError(
                f"trace arrays disagree: rank {len(self.rank)}, step {len(self.step)}, layer {len(self.layer)}, "
                f"counts {self.counts.shape}"
            )

    @property
    def num_records(self) -> int:
        return len(self.rank)

    @property
    def num_experts(self) -> int:
        return self.counts.shape[1]

    @property
    def num_layers(self) -> int:
        return int(self.layer.max()) + 1 if self.num_records else 0

    @property
    def num_ranks(self) -> int:
        return int(self.rank.max()) + 1 if self.num_records else 0

    def load_lge(self, num_layers: int | None = None, num_ranks: int | None = None) -> np.ndarray:
        """[num_layers, num_ranks, num_experts] float64: counts summed over steps (input of `optimize_placement`)."""
        num_layers = self.num_layers if num_layers is None else num_layers
        num_ranks = self.num_ranks if num_ranks is None else num_ranks
        out = np.zeros((num_layers, num_ranks, self.num_experts))
        np.add.at(out, (self.layer, self.rank), self.counts)
        return out

    def use_frequency_lge(self, num_layers: int | None = None, num_ranks: int | None = None) -> np.ndarray:
        """[num_layers, num_ranks, num_experts]: fraction of a rank's recorded steps in which it routed any token
        to the expert, i.e. how often selective prefetch needs it (the better `optimize_placement` input when
        policies fetch only what is used)."""
        num_layers = self.num_layers if num_layers is None else num_layers
        num_ranks = self.num_ranks if num_ranks is None else num_ranks
        used = np.zeros((num_layers, num_ranks, self.num_experts))
        records = np.zeros((num_layers, num_ranks))
        np.add.at(used, (self.layer, self.rank), self.counts > 0)
        np.add.at(records, (self.layer, self.rank), 1)
        return np.divide(used, records[..., None], out=np.zeros_like(used), where=records[..., None] > 0)

    @classmethod
    def concat(cls, traces: Sequence["Trace"]) -> "Trace":
        if not traces:
            raise ValueError("concat needs at least one trace")
        widths = {t.num_experts for t in traces}
        if len(widths) > 1:
            raise ValueError(f"traces have different expert counts: {sorted(widths)}")
        return cls(*(np.concatenate([getattr(t, f) for t in traces]) for f in ("rank", "step", "layer", "counts")))

    @classmethod
    def load(cls, paths: str | os.PathLike | Sequence[str | os.PathLike]) -> "Trace":
        """Reads the trace part of one or several `RouterStats.save` files."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        parts = []
        for path in paths:
            with np.load(path, allow_pickle=False) as z:
                parts.append(cls(z["rank"], z["step"], z["layer"], z["counts"]))
        return cls.concat(parts)


class RouterStats:
    """Expert-load statistics of one rank over all MoE layers (mutable accumulator; host numpy only).

    rank: this rank's id; num_layers: MoE layers (placement layer index); num_experts: routed experts.
    decay: per-step decay of the counts in (0, 1]; 1.0 keeps plain running sums.
    prior_count: pseudo-count added to every expert in `predicted_share` (so unseen experts keep a small share).
    record_trace: keep every update in the trace (memory: 8 * num_experts bytes per update).
    """

    def __init__(
        self,
        rank: int,
        num_layers: int,
        num_experts: int,
        *,
        decay: float = 0.9,
        prior_count: float = 1.0,
        record_trace: bool = True,
    ):
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        if prior_count < 0:
            raise ValueError(f"prior_count must be >= 0, got {prior_count}")
        if num_layers < 1 or num_experts < 1 or rank < 0:
            raise ValueError("rank must be >= 0, num_layers and num_experts >= 1")
        self.rank = int(rank)
        self.num_layers = int(num_layers)
        self.num_experts = int(num_experts)
        self.decay = float(decay)
        self.prior_count = float(prior_count)
        self.record_trace = record_trace
        self.step = 0
        self.decayed_le = np.zeros((num_layers, num_experts))  # as of last_step_l
        self.last_step_l = np.zeros(num_layers, np.int64)
        self._records: list[tuple[int, int, np.ndarray]] = []  # (step, layer, counts)

    def update(self, layer: int, counts: np.ndarray):
        """Adds one layer's histogram for the current step: counts [num_experts] >= 0 (host array)."""
        counts = np.asarray(counts)
        if counts.shape != (self.num_experts,):
            raise ValueError(f"counts must have shape ({self.num_experts},), got {counts.shape}")
        self.update_layers([layer], counts[None])

    def update_layers(self, layers, counts: np.ndarray):
        """Adds the current step's histograms of several distinct layers at once: layers [n], counts [n, num_experts]
        >= 0 (a DWDP rank's step stacks every MoE layer's: one numpy pass instead of one per layer)."""
        layers = np.asarray(layers, np.int64).reshape(-1)
        counts = np.asarray(counts)
        bad = layers[(layers < 0) | (layers >= self.num_layers)]
        if bad.size:
            raise ValueError(f"layer {int(bad[0])} not in [0, {self.num_layers})")
        if len(np.unique(layers)) != len(layers):
            raise ValueError(f"layers must be distinct, got {layers.tolist()}")
        if counts.shape != (len(layers), self.num_experts):
            raise ValueError(f"counts must have shape ({len(layers)}, {self.num_experts}), got {counts.shape}")
        if (counts < 0).any():
            raise ValueError("counts must be >= 0")
        elapsed = self.step - self.last_step_l[layers]
        self.decayed_le[layers] = (self.decay**elapsed)[:, None] * self.decayed_le[layers] + counts
        self.last_step_l[layers] = self.step
        if self.record_trace:
            copied = counts.astype(np.int64, copy=True)
            self._records.extend((self.step, int(layer), row) for layer, row in zip(layers, copied))

    def next_step(self):
        """Ends the current step: later updates count one step newer."""
        self.step += 1

    def decayed_counts(self, layer: int) -> np.ndarray:
        """[num_experts] decayed counts as of the current step."""
        return self.decay ** (self.step - self.last_step_l[layer]) * self.decayed_le[layer]

    def predicted_share(self, layer: int) -> np.ndarray:
        """[num_experts] float64 summing to 1: predicted share of this rank's routed tokens going to each expert.

        (decayed counts + prior_count) normalized; uniform before any data (or with everything decayed to 0 and
        no prior).
        """
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} not in [0, {self.num_layers})")
        c = self.decayed_counts(layer) + self.prior_count
        total = c.sum()
        return c / total if total > 0 else np.full(self.num_experts, 1.0 / self.num_experts)

    @property
    def trace(self) -> Trace:
        n = len(self._records)
        counts = np.stack([r[2] for r in self._records]) if n else np.zeros((0, self.num_experts), np.int64)
        return Trace(
            rank=np.full(n, self.rank, np.int64),
            step=np.array([r[0] for r in self._records], np.int64),
            layer=np.array([r[1] for r in self._records], np.int64),
            counts=counts,
        )

    def save(self, path: str | os.PathLike):
        """Writes trace and state to `path` (.npz, no pickle)."""
        t = self.trace
        with open(path, "wb") as f:
            np.savez(
                f,
                format=np.int64(_FORMAT),
                rank=t.rank,
                step=t.step,
                layer=t.layer,
                counts=t.counts,
                this_rank=np.int64(self.rank),
                current_step=np.int64(self.step),
                decay=np.float64(self.decay),
                prior_count=np.float64(self.prior_count),
                decayed_le=self.decayed_le,
                last_step_l=self.last_step_l,
            )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RouterStats":
        with np.load(path, allow_pickle=False) as z:
            if int(z["format"]) != _FORMAT:
                raise ValueError(f"{path}: router stats format {int(z['format'])}, expected {_FORMAT}")
            decayed = z["decayed_le"]
            stats = cls(
                int(z["this_rank"]),
                decayed.shape[0],
                decayed.shape[1],
                decay=float(z["decay"]),
                prior_count=float(z["prior_count"]),
            )
            stats.step = int(z["current_step"])
            stats.decayed_le = decayed.astype(np.float64)
            stats.last_step_l = z["last_step_l"].astype(np.int64)
            records = zip(z["step"], z["layer"], z["counts"], strict=True)
            stats._records = [(int(s), int(layer), c.astype(np.int64)) for s, layer, c in records]
        return stats
