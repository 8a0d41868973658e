"""Fetch backends: how a rank copies a peer's expert buffer into its own staging buffer.

A backend has three calls, all made from the destination rank's host thread:
  * `fetch(src, device) -> staged`: start copying `src` (an `ExpertWeights` on a peer) to `device`; returns
    at once.
  * `ready(staged) -> ExpertWeights`: the staged weights, safe to hand to the next program dispatched on
    `device` (a backend that copies outside XLA's view makes the host wait for its copy here).
  * `consumed(staged, output)`: the program that read `staged` produced `output`; a backend that reuses
    staging memory must not overwrite it before `output` is ready.
  * `ready_all(handles) -> [ExpertWeights]`: `ready` of several handles (one device-side wait for a layer's
    peers where the backend can);
and, for the planner's partial fetches:
  * `subset(src, device, slots, into=None, offset=0) -> staged`: start copying the experts `src[slots]` into
    positions [offset, offset + len(slots)) of a staging buffer shaped like `src` (a new one, or `into`, a
    handle this backend returned for the same layer and peer: how on-demand misses join the prefetched
    experts). Staging keeps `src`'s full shape, so the programs that read it never recompile.

A peer in another process (`multiprocess.py`) hands out its buffers as `peer_memory.PeerArray`s (a pointer valid
in this process, mapped for the reading device); every backend reads them as it reads an in-process peer's
arrays: the copy engines from the pointer, the Pallas pull through the mapped view, `device_put` by
`PeerArray.take_to`.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np

from dwdp_jax.experts import ExpertWeights
from dwdp_jax.parallel.peer_memory import PeerArray, alias_device_memory, cuda_ordinal

_FIELDS = ("w_gate_up", "w_down", "s_gate_up", "s_down")


class FetchBackend:
    """Base: staged weights are ordinary jax.Arrays whose readiness XLA tracks."""

    name = "base"

    def __call__(self, src: ExpertWeights, device: jax.Device):
        raise NotImplementedError

    def subset(self, src: ExpertWeights, device: jax.Device, slots, into=None, offset: int = 0):
        raise NotImplementedError(f"{type(self).__name__} cannot fetch a subset of experts")

    def ready(self, staged) -> ExpertWeights:
        return staged

    def ready_all(self, handles) -> list[ExpertWeights]:
        return [self.ready(h) for h in handles]

    def sync(self, device: jax.Device) -> None:
        """Blocks the host until the copies handed out by `ready` on `device` have landed (a measurement aid:
        here the staged arrays are ordinary jax.Arrays, so `jax.block_until_ready` on them suffices)."""

    def consumed(self, staged, output) -> None:
        pass


@jax.jit
def _take_experts(src: ExpertWeights, slots) -> ExpertWeights:
    return jax.tree.map(lambda a: a[slots], src)


@jax.jit
def _put_experts(base: ExpertWeights, part: ExpertWeights, offset) -> ExpertWeights:
    return jax.tree.map(lambda b, p: jax.lax.dynamic_update_slice_in_dim(b, p, offset, 0), base, part)


def _zeros_like_on(src: ExpertWeights, device: jax.Device) -> ExpertWeights:
    """A zero staging buffer of `src`'s shapes on `device`."""
    return _map_fields(lambda a: jnp.zeros(a.shape, a.dtype, device=device), src)


def _map_fields(fn, src: ExpertWeights) -> ExpertWeights:
    """fn over the present fields of `src` (jax.Arrays or `PeerArray`s, which are no pytree leaves)."""
    return ExpertWeights(*(None if getattr(src, f) is None else fn(getattr(src, f)) for f in _FIELDS), src.block)


def _is_peer(src: ExpertWeights) -> bool:
    """Whether `src` is a peer's buffer in another process (fields are `PeerArray`s)."""
    return isinstance(src.w_gate_up, PeerArray)


def _source_device(a) -> jax.Device:
    """The device a copy reads from: a jax.Array's own, or the local device a peer process's buffer is mapped for."""
    return a.device if isinstance(a, PeerArray) else next(iter(a.devices()))


def _source_key(a) -> tuple:
    """Who a staging ring belongs to: one ring per source, so that each is used once per layer (a peer process's
    buffers are all mapped for the reading device, so their exporting rank tells them apart)."""
    return ("rank", a.source) if isinstance(a, PeerArray) else ("device", next(iter(a.devices())).id)


