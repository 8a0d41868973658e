"""The e2e DWDP-vs-DEP sweep: matching arithmetic on hand-computable curves, argument checks, and a smoke run of
the whole script (three launcher subprocesses on the tiny preset, two simulated CPU devices).

`tiny_sweep` runs once per test session, also under pytest-xdist (a file lock in the session's shared temp
directory), and `tests/test_notebooks.py` reuses it; its two tests share an xdist group, so one worker runs both.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys

import pytest

from experiments import e2e_sweep as sw
from experiments.e2e_sweep import Point

REPO = pathlib.Path(__file__).resolve().parents[1]

# DEP's curve: TPS/GPU falls as TPS/user rises. Listed out of order on purpose.
DEP = [Point(8, 20.0, 50.0, ttft_s=0.4, tpot_s=0.05), Point(16, 10.0, 100.0, ttft_s=0.8, tpot_s=0.1),
       Point(4, 40.0, 30.0, ttft_s=0.2, tpot_s=0.025)]


# ---------------------------------------------------------------------------------------------------------------
# Arithmetic.

def test_interpolate_between_and_outside_points():
    assert sw.interpolate(DEP, 15.0) == pytest.approx(75.0)  # halfway between (10, 100) and (20, 50)
    assert sw.interpolate(DEP, 30.0) == pytest.approx(40.0)  # halfway between (20, 50) and (40, 30)
    assert sw.interpolate(DEP, 10.0) == pytest.approx(100.0)
    assert sw.interpolate(DEP, 15.0, "ttft_s") == pytest.approx(0.6)
    assert math.isnan(sw.interpolate(DEP, 9.99)) and math.isnan(sw.interpolate(DEP, 40.01))


def test_interpolate_averages_points_at_equal_tps_per_user():
    curve = [Point(1, 10.0, 100.0), Point(2, 10.0, 80.0), Point(3, 20.0, 40.0)]
    assert sw.interpolate(curve, 10.0) == pytest.approx(90.0)
    assert sw.interpolate(curve, 15.0) == pytest.approx(65.0)


def test_match_curves_keeps_the_overlap_and_summarizes():
    dwdp = [Point(2, 5.0, 200.0), Point(12, 15.0, 90.0), Point(6, 30.0, 44.0), Point(1, 50.0, 20.0),
            Point(3, math.nan, 10.0)]
    matches = sw.match_curves(dwdp, DEP)
    assert [m.point.concurrency for m in matches] == [12, 6]  # by TPS/user; 5 and 50 are outside [10, 40]
    assert [m.ratio for m in matches] == pytest.approx([90 / 75, 44 / 40])
    assert matches[0].ref_tpot_s == pytest.approx(0.075)
    summary = sw.summarize_matches(matches)
    assert summary["median"] == pytest.approx((1.2 + 1.1) / 2) and summary["best"] == pytest.approx(1.2)
    assert summary["points"] == 2 and summary["tps_per_user_range"] == [15.0, 30.0]
    assert sw.summarize_matches([]) == dict(median=None, best=None, points=0, tps_per_user_range=None)


def _record(strategy, points, **config):
    rows = [dict(kind="point", concurrency=p.concurrency, tps_per_user_median=p.tps_per_user,
                 output_tps_per_gpu=p.tps_per_gpu, ttft_median_s=p.ttft_s, tpot_median_s=p.tpot_s) for p in points]
    rows.append(dict(kind="request", request_id="r0"))  # other row kinds are not points
    return dict(part="e2e", device_kind="cpu", num_devices=2, commit="abc", jax_version="0",
                config=dict(strategy=strategy, model="tiny", **config), rows=rows)


def test_compare_metrics_and_rows():
    records = {
        "dwdp": _record("dwdp", [Point(12, 15.0, 90.0, 0.5, 1 / 15), Point(6, 30.0, 44.0, 0.3, 1 / 30)]),
        "dep": _record("dep", DEP),
        "dwdp[prefetch_depth=0]": _record("dwdp", [Point(6, 30.0, 22.0), Point(12, 15.0, 45.0)]),
    }
    metrics, rows = sw.compare(records)
    assert metrics["dwdp_over_dep_tps_per_gpu"] == pytest.approx(1.15)
    assert metrics["dwdp_over_dep_tps_per_gpu_best"] == pytest.approx(1.2)
    assert metrics["dwdp_over_dep_tps_per_gpu_points"] == 2
    # The variant at half the default's rate: 0.5 against DWDP (interpolated at equal points), 0.575 against DEP.
    assert metrics["dwdp[prefetch_depth=0]_over_dwdp_tps_per_gpu"] == pytest.approx(0.5)
    assert metrics["dwdp[prefetch_depth=0]_over_dep_tps_per_gpu"] == pytest.approx(0.575)
    assert metrics["ttft_median_s"] == pytest.approx({"dwdp": 0.4, "dep": (0.6 + 0.3) / 2})
    assert metrics["tpot_median_s"]["dep"] == pytest.approx((0.075 + 0.0375) / 2)
    assert sum(r["kind"] == "point" for r in rows) == 7
    matched = [r for r in rows if r["kind"] == "matched" and r["arm"] == "dwdp"]
    assert [r["ref_output_tps_per_gpu"] for r in matched] == pytest.approx([75.0, 40.0])


def test_curve_points_read_rows_without_kinds():
    # Launcher records written before rows had kinds: one row per concurrency.
    record = dict(rows=[dict(concurrency=4, output_tps_per_gpu=10.0, tps_per_user_median=None)])
    (p,) = sw.curve_points(record)
    assert p.concurrency == 4 and p.tps_per_gpu == 10.0 and math.isnan(p.tps_per_user)


# ---------------------------------------------------------------------------------------------------------------
# Arguments.

def test_arms_commands_and_passthrough():
    args, flags = sw.parse_args(["--strategies=dwdp,dep", "--concurrency=2,4", "--variant=--prefetch_depth=0",
                                 "--preset=tiny", "--num_devices=2"])
    assert flags == ["--preset=tiny", "--num_devices=2"]
    assert [a.name for a in args.arms] == ["dwdp", "dep", "dwdp[prefetch_depth=0]"]
    cmd = sw.launcher_command("py", args.arms[2], [2, 4], "/o", "sweep", flags)
    assert cmd == ["py", "-m", "experiments.launch", "--strategy=dwdp", "--concurrency=2,4", "--out=/o",
                   "--tag=sweep-dwdp-prefetch-depth-0", "--preset=tiny", "--num_devices=2", "--prefetch_depth=0"]


@pytest.mark.parametrize("argv, message", [
    (["--strategies=dwdp"], "must include dep"),
    (["--concurrency=4"], "at least two values"),
    (["--concurrency=a,b"], "integers"),
    (["--tag=x", "--out=y", "--strategy=dep"], "set by the sweep"),
    (["--variant=--concurrency=3"], "set by the sweep"),
    (["--strategies=dwdp,dep,dwdp"], "arms must differ"),
    (["--strategies=dwdp,dep,ep"], "strategy 'ep'"),
    (["--preset", "tiny"], "--name=value"),
    (["--reuse=ep=/tmp/x.json"], "ARM=PATH"),
    (["--reuse=dwdp=/nonexistent/e2e.json"], "no file"),
])
def test_bad_arguments_say_why(argv, message, capsys):
    with pytest.raises(SystemExit):
        sw.parse_args(argv)
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Smoke run.

TINY_FLAGS = ["--preset=tiny", "--num_devices=2", "--num_requests=4", "--input_len=12", "--output_len=4",
              "--max_batch_size=1", "--noprogress", "--show_requests=0"]


def _run_tiny_sweep(out: pathlib.Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "experiments.e2e_sweep", "--strategies=dwdp,dep", "--concurrency=2,4",
           "--variant=--prefetch_depth=0", f"--out={out}", "--tag=sweep", f"--jax_cache_dir={out / 'jax_cache'}",
           *TINY_FLAGS]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    (out / "sweep.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory) -> pathlib.Path:
    """Results directory of one tiny CPU sweep (dwdp, dep, dwdp with --prefetch_depth=0), made once per session."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = shared / "tiny_sweep"
    with open(shared / "tiny_sweep.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (out / "done").exists():
                out.mkdir(exist_ok=True)
                _run_tiny_sweep(out)
                (out / "done").touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


@pytest.mark.xdist_group("tiny_sweep")  # with the notebook test that reads it: no worker waits on the lock
def test_sweep_on_tiny_cpu_writes_one_e2e_record(tiny_sweep):
    (path,) = tiny_sweep.glob("e2e-*-cpu-sweep.json")
    record = json.loads(path.read_text())
    for key in ("part", "date", "commit", "command", "device_kind", "num_devices", "jax_version", "config",
                "metrics", "rows"):
        assert key in record, key
    assert record["part"] == "e2e" and record["device_kind"] == "cpu" and record["num_devices"] == 2
    assert record["config"]["arms"] == ["dwdp", "dep", "dwdp[prefetch_depth=0]"]
    for name, file in record["config"]["arm_files"].items():
        arm = json.loads((tiny_sweep / file).read_text())
        assert arm["config"]["strategy"] == name.split("[")[0]
        assert [r["concurrency"] for r in sw.point_rows(arm)] == [2, 4]
    assert record["config"]["arm_files"]["dwdp[prefetch_depth=0]"].endswith("-sweep-dwdp-prefetch-depth-0.json")
    points = [r for r in record["rows"] if r["kind"] == "point"]
    assert sorted((r["arm"], r["concurrency"]) for r in points) == sorted(
        (a, c) for a in record["config"]["arms"] for c in (2, 4))
    assert all(r["output_tps_per_gpu"] > 0 for r in points)
    # The headline is the median of the matched rows' ratios (None when CPU timings left no overlap).
    metrics = record["metrics"]
    ratios = [r["ratio"] for r in record["rows"] if r["kind"] == "matched" and r["arm"] == "dwdp"
              and r["reference"] == "dep"]
    assert metrics["dwdp_over_dep_tps_per_gpu_points"] == len(ratios)
    if ratios:
        assert metrics["dwdp_over_dep_tps_per_gpu"] == pytest.approx(statistics.median(ratios))
        assert set(metrics["ttft_median_s"]) == {"dwdp", "dep"}
    else:
        assert metrics["dwdp_over_dep_tps_per_gpu"] is None
