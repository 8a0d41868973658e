"""XLA GPU flags the engine runs under: command buffers (CUDA graphs) for the step programs.

A decode step of a few rows is host-bound without CUDA graphs: XLA launches every kernel of the step from the
host (~100 per R1 layer), and at B=1 the host takes longer than the GPU. XLA's default command buffers cover
only some kernel types and leave sequences shorter than its minimum graph size outside, so most of the step
is still launched one kernel at a time. `ENGINE` puts every kernel type the step programs use (fusions,
cuBLAS/cuBLASLt, custom calls, which include the Mosaic GPU kernels, cuDNN) into command buffers with no
minimum size. Measured on an H100 (WORKSPACE Finding 18), r1-layers-2 decode B=1 at 1K context, steps
dispatched ahead: 0.645 of HBM with `engine`, 0.557 with XLA's default, 0.389 with command buffers off
(experiments/results/engine-20261206-nvidia-h100-x1-cb-*.json); r1-layers-4 B=1 at 4K with `engine`: 0.553.

XLA reads XLA_FLAGS once, when JAX starts its backends: `configure` must run before the first device use.
"""

from __future__ import annotations

import logging
import os

COMMAND_BUFFER_FLAGS = {
    # every kernel type of the step programs, no minimum graph size
    "engine": ("--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN",
               "--xla_gpu_graph_min_graph_size=1"),
    "xla_default": (),
    # every kernel launched from the host (a profile then names each kernel's HLO instruction)
    "off": ("--xla_gpu_enable_command_buffer=",),
}

# compile options (`jax.jit(..., compiler_options=...)`) of one program without command buffers, whatever the
# process's XLA_FLAGS say: a DWDP rank's per-layer programs (`DwdpConfig.cuda_graphs`). Measured on an H100,
# r1-layers-4, B=1 at 4K, steps dispatched ahead: the rank's step 3.16 ms without command buffers, 4.23 ms with
# the engine's (the single program: 2.43 / 2.46 ms); WORKSPACE Finding 28.
NO_COMMAND_BUFFERS = {"xla_gpu_enable_command_buffer": ""}

log = logging.getLogger(__name__)


def _name(flag: str) -> str:
    return flag.split("=", 1)[0]


def merged(current: str, flags: tuple[str, ...]) -> str:
    """`current` XLA_FLAGS with `flags` appended, except those whose name `current` already sets (a flag the
    user set wins)."""
    have = {_name(f) for f in current.split()}
    return " ".join(current.split() + [f for f in flags if _name(f) not in have])


def configure(command_buffers: str) -> str:
    """Sets XLA_FLAGS for `command_buffers` (a key of COMMAND_BUFFER_FLAGS) if JAX has not started its
    backends yet; returns XLA_FLAGS as the backends read (or already read) them. After the start (tests,
    notebooks) it changes nothing and logs a warning when the mode's flags are missing."""
    if command_buffers not in COMMAND_BUFFER_FLAGS:
        raise ValueError(f"command_buffers must be one of {sorted(COMMAND_BUFFER_FLAGS)}, got {command_buffers!r}")
    from jax._src import xla_bridge

    flags = COMMAND_BUFFER_FLAGS[command_buffers]
    current = os.environ.get("XLA_FLAGS", "")
    if xla_bridge.backends_are_initialized():
        if merged(current, flags) != " ".join(current.split()):
            log.warning("command_buffers=%s not applied: JAX's backends started before (XLA_FLAGS=%r)",
                        command_buffers, current)
        return current
    os.environ["XLA_FLAGS"] = merged(current, flags)
    return os.environ["XLA_FLAGS"]
