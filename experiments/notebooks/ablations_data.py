"""What the ablations notebook reads from e2e results JSONs: runs, their curves, the default DWDP run, variants.

A *run* is one curve: the timed passes (`kind: "point"` rows) of one launcher record that share a strategy
(colocated records: the record's `config.strategy`; disaggregated ones: each context strategy and context device
count). A run's *settings* are the DWDP knobs found in its config (`ABLATION_KEYS`); a knob missing from a
config is taken at its default (`DEFAULTS`), since the flag did not exist when that run was made. Runs compare
only within one *workload* (device kind, model, lengths, requests, devices). Sweep summaries written by
`experiments/e2e_sweep.py` (config with `arms`) repeat their arms' files and are not runs.

Variants are ranked against the default DWDP run at matched TPS/user (`experiments.e2e_sweep.match_curves`);
where their TPS/user ranges do not overlap, at equal concurrency instead (said in the label).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import numpy as np

from experiments.e2e_sweep import Point, curve_points, match_curves, point_rows

# DWDP knobs an ablation changes, as named in the launcher's config (fetch backend, prefetch depth, staggered
# source order, planner policy, merge copy, placement, group size).
ABLATION_KEYS = ("fetch", "prefetch_depth", "staggered", "planner_policy", "merge_copy", "placement", "group_size")
# The default DWDP run: these values (a key absent from a config counts as its default). Keys not listed here
# (fetch, group_size) may take any value; between several candidates the one with more points wins.
DEFAULTS = dict(prefetch_depth=1, staggered=True, merge_copy=False, placement="contiguous")
WORKLOAD_KEYS = ("model", "workload", "input_len", "output_len", "num_requests", "num_devices")
DISAGG_KEYS = ("context_strategy", "context_devices")


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """One curve. `points` are (TPS/user, TPS/GPU, ...) per timed pass; `settings` the DWDP knobs it ran with."""

    path: str
    strategy: str
    workload: tuple
    settings: dict
    points: list[Point]
    record: dict

    @property
    def label(self) -> str:
        return self.strategy


def workload_key(record: dict) -> tuple:
    config = record.get("config", {})
    return (record.get("device_kind"),) + tuple(config.get(k) for k in WORKLOAD_KEYS)


def _is_launcher_record(record: dict) -> bool:
    return isinstance(record, dict) and record.get("part") == "e2e" and "arms" not in record.get("config", {})


def load_records(results_dir, device_kind: str = "") -> list[tuple[str, dict]]:
    """(path, record) of every e2e JSON under `results_dir` (recursively), optionally of one device kind;
    records marked `superseded` (wrong because of a bug found later) are left out."""
    out = []
    for path in sorted(pathlib.Path(results_dir).rglob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a results JSON ({e})") from e
        if isinstance(record, dict) and record.get("part") == "e2e" and not record.get("superseded"):
            if not device_kind or record.get("device_kind") == device_kind:
                out.append((str(path), record))
    return out


def runs_of(path: str, record: dict) -> list[Run]:
    """The runs (curves) of one launcher record; [] for sweep summaries and records without timed passes."""
    if not _is_launcher_record(record):
        return []
    config = record.get("config", {})
    settings = {k: config[k] for k in ABLATION_KEYS if config.get(k) is not None}
    rows = point_rows(record)
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in DISAGG_KEYS), []).append(row)
    runs = []
    for key, group in groups.items():
        if any(v is not None for v in key):  # disaggregated: one curve per context strategy and size
            strategy = "disagg ctx " + " x".join(str(v) for v in key if v is not None)
        else:
            strategy = config.get("strategy", "?")
        sub = dict(record, rows=group)
        runs.append(Run(path, strategy, workload_key(record), settings, curve_points(sub), sub))
    return runs


def load_runs(results_dir, device_kind: str = "") -> list[Run]:
    return [run for path, record in load_records(results_dir, device_kind) for run in runs_of(path, record)]


def sweep_summaries(results_dir, device_kind: str = "") -> list[tuple[str, dict]]:
    """(path, metrics) of the e2e_sweep summaries under `results_dir`."""
    return [(path, r["metrics"]) for path, r in load_records(results_dir, device_kind) if "arms" in r["config"]]


def setting(run: Run, key: str):
    """The run's value of a DWDP knob: its config's, else the default."""
    return run.settings.get(key, DEFAULTS.get(key))


def default_dwdp_run(runs: list[Run], defaults: dict = DEFAULTS) -> Run | None:
    """The DWDP run that differs least from `defaults` (ties: more points, then the later file)."""
    dwdp = [r for r in runs if r.strategy == "dwdp"]
    if not dwdp:
        return None

    def mismatches(run):
        return sum(run.settings.get(k, v) != v for k, v in defaults.items())

    return max(dwdp, key=lambda r: (-mismatches(r), len(r.points), r.path))


def variant_label(run: Run, reference: Run) -> str:
    """The strategy, plus every DWDP knob whose value differs from the reference run's ('dwdp prefetch_depth=0')."""
    diffs = [f"{k}={setting(run, k)}" for k in ABLATION_KEYS
             if run.strategy == "dwdp" and setting(run, k) != setting(reference, k)]
    return " ".join([run.strategy] + diffs) if diffs or run.strategy != "dwdp" else "dwdp (default)"


