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
