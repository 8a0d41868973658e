"""The end-to-end launcher, in-process with the tiny preset on simulated CPU devices."""

from __future__ import annotations

import json

import jax
import pytest
from absl import app

from experiments import launch

COMMON = ["--preset=tiny", "--num_requests=2", "--input_len=8", "--output_len=4", "--max_batch_size=1",
          "--warmup=none", "--progress=false"]


@pytest.fixture(scope="module", autouse=True)
def launcher_flags():
    """absl's FLAGS are process-wide: leave none of the launcher's behind for other entry points' tests."""
    yield
    launch.undefine_flags()


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    return {
        strategy: launch.run_main(["launch", f"--strategy={strategy}", *extra, f"--out={out}", *COMMON])
        for strategy, extra in [("single", []), ("dwdp", ["--num_devices=2"])]
    }


@pytest.mark.parametrize("strategy, num_devices", [("single", 1), ("dwdp", 2)])
def test_launch_writes_e2e_results(records, strategy, num_devices):
    record = records[strategy]
    with open(record["path"]) as f:
        saved = json.load(f)
    for key in ("part", "date", "commit", "command", "device_kind", "num_devices", "jax_version", "config",
                "metrics", "rows"):
        assert key in saved, key
    assert saved["part"] == "e2e" and saved["device_kind"] == "cpu" and saved["num_devices"] == num_devices
    assert saved["jax_version"] == jax.__version__ and f"--strategy={strategy}" in saved["command"]
    assert saved["config"]["strategy"] == strategy and saved["config"]["model"] == "tiny"
    m = saved["metrics"]
    assert m["num_requests"] == 2 and m["output_tokens"] == 2 * 4 and m["num_gpus"] == num_devices
    assert m["output_tps_per_gpu"] > 0 and m["ttft_median_s"] > 0 and m["kv_cache_bytes_per_gpu"] > 0
    outputs = saved["rows"][0]["outputs"]
    assert len(outputs) == 2 and all(len(tokens) == 4 for tokens in outputs.values())
    assert len(saved["rows"][0]["ranks"]) == num_devices  # step-time stats per rank


def test_strategies_generate_the_same_tokens(records):
    """Both strategies serve the same weights (the tiny model is built once and split)."""
    assert records["single"]["rows"][0]["outputs"] == records["dwdp"]["rows"][0]["outputs"]


@pytest.mark.parametrize("flags, message", [
    (["--strategy=dwdp", "--num_devices=64"], "only 8 cpu devices are visible"),
    (["--strategy=dwdp", "--num_devices=3"], "must divide the 16 routed experts"),
    (["--strategy=single", "--expert_backend=pallas"], "needs GPUs"),
    (["--strategy=single", "--workload=zipf"], "--workload='zipf'"),
    (["--strategy=single", "--max_seq_len=10"], "requests need up to 12 tokens"),
])
def test_bad_flags_raise_clear_errors(flags, message, tmp_path):
    if jax.device_count() != 8 and "8 cpu" in message:
        message = "devices are visible"
    with pytest.raises(app.UsageError, match=message.replace("(", r"\(")):
        launch.run_main(["launch", *flags, f"--out={tmp_path}", *COMMON])
