"""experiments/gpu_env.sh: the device kind the GPU check scripts write into results comes from the machine's
GPUs, not from the kind the caller named (the device tool may run a call for one kind on another card)."""

import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def kind_after_sourcing(tmp_path, gpu_names: list[str] | None, named: str) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if gpu_names is not None:  # a stand-in nvidia-smi listing these GPUs
        smi = bin_dir / "nvidia-smi"
        smi.write_text("#!/bin/sh\n" + "".join(f"echo '{n}'\n" for n in gpu_names))
        smi.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:/usr/bin:/bin", OUT=str(tmp_path / "out"), GIT_COMMIT="abc")
    script = f'KIND="{named}"; source experiments/gpu_env.sh > /dev/null; echo "$KIND"'
    return subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.parametrize("gpus, named, kind", [
    (["NVIDIA H200"], "nvidia-h100-x1", "nvidia-h200"),
    (["NVIDIA H100 80GB HBM3"], "nvidia-h200", "nvidia-h100-x1"),
    (["NVIDIA H100 80GB HBM3"] * 2, "", "nvidia-h100-x2"),
    (["NVIDIA H200"] * 4, "nvidia-h100-x4", "nvidia-h200-x4"),
    (["Some Other GPU"], "nvidia-h200", "nvidia-h200"),  # unknown cards: the named kind stays
    (None, "cpu", "cpu"),  # no nvidia-smi
])
def test_kind_is_the_machines(tmp_path, gpus, named, kind):
    assert kind_after_sourcing(tmp_path, gpus, named) == kind
