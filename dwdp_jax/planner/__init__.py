"""Planner: where experts live (`placement`), what the router did (`stats`), what to prefetch (`policies`),
synthetic routing skew for random-weight runs (`skew`), and an offline trace summary (`summarize`).

Host-side numpy only; the engine hands in arrays and gets plans back. `skew` uses jax to run the real router.
"""

from dwdp_jax.planner.placement import (
    Placement,
    PlacementCost,
    PlacementError,
    optimize_placement,
    placement_cost,
)
from dwdp_jax.planner.policies import (
    Accounting,
    FetchPlan,
    FetchPolicy,
    SourceSchedule,
    account,
    hit_probability,
    plan_fetch,
    source_schedule,
)
from dwdp_jax.planner.stats import RouterStats, Trace

__all__ = [
    "Accounting",
    "FetchPlan",
    "FetchPolicy",
    "Placement",
    "PlacementCost",
    "PlacementError",
    "RouterStats",
    "SourceSchedule",
    "Trace",
    "account",
    "hit_probability",
    "optimize_placement",
    "placement_cost",
    "plan_fetch",
    "source_schedule",
]
