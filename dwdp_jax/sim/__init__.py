"""Performance model of DWDP vs DEP serving (issue 9): hardware profiles, layer costs, an event simulator.

  hardware.py  achieved rates per GPU: H200_HGX (measured), GB200_NVL72 (datasheet x H200 fractions)
  costs.py     FLOPs, bytes and roofline times of one R1 layer; DWDP fetch and DEP all-to-all bytes
  simulator.py one step per rank (DWDP pipeline, DEP lockstep) and serving with continuous batching
  validate.py  comparison with recorded measurements; the GB200 NVL72 prediction next to the paper's
"""

from dwdp_jax.sim.costs import CostModel, Efficiency
from dwdp_jax.sim.hardware import GB200_NVL72, H200_HGX, PROFILES, AllToAll, Hardware
from dwdp_jax.sim.simulator import (DEPConfig, DWDPConfig, RankBatch, RankStep, RunResult, SchedulerConfig, Workload,
                                    dep_step, dwdp_rank_step, fetch_time_s, simulate, step_costs)
from dwdp_jax.sim.validate import Comparison, Report, decode_point, load_measurements, predict_nvl72, validate

__all__ = [
    "AllToAll", "Comparison", "CostModel", "DEPConfig", "DWDPConfig", "Efficiency", "GB200_NVL72", "H200_HGX",
    "Hardware", "PROFILES", "RankBatch", "RankStep", "Report", "RunResult", "SchedulerConfig", "Workload",
    "decode_point", "dep_step", "dwdp_rank_step", "fetch_time_s", "load_measurements", "predict_nvl72", "simulate",
    "step_costs", "validate",
]
