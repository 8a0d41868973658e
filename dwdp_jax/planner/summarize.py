"""Offline summary of recorded router traces: how skewed is the expert load, per layer and per rank.

    python -m dwdp_jax.planner.summarize TRACE.npz [TRACE.npz ...] [--plot heatmap.png] [--json summary.json]

TRACE files are `RouterStats.save` outputs (one per rank, or any mix); they are concatenated. Per layer: entropy
of the expert load (bits, and as a fraction of log2 E: 1.0 is uniform), max/mean expert load, coefficient of
variation (std/mean) and the top-5 experts with their shares. Per rank: tokens, mean over layers of its own
max/mean expert load, and its share of all tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Sequence

import numpy as np

from dwdp_jax.planner.placement import Placement, optimize_placement, placement_cost
from dwdp_jax.planner.stats import Trace


@dataclasses.dataclass(frozen=True)
class LayerSummary:
    """Load statistics of one layer over all ranks and steps; `hot` is ((expert, share), ...) largest first."""

    layer: int
    routed: int  # routed (token, expert) slots
    entropy_bits: float
    entropy_frac: float  # entropy / log2(num_experts)
    max_over_mean: float
    cv: float
    hot: tuple[tuple[int, float], ...]


@dataclasses.dataclass(frozen=True)
class RankSummary:
    rank: int
    routed: int
    max_over_mean: float  # mean over layers of this rank's max/mean expert load
    token_share: float  # this rank's routed slots / all ranks'


@dataclasses.dataclass(frozen=True, eq=False)
class TraceSummary:
    """share_le: [num_layers, num_experts] routed share per layer (rows sum to 1, or 0 for unseen layers)."""

    layers: tuple[LayerSummary, ...]
    ranks: tuple[RankSummary, ...]
    share_le: np.ndarray
    num_steps: int

    @property
    def rank_imbalance(self) -> float:
        """Max / mean routed slots over ranks (1.0 when balanced)."""
        routed = np.array([r.routed for r in self.ranks], np.float64)
        return float(routed.max() / routed.mean()) if routed.size and routed.mean() > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "num_steps": self.num_steps,
            "rank_imbalance": self.rank_imbalance,
            "layers": [dataclasses.asdict(s) for s in self.layers],
            "ranks": [dataclasses.asdict(s) for s in self.ranks],
        }


def _entropy_bits(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def _max_over_mean(c: np.ndarray) -> float:
    m = c.mean()
    return float(c.max() / m) if m > 0 else 0.0


def summarize(trace: Trace, top: int = 5) -> TraceSummary:
    """Summarizes `trace` (see the module docstring)."""
    if trace.num_records == 0:
        raise ValueError("empty trace")
    load = trace.load_lge()  # [L, G, E]
    per_layer = load.sum(1)  # [L, E]
    num_experts = trace.num_experts
    totals = per_layer.sum(1, keepdims=True)
    share = np.divide(per_layer, totals, out=np.zeros_like(per_layer), where=totals > 0)
    layers = []
    for l, (c, p) in enumerate(zip(per_layer, share, strict=True)):
        order = np.argsort(-c, kind="stable")[:top]
        h = _entropy_bits(p)
        layers.append(
            LayerSummary(
                layer=l,
                routed=int(c.sum()),
                entropy_bits=h,
                entropy_frac=h / np.log2(num_experts) if num_experts > 1 else 1.0,
                max_over_mean=_max_over_mean(c),
                cv=float(c.std() / c.mean()) if c.mean() > 0 else 0.0,
                hot=tuple((int(e), float(p[e])) for e in order),
            )
        )
    all_routed = load.sum()
    ranks = []
    for r in range(load.shape[1]):
        seen = [l for l in range(load.shape[0]) if load[l, r].sum() > 0]
        ranks.append(
            RankSummary(
                rank=r,
                routed=int(load[:, r].sum()),
                max_over_mean=float(np.mean([_max_over_mean(load[l, r]) for l in seen])) if seen else 0.0,
                token_share=float(load[:, r].sum() / all_routed) if all_routed > 0 else 0.0,
            )
        )
    return TraceSummary(tuple(layers), tuple(ranks), share, int(np.unique(trace.step).size))


def format_table(summary: TraceSummary) -> str:
    """The summary as fixed-width text tables."""
    lines = [
        f"{'layer':>5} {'routed':>10} {'entropy_bits':>12} {'entropy_frac':>12} {'max/mean':>9} {'cv':>6}"
        "  hot experts (share)"
    ]
    for s in summary.layers:
        hot = " ".join(f"{e}({p:.3f})" for e, p in s.hot)
        lines.append(
            f"{s.layer:>5} {s.routed:>10} {s.entropy_bits:>12.3f} {s.entropy_frac:>12.3f} {s.max_over_mean:>9.2f}"
            f" {s.cv:>6.2f}  {hot}"
        )
    lines.append("")
    lines.append(f"{'rank':>5} {'routed':>10} {'max/mean':>9} {'token_share':>11}")
    for r in summary.ranks:
        lines.append(f"{r.rank:>5} {r.routed:>10} {r.max_over_mean:>9.2f} {r.token_share:>11.3f}")
    lines.append(f"steps: {summary.num_steps}   rank imbalance (max/mean routed): {summary.rank_imbalance:.3f}")
    return "\n".join(lines)


def plot_heatmap(summary: TraceSummary, path: str):
    """Writes a layer x expert heatmap of the routed share to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_layers, num_experts = summary.share_le.shape
    fig, ax = plt.subplots(figsize=(min(16, 2 + num_experts / 16), min(12, 1.5 + num_layers / 4)))
    im = ax.imshow(summary.share_le, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"routed share per expert ({summary.num_steps} steps)")
    fig.colorbar(im, ax=ax, label="share of routed tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dwdp_jax.planner.summarize", description=__doc__.split("\n")[0])
    parser.add_argument("traces", nargs="+", help="RouterStats .npz files")
    parser.add_argument("--plot", help="write a layer x expert heatmap PNG here")
    parser.add_argument("--json", help="write the summary as JSON here")
    parser.add_argument("--top", type=int, default=5, help="hot experts listed per layer")
    parser.add_argument("--placement_out", help="optimize an expert placement on the traces' load and save it here "
                        "(for the launcher's or the converter's --placement)")
    parser.add_argument("--group_size", type=int, default=0, help="--placement_out: ranks (default: the traces')")
    parser.add_argument("--replicas", type=int, default=0, help="--placement_out: replica slots per rank per layer")
    args = parser.parse_args(argv)
    trace = Trace.load(args.traces)
    if args.placement_out:
        g = args.group_size or trace.num_ranks
        load = trace.load_lge(num_ranks=max(g, trace.num_ranks))[:, :g]
        placement = optimize_placement(load, g, replica_budget=args.replicas)
        placement.save(args.placement_out)
        cost, base = placement_cost(placement, load), placement_cost(Placement.contiguous(*load.shape[::2], g), load)
        print(f"placement for {g} ranks -> {args.placement_out}: remote load {cost.remote:.0f} "
              f"(contiguous {base.remote:.0f})")
    summary = summarize(trace, top=args.top)
    print(format_table(summary))
    if args.plot:
        plot_heatmap(summary, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary.to_dict(), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
