"""Hardware profiles for the DWDP/DEP performance model: achieved (not datasheet) rates per GPU.

Every number is measured on our machines or, for GB200 NVL72, a datasheet number scaled by the fraction of the
datasheet that we achieved on H200. Units: rates in TFLOP/s, bandwidths in GB/s (1 GB = 1e9 bytes), capacities
in GB, times in seconds. Sources of the H200 numbers:
  [df]   /work/shared/device-facts.md, 2026-11-22, 4x H200 (`nvidia-h200-x4`): cuBLAS matmul peaks, HBM copy,
         NVLink topology, single-pair peer copies, `device_put` at three sizes, the all-to-all of probe 3;
  [dwdp] experiments/results/dwdp-20261122-nvidia-h200-x2.json (bench_dwdp.py, commit 6cd96a7, 2x H200): our
         DWDP's copy-engine fetch, every rank pulling a MoE layer at once, next to cudaMemcpyPeerAsync in the
         same run.

H200 datasheet numbers used to form the achieved fractions (NVIDIA H200 SXM product brief): dense bf16
989 TFLOP/s, dense FP8 1979 TFLOP/s, HBM3e 4.8 TB/s, 141 GB; NVLink 4 with 18 links.

GB200 NVL72: public specifications only (sources and what each says at `GB200_NVL72`), each achieved rate the
datasheet rate times the fraction of its datasheet rate that we achieved on H200 (nothing is measured on
GB200, and nothing is taken from TensorRT-LLM's or the DWDP paper's results).

Peer copies. A copy of B bytes issued by a fetch backend takes `latency_s + B / (efficiency * share)`, where
`share` is the link rate left to it: a GPU's outbound copy-engine rate (`peer_copy_gbps`) divided by the readers
pulling from that source at once. A destination pulling from one source at a time is not limited below that:
on [df] every GPU pulling 1 GiB from its neighbour at once got the single-pair rate (283 GiB/s vs 270), and on
[dwdp] both GPUs pulling got 388 GB/s vs 396 for one pair.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class AllToAll:
    """Achieved time of one all-to-all (e.g. MoE dispatch): `latency_s + bytes_out / bandwidth`.

    `bytes_out` counts the bytes one rank sends to other ranks (its own share stays local).
    """

    latency_s: float
    bw_gbps: float

    def __post_init__(self):
        if self.latency_s < 0 or self.bw_gbps <= 0:
            raise ValueError(f"AllToAll needs latency_s >= 0 and bw_gbps > 0, got {self}")

    def time_s(self, bytes_out: float) -> float:
        return self.latency_s + bytes_out / (self.bw_gbps * 1e9)

    @staticmethod
    def fit(points: list[tuple[float, float]]) -> AllToAll:
        """Latency + size/bw through two (bytes_out, seconds) points."""
        (b0, t0), (b1, t1) = points
        bw = (b1 - b0) / (t1 - t0)
        return AllToAll(latency_s=t0 - b0 / bw, bw_gbps=bw / 1e9)


@dataclasses.dataclass(frozen=True)
class PeerCopy:
    """How one fetch backend moves bytes from a peer: a fixed cost per copy and the share of the link it reaches."""

    latency_s: float  # per copy (one copy = one peer's experts of one layer)
    efficiency: float  # achieved rate / the link rate left to this copy

    def __post_init__(self):
        if self.latency_s < 0 or not 0 < self.efficiency <= 1:
            raise ValueError(f"PeerCopy needs latency_s >= 0 and efficiency in (0, 1], got {self}")

    def time_s(self, bytes_: float, share_gbps: float) -> float:
        return self.latency_s + bytes_ / (self.efficiency * share_gbps * 1e9)

    @staticmethod
    def fit(points: list[tuple[float, float]], link_gbps: float) -> PeerCopy:
        """Least-squares latency and rate through (bytes, seconds) points of single-pair copies."""
        b, t = np.asarray(points, dtype=np.float64).T
        slope, intercept = np.polyfit(b, t, 1)
        return PeerCopy(latency_s=float(intercept), efficiency=float(1.0 / slope / (link_gbps * 1e9)))


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One GPU of a system, with its NVLink domain. All rates are achieved rates (see the module docstring)."""

    name: str
    gpus_per_domain: int
    bf16_tflops: float
    fp8_tflops: float
    fp4_tflops: float | None  # None: no FP4 tensor cores (FP4 weights then run at the FP8 rate)
    hbm_gbps: float  # bytes moved per second, reads and writes counted
    hbm_gb: float  # usable
    nvlink_gbps: float  # link rate, per direction per GPU
    peer_copy_frac: float  # one cudaMemcpyPeerAsync stream out of a GPU / nvlink_gbps
    copy_engine: PeerCopy  # DWDP's CopyEnginePull (cudaMemcpyPeerAsync on the destination's stream)
    device_put: PeerCopy  # DWDP's DevicePutFetch (jax.device_put between GPUs)
    all_to_all: AllToAll
    power_w: float | None = None  # the GPU's power limit (board TDP) in the configuration measured or specified

    def __post_init__(self):
        if self.gpus_per_domain < 1:
            raise ValueError("gpus_per_domain must be >= 1")
        for field in ("bf16_tflops", "fp8_tflops", "hbm_gbps", "hbm_gb", "nvlink_gbps"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be > 0")
        if not 0 < self.peer_copy_frac <= 1:
            raise ValueError("peer_copy_frac must be in (0, 1]")

    @property
    def peer_copy_gbps(self) -> float:
        """Outbound copy rate of one GPU, shared by the readers pulling from it at once."""
        return self.nvlink_gbps * self.peer_copy_frac

    def fetch_backend(self, name: str) -> PeerCopy:
        if name not in ("copy_engine", "device_put"):
            raise ValueError(f"unknown fetch backend {name!r}: use 'copy_engine' or 'device_put'")
        return getattr(self, name)

    def matmul_tflops(self, dtype: str) -> float:
        """Achieved dense matmul rate for weights of `dtype` ('bf16', 'fp8' or 'nvfp4')."""
        if dtype == "bf16":
            return self.bf16_tflops
        if dtype == "fp8":
            return self.fp8_tflops
        if dtype == "nvfp4":
            return self.fp4_tflops or self.fp8_tflops
        raise ValueError(f"unknown dtype {dtype!r}")

    def replace(self, **changes) -> Hardware:
        return dataclasses.replace(self, **changes)

    def with_nvlink_scale(self, scale: float) -> Hardware:
        """The same GPU with `scale` x the NVLink rate: fetches and all-to-all bandwidth scale, latency does not."""
        a2a = AllToAll(self.all_to_all.latency_s, self.all_to_all.bw_gbps * scale)
        return self.replace(name=f"{self.name}x{scale:g}nvl", nvlink_gbps=self.nvlink_gbps * scale, all_to_all=a2a)


# --------------------------------------------------------------------------------------------------------------
# H200 HGX: measured on our machines.

_H200_NVLINK_GBPS = 478.0  # [df] nvidia-smi topo: NV18, 18 links x 26.6 GB/s per direction
_H200_PEER_COPY_GBPS = 396.0  # [df] cudaMemcpyPeerAsync GPU0 -> GPU1, 4 GiB, one pair

_R1_DISPATCH_BYTES_PER_TOKEN = 8 * 7168 * 2  # top-8 copies of a bf16 row of 7168, as in the probe
# [df] probe 3, one `jax.lax.all_to_all` on 4 GPUs; 3/4 of the bytes leave the rank (this reproduces the quoted
# 104 and 265 GB/s "per rank out"): 1024 tokens/rank in 0.85 ms, 8192 tokens/rank in 2.66 ms.
_H200_A2A = AllToAll.fit([
    (0.75 * 1024 * _R1_DISPATCH_BYTES_PER_TOKEN, 0.85e-3),
    (0.75 * 8192 * _R1_DISPATCH_BYTES_PER_TOKEN, 2.66e-3),
])  # -> latency 0.59 ms, 341 GB/s. The intercept is XLA/NCCL's, measured, and large.

# [df] `jax.device_put` between two GPUs at three sizes: 4 GiB at 361 GB/s, 1 GiB at 270 GiB/s, 256 MiB at
# 190 GiB/s. Fit: 0.75 ms per copy (PJRT allocates the destination and orders the copy) + 384 GB/s.
DEVICE_PUT_SINGLE_PAIR = [(4 * 2**30, 4 * 2**30 / 361e9), (2**30, 1 / 270.0), (2**28, 0.25 / 190.0)]
_H200_DEVICE_PUT = PeerCopy.fit(DEVICE_PUT_SINGLE_PAIR, _H200_PEER_COPY_GBPS)

# [dwdp] metrics.fetch_frac_of_copy_engine: our CopyEnginePull, both GPUs pulling a 5.6 GB MoE layer at once,
# reached 364 GB/s = 0.937 of cudaMemcpyPeerAsync in the same run (388 GB/s, 2 GiB, both pulling). No fixed
# cost is resolved at these sizes (one fetch size was measured).
H200_COPY_ENGINE_EFFICIENCY = 0.9368186912522258

H200_HGX = Hardware(
    name="H200_HGX",
    gpus_per_domain=8,  # one HGX board; our machines expose up to 8 of them
    bf16_tflops=799.0,  # [df] cuBLAS dense 8192^3 bf16 (probe 3); datasheet 989 -> 0.81
    fp8_tflops=1454.0,  # [df] torch._scaled_mm e4m3 8192^3 (probe 3); datasheet 1979 -> 0.73
    fp4_tflops=None,
    hbm_gbps=4300.0,  # [df] device-to-device copy, read+write counted; datasheet 4800 -> 0.90
    hbm_gb=141.0,
    nvlink_gbps=_H200_NVLINK_GBPS,
    peer_copy_frac=_H200_PEER_COPY_GBPS / _H200_NVLINK_GBPS,
    copy_engine=PeerCopy(latency_s=0.0, efficiency=H200_COPY_ENGINE_EFFICIENCY),
    device_put=_H200_DEVICE_PUT,
    all_to_all=_H200_A2A,
    power_w=700.0,  # WORKSPACE Finding 10: every loaded phase ran at the 700 W software power cap
)

# --------------------------------------------------------------------------------------------------------------
# GB200 NVL72: datasheet rates times the fractions achieved on H200 (see the module docstring).
#
# Public sources, per GPU (one B200 of a GB200 superchip, 72 per NVLink domain):
#   [nvl72] NVIDIA GB200 NVL72 product page, rack totals: 72 Blackwell GPUs in one NVLink domain; FP4 tensor
#           1,440 PFLOPS, FP8/FP6 720 PFLOPS, FP16/BF16 360 PFLOPS (all "with sparsity"); up to 13.4 TB HBM3e at
#           576 TB/s; NVLink Switch System 130 TB/s. Per GPU: /72, and /2 for dense (no sparsity).
#   [b200]  glennklockwood.com/garden/processors/B200: "the GB200 variant of B200 when configured to 1,200 W":
#           dense matrix BF16 2500, FP8 5000, FP4 10000 TFLOPS (20000 sparse); 192 GB HBM3e, 8 TB/s; 1.8 TB/s
#           NVLink 5 (2 x 900 GB/s).
#   [nvl5]  NVIDIA NVLink page: fifth-generation NVLink, 18 links per Blackwell GPU, 1.8 TB/s total (bidirectional)
#           per GPU, i.e. 900 GB/s each way.
# So: 360 PF / 72 / 2 = 2.5 PF BF16, 720 / 72 / 2 = 5 PF FP8, 1440 / 72 / 2 = 10 PF FP4 ([nvl72] = [b200]);
# HBM 576 TB/s / 72 = 8 TB/s; 13.4 TB / 72 = 186 GB usable of the 192 GB stacks; NVLink 130 TB/s / 72 = 1.8 TB/s.

_BF16_FRAC = 799.0 / 989.0  # [df] cuBLAS bf16 / H200 datasheet
_FP8_FRAC = 1454.0 / 1979.0  # [df] FP8 _scaled_mm / H200 datasheet
_HBM_FRAC = 4300.0 / 4800.0  # [df] device copy / H200 datasheet
_A2A_BW_FRAC = _H200_A2A.bw_gbps / _H200_NVLINK_GBPS  # [df] probe 3's all-to-all / the H200 link rate

GB200_NVL72 = Hardware(
    name="GB200_NVL72",
    gpus_per_domain=72,  # [nvl72]
    bf16_tflops=2500.0 * _BF16_FRAC,  # [nvl72], [b200] dense BF16
    fp8_tflops=5000.0 * _FP8_FRAC,  # [nvl72], [b200] dense FP8
    fp4_tflops=10000.0 * _FP8_FRAC,  # [nvl72], [b200] dense FP4; FP4's achieved fraction unmeasured: FP8's assumed
    hbm_gbps=8000.0 * _HBM_FRAC,  # [nvl72] 576 TB/s / 72, [b200] 8 TB/s
    hbm_gb=186.0,  # [nvl72] 13.4 TB / 72 (the stacks hold 192 GB, [b200])
    nvlink_gbps=900.0,  # [nvl5], [b200] 1.8 TB/s bidirectional per GPU
    peer_copy_frac=H200_HGX.peer_copy_frac,  # [df] one cudaMemcpyPeerAsync stream: 0.83 of the link
    copy_engine=H200_HGX.copy_engine,  # [dwdp] our copy-engine pull: 0.94 of cudaMemcpyPeerAsync
    device_put=H200_HGX.device_put,
    # Bandwidth: the H200 fraction of the link rate. Latency: the H200 fit's 0.59 ms intercept belongs to XLA's
    # all-to-all; the NVL72 baseline is a dedicated NVLink all-to-all kernel, assumed at 50 us per call (the
    # order of DeepEP's published intranode dispatch/combine latencies). Sensitivity in `gb200.py`.
    all_to_all=AllToAll(latency_s=50e-6, bw_gbps=900.0 * _A2A_BW_FRAC),
    power_w=1200.0,  # [b200] the GB200 configuration of B200
)

PROFILES = {p.name: p for p in (H200_HGX, GB200_NVL72)}
