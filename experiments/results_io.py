"""Writing a measurement in the results schema (`../shared/results-schema.md`): one JSON file per run."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

import jax


def git_commit() -> str:
    """The commit the run used: DWDP_COMMIT / GIT_COMMIT when set (the device tool's copy of the tree may
    carry a stale .git), else `git rev-parse HEAD`."""
    for var in ("DWDP_COMMIT", "GIT_COMMIT"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_result(out_dir: str, part: str, device_kind: str, config: dict, metrics: dict, rows: list,
                 tag: str = "") -> str:
    """Writes `<part>-<YYYYMMDD>-<device_kind>[-tag].json` under out_dir and returns its path."""
    today = datetime.date.today()
    record = {
        "part": part,
        "date": today.isoformat(),
        "commit": git_commit(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device_kind": device_kind,
        "num_devices": jax.device_count(),
        "jax_version": jax.__version__,
        "config": config,
        "metrics": metrics,
        "rows": rows,
    }
    os.makedirs(out_dir, exist_ok=True)
    name = f"{part}-{today:%Y%m%d}-{device_kind}" + (f"-{tag}" if tag else "") + ".json"
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(record, f, indent=1, default=float)
    return path
