"""A DWDP group across processes (and hosts): each process runs its local ranks, one per local device.

Global rank r of a group of G lives in the process whose slice of ranks holds it (`coordination.process_slices`:
process 0 has ranks 0..n0-1, process 1 the next, ...); placement, planner and programs are those of an
in-process group. A local rank reads a peer in another process through a `RemoteRank`: that peer's expert
buffers, opened once through a `peer_memory` transport, which every fetch backend reads like an in-process
peer's. Nothing on the step path talks to another process.

Protocol (keys under the group's namespace in the coordination service; every wait has a deadline, `PeerError`):
  1. hello: each process publishes its local rank count, host and a fingerprint of (model config, placement,
     DWDP config, transport); every process checks that all fingerprints agree and the ranks add up to G.
  2. exports: each local rank exports its expert buffers (every MoE layer, every field) and publishes their
     descriptors under `exports/rank<r>`. Where a buffer's memory cannot be exported (XLA's allocator under jax
     0.11.2 / CUDA 13 gives memory cudaIpcGetMemHandle refuses), the transport copies it into memory that can
     be, and the rank computes from that copy from then on (`DwdpRank.replace_expert_arrays`).
  3. imports: each process reads every remote rank's descriptors and opens them for each local device.
  4. ready: a barrier; then the ranks serve independently.
  5. close (`DwdpProcessGroup.close`): barrier `stopped` (nobody reads peers any more), unmap the imports,
     barrier `unmapped`, release the exports. Until that second barrier no process frees an exported buffer.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import socket
from typing import Sequence

import jax
from dwdp_jax.experts import ExpertWeights
from dwdp_jax.model import DeepseekV3
from dwdp_jax.parallel.coordination import ControlChannel, PeerError, process_slices
from dwdp_jax.parallel.dwdp import DwdpConfig, DwdpRank, model_device, own_rank_weights, rank_weights
from dwdp_jax.parallel.fetch import FetchBackend
from dwdp_jax.parallel.peer_memory import Transport
from dwdp_jax.parallel.threads import run_in_threads
from dwdp_jax.planner.placement import Placement

_FIELDS = ("w_gate_up", "w_down", "s_gate_up", "s_down")


class RemoteRank:
    """A rank of another process as one local device reads it: `local_experts(layer)` gives that rank's expert
    buffer of decoder layer `layer` as `ExpertWeights` of `PeerArray`s (what fetch backends copy from)."""

    def __init__(self, rank: int, process: int, buffers: dict[int, ExpertWeights]):
        self.rank, self.process, self.buffers = rank, process, buffers

    def local_experts(self, layer: int) -> ExpertWeights:
        return self.buffers[layer]


def fingerprint(cfg, placement: Placement, dwdp: DwdpConfig, transport: str) -> str:
    """What every process of a group must agree on, hashed (the weights themselves are not: processes build or
    load the same ones, e.g. random weights from one seed)."""
    text = json.dumps([repr(cfg), placement.home_le.tolist(), repr(placement.replicas), repr(dwdp), transport])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _buffers(weights: ExpertWeights) -> list:
    return [getattr(weights, f) for f in _FIELDS if getattr(weights, f) is not None]


class DwdpProcessGroup:
    """This process's part of a DWDP group spanning processes (module docstring).

    channel: the group's control channel (`coordination.join`); devices: this process's devices, one rank each;
    model: the whole model (split per rank here) or rank_models: per local device, models holding only their
    rank's experts (global rank = this process's first rank + index). `ranks` are the local `DwdpRank`s.
    """

    def __init__(self, channel: ControlChannel, devices: Sequence[jax.Device], placement: Placement,
                 dwdp: DwdpConfig, fetch: FetchBackend, transport: Transport, *, model: DeepseekV3 | None = None,
                 rank_models: Sequence[DeepseekV3] | None = None, name: str = "dwdp"):
        if (model is None) == (rank_models is None):
            raise ValueError("give either the whole model or the local rank models")
        cfg = (model or rank_models[0]).cfg
        if len(set(devices)) != len(devices) or not devices:
            raise ValueError(f"a process needs distinct local devices, got {list(devices)}")
        if placement.num_ranks != dwdp.group_size or placement.num_layers != cfg.num_moe_layers:
            raise ValueError(f"placement is for {placement.num_ranks} ranks x {placement.num_layers} MoE layers; the "
                             f"group has {dwdp.group_size} ranks and the model {cfg.num_moe_layers} MoE layers")
        self.cfg, self.placement, self.dwdp, self.fetch, self.transport = cfg, placement, dwdp, fetch, transport
        self.channel = channel.scoped(name)
        self.process_id, self.num_processes = channel.process_id, channel.num_processes
        startup = channel.spec.startup_timeout_s
        try:
            self._hello(len(devices), startup)
            self.ranks = self._local_ranks(devices, model, rank_models)
            self._export()
            self._import(startup)
            self.channel.barrier("ready", startup)
        except BaseException as e:
            channel.report_failure(f"{type(e).__name__}: {e}")
            raise

    # -- start-up ------------------------------------------------------------------------------------------

    def _hello(self, num_local: int, timeout_s: float) -> None:
        mine = dict(ranks=num_local, host=socket.gethostname(), pid=os.getpid(), transport=self.transport.name,
                    fingerprint=fingerprint(self.cfg, self.placement, self.dwdp, self.transport.name))
        hellos = self.channel.gather_json("hello", mine, timeout_s, "hello (rank count, configuration)")
        for p, h in enumerate(hellos):
            if h["fingerprint"] != mine["fingerprint"] or h["transport"] != mine["transport"]:
                raise ValueError(f"process {p} ({h['host']}, pid {h['pid']}) runs a different model config, placement, "
                                 f"DWDP config or transport ({h['transport']}) than process {self.process_id}: every "
                                 "process of a group must be started with the same settings")
        self.slices = process_slices([h["ranks"] for h in hellos])
        self.group_size = self.slices[-1].stop
        if self.group_size != self.dwdp.group_size:
            raise ValueError(f"the processes hold {self.group_size} ranks ({[len(s) for s in self.slices]} per "
                             f"process) but the DWDP group size is {self.dwdp.group_size}")
        self.rank_ids = list(self.slices[self.process_id])
        self.process_of = {r: p for p, s in enumerate(self.slices) for r in s}

    def _local_ranks(self, devices, model, rank_models) -> list[DwdpRank]:
        if model is not None:
            weights = [rank_weights(model, self.placement, r, d) for r, d in zip(self.rank_ids, devices)]
        else:
            if [model_device(m) for m in rank_models] != list(devices):
                raise ValueError("each rank model must live on its device, in the order of `devices`")
            weights = [own_rank_weights(m) for m in rank_models]
        return [DwdpRank(self.cfg, r, d, head, layers, self.placement, self.dwdp, self.fetch)
                for r, d, (head, layers) in zip(self.rank_ids, devices, weights)]

    def _export(self) -> None:
        for rank in self.ranks:
            layers = sorted(rank.expert_buffers)
            for i in layers:
                old = _buffers(rank.expert_buffers[i])
                new = self.transport.exportable(old)
                moved = {a.unsafe_buffer_pointer(): b for a, b in zip(old, new) if b is not a}
                if moved:
                    rank.replace_expert_arrays(i, moved)
            arrays = [a for i in layers for a in _buffers(rank.expert_buffers[i])]
            descriptors = iter(dict(d, source=rank.rank) for d in self.transport.export(arrays))
            table = {str(i): {f: next(descriptors) for f in _FIELDS if getattr(rank.expert_buffers[i], f) is not None}
                     for i in layers}
            self.channel.publish(f"exports/rank{rank.rank}", json.dumps(table).encode())

    def _import(self, timeout_s: float) -> None:
        tables = {}
        for r in range(self.group_size):
            if r not in self.rank_ids:
                what = f"process {self.process_of[r]}'s expert handles of rank {r}"
                tables[r] = json.loads(self.channel.read(f"exports/rank{r}", timeout_s, what))
        local = {rank.rank: rank for rank in self.ranks}
        for rank in self.ranks:
            group = []
            for r in range(self.group_size):
                if r in local:
                    group.append(local[r])
                    continue
                buffers = {}
                for layer, fields in tables[r].items():
                    opened = {f: self.transport.open(d, rank.device) for f, d in fields.items()}
                    block = rank.expert_buffers[int(layer)].block
                    buffers[int(layer)] = ExpertWeights(opened["w_gate_up"], opened["w_down"], opened.get("s_gate_up"),
                                                        opened.get("s_down"), block)
                group.append(RemoteRank(r, self.process_of[r], buffers))
            rank.group = group

    # -- serving and shutdown ------------------------------------------------------------------------------

    def run_parallel(self, fn, args_per_rank: Sequence) -> list:
        """fn(rank, arg) for every local rank, each in its own host thread; results in local rank order."""
        return run_in_threads([lambda i=i: fn(self.ranks[i], args_per_rank[i]) for i in range(len(self.ranks))],
                              name=f"dwdp-p{self.process_id}-rank")

    def close(self) -> None:
        """Leaves the group without freeing anything a peer may still read (module docstring, step 5). Every
        process must call it; a peer that never does makes it raise `PeerError` after the control timeout."""
        timeout = self.channel.spec.control_timeout_s
        try:
            self.channel.barrier("stopped", timeout)
            for rank in self.ranks:
                rank._carry = None  # noqa: SLF001 (the next step's staged fetches, copies of peers' buffers)
                rank.group = []
            gc.collect()
            self.transport.close_imports()
            self.channel.barrier("unmapped", timeout)
        except PeerError:
            raise
        except BaseException as e:
            self.channel.report_failure(f"{type(e).__name__}: {e}")
            raise
        self.transport.release_exports()

