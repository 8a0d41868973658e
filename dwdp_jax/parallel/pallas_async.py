"""The Pallas remote-DMA kernel as an asynchronous fetch backend: it runs on a side stream of the destination GPU,
beside the layer programs, ordered by CUDA events, with no host wait on the step path (`--fetch=pallas_async`).

`PallasPull` runs the same kernel inside the rank's own XLA program, so it occupies the compute stream and nothing
overlaps. XLA's stream annotation (`_compat.on_stream`) can put a kernel on another stream only *within* one
program: its `call-done` ends that program, and PJRT marks a program's outputs ready at its end on the compute
stream, so a fetch that must span layer l's program (issued before it, read by layer l+d's) cannot be expressed
with it unless the fetch moves into the layer programs themselves. Here instead, as `StreamOrderedPull` does for
the copy engine, the issue hook (a `DeviceHook` program dispatched in line with the layer programs) records an
event on the compute stream, makes our copy stream wait for it, and launches the kernel there
(`pallas_kernels.stream_launch`: the kernel's Mosaic module compiled once per device and expert shape, launched
with raw pointers); the ready hook makes the compute stream wait for the launch's `done` event.

What the kernel reads: the peer's expert buffer in place (a pointer valid on the reading GPU: peer access on
between GPUs of this process, an IPC mapping for a peer process, or, on one GPU, a second buffer of the same GPU).
What to copy comes from a header in GPU memory (`remote_dma.gather_header`: count, first staging position,
expert ids), so one compiled kernel serves whole-buffer fetches and the planner's arbitrary subsets and
on-demand misses alike. Headers are uploaded on the copy stream (ahead of the launch that reads them) and cached
by content per device; an entry is dropped only after the last launch that read it has been recorded and has
completed. Fields whose experts do not split into TMA tiles (small block-scale arrays) go through the copy engine
on the same stream.

SM budget: the kernel takes `config.num_sms` CTAs; give the grouped GEMMs the rest (`DwdpConfig.gemm_sms`), or
a persistent GEMM grid that already fills every SM delays the kernel's CTAs (or its own) until SMs free up.

CPU (tests, synchronous dispatch): the same kernel in GPU interpret mode gathers the rows when the fetch is issued,
and the issue hook writes them into the staging ring when the device reaches it, in order with the layer programs.
"""

from __future__ import annotations

import collections
import ctypes
import threading

import numpy as np

from dwdp_jax.parallel.fetch import _INTERPRET_LOCK, StreamOrderedPull, _copy_async, _runs, _source_device
from dwdp_jax.parallel.peer_memory import PeerArray, cuda_ordinal

METHODS = ("tma_pull", "ld_pull")  # reader-driven methods (tma_push needs the source GPU's own launch)
MAX_HEADERS = 256  # cached headers per device before completed ones are dropped


class _Header:
    """A header in GPU memory and the last launch that reads it (dropped once that launch is recorded and done)."""

    def __init__(self, array):
        self.array, self.event, self.recorded = array, None, False

    def idle(self) -> bool:
        return self.event is None or (self.recorded and self.event.done)


