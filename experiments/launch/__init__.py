"""Serve a workload end to end and record it: colocated (one strategy on every device) or disaggregated.

Colocated (`--mode=colocated`, the default): single device, DWDP, replicated DP or DEP (`--strategy`). One
engine per rank (its own `Scheduler`, slot cache and host thread; DEP: one lockstep engine whose SPMD program
spans its devices, each device with its own slot group), prefill and decode mixed in every step.

Disaggregated (`--mode=disagg`, `dwdp_jax.engine.disagg`): the first `--context_devices` devices are context
servers (`--context_strategy`, `--context_group_size`) that prefill prompts in steps of up to
`--context_token_budget` tokens; the rest are generation servers (`--generation_strategy`,
`--generation_group_size`) that decode; each finished prefill's MLA cache is copied from its context device to
a generation device (`--kv_transfer`). `--context_devices`, `--context_strategy` and `--context_token_budget`
take lists: every combination is one sweep point (a DWDP vs DEP context comparison at equal points gives
`dwdp_over_dep_tps_per_gpu`).

Per run: a model (a preset with random weights, or an HF checkpoint), a warm-up, then one timed pass per sweep
point and `--concurrency` value with a progress bar, a summary table, and one results JSON (part `e2e`,
`../shared/results-schema.md`) under `--out`. Its `rows` hold one `kind: "point"` row per timed pass (metrics,
per-rank step statistics, and `timeline`: every step on every device, as columns), then `kind: "role"` rows
(disaggregated: context, handoff, generation) and `kind: "request"` rows (per-request latencies).

Demos (tiny random model, simulated CPU devices, well under a minute each; one line each):

  XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m experiments.launch --preset=tiny
      --strategy=dwdp --num_devices=2 --num_requests=8 --input_len=32 --output_len=16
  XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m experiments.launch --preset=tiny --mode=disagg
      --num_devices=4 --context_devices=2 --context_strategy=dwdp --generation_strategy=dep --num_requests=8

Concurrency is the number of requests in flight over all GPUs (colocated: split evenly over the data-parallel
ranks); 0 queues every request at the start (offline batch).

Multi-process (`processes`): one DWDP or DP group over several processes or hosts, joined through
jax.distributed (`--num_processes=N --process_id=I --coordinator_address=HOST:PORT`, or `--cluster_detection`
under SLURM / Open MPI), expert buffers shared by CUDA IPC (CPU: POSIX shared memory); `--spawn_local_processes=N`
starts the N processes on this machine. Process 0 writes the group's record. CPU demo (one line):

  XLA_FLAGS=--xla_force_host_platform_device_count=1 python -m experiments.launch --preset=tiny --strategy=dwdp
      --num_devices=2 --spawn_local_processes=2 --num_requests=8 --input_len=32 --output_len=16

The package, one concern per module: `options` (the flag table), `validation` (flags -> a frozen `Setup`),
`engines` (models, DWDP/DP/DEP/single runners), `serving` (the serving passes, one host thread per engine),
`records` (tables and the results JSON), `colocated` and `disaggregated` (the two kinds of run), `processes`
(multi-process groups and the local spawner).
"""

from __future__ import annotations

import os
import sys
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

from absl import app  # noqa: E402

from dwdp_jax import xla_flags  # noqa: E402

from experiments.launch.colocated import launch_colocated  # noqa: E402
from experiments.launch.disaggregated import launch_disagg  # noqa: E402
from experiments.launch.options import FLAGS, define_flags, undefine_flags  # noqa: E402,F401 (undefine: tests)
from experiments.launch.processes import is_multiprocess, launch_processes, spawn_local  # noqa: E402
from experiments.launch.validation import validate  # noqa: E402


def launch(f, argv: list[str]) -> dict:
    """Runs the configured sweep; returns the results record (with `path`, where it was written)."""
    xla_flags.configure(f.command_buffers)  # before the first device use (a no-op once JAX has started)
    if f.spawn_local_processes:
        return spawn_local(f, argv)
    if is_multiprocess(f):
        return launch_processes(f, argv)
    setup = validate(f)
    if setup.disagg is not None:
        return launch_disagg(f, setup, argv)
    return launch_colocated(f, setup, argv)


def run_main(argv: list[str]) -> dict:
    """Parses `argv` (argv[0] is the program name) into fresh flags and runs; for tests and notebooks."""
    define_flags()
    FLAGS.unparse_flags()
    FLAGS(argv)
    return launch(FLAGS, argv)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not is_multiprocess(FLAGS):
        launch(FLAGS, sys.argv)
        return
    try:
        launch(FLAGS, sys.argv)
    except BaseException:  # one process of a group failed: say why and leave now, past jax's shutdown barrier
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def run():
    """Console script `dwdp-launch`."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
