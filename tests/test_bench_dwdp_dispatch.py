"""The DWDP dispatch benchmark end to end on CPU (tiny preset, jnp experts), in a subprocess (absl flags are
process-wide): both runners run every point and the record's metrics follow from its rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_dwdp_dispatch_writes_both_runners(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT,
               XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "bench_dwdp_dispatch.py"), "--preset=tiny",
           "--backend=jnp", "--device_kind=cpu", "--decode_batch=1,2", "--decode_context=32", "--typical=2x32",
           "--repeats=2", "--warmup=0", f"--out={tmp_path}"]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (name,) = os.listdir(tmp_path)
    assert name.startswith("engine-") and name.endswith("-cpu-dwdp-dispatch.json")
    record = json.load(open(tmp_path / name))
    rows = record["rows"]
    assert [(r["batch"], r["context"]) for r in rows] == [(1, 32), (2, 32)]
    for r in rows:
        for runner in ("single", "dwdp_rank"):
            assert all(r[runner][k] > 0 for k in ("step_s", "host_s", "step_ahead_s"))
        assert r["single"]["programs_per_step"] == 1 and r["dwdp_rank"]["programs_per_step"] > 2
        assert any("dwdp.py" in e["function"] for e in r["dwdp_rank"]["host_profile"]["top"])
        # the rank's programs by name in the host trace, each launching kernels
        trace = r["dwdp_rank"]["host_trace"]
        assert any(e["name"] == "PjitFunction(prologue)" for e in trace["host_events"])
        assert set(trace["kernels_per_call_by_module"]) >= {"jit_prologue", "jit_layer_head"}
        assert r["logits_rel_diff"] <= 1e-2  # the same step through both runners
    typical = rows[1]
    m = record["metrics"]
    assert m["typical_point"] == "2x32"
    assert m["dwdp_step_ahead_over_single"] == pytest.approx(
        typical["dwdp_rank"]["step_ahead_s"] / typical["single"]["step_ahead_s"])
    extra = typical["dwdp_rank"]["programs_per_step"] - 1
    assert m["dwdp_dispatch_us_per_program"] == pytest.approx(
        (typical["dwdp_rank"]["host_s"] - typical["single"]["host_s"]) / extra * 1e6)
