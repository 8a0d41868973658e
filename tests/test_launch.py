"""The end-to-end launcher, in-process with the tiny preset on simulated CPU devices."""

from __future__ import annotations

import json
import os
import pathlib

import jax
import pytest
from absl import app

from experiments import launch

# The module's tests share one set of launcher runs: one xdist worker runs them all (`--dist loadgroup`).
pytestmark = pytest.mark.xdist_group("launch")

COMMON = ["--preset=tiny", "--num_requests=2", "--input_len=8", "--output_len=4", "--max_batch_size=1",
          "--warmup=none", "--progress=false"]


@pytest.fixture(scope="module", autouse=True)
def launcher_flags():
    """absl's FLAGS are process-wide: leave none of the launcher's behind for other entry points' tests."""
    yield
    launch.undefine_flags()


class LazyRecords:
    """The launcher's record of each run in RUNS by name, the run made on first use (a test alone makes only the
    runs it reads)."""

    def __init__(self, out):
        self.out, self._records = out, {}

    def __getitem__(self, name):
        if name not in self._records:
            flags = [flag.format(out=self.out) for flag in RUNS[name]]
            self._records[name] = launch.run_main(["launch", *flags, f"--out={self.out}", *COMMON])
        return self._records[name]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return LazyRecords(tmp_path_factory.mktemp("results"))


# DWDP generation servers fetching by a planner policy from the router statistics they see
DISAGG_PLANNED = ["--mode=disagg", "--num_devices=3", "--context_devices=1", "--context_strategy=dwdp",
                  "--generation_strategy=dwdp", "--planner_policy=top_k", "--planner_top_k=1"]


# DWDP ablations: planned fetches with on-demand misses, merged buffers, unstaggered sources, no prefetch
ABLATIONS = ["--strategy=dwdp", "--num_devices=4", "--planner_policy=coverage", "--planner_coverage=0.5",
             "--merge_copy", "--nostaggered", "--prefetch_depth=0"]


# one device per role, as the GPU smoke run (DEP over a single device still runs lockstep plans)
DISAGG = ["--mode=disagg", "--num_devices=2", "--context_devices=1", "--context_strategy=dwdp",
          "--generation_strategy=dep", "--context_token_budget=4,8", "--verify_handoff"]

# The runs the tests read, by name ("{out}": the results directory)
RUNS = {"single": ["--strategy=single"], "dwdp": ["--strategy=dwdp", "--num_devices=2"], "disagg": DISAGG,
        "dwdp_ablations": ABLATIONS, "single_skew": ["--strategy=single", "--routing_skew=1.0"],
        "dwdp_skew": ["--strategy=dwdp", "--num_devices=2", "--routing_skew=1.0", "--planner_policy=top_k",
                      "--planner_top_k=1", "--save_router_trace={out}/traces"],
        "disagg_planned": DISAGG_PLANNED}


def saved(record):
    with open(record["path"]) as f:
        return json.load(f)