class PallasAsyncPull(StreamOrderedPull):
    """Whole and partial peer-buffer fetches by the Pallas remote-DMA kernel on the copy stream, device-ordered."""

    name = "pallas_async"

    def __init__(self, slots: int = 3, config=None, platform: str | None = None):
        from pallas_kernels import remote_dma as rd

        self.config = config or rd.RemoteDmaConfig(num_sms=16, max_in_flight=4, method="tma_pull")
        if self.config.method not in METHODS:
            raise ValueError(f"pallas_async pulls with {METHODS}, not {self.config.method!r}")
        super().__init__(slots, platform)
        self._kernels: dict = {}  # (ordinal, shape, dtype) -> StreamKernel | None (fields that do not tile)
        self._headers: dict = {}  # ordinal -> OrderedDict(header bytes -> _Header)
        self._lock = threading.Lock()

    # -- what runs where --------------------------------------------------------------------------------------

    def _tiles(self, shape, dtype) -> bool:
        from pallas_kernels import remote_dma as rd

        if self.config.method == "ld_pull":
            try:
                rd._flat_tile(shape[1] * shape[2], np.dtype(dtype).itemsize, self.config)
            except ValueError:
                return False
            return True
        try:
            rd._tile_shape(shape[1], shape[2], np.dtype(dtype).itemsize, self.config)
        except ValueError:
            return False
        return True

    def _call(self, shape, dtype, interpret: bool):
        """(call, operand shape): the gather kernel for a source of `shape` writing a staging buffer of its shape."""
        from pallas_kernels import remote_dma as rd

        call, operand_shape, _ = rd.gather_kernel(shape, dtype, shape[0], config=self.config, interpret=interpret)
        return call, operand_shape

    def _kernel(self, ordinal: int, shape, dtype):
        """The compiled kernel for this device and expert shape (None where the experts do not tile)."""
        key = (ordinal, tuple(shape), np.dtype(dtype).name)
        with self._lock:
            if key not in self._kernels:
                self._kernels[key] = self._compile(ordinal, shape, dtype) if self._tiles(shape, dtype) else None
            return self._kernels[key]

    def _compile(self, ordinal, shape, dtype):
        import jax
        from pallas_kernels import remote_dma as rd
        from pallas_kernels.stream_launch import StreamKernel, mosaic_module

        call, operand_shape = self._call(shape, dtype, interpret=False)
        module = mosaic_module(call, jax.ShapeDtypeStruct((rd.HEADER + shape[0],), np.int32),
                               jax.ShapeDtypeStruct(operand_shape, dtype))
        return StreamKernel(module, ordinal)

    def _header(self, ordinal: int, hdr: np.ndarray, stream) -> _Header:
        """The cached GPU copy of `hdr` (uploaded on `stream`, ahead of the launches enqueued there later)."""
        import cupy as cp

        cache = self._headers.setdefault(ordinal, collections.OrderedDict())
        key = hdr.tobytes()
        entry = cache.get(key)
        if entry is None:
            with cp.cuda.Device(ordinal), stream:
                entry = cache[key] = _Header(cp.asarray(hdr))
            if len(cache) > MAX_HEADERS:
                for k in [k for k, e in cache.items() if e.idle() and k != key]:
                    del cache[k]
        cache.move_to_end(key)
        return entry

    # -- the backend ------------------------------------------------------------------------------------------

    def subset(self, src, device, slots, into=None, offset=0):
        """Issues src[slots] -> staging positions [offset, offset + len(slots)) (a fresh ring slot, or `into`)."""
        from pallas_kernels import remote_dma as rd

        slots = [int(s) for s in slots]
        if into is not None and not slots:
            return into
        key, slot, bufs, staged = self._staging(src, device, into, wait_reader=False)
        num = src.w_gate_up.shape[0]
        hdr = rd.gather_header(slots, offset, num, num)
        if self.platform == "gpu":
            done = self._issue_gpu(src, device, bufs, slots, offset, hdr)
        else:
            done = self._issue_cpu(src, device, bufs, slots, offset, hdr)
        return (key, slot, staged, done)

    def _issue_gpu(self, src, device, bufs, slots, offset, hdr):
        import cupy as cp

        src_dev = _source_device(src.w_gate_up)
        ordinal = cuda_ordinal(device)
        self._enable_peer(ordinal, cuda_ordinal(src_dev))
        stream = self._stream(device)
        launches, copies, header = [], [], None
        for f, dst in bufs.items():
            a = getattr(src, f)
            kernel = self._kernel(ordinal, a.shape, a.dtype)
            if kernel is None:  # copy-engine runs for fields that do not tile
                row = (a.size // a.shape[0]) * a.dtype.itemsize
                copies += [(dst.unsafe_buffer_pointer() + start * row, a.unsafe_buffer_pointer() + first * row,
                            length * row) for first, start, length in _runs(slots, offset)]
                continue
            header = header or self._header(ordinal, hdr, stream)
            launches.append((kernel, [header.array.data.ptr, a.unsafe_buffer_pointer(), dst.unsafe_buffer_pointer()]))
        with cp.cuda.Device(ordinal):
            start = cp.cuda.Event(disable_timing=True)
            done = cp.cuda.Event(disable_timing=True)
        if header is not None:
            header.event, header.recorded = done, False

        def issue(compute_stream):
            with cp.cuda.Device(ordinal):
                cp.cuda.runtime.eventRecord(start.ptr, compute_stream)
                stream.wait_event(start)
                for kernel, pointers in launches:
                    kernel.launch(stream.ptr, pointers)
                for dst, source, n in copies:
                    _copy_async(dst, device, source, src_dev, n, stream.ptr)
                done.record(stream)
                if header is not None and header.event is done:
                    header.recorded = True

        self._hook(device).run(issue)
        return done

    def _issue_cpu(self, src, device, bufs, slots, offset, hdr):
        import jax

        rows = {}
        for f in bufs:
            a = getattr(src, f)
            if not self._tiles(a.shape, a.dtype):
                host = a.host if isinstance(a, PeerArray) else np.asarray(a)
                rows[f] = np.zeros(a.shape, a.dtype)
                rows[f][offset:offset + len(slots)] = host[slots]
                continue
            local = a.take_to(device) if isinstance(a, PeerArray) else jax.device_put(a, device)
            call, operand_shape = self._call(a.shape, a.dtype, interpret=True)
            with _INTERPRET_LOCK:  # eagerly, one at a time: the interpreter's simulated SMEM is global
                rows[f] = np.asarray(call(jax.device_put(hdr, device), local.reshape(operand_shape)))
        n = len(slots)

        def host_copy(_stream):
            for f, dst in bufs.items():
                row = rows[f].nbytes // rows[f].shape[0]
                ctypes.memmove(dst.unsafe_buffer_pointer() + offset * row, rows[f].ctypes.data + offset * row, n * row)

        self._hook(device).run(host_copy)
        return None
