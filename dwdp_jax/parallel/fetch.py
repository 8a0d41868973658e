"""Fetch backends: how a rank copies a peer's expert buffer into its own staging buffer.

A backend has three calls, all made from the destination rank's host thread:
  * `fetch(src, device) -> staged`: start copying `src` (an `ExpertWeights` on a peer) to `device`; returns
    at once.
  * `ready(staged) -> ExpertWeights`: the staged weights, safe to hand to the next program dispatched on
    `device` (a backend that copies outside XLA's view makes the host wait for its copy here).
  * `consumed(staged, output)`: the program that read `staged` produced `output`; a backend that reuses
    staging memory must not overwrite it before `output` is ready.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from dwdp_jax.experts import ExpertWeights

_FIELDS = ("w_gate_up", "w_down", "s_gate_up", "s_down")


class FetchBackend:
    """Base: staged weights are ordinary jax.Arrays whose readiness XLA tracks."""

    name = "base"

    def __call__(self, src: ExpertWeights, device: jax.Device):
        raise NotImplementedError

    def ready(self, staged) -> ExpertWeights:
        return staged

    def consumed(self, staged, output) -> None:
        pass


class DevicePutFetch(FetchBackend):
    """Peer-to-peer copy through PJRT (`jax.device_put` of a committed array to another device).

    On GPUs a copy-engine DMA over NVLink; on CPU a memcpy between simulated devices. Measured caveat
    (WORKSPACE.md): PJRT orders the copy after the work already queued on the *source* device, so a rank
    pulling from a busy peer waits for that peer's compute: ranks are coupled through their fetches.
    """

    name = "device_put"

    def __call__(self, src: ExpertWeights, device: jax.Device) -> ExpertWeights:
        return jax.device_put(src, device)


class CachedFetch(FetchBackend):
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


class CopyEnginePull(FetchBackend):
    """Pull with cudaMemcpyPeerAsync (CuPy) on a non-blocking stream of the *destination* GPU.

    The copy engine reads the peer's memory without any ordering on the peer's streams, so a busy peer
    does not delay the pull. Staged weights live in a ring of `slots` preallocated buffers per (device,
    fetch position); before a slot is overwritten the host waits for the output of the program that last
    read it, and before a program reads a slot the host waits for the slot's copy (CUDA event). GPU only.
    """

    name = "copy_engine"

    def __init__(self, slots: int = 3):
        import cupy  # noqa: F401  (fail early off-GPU)

        self.slots = slots
        self._rings: dict = {}
        self._calls: dict = {}
        self._streams: dict = {}
        self._peer_enabled: set = set()

    def _stream(self, device):
        import cupy as cp

        if device.id not in self._streams:
            with cp.cuda.Device(device.id):
                self._streams[device.id] = cp.cuda.Stream(non_blocking=True)
        return self._streams[device.id]

    def _enable_peer(self, dst: int, src: int):
        import cupy as cp

        if (dst, src) not in self._peer_enabled:
            with cp.cuda.Device(dst):
                try:
                    cp.cuda.runtime.deviceEnablePeerAccess(src)
                except cp.cuda.runtime.CUDARuntimeError:
                    pass  # already enabled
            self._peer_enabled.add((dst, src))

    def __call__(self, src: ExpertWeights, device: jax.Device):
        import cupy as cp

        src_dev = next(iter(src.w_gate_up.devices()))
        self._enable_peer(device.id, src_dev.id)
        key = (device.id, src_dev.id, src.w_gate_up.shape)
        n = self._calls.get(key, 0)
        self._calls[key] = n + 1
        ring = self._rings.setdefault(key, [None] * self.slots)
        slot = n % self.slots
        if ring[slot] is None:
            with jax.default_device(device):
                bufs = {f: jnp.zeros_like(getattr(src, f), device=device) for f in _FIELDS if getattr(src, f) is not None}
            jax.block_until_ready(bufs)
            ring[slot] = [bufs, None]
        bufs, last_output = ring[slot]
        if last_output is not None:
            jax.block_until_ready(last_output)  # the previous reader of this slot has finished
        stream = self._stream(device)
        with cp.cuda.Device(device.id):
            for f, dst in bufs.items():
                s = getattr(src, f)
                cp.cuda.runtime.memcpyPeerAsync(dst.unsafe_buffer_pointer(), device.id, s.unsafe_buffer_pointer(),
                                                src_dev.id, s.size * s.dtype.itemsize, stream.ptr)
            event = stream.record()
        staged = ExpertWeights(bufs["w_gate_up"], bufs["w_down"], bufs.get("s_gate_up"), bufs.get("s_down"), src.block)
        return (key, slot, staged, event)

    def ready(self, staged) -> ExpertWeights:
        _, _, weights, event = staged
        event.synchronize()
        return weights

    def consumed(self, staged, output) -> None:
        key, slot, _, _ = staged
        self._rings[key][slot][1] = output


def copy_engine_gbps(devices, nbytes=2 << 30, repeats=5) -> float:
    """Per-GPU bandwidth of cudaMemcpyPeerAsync with every GPU pulling from its next peer at once."""
    import cupy as cp

    g = len(devices)
    ids = [d.id for d in devices]
    bufs, streams = [], []
    for i in ids:
        with cp.cuda.Device(i):
            for j in ids:
                if j != i:
                    try:
                        cp.cuda.runtime.deviceEnablePeerAccess(j)
                    except cp.cuda.runtime.CUDARuntimeError:
                        pass
            bufs.append((cp.empty(nbytes, cp.uint8), cp.ones(nbytes, cp.uint8)))
            streams.append(cp.cuda.Stream(non_blocking=True))
    times = []
    for _ in range(repeats + 1):
        for i in ids:
            cp.cuda.Device(i).synchronize()
        t0 = time.perf_counter()
        for r, i in enumerate(ids):
            src_rank = (r + 1) % g
            with cp.cuda.Device(i):
                cp.cuda.runtime.memcpyPeerAsync(bufs[r][0].data.ptr, i, bufs[src_rank][1].data.ptr, ids[src_rank],
                                                nbytes, streams[r].ptr)
        for r, i in enumerate(ids):
            streams[r].synchronize()
        times.append(time.perf_counter() - t0)
    del bufs
    return nbytes / statistics.median(times[1:]) / 1e9
