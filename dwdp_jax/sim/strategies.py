"""The two strategies of the simulator (`simulator.py`): DWDP and DEP over a group of G ranks.

`DWDPConfig`: experts split over the group and prefetched from peers, with the measured slowdowns of compute and
copies running side by side (`COPY_ENGINE_SLOWDOWN`, `DEVICE_PUT_SLOWDOWN`); `DEPConfig`: experts split over the
group, tokens dispatched and combined by an all-to-all per MoE layer.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from dwdp_jax.sim.hardware import AllToAll


# Compute and copy slow each other down by this factor while both run: fitted on our DWDP step with the
# copy-engine fetch (validate.fit_copy_engine_slowdown, dwdp-20261122-nvidia-h200-x2.json at 8192 tokens/rank).
COPY_ENGINE_SLOWDOWN = 0.0961
# The same for device_put copies issued before the compute (validate.probe4_default_slowdown, device-facts probe 4).
DEVICE_PUT_SLOWDOWN = 0.232


@dataclasses.dataclass(frozen=True)
class DWDPConfig:
    """DWDP: each rank holds E/G routed experts per MoE layer and prefetches the rest from its G-1 peers.

    While a copy is in flight compute runs `1 + compute_slowdown` times slower, and a copy `1 + copy_slowdown`
    times slower while compute runs (memory and SM contention); both default to the measured value of the
    default fetch backend (COPY_ENGINE_SLOWDOWN).
    """

    group_size: int = 4
    prefetch_depth: int = 1  # layer l+d's fetch may start once layer l's compute starts; d+1 staging buffers
    schedule: Literal["staggered", "same_order"] = "staggered"
    fetch_frac: float | None = 1.0  # experts prefetched / all experts; None: the expected routed set (planner)
    # The paper's layout (TensorRT-LLM's num_prefetch_experts): p experts pulled from each peer per MoE layer,
    # E - (G-1) p held locally (replicas when p < E/G); overrides fetch_frac.
    prefetch_per_peer: int | None = None
    miss_rate: float = 0.0  # routed remote experts not prefetched, pulled on the critical path
    fetch_backend: Literal["copy_engine", "device_put"] = "copy_engine"  # Hardware.copy_engine / device_put
    compute_slowdown: float = COPY_ENGINE_SLOWDOWN
    copy_slowdown: float = COPY_ENGINE_SLOWDOWN

    def __post_init__(self):
        if self.group_size < 1 or self.prefetch_depth < 1:
            raise ValueError("group_size and prefetch_depth must be >= 1")
        if self.schedule not in ("staggered", "same_order"):
            raise ValueError(f"schedule must be 'staggered' or 'same_order', got {self.schedule!r}")
        if self.fetch_backend not in ("copy_engine", "device_put"):
            raise ValueError(f"fetch_backend must be 'copy_engine' or 'device_put', got {self.fetch_backend!r}")
        if self.fetch_frac is not None and not 0 <= self.fetch_frac <= 1:
            raise ValueError("fetch_frac must be in [0, 1] or None")
        if not 0 <= self.miss_rate <= 1 or self.compute_slowdown < 0 or self.copy_slowdown < 0:
            raise ValueError("miss_rate must be in [0, 1]; slowdowns must be >= 0")
        if self.prefetch_per_peer is not None and self.prefetch_per_peer < 0:
            raise ValueError("prefetch_per_peer must be >= 0 or None")

    name = "dwdp"


@dataclasses.dataclass(frozen=True)
class DEPConfig:
    """DEP: attention data-parallel, experts split over the group, dispatch and combine all-to-all per MoE layer."""

    group_size: int = 4
    dispatch_bytes: float = 2.0  # per activation element (bf16; 1.0 for FP8 dispatch)
    combine_bytes: float = 2.0
    # Rows a rank sends to each peer, in units of the mean (tokens * top_k / G): None sends exactly the routed
    # rows; ours (dwdp_jax/parallel/dep.py) sends a fixed-capacity buffer, padded, of this many times the mean.
    capacity_factor: float | None = None
    all_to_all: AllToAll | None = None  # None: the hardware's (Hardware.all_to_all); else an implementation's own
    per_rank_rows: bool = False  # send a token once per destination rank (dedicated all-to-all kernels), not per
    #                              routed expert (ours)

    def __post_init__(self):
        if self.group_size < 1:
            raise ValueError("group_size must be >= 1")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError("capacity_factor must be > 0 or None")

    name = "dep"


Strategy = DWDPConfig | DEPConfig
