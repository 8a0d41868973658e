"""Performance model of DWDP vs DEP serving (issue 9): hardware profiles, layer costs, an event simulator.

  hardware.py    achieved rates per GPU: H200_HGX (measured), GB200_NVL72 (cited datasheet x H200 fractions); peer
                 copies per fetch backend (fixed cost + share of the link)
  costs.py       FLOPs, bytes and roofline times of one R1 layer; DWDP fetch and DEP all-to-all bytes
  strategies.py  the two strategies: DWDPConfig (with the measured compute/copy slowdowns) and DEPConfig
  step.py        one step per rank (DWDP pipeline, DEP lockstep), from a rank's batch through the costs
  simulator.py   the workload, the per-rank scheduler and serving with continuous batching
  calibration.py our JAX implementation on H200: the parameters fitted once on recorded runs, and the fits
  gb200.py       the paper's setting on GB200 NVL72 (NVFP4 experts, DWDP4 vs DEP4 context servers), predicted blind
  disagg_prediction.py  DWDP vs DEP context servers sized against DEP generation servers (`predict_nvl72`)
  validate.py    comparison with recorded measurements; the GB200 NVL72 prediction next to the paper's
                 (calibration and validate are not imported here, so that `python -m dwdp_jax.sim.validate`
                 runs cleanly)
"""

from dwdp_jax.sim.costs import CostModel, Efficiency
from dwdp_jax.sim.hardware import GB200_NVL72, H200_HGX, PROFILES, AllToAll, Hardware
from dwdp_jax.sim.simulator import (DEPConfig, DWDPConfig, RankBatch, RankStep, RunResult, SchedulerConfig, Workload,
                                    dep_step, dwdp_rank_step, fetch_time_s, simulate, step_costs)

__all__ = [
    "GB200_NVL72", "H200_HGX", "PROFILES", "AllToAll", "CostModel", "DEPConfig", "DWDPConfig", "Efficiency", "Hardware",
    "RankBatch", "RankStep", "RunResult", "SchedulerConfig", "Workload", "dep_step", "dwdp_rank_step", "fetch_time_s",
    "simulate", "step_costs",
]
