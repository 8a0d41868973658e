"""The engine benchmark end to end on CPU (tiny preset, tiny sizes, jnp experts), in a subprocess (absl flags
are process-wide): the results JSON follows the schema and its numbers follow from the roofline accounting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

from dwdp_jax.config import TINY
from dwdp_jax.engine import roofline

# The module's tests share one benchmark run: one xdist worker runs them (`--dist loadgroup`).
pytestmark = pytest.mark.xdist_group("test_bench_engine")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--preset=tiny", "--backend=jnp", "--device_kind=cpu", "--prefill_requests=2", "--prefill_prompt_len=32",
         "--prefill_chunk=16", "--decode_batch=1,4", "--decode_context=32", "--typical=4x32", "--repeats=2",
         "--hbm_copy_mib=16", "--peak_matmul_size=128"]


def run_bench(out_dir, *extra) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT,
               # compile speed over code quality: these programs run a few steps of a tiny model
               XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "bench_engine.py"), *SMALL, f"--out={out_dir}", *extra]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (name,) = os.listdir(out_dir)
    assert name.startswith("engine-") and name.endswith("-cpu.json")
    with open(os.path.join(out_dir, name)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return run_bench(tmp_path_factory.mktemp("engine"), "--profile", "--profile_steps=2")


def test_schema_and_headline(record):
    for key in ("part", "date", "commit", "command", "device_kind", "num_devices", "jax_version", "config",
                "metrics", "rows"):
        assert key in record, key
    assert record["part"] == "engine" and record["device_kind"] == "cpu" and record["jax_version"] == jax.__version__
    assert "--preset=tiny" in record["command"] and record["config"]["backend"] == "jnp"
    # a profiled run turns command buffers off, and the file says with which XLA flags it ran
    assert record["config"]["command_buffers"] == "off"
    assert record["config"]["xla_flags"].endswith("--xla_gpu_enable_command_buffer=")
    assert record["config"]["xla_flags"].startswith("--xla_backend_optimization_level=0")
    m = record["metrics"]
    assert m["param_bytes"] == m["param_bytes_accounted"] == roofline.model_bytes(TINY, 2)
    assert m["skipped_points"] == [] and m["hbm_gbps"] > 0 and m["bf16_peak_tflops"] > 0
    typical = next(r for r in record["rows"] if r["regime"] == "decode" and (r["batch"], r["context"]) == (4, 32))
    assert m["decode_hbm_frac"] == typical["hbm_frac"] > 0
    assert m["decode_output_tps_typical"] == pytest.approx(4 / typical["step_s"])
    assert m["decode_hbm_frac_best"] >= m["decode_hbm_frac"]
    assert 0 < m["prefill_mfu"] == max(r["mfu_mixed"] for r in record["rows"] if r["regime"] == "prefill")


def test_decode_rows_follow_from_the_router_and_the_accounting(record):
    rows = {r["batch"]: r for r in record["rows"] if r["regime"] == "decode"}
    assert sorted(rows) == [1, 4] and not any("error" in r for r in rows.values())
    # one token selects exactly top-k distinct experts per MoE layer; four tokens at least as many, at most 4k
    assert rows[1]["distinct_experts_per_moe_layer"] == [TINY.num_experts_per_tok] * TINY.num_moe_layers
    for ones, fours in zip(rows[1]["distinct_experts_per_moe_layer"], rows[4]["distinct_experts_per_moe_layer"]):
        assert ones <= fours <= min(TINY.n_routed_experts, 4 * TINY.num_experts_per_tok)
    hbm = record["metrics"]["hbm_gbps"]
    for b, r in rows.items():
        need = roofline.decode_bytes(TINY, b, b * 32, r["distinct_experts_per_moe_layer"])
        assert r["bytes"] == need.as_dict()
        assert r["hbm_frac"] == pytest.approx(need.total / r["step_s"] / 1e9 / hbm)
        assert r["output_tokens_per_s"] == pytest.approx(b / r["step_s"])
        assert 0 < r["host_return_s"]  # the host's share of a step (no upper bound: CPU steps run on the host)
        ahead = roofline.decode_bytes(TINY, b, b * 32, r["distinct_experts_step_ahead"])
        assert r["hbm_frac_step_ahead"] == pytest.approx(ahead.total / r["step_ahead_s"] / 1e9 / hbm)
        # the host's step under cProfile names the runner's own frames
        functions = [e["function"] for e in r["host_profile"]["top"]]
        assert r["host_profile"]["host_s_per_call"] > 0 and any("runner.py" in f for f in functions)


def test_prefill_row_counts_the_chunked_prompts(record):
    (row,) = [r for r in record["rows"] if r["regime"] == "prefill"]
    assert (row["requests"], row["tokens_per_step"], row["steps_per_call"]) == (2, 32, 2)
    flops = roofline.prefill_flops(TINY, [(0, 16), (16, 16)] * 2, routed_fp8=False)  # jnp experts run in bf16
    assert (row["flops_bf16"], row["flops_fp8"]) == (flops.bf16, 0)
    assert row["step_s"] == pytest.approx(row["call_s"] / 2)
    peak = record["metrics"]["bf16_peak_tflops"] * 1e12
    assert row["mfu_bf16_peak"] == pytest.approx(flops.total / row["call_s"] / peak)
    assert row["layer_tokens_per_s"] == pytest.approx(row["input_tokens_per_s"] * TINY.num_layers)
    assert record["metrics"]["prefill_layer_tps_best"] == row["layer_tokens_per_s"]
    assert record["metrics"]["deepseek_prefill_layer_tps_per_gpu"] == pytest.approx(62.7e3 / 8 * 61)


def test_profile_breaks_down_the_headline_points(record):
    """--profile: the best prefill row and the typical decode row carry a per-step breakdown (engine_profile),
    copied into the metrics."""
    rows = record["rows"]
    prefill = next(r for r in rows if r["regime"] == "prefill")
    decode = {r["batch"]: r for r in rows if r["regime"] == "decode"}
    assert "breakdown" not in decode[1]  # only the typical point (4x32) is profiled
    m = record["metrics"]
    for row, key, steps in ((prefill, "prefill_breakdown", 2), (decode[4], "decode_breakdown", 2)):
        b = row["breakdown"]
        assert m[key] == b and b["steps"] == steps and b["warnings"] == []
        assert b["gpu_s"]["attention"] > 0 and b["gpu_s"]["expert_gemm"] > 0 and b["gpu_s"]["unattributed"] == 0
        assert b["unprofiled_step_s"] == row["step_s"]
        assert b["dispatch_idle_unprofiled_s"] == pytest.approx(row["step_s"] - b["gpu_busy_s"])
        assert b["dispatch_idle_s"] == pytest.approx(b["wall_s"] - b["gpu_busy_s"])
    assert record["config"]["profile"] is True


def test_time_budget_skips_points_but_writes_the_file(tmp_path):
    record = run_bench(tmp_path, "--time_budget_s=0")
    m = record["metrics"]
    assert record["rows"] == [] and m["decode_hbm_frac"] is None and m["prefill_mfu"] is None
    assert m["skipped_points"] == ["prefill n=2 x 16", "decode L=32"]


def test_an_empty_prefill_list_measures_decode_only(tmp_path):
    record = run_bench(tmp_path, "--prefill_requests=", "--time_budget_s=0")
    assert record["metrics"]["skipped_points"] == ["decode L=32"]


def test_time_budget_refuses_a_point_the_longest_so_far_would_overrun():
    from experiments.timing import Budget  # not bench_engine: importing it defines its absl flags here

    now = [100.0]
    budget = Budget(t0=100.0, limit_s=140.0, clock=lambda: now[0])
    assert budget.allows("first")  # nothing measured yet
    now[0] += 100.0  # the first point (compile + measurement) took 100 s
    budget.record(100.0)
    assert not budget.allows("second")  # 100 s used + 100 s expected > 140
    assert budget.skipped == ["second"]
    now[0] = 120.0
    budget = Budget(t0=100.0, limit_s=140.0, clock=lambda: now[0])
    budget.record(30.0)
    assert budget.allows("third")  # 20 s used + 30 s expected < 140
