"""The notebooks under experiments/notebooks run, stored without outputs: the ablations notebook on the results of
a tiny CPU sweep (`tiny_sweep`, shared with test_e2e_sweep.py), the simulator's sensitivity notebook as is.
Also the ablations notebook's data helpers on hand-made records (variant labels, default run, timelines)."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest

from experiments.e2e_sweep import Point
from experiments.notebooks import ablations_data as ad
from tests.test_e2e_sweep import tiny_sweep  # noqa: F401  (the shared session fixture)

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "experiments" / "notebooks"


def _execute(name: str, env: dict | None = None, monkeypatch=None):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code"), \
        f"store {name} without outputs"
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)  # the kernel inherits the test's environment
    nbclient.NotebookClient(nb, timeout=180, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def _text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", [])
                   if o.get("output_type") == "stream")


def _figures(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


@pytest.mark.xdist_group("tiny_sweep")  # on the worker that makes the sweep (tests/test_e2e_sweep.py)
def test_ablations_notebook_runs_on_a_tiny_sweep(tiny_sweep, monkeypatch):  # noqa: F811
    nb = _execute("ablations.ipynb", {"DWDP_RESULTS_DIR": str(tiny_sweep), "DWDP_DEVICE_KIND": "cpu"}, monkeypatch)
    text = _text(nb)
    assert "3 runs in 1 workloads" in text, text
    assert "dwdp prefetch_depth=0" in text  # the variant's ablation bar
    assert _figures(nb) == 3  # Pareto curves, ablation bars, timeline (or step histograms)


def test_simulator_sensitivity_notebook_runs(monkeypatch):
    nb = _execute("simulator_sensitivity.ipynb", monkeypatch=monkeypatch)
    assert _figures(nb) == 4  # imbalance, bytes x hardware, NVLink, the GB200 prediction vs published


# ---------------------------------------------------------------------------------------------------------------
# Data helpers.

def _run(strategy, path="a.json", points=(), **settings):
    return ad.Run(path, strategy, ("cpu",), settings, list(points), {})


def test_variant_labels_and_the_default_run():
    default = _run("dwdp", "b.json", [Point(1, 1.0, 1.0)], fetch="copy_engine", prefetch_depth=1)
    older_flags = _run("dwdp", "a.json", [Point(1, 1.0, 1.0)], fetch="copy_engine")  # no prefetch_depth in config
    deeper = _run("dwdp", "c.json", fetch="copy_engine", prefetch_depth=2, staggered=False)
    dep = _run("dep", "d.json", fetch="device_put")
    runs = [older_flags, deeper, dep, default]
    assert ad.default_dwdp_run(runs) is default  # equal knobs and points: the later file
    assert ad.default_dwdp_run([deeper, dep]) is deeper  # the least different DWDP run
    assert ad.default_dwdp_run([dep]) is None
    assert ad.variant_label(deeper, default) == "dwdp prefetch_depth=2 staggered=False"
    assert ad.variant_label(older_flags, default) == "dwdp (default)"
    assert ad.variant_label(dep, default) == "dep"  # baselines are not labelled by DWDP knobs


def test_ablation_at_matched_tps_per_user_else_at_equal_concurrency():
    ref = _run("dwdp", points=[Point(2, 10.0, 100.0), Point(4, 20.0, 50.0)])
    half = _run("dwdp", points=[Point(2, 15.0, 37.5)], prefetch_depth=0)
    a = ad.ablation(half, ref)
    assert (a.median, a.points, a.matched_by, a.label) == (pytest.approx(0.5), 1, "tps_per_user",
                                                           "dwdp prefetch_depth=0")
    far = _run("dep", points=[Point(2, 100.0, 300.0), Point(4, 200.0, 100.0), Point(8, 300.0, 10.0)])
    b = ad.ablation(far, ref)
    assert (b.median, b.low, b.high, b.matched_by) == (pytest.approx(2.5), pytest.approx(2.0), pytest.approx(3.0),
                                                        "concurrency")


def test_pareto_front():
    pts = [Point(1, 10.0, 100.0), Point(2, 20.0, 60.0), Point(3, 15.0, 50.0), Point(4, 30.0, 60.0)]
    assert [p.concurrency for p in ad.pareto_front(pts)] == [1, 4]


def test_timeline_from_columns_or_step_lists():
    row = dict(concurrency=4, timeline=dict(device=[0, 1, 0], start_s=[0.0, 0.1, 0.5], end_s=[0.5, 0.4, 0.9],
                                            prefill_tokens=[8, 8, 0], decode_tokens=[0, 0, 2]))
    t = ad.timeline(row)
    assert t.concurrency == 4 and t.device.tolist() == [0, 1, 0] and not t.has_fetch_wait
    steps = [dict(rank=0, start_s=0.0, end_s=1.0, fetch_wait_s=0.25), dict(rank=1, start_s=0.0, end_s=1.0)]
    t = ad.timeline(dict(concurrency=2, steps=steps))
    assert t.has_fetch_wait and t.fetch_wait_s[0] == 0.25 and math.isnan(t.fetch_wait_s[1])
    assert ad.timeline(dict(concurrency=2, ranks=[])) is None
    with pytest.raises(ValueError, match="no 'device' or 'rank' column"):
        ad.timeline(dict(concurrency=2, timeline=dict(start_s=[0.0], end_s=[1.0])))


def test_runs_skip_sweep_summaries_and_split_disaggregated_points(tmp_path):
    point = dict(kind="point", concurrency=2, output_tps_per_gpu=1.0, tps_per_user_median=2.0)
    colocated = dict(part="e2e", device_kind="cpu", config=dict(strategy="dwdp", model="tiny", prefetch_depth=2),
                     rows=[point, dict(kind="request")])
    disagg = dict(part="e2e", device_kind="cpu", config=dict(mode="disagg", model="tiny"),
                  rows=[dict(point, context_strategy=s, context_devices=1) for s in ("dwdp", "dep")])
    summary = dict(part="e2e", device_kind="cpu", config=dict(arms=["dwdp", "dep"]), metrics={}, rows=[])
    other = dict(part="dwdp", device_kind="cpu", config={}, rows=[])
    for name, record in dict(a=colocated, b=disagg, c=summary, d=other).items():
        (tmp_path / f"{name}.json").write_text(json.dumps(record))
    runs = ad.load_runs(tmp_path)
    assert [r.strategy for r in runs] == ["dwdp", "disagg ctx dwdp x1", "disagg ctx dep x1"]
    assert runs[0].settings == {"prefetch_depth": 2} and len(runs[0].points) == 1
    assert [p for p, _ in ad.sweep_summaries(tmp_path)] == [str(tmp_path / "c.json")]
    assert ad.load_runs(tmp_path, device_kind="nvidia-h200-x2") == []


def test_step_histograms_of_records_without_steps():
    row = dict(ranks=[dict(rank=0, counts=[1, 2], edges_s=[0.0, 0.1, 0.2]), dict(rank=1, counts=[], edges_s=[])])
    assert [h["rank"] for h in ad.step_histograms(row)] == [0]
    assert np.sum(ad.step_histograms(row)[0]["counts"]) == 3