@dataclasses.dataclass(frozen=True)
class Ablation:
    """A run's output TPS/GPU relative to the default DWDP run: median and range over the compared points."""

    label: str
    strategy: str
    median: float
    low: float
    high: float
    points: int
    matched_by: str  # "tps_per_user" or "concurrency"


def ablation(run: Run, reference: Run) -> Ablation | None:
    """`run` against `reference` at matched TPS/user, else at equal concurrency; None if neither has a point."""
    ratios = [m.ratio for m in match_curves(run.points, reference.points)]
    by = "tps_per_user"
    if not ratios:
        ref = {p.concurrency: p.tps_per_gpu for p in reference.points}
        ratios = [p.tps_per_gpu / ref[p.concurrency] for p in run.points if ref.get(p.concurrency)]
        by = "concurrency"
    ratios = [r for r in ratios if math.isfinite(r)]
    if not ratios:
        return None
    return Ablation(variant_label(run, reference), run.strategy, float(np.median(ratios)), float(min(ratios)),
                    float(max(ratios)), len(ratios), by)


def pareto_front(points: list[Point]) -> list[Point]:
    """Points not beaten on both TPS/user and TPS/GPU by another point, by increasing TPS/user."""
    ok = [p for p in points if math.isfinite(p.tps_per_user) and math.isfinite(p.tps_per_gpu)]
    front = [p for p in ok if not any(q.tps_per_user >= p.tps_per_user and q.tps_per_gpu >= p.tps_per_gpu
                                      and (q.tps_per_user, q.tps_per_gpu) != (p.tps_per_user, p.tps_per_gpu)
                                      for q in ok)]
    return sorted(front, key=lambda p: p.tps_per_user)


# ---------------------------------------------------------------------------------------------------------------
# Per-step records.


@dataclasses.dataclass(frozen=True)
class Timeline:
    """Steps of one timed pass: per step its device, [start_s, end_s), and fetch wait (NaN when not recorded)."""

    concurrency: int
    device: np.ndarray  # int [steps]
    start_s: np.ndarray  # [steps]
    end_s: np.ndarray  # [steps]
    fetch_wait_s: np.ndarray  # [steps]

    @property
    def has_fetch_wait(self) -> bool:
        return bool(np.isfinite(self.fetch_wait_s).any())


def timeline(row: dict) -> Timeline | None:
    """The step records of a point row: `timeline` columns ({device|rank, start_s, end_s, [fetch_wait_s]}),
    or a `steps` list of such objects; None when the row has neither."""
    cols = row.get("timeline")
    if cols is None and row.get("steps"):
        steps = row["steps"]
        cols = {k: [s.get(k) for s in steps] for k in steps[0]}
    if not cols or not cols.get("start_s"):
        return None
    device = cols.get("device", cols.get("rank"))
    if device is None:
        raise ValueError(f"timeline of concurrency {row.get('concurrency')}: no 'device' or 'rank' column")
    n = len(cols["start_s"])
    wait = cols.get("fetch_wait_s") or [None] * n
    return Timeline(int(row.get("concurrency") or 0), np.asarray(device, dtype=np.int64),
                    np.asarray(cols["start_s"], dtype=np.float64), np.asarray(cols["end_s"], dtype=np.float64),
                    np.array([math.nan if w is None else w for w in wait], dtype=np.float64))


def step_histograms(row: dict) -> list[dict]:
    """Per-rank step-time histograms of a point row (`ranks`: rank, counts, edges_s), for records without steps."""
    return [r for r in row.get("ranks") or [] if r.get("counts") and r.get("edges_s")]