@pytest.mark.parametrize("strategy, num_devices", [("single", 1), ("dwdp", 2)])
def test_launch_writes_e2e_results(records, strategy, num_devices):
    saved = globals()["saved"](records[strategy])
    assert tuple(saved) == ("part", "date", "commit", "command", "device_kind", "num_devices", "jax_version",
                            "config", "metrics", "rows")  # the schema, exactly
    assert saved["part"] == "e2e" and saved["device_kind"] == "cpu" and saved["num_devices"] == num_devices
    assert saved["jax_version"] == jax.__version__ and f"--strategy={strategy}" in saved["command"]
    assert saved["config"]["strategy"] == strategy and saved["config"]["model"] == "tiny"
    # the XLA flags the run had (JAX started before the launcher here: the test process's, unchanged)
    assert saved["config"]["command_buffers"] == "engine" and saved["config"]["step_ahead"] is True
    assert saved["config"]["xla_flags"] == os.environ.get("XLA_FLAGS", "")
    m = saved["metrics"]
    assert m["num_requests"] == 2 and m["output_tokens"] == 2 * 4 and m["num_gpus"] == num_devices
    assert m["output_tps_per_gpu"] > 0 and m["ttft_median_s"] > 0 and m["kv_cache_bytes_per_gpu"] > 0
    outputs = saved["rows"][0]["outputs"]
    assert len(outputs) == 2 and all(len(tokens) == 4 for tokens in outputs.values())
    assert len(saved["rows"][0]["ranks"]) == num_devices  # step-time stats per rank
    steps = saved["rows"][0]["timeline"]  # every step of every device, as columns
    assert sorted(set(steps["device"])) == list(range(num_devices)) and steps["role"][0] == strategy
    assert sum(steps["prefill_tokens"]) == 2 * 8 and sum(steps["decode_tokens"]) == 2 * 3
    assert all(a <= b for a, b in zip(steps["start_s"], steps["end_s"]))
    requests = [r for r in saved["rows"] if r["kind"] == "request"]
    assert len(requests) == 2 and all(r["ttft_s"] > 0 for r in requests)


def test_strategies_generate_the_same_tokens(records):
    """Every strategy serves the same weights (the tiny model is built once and split)."""
    single = records["single"]["rows"][0]["outputs"]
    assert records["dwdp"]["rows"][0]["outputs"] == single
    points = [r for r in records["disagg"]["rows"] if r["kind"] == "point"]
    assert len(points) == 2 and all(p["outputs"] == single for p in points)
    assert records["dwdp_ablations"]["rows"][0]["outputs"] == single
    assert [r for r in records["disagg_planned"]["rows"] if r["kind"] == "point"][0]["outputs"] == single


def test_ablation_and_skew_flags_are_recorded_and_exact(records):
    config = saved(records["dwdp_ablations"])["config"]
    assert (config["planner_policy"], config["merge_copy"], config["staggered"], config["prefetch_depth"]) == (
        "coverage", True, False, 0)
    m = records["dwdp_ablations"]["metrics"]
    assert m["fetch_prefetched_bytes"] == 0 and m["fetch_miss_rate"] == 1.0  # depth 0: every remote expert on demand
    assert m["fetch_miss_bytes"] > 0
    skewed = records["single_skew"]["rows"][0]["outputs"]
    assert skewed != records["single"]["rows"][0]["outputs"]  # the skew changes the routers
    assert records["dwdp_skew"]["rows"][0]["outputs"] == skewed


def test_disaggregated_run_records_roles_handoffs_and_timelines(records):
    record = saved(records["disagg"])
    assert record["num_devices"] == 2 and record["config"]["mode"] == "disagg"
    assert record["config"]["context_token_budget"] == [4, 8] and "--mode=disagg" in record["command"]
    points = [r for r in record["rows"] if r["kind"] == "point"]
    assert [p["context_token_budget"] for p in points] == [4, 8]
    for p in points:
        assert (p["context_strategy"], p["context_devices"], p["generation_devices"]) == ("dwdp", 1, 1)
        assert p["num_gpus"] == 2 and p["handoff_count"] == 2 and p["output_tokens"] == 2 * 4
        steps = p["timeline"]
        assert dict(zip(steps["device"], steps["role"])) == {0: "context", 1: "generation"}
        context_steps = [t for r, t in zip(steps["role"], steps["prefill_tokens"]) if r == "context"]
        assert sum(context_steps) == 2 * 8 and max(context_steps) <= p["context_token_budget"]
    roles = [r for r in record["rows"] if r["kind"] == "role"]
    assert [r["role"] for r in roles] == ["context", "handoff", "generation"] * 2
    # an 8-token prompt moves min(16, the context cache's 8 + 1 positions)
    per_token = record["metrics"]["kv_bytes_per_token"]
    requests = [r for r in record["rows"] if r["kind"] == "request"]
    assert len(requests) == 4 and all(r["kv_len"] == 9 and r["kv_bytes"] == 9 * per_token for r in requests)
    assert all(r["context_device"] == 0 and r["generation_device"] == 1 for r in requests)
    assert all(r["ttft_s"] >= r["handoff_end_s"] - r["arrival_s"] > 0 for r in requests)


