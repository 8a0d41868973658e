"""Expert buffers shared across processes: exported by their owner, opened once by each reader.

A transport turns a rank's expert buffers into small JSON descriptors (the control channel carries them) and a
peer's descriptors into `PeerArray`s: a pointer valid in the reading process, the buffer's own shape and dtype,
and the local device that reads it. The fetch backends (`fetch.py`) read a `PeerArray` as they read an
in-process peer's jax.Array: the copy engines copy from its pointer, the Pallas pull reads its `view` in place,
`device_put` becomes `PeerArray.copy_to`.

  * `CudaIpcTransport` (GPUs of one host): XLA's buffer may be a sub-range of a larger allocation (its BFC
    allocator carves buffers out of big cuMemAlloc regions), so the exporter finds the allocation with
    cuMemGetAddressRange, exports it with cudaIpcGetMemHandle and publishes the buffer's offset inside it; a
    reader opens each allocation once per reading device (cudaIpcOpenMemHandle) and adds the offset.
  * `SharedMemoryTransport` (CPU, CI): a POSIX shared-memory segment per export call holding a copy of the
    buffers, at offsets inside it as with IPC; readers map it once. The same protocol on simulated CPU devices.
  * `FabricTransport` (GB200 multi-node NVLink, MNNVL): the same interface over fabric handles. It cannot run
    here: it raises `FabricUnavailable` naming what is missing (WORKSPACE, "DWDP across processes").

Lifetime: the exporter keeps every exported buffer alive until `release_exports`, which the group calls only
after its shutdown barrier, once every reader has run `close_imports`. Expert buffers are immutable: nothing
writes or reallocates them while they are exported.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import secrets
import socket
from multiprocessing import resource_tracker, shared_memory
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dwdp_jax.parallel.dlpack_alias import alias

_ALIGN = 256  # bytes: offsets of buffers inside a shared-memory segment
_IPC_LAZY_ENABLE_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess: a mapping on another GPU enables peer access


def cuda_ordinal(device: jax.Device) -> int:
    """The CUDA device ordinal of a jax GPU device in this process. `device.id` is global once a process joins
    a multi-process JAX group; `local_hardware_id` is what CUDA (and CuPy) number the device by."""
    local = getattr(device, "local_hardware_id", None)
    return device.id if local is None else int(local)


def alias_device_memory(pointer: int, shape: tuple, dtype, device: jax.Device, owner) -> jax.Array:
    """A jax.Array on GPU `device` whose memory is the bytes at `pointer` (no copy; `dlpack_alias.alias`), as the
    unsigned int of `dtype`'s width: bitcast where it is read (the fetch backends' contract). `owner` is kept
    alive as long as the view. The memory may live on a peer GPU (peer access or an IPC mapping makes it
    addressable here)."""
    raw = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[jnp.dtype(dtype).itemsize]
    return alias(pointer, shape, raw, device, owner)


@functools.partial(jax.jit, static_argnames="dtype")
def _typed_take(view, slots, dtype):
    """view[slots] (all experts when slots is None), reinterpreted as `dtype`: a copy on the view's device."""
    part = view if slots is None else view[slots]
    return part if part.dtype == dtype else jax.lax.bitcast_convert_type(part, dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class PeerArray:
    """A buffer of a rank in another process, as this process reads it.

    pointer: its address in this process; shape, dtype: the buffer's own; device: the local device that reads it.
    view: GPU, a jax.Array on `device` aliasing the peer's memory (unsigned ints of dtype's width);
    host: CPU stand-in, a numpy array over the shared-memory segment. Exactly one of them is set.
    source: who exported it (the group rank; -1: unknown), what a fetch backend keys its staging by.
    """

    pointer: int
    shape: tuple
    dtype: np.dtype
    device: jax.Device
    view: jax.Array | None = None
    host: np.ndarray | None = None
    source: int = -1

    def __post_init__(self):
        if (self.view is None) == (self.host is None):
            raise ValueError("a PeerArray has either a device view (GPU) or a host array (shared memory)")

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def unsafe_buffer_pointer(self) -> int:
        return self.pointer

    def devices(self) -> set:
        return {self.device}

    def take_to(self, device: jax.Device, slots=None) -> jax.Array:
        """A copy of the buffer (or of its experts `slots` [n] along axis 0) as a typed jax.Array on `device`:
        what `jax.device_put` of an in-process peer's array gives. Reads the peer's memory now."""
        if self.host is not None:
            return jax.device_put(self.host if slots is None else self.host[np.asarray(slots)], device)
        if device != self.device:
            raise ValueError(f"this PeerArray is mapped for {self.device}, not {device}")
        ids = None if slots is None else jax.device_put(np.asarray(slots, np.int32), device)
        return _typed_take(self.view, ids, dtype=self.dtype)


class Transport:
    """Export and open expert buffers across processes (see the module docstring)."""

    name = "base"

    def exportable(self, arrays: Sequence[jax.Array]) -> list[jax.Array]:
        """`arrays` in memory this transport can export, with the same values: each array itself where its memory
        already is, else a copy the caller must use in its place (`DwdpRank.replace_expert_arrays`), so that the
        owner computes from the memory its peers read and holds each buffer once."""
        return list(arrays)

    def export(self, arrays: Sequence[jax.Array]) -> list[dict]:
        """JSON-able descriptors of `arrays` (each on one device), in order; keeps them alive until
        `release_exports`. A caller may add `source` (the exporting rank) to each descriptor."""
        raise NotImplementedError

    def open(self, descriptor: dict, device: jax.Device) -> PeerArray:
        """The peer buffer of `descriptor`, read through local `device` (its allocation opened once)."""
        raise NotImplementedError

    def close_imports(self) -> None:
        """Unmaps every opened peer allocation (after this process has stopped reading them)."""

    def release_exports(self) -> None:
        """Lets go of the exported buffers (after every reader has closed its imports)."""


def _descriptor(a, **fields) -> dict:
    return dict(shape=list(a.shape), dtype=jnp.dtype(a.dtype).name, nbytes=int(a.nbytes), **fields)


class SharedMemoryTransport(Transport):
    """CPU stand-in for CUDA IPC: one POSIX shared-memory segment per `export` call holds a copy of the buffers
    (at aligned offsets, as buffers sit inside an allocation on a GPU); readers map each segment once. Buffers
    are immutable, so the copy reads as the original."""

    name = "shm"

    def __init__(self):
        self._token = secrets.token_hex(4)
        self._exports: list[shared_memory.SharedMemory] = []
        self._opened: dict[str, shared_memory.SharedMemory] = {}

    def export(self, arrays):
        offsets, total = [], 0
        for a in arrays:
            offsets.append(total)
            total += -(-int(a.nbytes) // _ALIGN) * _ALIGN
        name = f"dwdp-{os.getpid()}-{self._token}-{len(self._exports)}"
        segment = shared_memory.SharedMemory(name=name, create=True, size=max(total, 1))
        self._exports.append(segment)
        for a, offset in zip(arrays, offsets):
            data = np.asarray(jax.device_get(a)).reshape(-1).view(np.uint8)
            segment.buf[offset : offset + data.size] = data
        return [_descriptor(a, transport=self.name, segment=name, offset=o) for a, o in zip(arrays, offsets)]

    def open(self, descriptor, device):
        name = descriptor["segment"]
        if name not in self._opened:
            try:
                self._opened[name] = _attach(name)
            except FileNotFoundError as e:
                raise RuntimeError(f"shared-memory segment {name!r} is gone: its exporting process exited or "
                                   "released it before this process opened it") from e
        dtype = jnp.dtype(descriptor["dtype"])
        host = np.ndarray(tuple(descriptor["shape"]), dtype, buffer=self._opened[name].buf,
                          offset=descriptor["offset"])
        return PeerArray(host.ctypes.data, tuple(descriptor["shape"]), dtype, device, host=host,
                         source=descriptor.get("source", -1))

    def close_imports(self):
        for segment in self._opened.values():
            try:
                segment.close()
            except BufferError:
                pass  # numpy views still alive somewhere (e.g. a backend's cache): unmapped at exit instead
        self._opened.clear()

    def release_exports(self):
        for segment in self._exports:
            segment.close()
            segment.unlink()
        self._exports.clear()


def _attach(name: str) -> shared_memory.SharedMemory:
    """Maps an existing segment without registering it with this process's resource tracker (which would
    unlink the exporter's segment when this reader exits; Python < 3.13 has no `track=False`)."""
    try:
        return shared_memory.SharedMemory(name=name, track=False)
    except TypeError:
        segment = shared_memory.SharedMemory(name=name)
        resource_tracker.unregister(segment._name, "shared_memory")  # noqa: SLF001 (the tracker's own key)
        return segment


@functools.lru_cache(maxsize=None)
def _libcuda():
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise RuntimeError("no CUDA driver (libcuda.so.1) in this process") from e


def allocation_range(pointer: int) -> tuple[int, int]:
    """(base, bytes) of the CUDA allocation that contains device address `pointer` (cuMemGetAddressRange; the
    device's context must be current)."""
    fn = _libcuda().cuMemGetAddressRange_v2
    fn.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    rc = fn(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(pointer))
    if rc != 0:
        raise RuntimeError(f"cuMemGetAddressRange(0x{pointer:x}) failed with CUDA driver error {rc}")
    return base.value, size.value


def ipc_exportable_copy(a: jax.Array) -> jax.Array:
    """A copy of GPU array `a` in its own cudaMalloc allocation (exportable through legacy IPC), as a jax.Array of
    a's dtype and shape over that memory; the allocation is freed with the last array over it."""
    import cupy as cp

    (device,) = a.devices()
    with cp.cuda.Device(cuda_ordinal(device)):
        memory = cp.cuda.Memory(max(int(a.nbytes), 1))  # cudaMalloc itself, not CuPy's pool
        cp.cuda.runtime.memcpy(memory.ptr, jax.block_until_ready(a).unsafe_buffer_pointer(), int(a.nbytes),
                               cp.cuda.runtime.memcpyDeviceToDevice)
        cp.cuda.runtime.deviceSynchronize()
    return alias(memory.ptr, a.shape, a.dtype, device, memory)


class CudaIpcTransport(Transport):
    """CUDA IPC memory handles, for processes on one host (any GPUs of it: one process per GPU, or several
    processes sharing a GPU). A descriptor: the allocation's handle, the buffer's offset in it, the host name
    (a handle opens only on its own host)."""

    name = "cuda_ipc"

    def __init__(self):
        import cupy  # noqa: F401  (fail early off-GPU)

        self._exported: list[jax.Array] = []
        self._handles: dict[int, bytes] = {}  # allocation base -> its IPC handle
        self._opened: dict[tuple[int, str], int] = {}  # (reading ordinal, handle) -> mapped base
        self.relocated = 0  # arrays copied out of XLA's memory by `exportable` (XLA's allocator not IPC-capable)

    def exportable(self, arrays):
        out = []
        for a in jax.block_until_ready(list(arrays)):
            try:
                self._allocation_handle(a)
                out.append(a)
            except RuntimeError:  # e.g. XLA's allocator gives VMM or pool memory (seen with jax 0.11.2 / CUDA 13)
                out.append(ipc_exportable_copy(a))
                self.relocated += 1
        return out

    def _allocation_handle(self, a: jax.Array) -> tuple[int, int]:
        """(base, bytes) of the allocation holding `a`, its IPC handle made once (RuntimeError if it cannot be)."""
        import cupy as cp

        (device,) = a.devices()
        with cp.cuda.Device(cuda_ordinal(device)):
            base, size = allocation_range(a.unsafe_buffer_pointer())
            if base not in self._handles:
                try:
                    self._handles[base] = cp.cuda.runtime.ipcGetMemHandle(base)
                except cp.cuda.runtime.CUDARuntimeError as e:
                    raise RuntimeError(
                        f"cudaIpcGetMemHandle of the allocation at 0x{base:x} failed ({e}): legacy IPC handles need "
                        "cudaMalloc/cuMemAlloc memory; pass the arrays through `exportable` first") from e
        return base, size

    def export(self, arrays):
        out = []
        for a in jax.block_until_ready(list(arrays)):
            base, size = self._allocation_handle(a)
            self._exported.append(a)
            out.append(_descriptor(a, transport=self.name, handle=self._handles[base].hex(),
                                   offset=a.unsafe_buffer_pointer() - base, allocation_bytes=size,
                                   host=socket.gethostname()))
        return out

    def open(self, descriptor, device):
        import cupy as cp

        if descriptor["host"] != socket.gethostname():
            raise RuntimeError(f"a buffer exported on host {descriptor['host']!r} cannot be opened on "
                               f"{socket.gethostname()!r}: CUDA IPC handles work within one host; across the hosts "
                               "of an NVLink domain (GB200 NVL72) fabric handles are needed (FabricTransport)")
        ordinal = cuda_ordinal(device)
        key = (ordinal, descriptor["handle"])
        if key not in self._opened:
            with cp.cuda.Device(ordinal):
                self._opened[key] = cp.cuda.runtime.ipcOpenMemHandle(bytes.fromhex(descriptor["handle"]),
                                                                     _IPC_LAZY_ENABLE_PEER_ACCESS)
        pointer = self._opened[key] + descriptor["offset"]
        dtype, shape = jnp.dtype(descriptor["dtype"]), tuple(descriptor["shape"])
        return PeerArray(pointer, shape, dtype, device, view=alias_device_memory(pointer, shape, dtype, device, self),
                         source=descriptor.get("source", -1))

    def close_imports(self):
        import cupy as cp

        for (ordinal, _), base in self._opened.items():
            with cp.cuda.Device(ordinal):
                cp.cuda.runtime.ipcCloseMemHandle(base)
        self._opened.clear()

    def release_exports(self):
        self._exported.clear()
        self._handles.clear()


class FabricUnavailable(NotImplementedError):
    """Fabric-handle sharing (multi-node NVLink) cannot run in this process; the message names what is missing."""


_CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED = 128
_FABRIC_SYMBOLS = ("cuMemCreate", "cuMemExportToShareableHandle", "cuMemImportFromShareableHandle",
                   "cuMemAddressReserve", "cuMemMap", "cuMemSetAccess", "cuMemUnmap", "cuMemRelease")
IMEX_CHANNELS = "/dev/nvidia-caps-imex-channels"


def fabric_missing() -> list[str]:
    """What this process lacks for fabric handles (empty: nothing). Always lists the allocator: XLA's buffers
    come from cuMemAlloc, which has no fabric handle, and an allocator for exported buffers is not written."""
    missing = []
    try:
        lib = _libcuda()
    except RuntimeError as e:
        missing.append(str(e))
    else:
        missing += [f"the driver entry point {s}" for s in _FABRIC_SYMBOLS if not hasattr(lib, s)]
        count = ctypes.c_int()
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
            missing.append("a CUDA device")
        for d in range(count.value):
            value = ctypes.c_int()
            lib.cuDeviceGetAttribute(ctypes.byref(value), _CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED, d)
            if not value.value:
                missing.append(f"fabric handle support on CUDA device {d} "
                               "(CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED = 0: not an NVLink-fabric GPU)")
    if not os.path.isdir(IMEX_CHANNELS):
        missing.append(f"an IMEX channel ({IMEX_CHANNELS}/channel0: nvidia-imex running on every node of the NVLink "
                       "domain and the channel device visible in this container)")
    missing.append("expert buffers allocated with cuMemCreate(requestedHandleTypes=CU_MEM_HANDLE_TYPE_FABRIC) and "
                   "mapped with cuMemAddressReserve/cuMemMap/cuMemSetAccess in place of ipc_exportable_copy's "
                   "cudaMalloc (not written: it cannot be run here)")
    return missing


class FabricTransport(Transport):
    """Multi-node NVLink (GB200 NVL72): the exporter allocates each expert buffer with cuMemCreate(fabric handle
    type), maps it (cuMemAddressReserve, cuMemMap, cuMemSetAccess), fills it once, and publishes the 64-byte
    CUmemFabricHandle from cuMemExportToShareableHandle; a reader on any node of the domain imports it with
    cuMemImportFromShareableHandle, reserves and maps its own range, grants its device access, and reads it as a
    `PeerArray` exactly like an IPC mapping. Needs the IMEX daemon and a channel. Not runnable here: constructing
    it raises `FabricUnavailable` with what is missing (`fabric_missing`)."""

    name = "fabric"

    def __init__(self):
        raise FabricUnavailable("fabric-handle expert sharing cannot run here; missing: " + "; ".join(fabric_missing()))


def make_transport(name: str) -> Transport:
    """'shm' (CPU processes), 'cuda_ipc' (GPUs of one host) or 'fabric' (multi-node NVLink; raises here)."""
    transports = {"shm": SharedMemoryTransport, "cuda_ipc": CudaIpcTransport, "fabric": FabricTransport}
    if name not in transports:
        raise ValueError(f"unknown peer-memory transport {name!r}: use {', '.join(transports)}")
    return transports[name]()


def default_transport(platform: str) -> str:
    """The transport of a platform: shared memory between CPU processes, CUDA IPC between GPU processes."""
    return "cuda_ipc" if platform == "gpu" else "shm"
