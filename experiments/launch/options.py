"""The launcher's flags: one table, defined on absl's global FLAGS at run time (importing defines nothing).

Each row: (define function, name, default, help, extra keyword arguments). A new flag is one row here plus its
use where the engines are built (`engines.dwdp_groups` for every DWDP group of both modes).
"""

from __future__ import annotations

from absl import flags

from dwdp_jax import xla_flags
from dwdp_jax.engine import disagg as disagg_lib

STRATEGIES = list(disagg_lib.STRATEGIES)
MODES = ["colocated", "disagg"]

FLAGS = flags.FLAGS

_FLAGS = [
    # model
    (flags.DEFINE_string, "preset", "tiny", "model preset with random weights: tiny, r1-layers-N, deepseek-r1", {}),
    (flags.DEFINE_string, "checkpoint", None, "HF DeepSeek-V3/R1 directory (overrides --preset)", {}),
    (flags.DEFINE_enum, "dtype", None, "activation / unquantized weight dtype (default: float32 on CPU, whose XLA "
     "backend lacks bf16 x bf16 -> f32 batched dots; bfloat16 elsewhere)", dict(enum_values=["bfloat16", "float32"])),
    # what serves: colocated
    (flags.DEFINE_enum, "mode", "colocated", "colocated: one --strategy on every device; disagg: context and "
     "generation servers (--context_*, --generation_*)", dict(enum_values=MODES)),
    (flags.DEFINE_enum, "strategy", "dwdp", "colocated: single device, DWDP, replicated data parallel, or DEP",
     dict(enum_values=STRATEGIES)),
    (flags.DEFINE_integer, "num_devices", 0, "devices to use (0: 1 for single, every visible device otherwise)", {}),
    (flags.DEFINE_integer, "group_size", None, "colocated DWDP group size (default: num_devices); num_devices / "
     "group_size groups", {}),
    # what serves: disaggregated
    (flags.DEFINE_list, "context_devices", [], "disagg: devices of the context servers, one sweep point each "
     "(default: half of --num_devices); the generation servers get the rest", {}),
    (flags.DEFINE_list, "context_strategy", ["dwdp"], "disagg: context servers' strategy, one sweep point each "
     f"({', '.join(STRATEGIES)})", {}),
    (flags.DEFINE_integer, "context_group_size", 0, "disagg: DWDP/DEP group size of the context servers (0: all "
     "context devices)", {}),
    (flags.DEFINE_enum, "generation_strategy", "dep", "disagg: generation servers' strategy",
     dict(enum_values=STRATEGIES)),
    (flags.DEFINE_integer, "generation_group_size", 0, "disagg: DWDP/DEP group size of the generation servers (0: "
     "all generation devices)", {}),
    (flags.DEFINE_list, "context_token_budget", ["0"], "disagg: prefill tokens per context step per device, one "
     "sweep point each (0: --token_budget's default)", {}),
    (flags.DEFINE_integer, "context_max_batch_size", 0, "disagg: cache slots per context device (prompts being "
     "prefilled or waiting for their hand-off; 0: --max_batch_size)", {}),
    (flags.DEFINE_enum, "kv_transfer", "device_put", "disagg: how a prefilled cache moves to a generation device",
     dict(enum_values=["device_put", "copy_engine"])),
    (flags.DEFINE_bool, "verify_handoff", False, "disagg: compare every hand-off's arrived cache rows with the "
     "source's, bit for bit (two device-to-host copies per request, off the serving threads)", {}),
    # DWDP
    (flags.DEFINE_enum, "fetch", "device_put", "DWDP fetch backend: device_put, copy_engine (cudaMemcpyPeerAsync, "
     "host-ordered), copy_engine_stream (the same copies ordered on the device, no host wait), pallas_pull (the "
     "Pallas remote-DMA kernel reading peer memory in place, on the compute stream: not overlapped) or pallas_async "
     "(that kernel on a side stream beside the layers, device-ordered; pair it with --gemm_sms)",
     dict(enum_values=["device_put", "copy_engine", "copy_engine_stream", "pallas_pull", "pallas_async"])),
    (flags.DEFINE_integer, "gemm_sms", 0, "DWDP: persistent CTAs of the Pallas expert GEMMs (0: one per SM); with "
     "--fetch=pallas_async, the SM count minus its 16 fetch CTAs", {}),
    (flags.DEFINE_enum, "expert_backend", "auto", "expert GEMMs: ragged_dot (jnp), Mosaic GPU kernels (pallas), or "
     "auto (pallas on GPUs)", dict(enum_values=["auto", "jnp", "pallas"])),
    (flags.DEFINE_enum, "attention", "auto", "MLA over the paged cache: the Pallas kernels, the einsum "
     "reference, or auto (Pallas on a GPU with a bf16 cache)", dict(enum_values=["auto", "pallas", "einsum"])),
    (flags.DEFINE_enum, "fp8_matmul", "auto", "FP8 linear layers: the block-scaled FP8 GEMM (pallas), the weight "
     "dequantized to bf16 (dequantize), or auto (pallas on a GPU)", dict(enum_values=["auto", "pallas", "dequantize"])),
    (flags.DEFINE_integer, "kv_pages", 0, "pages of 64 tokens in each rank's cache pool (0: every slot at "
     "max_seq_len); requests are admitted while the pool can hold their prompt + output", {}),
    (flags.DEFINE_integer, "prefetch_depth", 1, "DWDP: MoE layers fetched ahead (0: fetch each layer right before "
     "it runs: the no-prefetch ablation)", {}),
    (flags.DEFINE_bool, "staggered", True, "DWDP: rank-rotated source order (False: every rank reads peers 0, 1, "
     "...: the no-staggering ablation)", {}),
    (flags.DEFINE_bool, "merge_copy", False, "DWDP: copy local and fetched experts into one buffer before the "
     "grouped GEMM (the no-split-weight-management ablation)", {}),
    (flags.DEFINE_enum, "planner_policy", "none", "DWDP prefetch: none (whole peer buffers, no host sync), or a "
     "planner policy (per-layer expert choice from router statistics; misses fetched on demand)",
     dict(enum_values=["none", "fetch_all", "top_k", "coverage"])),
    (flags.DEFINE_integer, "planner_top_k", 0, "top_k policy: minimum remote experts per layer", {}),
    (flags.DEFINE_float, "planner_coverage", 0.9, "coverage policy: target share of the expected needed remote "
     "experts", {}),
    (flags.DEFINE_integer, "staging_budget", 0, "planner policies: most experts prefetched per layer (0: no cap)",
     {}),
    (flags.DEFINE_string, "placement", None, "DWDP expert placement JSON (`Placement.save`, e.g. from `python -m "
     "dwdp_jax.planner.summarize TRACES --placement_out=FILE`; default: the contiguous split; shared with "
     "dwdp-convert)", {}),
    (flags.DEFINE_string, "save_router_trace", "", "DWDP: directory for each rank's router statistics after the "
     "run (`router-rank<r>.npz`; `python -m dwdp_jax.planner.summarize` summarizes them or optimizes a placement)",
     {}),
    (flags.DEFINE_float, "routing_skew", 0.0, "random weights: Zipf exponent of the expert load the routers are "
     "calibrated to (planner.skew; 0: the random init's near-uniform load)", {}),
    # workload
    (flags.DEFINE_string, "workload", "fixed", "fixed (--input_len/--output_len), fixed-<I>-<O> (e.g. fixed-8k-1k), "
     "lognormal (medians --input_len/--output_len), or a JSONL trace path", {}),
    (flags.DEFINE_integer, "num_requests", 8, "requests to generate (a trace: the first N when given)", {}),
    (flags.DEFINE_integer, "input_len", 32, "prompt tokens (median for lognormal)", {}),
    (flags.DEFINE_integer, "output_len", 16, "output tokens (median for lognormal)", {}),
    (flags.DEFINE_float, "lognormal_sigma", 0.5, "sigma of the lognormal lengths", {}),
    (flags.DEFINE_list, "concurrency", ["0"], "requests in flight over all GPUs, one timed pass each (0: all "
     "queued at the start)", {}),
    # scheduling and sampling
    (flags.DEFINE_integer, "max_batch_size", 8, "cache slots (requests in flight) per rank; disagg: per "
     "generation device", {}),
    (flags.DEFINE_integer, "token_budget", 0, "tokens per step per rank (0: max(max_batch_size, 2048))", {}),
    (flags.DEFINE_integer, "max_seq_len", 0, "tokens per cache slot (0: the longest request's prompt + output)", {}),
    (flags.DEFINE_float, "temperature", 0.0, "sampling temperature (0: greedy)", {}),
    (flags.DEFINE_bool, "step_ahead", True, "single and DWDP ranks: plan and dispatch each decode step while the "
     "one before runs, its tokens fed on the device (no host round trip between decode steps); DEP: off", {}),
    (flags.DEFINE_enum, "command_buffers", "engine", "XLA command buffers (CUDA graphs) of the step programs: "
     "engine (every kernel type, no minimum size: dwdp_jax.xla_flags), xla_default, or off; set before JAX starts "
     "(a flag already in XLA_FLAGS wins)", dict(enum_values=sorted(xla_flags.COMMAND_BUFFER_FLAGS))),
    (flags.DEFINE_integer, "seed", 0, "seed of the weights, the workload and sampling", {}),
    # multi-process DWDP / DP (processes.py): one group over several processes or hosts
    (flags.DEFINE_integer, "num_processes", 1, "processes of one DWDP/DP group (one per host or GPU), joined through "
     "jax.distributed; each serves its ranks' share and process 0 writes the record", {}),
    (flags.DEFINE_integer, "process_id", 0, "this process's index in the group (0 hosts the coordination service)",
     {}),
    (flags.DEFINE_string, "coordinator_address", None, "host:port of process 0's coordination service", {}),
    (flags.DEFINE_bool, "cluster_detection", False, "let jax detect the coordinator address, process count and id "
     "that the flags leave out (SLURM, Open MPI, ...)", {}),
    (flags.DEFINE_integer, "spawn_local_processes", 0, "start this many processes of one group on this machine "
     "(--num_devices split evenly; GPUs assigned in order) and wait for them", {}),
    (flags.DEFINE_list, "local_device_ids", [], "GPUs of this process (default: every visible one)", {}),
    (flags.DEFINE_enum, "peer_memory", "auto", "how ranks read the expert buffers of other processes: auto (CUDA "
     "IPC on GPUs, POSIX shared memory on CPU), cuda_ipc, shm, or fabric (multi-node NVLink; not runnable here)",
     dict(enum_values=["auto", "cuda_ipc", "shm", "fabric"])),
    (flags.DEFINE_float, "peer_timeout_s", 600.0, "multi-process: time-out of start-up and of every control-channel "
     "wait (barriers, the gather of results); a peer that does not answer in time is an error", {}),
    (flags.DEFINE_float, "heartbeat_timeout_s", 60.0, "multi-process: the coordination service declares a silent "
     "process dead after this long (JAX then stops the others)", {}),
    (flags.DEFINE_bool, "join_devices", True, "multi-process: join JAX's multi-process device view "
     "(jax.distributed.initialize); false: only the coordination service (DWDP needs no global devices)", {}),
    # the run and its record
    (flags.DEFINE_enum, "warmup", "run", "before each timed pass: run the same pass untimed (exactly its "
     "programs), compile every bucket, or nothing", dict(enum_values=["run", "buckets", "none"])),
    (flags.DEFINE_integer, "show_requests", 8, "requests whose first generated tokens are printed and recorded", {}),
    (flags.DEFINE_bool, "progress", True, "show a progress bar", {}),
    (flags.DEFINE_string, "device_kind", "", "the device tool's kind for the results file (default: cpu, or the "
     "platform's device kind)", {}),
    (flags.DEFINE_string, "out", "experiments/results", "results directory", {}),
    (flags.DEFINE_string, "tag", "", "file-name tag (default: <strategy>-<model>-g<devices>, or "
     "disagg-<context strategies>-<generation strategy>-<model>-g<devices>)", {}),
]
DISAGG_ONLY = ("context_devices", "context_strategy", "context_group_size", "generation_strategy",
               "generation_group_size", "context_token_budget", "context_max_batch_size", "kv_transfer",
               "verify_handoff")
COLOCATED_ONLY = ("strategy", "group_size", "save_router_trace")
_defined: list[str] = []


def define_flags() -> None:
    """Defines the launcher's flags once. A flag that another entry point in this process already defined
    under the same name (`--group_size`, `--progress` of dwdp-convert) is shared, not redefined."""
    for define, name, default, help_text, extra in _FLAGS:
        if name not in FLAGS:
            define(name, default, help=help_text, **extra)
            _defined.append(name)


def undefine_flags() -> None:
    """Removes the flags `define_flags` added (in-process tests share absl's global FLAGS)."""
    while _defined:
        delattr(FLAGS, _defined.pop())