class DevicePutFetch(FetchBackend):
    """Peer-to-peer copy through PJRT (`jax.device_put` of a committed array to another device).

    On GPUs a copy-engine DMA over NVLink; on CPU a memcpy between simulated devices. Measured caveat
    (WORKSPACE.md): PJRT orders the copy after the work already queued on the *source* device, so a rank
    pulling from a busy peer waits for that peer's compute: ranks are coupled through their fetches.
    """

    name = "device_put"

    def __call__(self, src: ExpertWeights, device: jax.Device) -> ExpertWeights:
        if _is_peer(src):
            return _map_fields(lambda a: a.take_to(device), src)
        return jax.device_put(src, device)

    def subset(self, src, device, slots, into=None, offset=0) -> ExpertWeights:
        """Gathers src[slots] on the source device, moves exactly those bytes, writes them into staging."""
        base = into if into is not None else _zeros_like_on(src, device)
        if len(slots) == 0:
            return base
        if _is_peer(src):
            part = _map_fields(lambda a: a.take_to(device, list(slots)), src)
        else:
            part = jax.device_put(_take_experts(src, np.asarray(slots, np.int32)), device)
        return _put_experts(base, part, np.int32(offset))


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

    def subset(self, src, device, slots, into=None, offset=0):
        key = (id(src.w_gate_up), device, tuple(int(x) for x in slots), offset, None if into is None else id(into))
        if key not in self.cache:
            self.cache[key] = ((src, into), self.inner.subset(src, device, slots, into, offset))
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
        self._check_platform()
        self.slots = slots
        self._rings: dict = {}
        self._calls: dict = {}
        self._streams: dict = {}
        self._peer_enabled: set = set()

    def _check_platform(self) -> None:
        import cupy  # noqa: F401  (fail early off-GPU)

    def _stream(self, device):
        import cupy as cp

        if device.id not in self._streams:
            with cp.cuda.Device(cuda_ordinal(device)):
                self._streams[device.id] = cp.cuda.Stream(non_blocking=True)
        return self._streams[device.id]

    def _enable_peer(self, dst: int, src: int):
        if (dst, src) not in self._peer_enabled:
            enable_peer_access(dst, src)
            self._peer_enabled.add((dst, src))

    def __call__(self, src: ExpertWeights, device: jax.Device):
        return self.subset(src, device, range(src.num_experts))

    def _acquire(self, src: ExpertWeights, device: jax.Device, wait_reader: bool = True):
        """The next ring slot of staging buffers for (device, source, shape); with `wait_reader`, once the
        program that last read it is done (host wait)."""
        key = (device.id, _source_key(src.w_gate_up), src.w_gate_up.shape)
        n = self._calls.get(key, 0)
        self._calls[key] = n + 1
        ring = self._rings.setdefault(key, [None] * self.slots)
        slot = n % self.slots
        if ring[slot] is None:
            with jax.default_device(device):
                bufs = {f: jnp.zeros(getattr(src, f).shape, getattr(src, f).dtype, device=device)
                        for f in _FIELDS if getattr(src, f) is not None}
            jax.block_until_ready(bufs)
            ring[slot] = [bufs, None]
        bufs, last_output = ring[slot]
        if wait_reader and last_output is not None:
            jax.block_until_ready(last_output)  # the previous reader of this slot has finished
        staged = ExpertWeights(bufs["w_gate_up"], bufs["w_down"], bufs.get("s_gate_up"), bufs.get("s_down"), src.block)
        return key, slot, bufs, staged

    def _staging(self, src, device, into, wait_reader: bool = True):
        """(key, slot, buffers by field, staged weights): a fresh ring slot, or the one of handle `into`."""
        if into is None:
            return self._acquire(src, device, wait_reader)
        key, slot, staged, _ = into
        return key, slot, self._rings[key][slot][0], staged

    @staticmethod
    def _copy_list(src: ExpertWeights, bufs: dict, slots, offset: int) -> list[tuple[int, int, int]]:
        """(destination pointer, source pointer, bytes): one copy per field per run of consecutive source
        slots, src[slots] landing at staging positions offset, offset + 1, ..."""
        copies = []
        for first, start, length in _runs(list(slots), offset):
            for f, dst in bufs.items():
                a = getattr(src, f)
                row = (a.size // a.shape[0]) * a.dtype.itemsize  # bytes per expert
                copies.append((dst.unsafe_buffer_pointer() + start * row, a.unsafe_buffer_pointer() + first * row,
                               length * row))
        return copies

    def subset(self, src, device, slots, into=None, offset=0):
        """The copies of `_copy_list` as cudaMemcpyPeerAsync on the destination stream, then a CUDA event."""
        import cupy as cp

        src_dev = _source_device(src.w_gate_up)
        self._enable_peer(cuda_ordinal(device), cuda_ordinal(src_dev))
        key, slot, bufs, staged = self._staging(src, device, into)
        stream = self._stream(device)
        with cp.cuda.Device(cuda_ordinal(device)):
            for dst, source, n in self._copy_list(src, bufs, slots, offset):
                _copy_async(dst, device, source, src_dev, n, stream.ptr)
            event = stream.record()
        return (key, slot, staged, event)

    def ready(self, staged) -> ExpertWeights:
        _, _, weights, event = staged
        event.synchronize()
        return weights

    def consumed(self, staged, output) -> None:
        key, slot, _, _ = staged
        self._rings[key][slot][1] = output


class DeviceHook:
    """A program with no computation on one device: its only op is a `buffer_callback` that runs queued host
    actions when XLA reaches it in the device's stream of work, i.e. in dispatch order with the layer programs.

    On GPUs the callback runs while XLA enqueues the program and gets the device's compute stream (an int
    `cudaStream_t`), so an action can order CUDA work against the programs dispatched before and after it
    without the host waiting for the device. On CPU the callback runs when the device executes the program
    (actions get `None`), which is in dispatch order only with `jax_cpu_enable_async_dispatch=False`.
    """

    def __init__(self, device: jax.Device):
        from jax.experimental.buffer_callback import buffer_callback

        self.device = device
        self._actions: collections.deque = collections.deque()
        self._token = jax.device_put(np.zeros((), np.int32), device)
        gpu = device.platform == "gpu"
        actions = self._actions  # the callback must not hold `self` (no reference cycle through the jit cache)

        def run_actions(ctx, out, token):
            stream = ctx.stream if gpu else None
            for action in actions.popleft():
                action(stream)

        self._program = jax.jit(buffer_callback(run_actions, jax.ShapeDtypeStruct((), jnp.int32),
                                                has_side_effect=True))

    def run(self, *actions) -> jax.Array:
        """Dispatches the hook program; `actions` (callables of the stream) run in order when it is reached.
        Returns the program's (meaningless) output: ready once the device has passed this point."""
        self._actions.append(actions)
        return self._program(self._token)


class StreamOrderedPull(CopyEnginePull):
    """cudaMemcpyPeerAsync ordered on the device: no host wait anywhere on the step path.

    `CopyEnginePull` orders its copies with host waits (a slot's CUDA event before the program that reads
    it is dispatched; a slot's last reader before it is refilled), so once per MoE layer the host stops
    until the device catches up and loses its lead. Here both orders are made on the device, through
    `DeviceHook` programs dispatched in line with the layer programs:
      * `subset` (issue): record an event on the compute stream (it covers every program dispatched so
        far, among them the slot's last reader: the ring has more slots than the prefetch depth), make the
        copy stream wait for it, enqueue the copies on the copy stream, record `done` there;
      * `ready_all`: make the compute stream wait for each handle's `done`; the layer program dispatched
        next reads the staged weights.
    The copy engine does the copy (no SMs); the host only enqueues. Off GPU (tests on simulated CPU
    devices) the copies are host memmoves run when the device reaches the issue program, which needs
    `jax_cpu_enable_async_dispatch=False` to keep dispatch order; checked at construction.
    """

    name = "copy_engine_stream"

    def __init__(self, slots: int = 3, platform: str | None = None):
        self.platform = platform or jax.devices()[0].platform
        super().__init__(slots)
        self._hooks: dict = {}

    def _check_platform(self) -> None:
        if self.platform == "gpu":
            super()._check_platform()
        elif jax.config.values["jax_cpu_enable_async_dispatch"]:
            raise ValueError("StreamOrderedPull on CPU needs jax.config.update('jax_cpu_enable_async_dispatch', "
                             "False): CPU programs otherwise do not run in dispatch order")

    def _hook(self, device) -> DeviceHook:
        if device.id not in self._hooks:
            self._hooks[device.id] = DeviceHook(device)
        return self._hooks[device.id]

    def subset(self, src, device, slots, into=None, offset=0):
        """Dispatches the issue hook for the copies of src[slots] into staging (positions from `offset`)."""
        src_dev = _source_device(src.w_gate_up)
        key, slot, bufs, staged = self._staging(src, device, into, wait_reader=False)
        done = self._copy_on_device(device, src_dev, self._copy_list(src, bufs, slots, offset))
        # Keep the source and staging arrays alive until the copies are enqueued (they are: the ring and the
        # model hold them for the group's lifetime).
        return (key, slot, staged, done)

    def _copy_on_device(self, device, src_dev, copies):
        if self.platform != "gpu":
            def host_copy(_stream):
                for dst, src, n in copies:
                    ctypes.memmove(dst, src, n)

            self._hook(device).run(host_copy)
            return None
        import cupy as cp

        ordinal = cuda_ordinal(device)
        self._enable_peer(ordinal, cuda_ordinal(src_dev))
        copy_stream = self._stream(device)
        with cp.cuda.Device(ordinal):
            start = cp.cuda.Event(disable_timing=True)
            done = cp.cuda.Event(disable_timing=True)

        def issue(compute_stream):
            with cp.cuda.Device(ordinal):
                cp.cuda.runtime.eventRecord(start.ptr, compute_stream)
                copy_stream.wait_event(start)
                for dst, src, n in copies:
                    _copy_async(dst, device, src, src_dev, n, copy_stream.ptr)
                done.record(copy_stream)

        self._hook(device).run(issue)
        return done

    def ready(self, staged) -> ExpertWeights:
        return self.ready_all([staged])[0]

    def ready_all(self, handles) -> list[ExpertWeights]:
        """One wait hook for all handles: the compute stream waits for each copy's `done` event."""
        events = [h[3] for h in handles if h[3] is not None]
        if events:
            import cupy as cp

            def wait(compute_stream):
                for event in events:
                    cp.cuda.runtime.streamWaitEvent(compute_stream, event.ptr, 0)

            self._hook(self._device_of(handles[0])).run(wait)
        return [h[2] for h in handles]

    def sync(self, device: jax.Device) -> None:
        """Blocks until the device has passed every wait dispatched so far (so its copies have landed)."""
        self._hook(device).run().block_until_ready()

    def _device_of(self, handle) -> jax.Device:
        return next(iter(handle[2].w_gate_up.devices()))

    def consumed(self, staged, output) -> None:
        pass  # the next issue's compute-stream event covers this reader


def peer_view(a: jax.Array, device: jax.Device) -> jax.Array:
    """A jax.Array on `device` whose memory *is* `a`'s on a peer GPU (CUDA unified addressing, peer access
    enabled): a program on `device` that reads it reads the peer's bytes over NVLink, with no copy, no SPMD
    launch and no barrier. The view has `a`'s shape as unsigned ints of the same width (CuPy, which wraps the
    pointer for DLPack, has no bf16 or FP8); bitcast it back where it is read. It keeps `a` alive. GPU only;
    the peer must never write `a` while views are read (expert weights are immutable)."""
    src_dev = next(iter(a.devices()))
    enable_peer_access(cuda_ordinal(device), cuda_ordinal(src_dev))
    a.block_until_ready()
    return alias_device_memory(a.unsafe_buffer_pointer(), a.shape, a.dtype, device, a)


def _pallas_take_field(view, dtype, ids, config, interpret):
    """view[ids] with the Pallas remote-DMA kernel where its tiles fit the expert shape, else an XLA gather
    (both read the view in place)."""
    from pallas_kernels import remote_dma as rd

    x = view if view.dtype == dtype else jax.lax.bitcast_convert_type(view, dtype)
    try:
        rd._tile_shape(x.shape[1], x.shape[2], x.dtype.itemsize, config)
    except ValueError:
        return x[ids]
    return rd.fetch_experts(x, ids, config=config, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("dtypes", "config"))
def _pallas_take(views, ids, dtypes, config):
    """dtypes: ((field, dtype), ...), static."""
    return {f: _pallas_take_field(views[f], dtype, ids, config, False) for f, dtype in dtypes}


class PallasPull(FetchBackend):
    """Pull with the Pallas remote-DMA kernel (`pallas_kernels/remote_dma.py`, TMA loads) from the destination
    rank's own single-device program: the peer's expert buffers are read through `peer_view` aliases, so
    unlike the kernel's SPMD `remote_ref` mode (which XLA fences with a multi-GPU barrier) nothing couples
    the ranks. The kernel runs on the destination's compute stream, in order with its other programs: the
    fetch is not overlapped with compute, and it takes `config.num_sms` SMs while it runs. The measured
    alternative to the copy engine (whose DMA runs on its own stream and takes no SMs).

    Staged weights are fresh arrays per fetch (XLA tracks their readiness). CPU: the view is a
    `device_put` copy and the kernel runs in GPU interpret mode (tests the program, not the aliasing)."""

    name = "pallas_pull"

    def __init__(self, config=None):
        from pallas_kernels import remote_dma as rd

        self.config = config or rd.RemoteDmaConfig(num_sms=16, max_in_flight=4, method="tma_pull")
        self._views: dict = {}

    def _view(self, a, device: jax.Device) -> jax.Array:
        """A view of `a` on `device` (GPU: its memory, in place; CPU: a copy). `a` may be a `PeerArray`, which on
        a GPU is its mapped view."""
        key = (id(a), device.id)
        if key not in self._views:
            if isinstance(a, PeerArray):
                view = a.view if device.platform == "gpu" else a.take_to(device)
            else:
                view = peer_view(a, device) if device.platform == "gpu" else jax.device_put(a, device)
            self._views[key] = (a, view)  # keep `a` alive so its id stays unique
        return self._views[key][1]

    def _take(self, src: ExpertWeights, device: jax.Device, slots) -> ExpertWeights:
        fields = [f for f in _FIELDS if getattr(src, f) is not None]
        views = {f: self._view(getattr(src, f), device) for f in fields}
        ids = jax.device_put(np.asarray(list(slots), np.int32), device)
        if device.platform == "gpu":
            dtypes = tuple((f, getattr(src, f).dtype) for f in fields)
            out = _pallas_take(views, ids, dtypes=dtypes, config=self.config)
        else:  # interpret mode: eagerly (not under an outer jit) and one call at a time, because the Mosaic GPU
            # interpreter keeps global simulated shared memory that concurrent kernels from rank threads corrupt
            with _INTERPRET_LOCK:
                out = {f: jax.block_until_ready(_pallas_take_field(v, getattr(src, f).dtype, ids, self.config, True))
                       for f, v in views.items()}
        return ExpertWeights(out["w_gate_up"], out["w_down"], out.get("s_gate_up"), out.get("s_down"), src.block)

    def __call__(self, src: ExpertWeights, device: jax.Device) -> ExpertWeights:
        return self._take(src, device, range(src.num_experts))

    def subset(self, src, device, slots, into=None, offset=0) -> ExpertWeights:
        base = into if into is not None else _zeros_like_on(src, device)
        if len(slots) == 0:
            return base
        return _put_experts(base, self._take(src, device, slots), np.int32(offset))


_INTERPRET_LOCK = threading.Lock()


def fetch_backend(name: str, slots: int = 3) -> FetchBackend:
    """A fetch backend by name: device_put, copy_engine (host-ordered), copy_engine_stream (device-ordered),
    pallas_pull (the Pallas remote-DMA kernel reading peer memory in place, on the compute stream) or pallas_async
    (the same kernel on a side stream beside the layer programs, device-ordered: `pallas_async.py`)."""
    if name == "device_put":
        return DevicePutFetch()
    if name == "copy_engine":
        return CopyEnginePull(slots=slots)
    if name == "copy_engine_stream":
        return StreamOrderedPull(slots=slots)
    if name == "pallas_pull":
        return PallasPull()
    if name == "pallas_async":
        from dwdp_jax.parallel.pallas_async import PallasAsyncPull

        return PallasAsyncPull(slots=slots)
    raise ValueError(f"unknown fetch backend {name!r}: use device_put, copy_engine, copy_engine_stream, "
                     "pallas_pull or pallas_async")


def _copy_async(dst: int, dst_device, src: int, src_device, nbytes: int, stream: int) -> None:
    """Enqueues one copy engine copy on `stream`: between two GPUs cudaMemcpyPeerAsync; from a buffer mapped for
    the destination device itself (a peer process's IPC mapping, or a local buffer) a plain cudaMemcpyAsync,
    which unified addressing routes to wherever the memory lives."""
    import cupy as cp

    if dst_device == src_device:
        cp.cuda.runtime.memcpyAsync(dst, src, nbytes, cp.cuda.runtime.memcpyDefault, stream)
    else:
        cp.cuda.runtime.memcpyPeerAsync(dst, cuda_ordinal(dst_device), src, cuda_ordinal(src_device), nbytes, stream)


def enable_peer_access(dst: int, src: int) -> None:
    """Lets GPU `dst` read GPU `src`'s memory (CUDA peer access; enabling it twice is harmless)."""
    import cupy as cp

    if dst == src:
        return
    with cp.cuda.Device(dst):
        try:
            cp.cuda.runtime.deviceEnablePeerAccess(src)
        except cp.cuda.runtime.CUDARuntimeError:
            pass  # already enabled


def _runs(slots: list[int], offset: int) -> list[tuple[int, int, int]]:
    """(first source slot, first staging position, length) of each run of consecutive source slots."""
    runs = []
    for i, s in enumerate(slots):
        if runs and s == runs[-1][0] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([s, offset + i, 1])
    return [tuple(r) for r in runs]
