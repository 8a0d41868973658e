"""Shims between the two jax versions we run: 0.10.2 (CI, CPU interpret) and 0.11.2 (GPU machines)."""

import jax
from jax.experimental.pallas import mosaic_gpu as plgpu

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())

try:  # 0.11.2 exports it
  InterpretGPUParams = plgpu.InterpretGPUParams
except AttributeError:  # 0.10.2
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # noqa: F401


def transpose_ref(ref, perm):
  """`plgpu.transpose_ref` is deprecated in 0.11 in favour of `ref.transpose`."""
  if JAX_VERSION >= (0, 11):
    return ref.transpose(perm)
  return plgpu.transpose_ref(ref, perm)


def on_gpu() -> bool:
  return jax.devices()[0].platform == "gpu"


def num_sms() -> int:
  return jax.devices()[0].core_count


def on_stream(fn, stream: int):
  """`fn` as a call that XLA runs on GPU stream `stream` beside the program's other work (XLA's stream
  annotation: `call-start`/`call-done` around it, flag `xla_gpu_experimental_stream_annotation`). The
  function form is `compute_on2` in 0.10.2 and `compute_on` in 0.11; outputs stay in device memory."""
  from jax.experimental import compute_on

  wrap = compute_on.compute_on if JAX_VERSION >= (0, 11) else compute_on.compute_on2
  return wrap(fn, compute_type=f"gpu_stream:{stream}", out_memory_spaces=jax.memory.Space.Device)
