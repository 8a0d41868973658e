"""Fetch backends: how a rank copies a peer's expert buffer into its own staging buffer.

A backend is a callable `fetch(src: ExpertWeights on a peer device, device) -> ExpertWeights on device` that
returns at once (the copy proceeds asynchronously; the consumer program waits for it on the device).
"""

from __future__ import annotations

from typing import Protocol

import jax

from dwdp_jax.experts import ExpertWeights


class FetchBackend(Protocol):
    def __call__(self, src: ExpertWeights, device: jax.Device) -> ExpertWeights: ...


class DevicePutFetch:
    """Peer-to-peer copy through PJRT (`jax.device_put` of a committed array to another device).

    On GPUs this is a copy-engine DMA over NVLink; on CPU it is a memcpy between simulated devices. It
    overlaps the destination's compute only when dispatched before that compute (device-facts.md), which
    is why the DWDP loop issues layer l+depth's fetch before dispatching layer l.
    """

    name = "device_put"

    def __call__(self, src: ExpertWeights, device: jax.Device) -> ExpertWeights:
        return jax.device_put(src, device)


class CachedFetch:
    """Measurement baseline, not a strategy: copies each peer buffer once, then returns the same staged copy
    on every later call. A forward pass then runs the exact DWDP programs with no copy traffic: the time
    difference to a real backend is the fetch time the prefetch failed to hide."""

    name = "cached"

    def __init__(self, inner: FetchBackend | None = None):
        self.inner = inner or DevicePutFetch()
        self.cache: dict = {}

    def __call__(self, src: ExpertWeights, device: jax.Device) -> ExpertWeights:
        key = (id(src.w_gate_up), device)
        if key not in self.cache:
            self.cache[key] = (src, self.inner(src, device))  # keep src alive so its id stays unique
        return self.cache[key][1]
