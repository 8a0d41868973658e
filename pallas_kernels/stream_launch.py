"""Launch a compiled Mosaic GPU kernel on a CUDA stream of the caller's choosing, outside XLA.

XLA runs a Pallas kernel on the compute stream of the program that calls it, in order with everything else
that program and the programs around it do. To run a kernel *beside* them (DWDP's fetch kernel beside a
layer's grouped GEMMs), we:
  1. lower a function that is exactly one Mosaic GPU kernel call and take the kernel's module from it (the
     `mosaic_gpu_v2` custom call's `module` attribute: the bytes XLA itself would compile);
  2. compile it once per device with the CUDA plugin's exported `MosaicGpuCompile`, the entry point jax's
     own PyTorch interop uses (`plgpu.as_torch_kernel` in 0.11), which loads the kernel into the current
     CUDA context and returns (handle, host launch function);
  3. call the host launch function with our stream and the buffers' device pointers in XLA's order (the
     kernel's operands, then its results): it builds the TMA descriptors on the host and launches.

Contract of the launch function, read from jaxlib's `jaxlib/mosaic/gpu/custom_call.cc`: `void(void* handle,
void* stream, void** buffers)` in 0.10.2 (handle: a kernel context) and 0.11 (handle: a `CUfunction`); only
the meaning of the opaque handle changed, so one call serves both. Other versions are refused. Only local
kernels qualify: a kernel with peer refs needs XLA's collective metadata and barrier, which we do not supply.
A launch error inside the plugin aborts the process (the plugin's runtime aborts on CUDA errors): run new
kernels in a child process first.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
from typing import Sequence

import jax

from pallas_kernels import _compat

MOSAIC_TARGET = "mosaic_gpu_v2"
TESTED_VERSIONS = ((0, 10), (0, 11))


@dataclasses.dataclass(frozen=True)
class MosaicModule:
  """A Mosaic GPU kernel as XLA would compile it: serialized module and the buffers its launch takes."""

  module: bytes
  operands: tuple  # jax.ShapeDtypeStruct per operand, in launch order
  results: tuple  # the same for the results, launched after the operands

  @property
  def num_buffers(self) -> int:
    return len(self.operands) + len(self.results)


def _walk(op):
  for region in op.regions:
    for block in region.blocks:
      for child in block.operations:
        yield child.operation
        yield from _walk(child.operation)


def _shape(value) -> tuple:
  from jax._src.lib.mlir import ir

  return tuple(ir.RankedTensorType(value.type).shape)


def mosaic_module(fn, *arg_types) -> MosaicModule:
  """The Mosaic module of `fn`, a function whose whole body is one Mosaic GPU kernel call on its arguments
  (e.g. the `call` of `remote_dma.gather_kernel`), lowered for CUDA (also on a CPU-only machine).

  Raises if the lowered program has no or several Mosaic kernels, if the kernel's operands are not `fn`'s
  arguments in order (anything computed in between would be skipped by a direct launch), or if the kernel
  needs XLA's collective support (peer refs)."""
  from jax._src.lib.mlir import ir

  lowered = jax.jit(fn).trace(*arg_types).lower(lowering_platforms=("cuda",))
  module = lowered.compiler_ir()
  with module.context:
    calls = [op for op in _walk(module.operation) if op.name == "stablehlo.custom_call"
             and ir.StringAttr(op.attributes["call_target_name"]).value == MOSAIC_TARGET]
    if len(calls) != 1:
      raise ValueError(f"expected one Mosaic GPU kernel in the function, found {len(calls)}")
    call = calls[0]
    operands = list(call.operands)
    if len(operands) != len(arg_types) or not all(isinstance(v, ir.BlockArgument) for v in operands) or [
        ir.BlockArgument(v).arg_number for v in operands] != list(range(len(operands))):
      raise ValueError("the kernel's operands must be the function's arguments, in order, with nothing computed "
                       "in between")
    if [_shape(v) for v in operands] != [tuple(a.shape) for a in arg_types]:
      raise ValueError("the kernel's operand shapes differ from the arguments'")
    config = ir.DictAttr(call.attributes["mhlo.backend_config"])
    for flag in ("use_custom_barrier", "uses_xla_collective_metadata"):
      if flag in config and ir.BoolAttr(config[flag]).value:
        raise ValueError(f"the kernel needs XLA's collective support ({flag}): only local kernels can be "
                         "launched outside XLA")
    module_bytes = ir.StringAttr(config["module"]).value_bytes
  out_info = jax.tree.leaves(lowered.out_info)
  results = tuple(jax.ShapeDtypeStruct(o.shape, o.dtype) for o in out_info)
  if len(results) != len(call.results):
    raise ValueError("the function must return exactly the kernel's results")
  operand_types = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arg_types)
  return MosaicModule(module_bytes, operand_types, results)


