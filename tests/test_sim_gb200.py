"""Tests of the GB200 NVL72 scenario of the performance model (dwdp_jax/sim/gb200.py): hand-computable pieces
(the prefetch layout, per-rank all-to-all rows, the step breakdown), the inputs read from our measurements, and
that the committed blind prediction is what the code computes."""

import json
import math

import numpy as np
import pytest

from dwdp_jax.config import preset
from dwdp_jax.sim import costs, gb200, hardware, simulator
from dwdp_jax.sim.simulator import DWDPConfig, RankBatch, step_costs

R1 = preset("deepseek-r1")
BLIND = "simulator-20261206-cpu-gb200-blind.json"


def test_gb200_profile_is_the_cited_datasheet_times_h200_fractions():
    hw = hardware.GB200_NVL72
    assert hw.nvlink_gbps == 900.0 and hw.hbm_gb == 186.0 and hw.gpus_per_domain == 72 and hw.power_w == 1200.0
    assert hw.bf16_tflops == pytest.approx(2500 * 799 / 989)
    assert hw.fp8_tflops == pytest.approx(5000 * 1454 / 1979)
    assert hw.fp4_tflops == pytest.approx(2 * hw.fp8_tflops)
    assert hw.hbm_gbps == pytest.approx(8000 * 4300 / 4800)


def test_nvfp4_bytes_and_ranks_touched():
    assert costs.BYTES_PER_PARAM["nvfp4"] == 0.5 + 1 / 16  # E2M1 values, one FP8 scale per 16
    assert costs.ranks_touched(R1, 1) == pytest.approx(1.0)
    assert costs.ranks_touched(R1, 256) == pytest.approx(8.0)  # one expert per rank: every routed expert a rank
    miss = np.prod([(128 - i) / (256 - i) for i in range(8)])  # G=2: none of the 8 in a given half
    assert costs.ranks_touched(R1, 2) == pytest.approx(2 * (1 - miss))
    # A token is sent once per remote rank holding its experts, not once per routed expert.
    per_rank = costs.dep_a2a_bytes(R1, 100, 4, 1.0, per_rank=True)
    assert per_rank == pytest.approx(100 * costs.ranks_touched(R1, 4) * 7168 * 0.75)
    assert per_rank < costs.dep_a2a_bytes(R1, 100, 4, 1.0) / 2


def test_prefetch_layout_memory_and_fetch():
    eb = costs.expert_params(R1) * costs.BYTES_PER_PARAM["nvfp4"]
    even = costs.weight_memory_gb(R1, 4, 2, "nvfp4")
    assert costs.weight_memory_gb(R1, 4, 2, "nvfp4", prefetch_per_peer=64) == pytest.approx(even)
    # p = 56: 256 - 3 * 56 = 88 local experts per MoE layer, two buffers of 3 * 56 experts.
    replicas = costs.weight_memory_gb(R1, 4, 2, "nvfp4", prefetch_per_peer=56)
    assert replicas - even == pytest.approx((58 * (88 - 64) - 2 * 3 * 8) * eb / 1e9)
    # Pulling p = 10 experts from each of 3 peers moves what fetch_frac = 30 / (3/4 * 256) of fetch-all moves.
    cfg, hw = preset("r1-layers-4"), hardware.GB200_NVL72
    cm = costs.CostModel(cfg, hw, expert_format="nvfp4")
    batch = [RankBatch(np.array([4096]), np.array([0]), 1)]
    layout = step_costs(cm, hw, DWDPConfig(group_size=4, prefetch_per_peer=10), batch)[0]
    frac = step_costs(cm, hw, DWDPConfig(group_size=4, fetch_frac=30 / (0.75 * 256)), batch)[0]
    assert layout.time_s == pytest.approx(frac.time_s, rel=1e-12) and layout.time_s > 0
    with pytest.raises(ValueError, match="E/G"):
        gb200.PaperScenario(prefetch_per_peer=70)


def test_step_breakdown_balanced_and_skewed():
    hw, scenario = hardware.GB200_NVL72, gb200.PaperScenario()
    eff = gb200.optimized_efficiency(hw, R1, scenario)
    cm = costs.CostModel(R1, hw, eff, expert_format="nvfp4")
    dep, dwdp = gb200.strategies(hw, scenario)
    same = [np.array([8192, 8192])] * 4
    parts, iteration = gb200.step_breakdown(cm, hw, dep, same)
    assert parts["sync_wait_us"] == pytest.approx(0.0, abs=1e-6)
    assert parts["moe_layer_us"] == pytest.approx(parts["attention_and_other_us"] + parts["grouped_gemm_us"]
                                                 + parts["all_to_all_us"])
    assert iteration == pytest.approx(step_costs(cm, hw, dep, [RankBatch(x, 0 * x, len(x)) for x in same])[0].time_s)
    skewed = [np.array([8192, 8192, 8192])] + [np.array([8192, 8192])] * 3
    p_dep, _ = gb200.step_breakdown(cm, hw, dep, skewed)
    assert p_dep["sync_wait_us"] > 0
    p_dwdp, t_dwdp = gb200.step_breakdown(cm, hw, dwdp, skewed)
    assert p_dwdp["all_to_all_us"] == 0 and p_dwdp["sync_wait_us"] == 0
    assert p_dwdp["moe_layer_us"] == pytest.approx(p_dwdp["attention_and_other_us"] + p_dwdp["grouped_gemm_us"]
                                                  + p_dwdp["interference_us"] + p_dwdp["exposed_fetch_us"])


def test_sampled_steps_fill_the_budget_with_whole_prompts():
    scenario = gb200.PaperScenario(min_ratio=0.8, steps=8)
    for step in gb200.sample_steps(scenario):
        assert len(step) == 4
        for lengths in step:
            assert lengths.sum() <= scenario.token_budget
            assert ((lengths >= 0.8 * 8192 - 1) & (lengths <= 8192)).all()


def test_inputs_from_our_measurements():
    record = {"rows": [dict(regime="prefill", flops=2e12, kernel_s=dict(fp8=2e-3)),
                       dict(regime="prefill", flops=1e12, kernel_s=dict(fp8=1e-3)), dict(regime="decode")]}
    assert gb200.kernel_fp8_grouped_gemm_frac(record) == pytest.approx(1000.0 / 1454.0)
    assert 0.65 < gb200.kernel_fp8_grouped_gemm_frac(gb200._load(gb200.KERNELS_PREFILL_FILE)) < 0.8
    # Copies beside compute: the H200 fit scaled by the copies' share of HBM bandwidth.
    h200 = gb200.copy_slowdown(hardware.H200_HGX)
    assert h200 == pytest.approx(simulator.COPY_ENGINE_SLOWDOWN * hardware.H200_HGX.peer_copy_gbps
                                 * hardware.H200_HGX.copy_engine.efficiency / gb200.H200_COPY_ENGINE_GBPS)
    assert gb200.moe_token_bytes(R1, 0.5625, 2.0) == 2 * 8 * 7168 * 2.5625


def test_the_committed_blind_prediction_is_what_the_code_computes():
    blind = json.loads((gb200.RESULTS / BLIND).read_text())
    assert blind["config"]["blind"]
    ctx = gb200.context_prediction()
    assert ctx["ctx_dwdp_over_dep"] == pytest.approx(blind["metrics"]["gb200_ctx_dwdp_over_dep_blind"], rel=1e-9)
    assert math.isfinite(blind["metrics"]["gb200_e2e_dwdp_over_dep_blind"])
