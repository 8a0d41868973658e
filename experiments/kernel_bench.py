"""What the kernel benchmarks with a CPU smoke mode share (`bench_fp8_linear.py`, `bench_moe_ffn.py`,
`bench_moe_glue.py`): their command line, the CUPTI timing of one jitted call and the results file."""

from __future__ import annotations

import argparse
import os

from pallas_kernels import _compat

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(description: str, tag: str, sizes: tuple[str, str, str], argv=None,
               extra: tuple[tuple[str, str, str], ...] = ()) -> tuple[argparse.Namespace, bool]:
    """(arguments, interpret): --device_kind, --out_dir, --tag, --smoke, the benchmark's list of sizes and any
    `extra` string flags, each given as (flag, default, help). interpret: no GPU (then --smoke is required:
    interpret mode, tiny shapes)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device_kind", default="cpu")
    for flag, default, help_text in (sizes, *extra):
        p.add_argument(flag, default=default, help=help_text)
    p.add_argument("--out_dir", default=RESULTS_DIR)
    p.add_argument("--tag", default=tag)
    p.add_argument("--smoke", action="store_true", help="CPU: interpret mode, tiny shapes")
    a = p.parse_args(argv)
    interpret = a.smoke or not _compat.on_gpu()
    if interpret and not a.smoke:
        raise SystemExit("no GPU: run with --smoke (interpret mode, tiny shapes)")
    return a, interpret


def cupti_times(f, *args) -> tuple[float, float, list]:
    """(seconds of the whole call, of its Mosaic kernels, [(kernel, us)] of the call with the median total): CUPTI
    kernel durations of the jitted `f(*args)` over a few calls (GPU only)."""
    from pallas_kernels import profiling

    calls = profiling.kernel_calls(f, *args)
    total = profiling.median_per_call(calls, lambda ks: sum(t for _, t in ks))
    kernels = profiling.median_per_call(calls, lambda ks: sum(t for kn, t in ks if profiling.is_mosaic(kn)))
    median_call = min(calls, key=lambda ks: abs(sum(t for _, t in ks) - total))
    return total, kernels, [(kn[:60], round(t * 1e6, 2)) for kn, t in median_call]


def write(a: argparse.Namespace, config: dict, metrics: dict, rows: list, hbm: float, hbm_detail: dict) -> str:
  """Writes the `kernels` results JSON (the HBM copy rate of the run added to the metrics when measured) and
  prints where. Returns its path."""
  from experiments.results_io import write_result

  if hbm:
    metrics = dict(metrics, hbm_copy_gbps=hbm, hbm_copy_detail_gbps=hbm_detail)
  path = write_result(a.out_dir, "kernels", a.device_kind, config, metrics, rows, a.tag)
  print(metrics)
  print("wrote", path)
  return path