def _plugin_library() -> ctypes.CDLL:
  """The library exporting MosaicGpuCompile: the loaded CUDA PJRT plugin (where jax's own interop looks; dlopen
  of a loaded library returns it), else whatever the process has loaded globally."""
  tried = []
  for name in ("jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12"):
    try:
      path = str(importlib.import_module(name)._get_library_path())
    except (ImportError, AttributeError):
      continue
    lib = ctypes.CDLL(path)
    if hasattr(lib, "MosaicGpuCompile"):
      return lib
    tried.append(path)
  lib = ctypes.CDLL(None)
  if hasattr(lib, "MosaicGpuCompile"):
    return lib
  raise RuntimeError(f"no loaded library exports MosaicGpuCompile (tried {tried} and the global namespace)")


_LAUNCH = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p))


class StreamKernel:
  """A Mosaic GPU kernel compiled for one GPU, launched on any stream of that GPU with raw device pointers.

  The caller owns ordering (events between our stream and XLA's) and the buffers' lifetimes: a buffer must
  stay allocated until the kernel that reads or writes it has finished on the device."""

  def __init__(self, module: MosaicModule, ordinal: int):
    """Compiles `module` for the GPU of CUDA ordinal `ordinal` (the process's numbering, as CuPy's)."""
    import cupy as cp

    if _compat.JAX_VERSION[:2] not in TESTED_VERSIONS:
      raise NotImplementedError(f"the Mosaic GPU launch contract is checked for jax {TESTED_VERSIONS}, not "
                                f"{jax.__version__}")
    self.module, self.ordinal = module, ordinal
    lib = _plugin_library()
    compile_fn, self._unload = lib.MosaicGpuCompile, lib.MosaicGpuUnload
    compile_fn.argtypes, compile_fn.restype = [ctypes.c_char_p, ctypes.c_int], ctypes.POINTER(ctypes.c_void_p)
    self._unload.argtypes, self._unload.restype = [compile_fn.restype], None
    with cp.cuda.Device(self.ordinal):  # the kernel is loaded into this device's (primary) context
      self._compiled = compile_fn(module.module, len(module.module))
    if not self._compiled:
      raise RuntimeError("MosaicGpuCompile failed (set MOSAIC_GPU_DUMP_PTX=1 to see the kernel)")
    self._handle = ctypes.c_void_p(self._compiled[0])
    self._launch = _LAUNCH(self._compiled[1])

  def launch(self, stream: int, pointers: Sequence[int]) -> None:
    """Enqueues the kernel on `stream` (a cudaStream_t of this device): pointers are device addresses of the
    operands, then the results, in `module`'s order."""
    if len(pointers) != self.module.num_buffers:
      raise ValueError(f"the kernel takes {self.module.num_buffers} buffers, got {len(pointers)}")
    buffers = (ctypes.c_void_p * len(pointers))(*pointers)
    self._launch(self._handle, ctypes.c_void_p(stream), buffers)

  def close(self) -> None:
    """Unloads the kernel (no launch may still be pending)."""
    if self._compiled:
      self._unload(self._compiled)
      self._compiled = None