@pytest.mark.parametrize("flags, message", [
    (["--strategy=dwdp", "--num_devices=64"], "only 8 cpu devices are visible"),
    (["--strategy=dwdp", "--num_devices=3"], "must divide the 16 routed experts"),
    (["--strategy=single", "--expert_backend=pallas"], "needs GPUs"),
    (["--strategy=single", "--workload=zipf"], "--workload='zipf'"),
    (["--strategy=single", "--max_seq_len=10"], "requests need up to 12 tokens"),
    (["--mode=disagg", "--num_devices=4", "--context_devices=4"], "--context_devices=4 must leave both roles"),
    (["--mode=disagg", "--num_devices=1"], "needs at least 2 devices"),
    (["--mode=disagg", "--num_devices=8", "--context_devices=4", "--context_group_size=3"],
     "--context_group_size=3 must divide context_devices=4"),
    (["--mode=disagg", "--num_devices=4", "--context_devices=1", "--generation_strategy=dep"],
     "--generation_group_size=3 must divide the 16 routed experts"),
    (["--mode=disagg", "--num_devices=2", "--generation_strategy=single", "--context_strategy=dp,ep"],
     "--context_strategy='ep'"),
    (["--mode=disagg", "--num_devices=2", "--strategy=dep"], "--strategy is a --mode=colocated flag"),
    (["--strategy=dwdp", "--num_devices=2", "--context_devices=1"], "--context_devices is a --mode=disagg flag"),
    (["--mode=disagg", "--num_devices=2", "--kv_transfer=copy_engine"], "needs GPUs"),
    (["--mode=disagg", "--num_devices=2", "--context_token_budget=0,x"], "must be integers"),
    (["--strategy=dwdp", "--num_devices=2", "--staging_budget=4"], "--staging_budget=4 needs a --planner_policy"),
    (["--strategy=dwdp", "--num_devices=2", "--placement=/no/such.json"], "does not exist"),
])
def test_bad_flags_raise_clear_errors(flags, message, tmp_path):
    if jax.device_count() != 8 and "8 cpu" in message:
        message = "devices are visible"
    with pytest.raises(app.UsageError, match=message.replace("(", r"\(")):
        launch.run_main(["launch", *flags, f"--out={tmp_path}", *COMMON])


def test_router_trace_to_optimized_placement_round_trip(records, tmp_path):
    """Router statistics saved by a run -> an optimized placement -> a run on it, with the same tokens."""
    from dwdp_jax.planner import summarize

    trace_dir = pathlib.Path(records["dwdp_skew"]["path"]).parent / "traces"
    traces = sorted(str(p) for p in trace_dir.glob("router-rank*.npz"))
    assert len(traces) == 2
    placement = tmp_path / "placement.json"
    assert summarize.main([*traces, f"--placement_out={placement}", "--replicas=1"]) == 0
    record = launch.run_main(["launch", "--strategy=dwdp", "--num_devices=2", "--routing_skew=1.0",
                              f"--placement={placement}", f"--out={tmp_path}", *COMMON])
    assert saved(record)["config"]["placement"] == str(placement)
    assert record["rows"][0]["outputs"] == records["single_skew"]["rows"][0]["outputs"]


def test_dep_pinning_keeps_arrival_order():
    """A DEP closed loop admits requests in list order: the pinned list must alternate devices, or the first
    `concurrency` requests all land on device 0 while the others idle (a bug that halved DEP's e2e numbers)."""
    from dwdp_jax.engine.workload import Request

    reqs = [Request(f"r{i}", [1, 2, 3], 2) for i in range(6)]
    pinned = launch.serving.pin_requests(reqs, 2)
    assert [r.request_id for r in pinned] == [r.request_id for r in reqs]
    assert [r.rank for r in pinned] == [0, 1, 0, 1, 0, 1]
