"""A typed jax.Array over memory this process did not get from XLA (no copy), through a DLPack capsule we build.

CuPy can wrap a raw device pointer for DLPack, but it has no bfloat16 or FP8 dtypes, so its views are unsigned
ints and a typed array would need a bitcast, i.e. a copy in XLA's memory. Expert buffers that peers open through
CUDA IPC must live in memory that can be exported (cudaMalloc), and the owner must compute from that same memory
(else every local expert is held twice), typed as the model expects. So `alias` describes the memory in a
`DLManagedTensor` of the right dtype and hands it to `jax.dlpack.from_dlpack`.

Lifetime: the capsule's deleter (called by XLA when the last jax.Array over the memory goes away) drops our
reference to `owner`; until then `owner` (e.g. the cupy.cuda.Memory that frees the allocation) stays alive.
The table of live capsules is module state by necessity: a C callback must find its Python objects.
"""

from __future__ import annotations

import ctypes

import jax
import jax.numpy as jnp
import numpy as np

_KDL_CPU, _KDL_CUDA = 1, 2
# DLDataTypeCode (dlpack.h, v1.1): the codes of the dtypes expert buffers use.
_DL_CODES = {"int": 0, "uint": 1, "float": 2, "bfloat16": 4, "bool": 6, "float8_e4m3fn": 10, "float8_e5m2": 12}


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32), ("dtype", _DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    pass


_Deleter = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _Deleter)]

_LIVE: dict[int, tuple] = {}  # address of a DLManagedTensor -> (struct, shape array, owner)


@_Deleter
def _delete(managed):
    _LIVE.pop(ctypes.addressof(managed.contents), None)


def dl_dtype(dtype) -> tuple[int, int]:
    """(DLPack type code, bits) of a jax/numpy dtype; ValueError for dtypes we do not describe."""
    dtype = jnp.dtype(dtype)
    name = dtype.name
    if name in _DL_CODES:
        return _DL_CODES[name], dtype.itemsize * 8
    kind = {"i": "int", "u": "uint", "f": "float", "b": "bool"}.get(dtype.kind)
    if kind is None:
        raise ValueError(f"no DLPack type code for dtype {name}")
    return _DL_CODES[kind], dtype.itemsize * 8


class _Capsule:
    """The producer side of DLPack for one buffer (what `jax.dlpack.from_dlpack` asks of an external array)."""

    def __init__(self, pointer: int, shape: tuple, dtype, device_type: int, device_id: int, owner):
        self.pointer, self.shape, self.dtype = pointer, tuple(int(s) for s in shape), jnp.dtype(dtype)
        self.device_type, self.device_id, self.owner = device_type, device_id, owner

    def __dlpack_device__(self):
        return self.device_type, self.device_id

    def __dlpack__(self, stream=None, **_):
        shape = (ctypes.c_int64 * max(len(self.shape), 1))(*self.shape)
        code, bits = dl_dtype(self.dtype)
        managed = _DLManagedTensor()
        managed.dl_tensor = _DLTensor(ctypes.c_void_p(self.pointer), _DLDevice(self.device_type, self.device_id),
                                      len(self.shape), _DLDataType(code, bits, 1), shape, None, 0)
        managed.manager_ctx = None
        managed.deleter = _delete
        _LIVE[ctypes.addressof(managed)] = (managed, shape, self.owner)
        new_capsule = ctypes.pythonapi.PyCapsule_New
        new_capsule.restype, new_capsule.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p,
                                                                        ctypes.c_void_p]
        return new_capsule(ctypes.addressof(managed), b"dltensor", None)


def alias(pointer: int, shape: tuple, dtype, device: jax.Device, owner) -> jax.Array:
    """A jax.Array of `dtype` and `shape` on `device` whose memory is the bytes at `pointer` (no copy), keeping
    `owner` alive as long as the array. `pointer` must be 64-byte aligned for XLA to take it without a copy;
    the memory must be ready (no pending writes on another stream). Raises if the import copied."""
    if device.platform == "gpu":
        local = getattr(device, "local_hardware_id", None)  # CUDA's ordinal (device.id is global across processes)
        device_type, device_id = _KDL_CUDA, device.id if local is None else int(local)
    elif device.platform == "cpu":
        device_type, device_id = _KDL_CPU, 0
    else:
        raise ValueError(f"DLPack aliasing is written for GPU and CPU devices, not {device.platform}")
    view = jax.dlpack.from_dlpack(_Capsule(pointer, shape, dtype, device_type, device_id, owner), device=device)
    if view.dtype != jnp.dtype(dtype) or view.unsafe_buffer_pointer() != pointer:
        raise RuntimeError(f"DLPack import of 0x{pointer:x} as {jnp.dtype(dtype).name}{list(shape)} copied or "
                           f"changed it (got {view.dtype} at 0x{view.unsafe_buffer_pointer():x})")
    return view


def live_capsules() -> int:
    """How many aliases XLA still holds (tests: the deleter ran)."""
    return len(_LIVE)


def host_buffer(nbytes: int) -> np.ndarray:
    """A 64-byte-aligned host buffer of `nbytes` (CPU tests of `alias`)."""
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + nbytes]
