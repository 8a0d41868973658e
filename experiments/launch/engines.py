"""Models and engines: the weights (a preset's random weights or a checkpoint, whole or per rank) and the runners
of each strategy (single, DWDP groups, replicated DP, DEP) with their schedulers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from dwdp_jax.engine import disagg as disagg_lib
from dwdp_jax.engine.lockstep import LockstepScheduler
from dwdp_jax.engine.runner import Buckets, DepRunner, DwdpRankRunner, ModelRunner
from dwdp_jax.engine.sampling import SamplingParams
from dwdp_jax.engine.scheduler import Scheduler, SchedulerConfig
from dwdp_jax.experts import LocalExecutor
from dwdp_jax.model import init_model, set_fp8_matmul
from dwdp_jax.parallel.dep import DepModel
from dwdp_jax.parallel.dwdp import DwdpConfig, DwdpGroup, replicated_placement
from dwdp_jax.parallel.memory import memory_per_device
from dwdp_jax.parallel.fetch import fetch_backend
from dwdp_jax.planner import skew as skew_lib
from dwdp_jax.planner.placement import Placement
from dwdp_jax.planner.policies import FetchPolicy
from experiments.launch.validation import Setup, usage_error

# A preset whose whole model is at most this large is built once and split (every strategy then serves the
# same weights); larger presets get random weights built directly on each rank.
FULL_MODEL_MAX_BYTES = 4e9


def _full_model_fits(cfg, dtype) -> bool:
    weight_bytes = 1.0 if cfg.weight_block_size else jnp.dtype(dtype).itemsize
    return memory_per_device(cfg, 1, 0, weight_bytes)["total_bytes"] <= FULL_MODEL_MAX_BYTES


def fp8_matmul_mode(f, device) -> str:
    """--fp8_matmul resolved: auto is the FP8 GEMM on a GPU, the dequantizing reference elsewhere."""
    if f.fp8_matmul != "auto":
        return f.fp8_matmul
    return "pallas" if device.platform == "gpu" else "dequantize"


def build_model(f, cfg, dtype, device, expert_ids=None, skew=None):
    """The model on `device`; with `expert_ids(layer)`, only those routed experts (a rank's shard); random
    weights get the routing skew `skew` (each router rescaled to unit logit spread, biases calibrated). Its
    FP8 linear layers multiply as --fp8_matmul says."""
    if f.checkpoint:
        from dwdp_jax import load_model

        model = load_model(f.checkpoint, dtype=dtype, with_mtp=False, expert_ids=expert_ids,
                           n_local_experts=None if expert_ids is None else len(expert_ids(cfg.first_k_dense_replace)),
                           device=device)
        return set_fp8_matmul(model, fp8_matmul_mode(f, device))
    with jax.default_device(device):
        n_local = None if expert_ids is None else len(expert_ids(cfg.first_k_dense_replace))
        model = init_model(cfg.replace(num_mtp_layers=0), seed=f.seed, dtype=dtype, n_local_experts=n_local,
                           jitted=device.platform == "gpu")
        if skew is not None:
            skew_lib.apply_skew(model, skew, logit_std=1.0)
        return set_fp8_matmul(model, fp8_matmul_mode(f, device))


def shared_model(f, setup: Setup, single_needed: bool = False):
    """The whole model on the first device when it is small (every engine is then built from the same weights),
    or when a single-device engine needs it; None otherwise (engines build their ranks' shards)."""
    full = f.checkpoint is None and _full_model_fits(setup.cfg, setup.dtype)
    return build_model(f, setup.cfg, setup.dtype, setup.devices[0], skew=setup.skew) if full or single_needed else None


def rank_models(f, setup, devices, placement, first_rank: int = 0):
    """One model per device holding the placement's experts of ranks first_rank, first_rank + 1, ... (random
    presets: the same seed on every rank)."""
    cfg = setup.cfg

    def expert_ids(rank):
        first = cfg.first_k_dense_replace
        return lambda layer: (placement.local_experts(layer - first, rank)
                              if first <= layer < cfg.num_layers else None)

    return [build_model(f, cfg, setup.dtype, d, expert_ids(first_rank + i), setup.skew) for i, d in enumerate(devices)]


@dataclasses.dataclass
class Engines:
    """What serves the workload: runners with their scheduler factories, and how requests are split."""

    runners: list
    make_schedulers: Callable[[], list]  # () -> one scheduler per runner
    weights_bytes_per_device: int
    notes: dict
    first_index: int = 0  # runner i is engine first_index + i of the run (multi-process: of every process's)
    num_engines: int | None = None  # engines of the whole run (None: len(runners))

    @property
    def total(self) -> int:
        return self.num_engines or len(self.runners)


def bytes_on(tree, device) -> int:
    total = 0
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            total += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == device)
    return total


def placement_from_flags(f, cfg, group_size: int) -> Placement:
    """--placement: a placement file checked against the model and the group, or the contiguous split."""
    if not f.placement:
        return Placement.from_config(cfg, group_size)
    placement = Placement.load(f.placement)
    if placement.num_ranks != group_size or placement.num_layers != cfg.num_moe_layers \
            or placement.num_experts != cfg.n_routed_experts:
        usage_error(f"--placement={f.placement} is for {placement.num_ranks} ranks x {placement.num_layers} MoE "
                    f"layers x {placement.num_experts} experts; this run has DWDP groups of {group_size}, "
                    f"{cfg.num_moe_layers} MoE layers and {cfg.n_routed_experts} experts")
    return placement


def dwdp_setup(f, cfg, group_size: int, replicated: bool) -> tuple[Placement, DwdpConfig]:
    """The placement and `DwdpConfig` of a DWDP group of `group_size` (replicated: DP ranks, every expert local,
    nothing fetched). The one place a DWDP group is configured, for both modes and for multi-process groups."""
    if replicated:
        return replicated_placement(cfg, group_size), DwdpConfig(group_size, 0, expert_backend=f.expert_backend)
    policy = (None if f.planner_policy == "none" else
              FetchPolicy(f.planner_policy, k=f.planner_top_k, coverage=f.planner_coverage,
                          experts_per_token=cfg.num_experts_per_tok))
    return placement_from_flags(f, cfg, group_size), DwdpConfig(
        group_size, f.prefetch_depth, staggered=f.staggered, expert_backend=f.expert_backend, policy=policy,
        staging_budget_experts=f.staging_budget or None, merge_copy=f.merge_copy, gemm_sms=f.gemm_sms or None)


def dwdp_groups(f, setup: Setup, model, devices: list, group_size: int, replicated: bool) -> list[DwdpGroup]:
    """DWDP groups of `group_size` over `devices` (`dwdp_setup` configures each)."""
    fetch = fetch_backend(f.fetch)
    groups = []
    for i in range(0, len(devices), group_size):
        group_devices = devices[i : i + group_size]
        placement, dwdp = dwdp_setup(f, setup.cfg, group_size, replicated)
        if model is not None:
            groups.append(DwdpGroup(model, group_devices, placement, dwdp, fetch))
        else:
            groups.append(DwdpGroup.from_rank_models(rank_models(f, setup, group_devices, placement), placement,
                                                     dwdp, fetch))
    return groups


def build_runners(f, setup: Setup, model, strategy: str, devices: list, group_size: int, sched: SchedulerConfig,
                  buckets: Buckets, seed: int) -> Engines:
    """Runners of one strategy over `devices`: one per device (dwdp: groups of `group_size`; dp), one per DEP
    group of `group_size` devices, or one single-device runner. `make_schedulers` gives colocated schedulers."""
    cfg = setup.cfg
    kw = dict(buckets=buckets, sampling=SamplingParams(temperature=f.temperature),
              attention=None if f.attention == "auto" else f.attention, num_pages=f.kv_pages or None)
    slots, max_len = sched.max_batch_size, sched.max_seq_len
    notes = dict(weights="random" if f.checkpoint is None else "checkpoint",
                 weights_built="whole model, split per rank" if model is not None else "per rank")

    if strategy == "single":
        if model is None:
            model = build_model(f, cfg, setup.dtype, devices[0], skew=setup.skew)
        runner = ModelRunner(model, slots, max_len, device=devices[0],
                             executor=LocalExecutor(backend=f.expert_backend), seed=seed, **kw)
        return Engines([runner], lambda: [Scheduler(sched, page_table=runner.page_table)],
                       bytes_on(runner.state, devices[0]), notes)

    if strategy == "dep":
        runners = []
        for i in range(0, len(devices), group_size):
            group = devices[i : i + group_size]
            if model is not None:
                dep = DepModel(model, group, backend=f.expert_backend)
            else:
                dep = DepModel.from_rank_models(
                    rank_models(f, setup, group, Placement.from_config(cfg, len(group))), backend=f.expert_backend)
            runners.append(DepRunner(dep, slots, max_len, backend=f.expert_backend, seed=seed + i, **kw))
        make = lambda: [LockstepScheduler([Scheduler(sched, rank=r, page_table=r_.page_tables[r])
                                           for r in range(len(r_.group_devices))]) for r_ in runners]
        return Engines(runners, make, bytes_on(runners[0].state, devices[0]), notes)

    # dwdp and dp: one rank per device, each with its own runner, scheduler and host thread
    g = group_size if strategy == "dwdp" else len(devices)
    groups = dwdp_groups(f, setup, model, devices, g, replicated=strategy == "dp")
    return rank_runners(f, setup, [rank for group in groups for rank in group.ranks], strategy, g, sched, buckets,
                        seed, notes)


def rank_runners(f, setup: Setup, ranks: list, strategy: str, group_size: int, sched: SchedulerConfig,
                 buckets: Buckets, seed: int, notes: dict, first_index: int = 0,
                 num_engines: int | None = None) -> Engines:
    """One runner and scheduler per DWDP/DP rank; runner i is engine `first_index + i` of the run's `num_engines`
    (its seed and scheduler rank: a multi-process run's processes number their ranks globally)."""
    kw = dict(buckets=buckets, sampling=SamplingParams(temperature=f.temperature),
              attention=None if f.attention == "auto" else f.attention, num_pages=f.kv_pages or None)
    slots, max_len = sched.max_batch_size, sched.max_seq_len
    runners = [DwdpRankRunner(rank, slots, max_len, seed=seed + first_index + r, **kw) for r, rank in enumerate(ranks)]
    rank0 = ranks[0]
    weights = bytes_on([rank0.head_state] + [state for _, state in rank0.layers], rank0.device)
    weight_bytes = 1.0 if setup.cfg.weight_block_size else setup.dtype.itemsize
    notes = dict(notes, staging_bytes_per_device_est=memory_per_device(
        setup.cfg, group_size, f.prefetch_depth, weight_bytes)["staging_bytes"] if strategy == "dwdp" else 0)
    make = lambda: [Scheduler(sched, rank=first_index + r, page_table=runners[r].page_table)
                    for r in range(len(runners))]
    return Engines(runners, make, weights, notes, first_index, num_engines)


def build_engines(f, setup: Setup) -> Engines:
    """The colocated engines of `setup.strategy` over every device."""
    model = shared_model(f, setup, single_needed=setup.strategy == "single")
    g = setup.group_size if setup.strategy == "dwdp" else len(setup.devices)
    return build_runners(f, setup, model, setup.strategy, list(setup.devices), g, setup.sched, setup.buckets, f.seed)


def build_disagg(f, setup: Setup, model, roles) -> tuple[Engines, Engines]:
    """Context and generation runners of one (context, generation) `RoleSpec` pair."""
    ctx, gen = roles
    ctx_devices, gen_devices = disagg_lib.split_devices(setup.devices, ctx, gen)
    context = build_runners(f, setup, model, ctx.strategy, ctx_devices, ctx.group, setup.disagg.context[-1],
                            setup.disagg.context_buckets, f.seed)
    generation = build_runners(f, setup, model, gen.strategy, gen_devices, gen.group, setup.sched, setup.buckets,
                               f.seed + 1000)
    return context, generation
