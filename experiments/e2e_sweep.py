"""DWDP vs DEP end to end: the same workload over a concurrency sweep, one launcher run per arm, compared at
matched TPS/user.

An arm is a strategy (`dwdp`, `dep`, `dp`) or a DWDP variant (`--variant="--prefetch_depth=0"`). Each arm runs
`python -m experiments.launch --strategy=<s> --concurrency=<list> <launcher flags> <variant flags>` in a
subprocess (its output streams through), which writes its own e2e JSON; this script reads them back and
compares every arm with DEP where their TPS/user ranges overlap: DEP's curve of output TPS/GPU against TPS/user
is interpolated linearly at the arm's TPS/user points (DEP's points sorted by TPS/user; no extrapolation).
It writes one results JSON (part `e2e`, `../shared/results-schema.md`):
  metrics  dwdp_over_dep_tps_per_gpu (median over the matched points), ..._best (max), ..._points (how many),
           ttft_median_s / tpot_median_s ({arm: median over the matched points}, DEP's interpolated there),
           the same ratios for every other arm (`<arm>_over_dep_tps_per_gpu`), and, with variants,
           `<variant>_over_dwdp_tps_per_gpu` against the default DWDP arm;
  rows     `kind: "point"`: every arm's measured point; `kind: "matched"`: every matched point with the
           reference values interpolated there and the ratio.

Flags this script does not know pass through to every launcher run. CPU smoke run (one line):

  XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m experiments.e2e_sweep --strategies=dwdp,dep
      --concurrency=2,4 --out=/tmp/e2e --preset=tiny --num_devices=2 --num_requests=4 --input_len=12
      --output_len=4 --max_batch_size=2
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import shlex
import subprocess
import sys

import numpy as np

STRATEGIES = ("dwdp", "dep", "dp")
REFERENCE = "dep"
# Launcher flags that this script sets per arm; passing them through would contradict the sweep.
OWNED_FLAGS = ("strategy", "concurrency", "out", "tag")


# ---------------------------------------------------------------------------------------------------------------
# Matching curves at equal TPS/user (pure arithmetic).


@dataclasses.dataclass(frozen=True)
class Point:
    """One timed pass: output tokens/s per GPU at a per-user rate (tokens/s), and its median latencies (s)."""

    concurrency: int
    tps_per_user: float
    tps_per_gpu: float
    ttft_s: float = math.nan
    tpot_s: float = math.nan


@dataclasses.dataclass(frozen=True)
class Match:
    """An arm's point and the reference curve interpolated at its TPS/user."""

    point: Point
    ref_tps_per_gpu: float
    ref_ttft_s: float
    ref_tpot_s: float

    @property
    def ratio(self) -> float:
        return self.point.tps_per_gpu / self.ref_tps_per_gpu


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def interpolate(curve: list[Point], tps_per_user: float, field: str = "tps_per_gpu") -> float:
    """`field` of the piecewise-linear curve through `curve` (ordered by TPS/user) at `tps_per_user`.

    Points at equal TPS/user are averaged first. Returns NaN outside [min, max] TPS/user of the curve.
    """
    xs = sorted({p.tps_per_user for p in curve if _finite(p.tps_per_user)})
    if not xs or not xs[0] <= tps_per_user <= xs[-1]:
        return math.nan
    ys = [float(np.mean([getattr(p, field) for p in curve if p.tps_per_user == x])) for x in xs]
    return float(np.interp(tps_per_user, xs, ys))


def match_curves(points: list[Point], reference: list[Point]) -> list[Match]:
    """Every point of `points` inside the reference curve's TPS/user range, with the reference interpolated."""
    out = []
    for p in sorted(points, key=lambda p: p.tps_per_user if _finite(p.tps_per_user) else math.inf):
        if not _finite(p.tps_per_user):
            continue
        ref = interpolate(reference, p.tps_per_user)
        if math.isnan(ref) or ref <= 0:
            continue
        out.append(Match(p, ref, interpolate(reference, p.tps_per_user, "ttft_s"),
                         interpolate(reference, p.tps_per_user, "tpot_s")))
    return out


def summarize_matches(matches: list[Match]) -> dict:
    """Median and best ratio, and the TPS/user range they cover (None when nothing matched)."""
    if not matches:
        return dict(median=None, best=None, points=0, tps_per_user_range=None)
    ratios = [m.ratio for m in matches]
    xs = [m.point.tps_per_user for m in matches]
    return dict(median=float(np.median(ratios)), best=float(max(ratios)), points=len(matches),
                tps_per_user_range=[float(min(xs)), float(max(xs))])


# ---------------------------------------------------------------------------------------------------------------
# Reading launcher records.


def point_rows(record: dict) -> list[dict]:
    """The rows of a launcher record that are timed passes (`kind: "point"`, or rows with a concurrency and an
    output rate in records written before rows had kinds)."""
    rows = record.get("rows") or []
    return [r for r in rows if r.get("kind", "point") == "point" and "output_tps_per_gpu" in r and "concurrency" in r]


def _num(x) -> float:
    return math.nan if x is None else float(x)


def curve_points(record: dict) -> list[Point]:
    """(TPS/user, TPS/GPU) points of a launcher record; TPS/user is the median over requests (1 / TPOT)."""
    return [Point(int(r["concurrency"]), _num(r.get("tps_per_user_median")), _num(r["output_tps_per_gpu"]),
                  _num(r.get("ttft_median_s")), _num(r.get("tpot_median_s"))) for r in point_rows(record)]


# ---------------------------------------------------------------------------------------------------------------
# Arms and launcher runs.


@dataclasses.dataclass(frozen=True)
class Arm:
    """One launcher run: a strategy, plus variant flags for a DWDP variant."""

    strategy: str
    variant_flags: tuple[str, ...] = ()

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r}: use one of {STRATEGIES}")
        if self.variant_flags and self.strategy != "dwdp":
            raise ValueError(f"variant flags {self.variant_flags} apply to dwdp arms only")

    @property
    def name(self) -> str:
        """'dwdp', 'dep', or e.g. 'dwdp[prefetch_depth=0]'."""
        if not self.variant_flags:
            return self.strategy
        return f"{self.strategy}[{','.join(f.lstrip('-') for f in self.variant_flags)}]"

    @property
    def slug(self) -> str:
        """File-name-safe form of `name`."""
        return re.sub(r"[^A-Za-z0-9]+", "-", self.name).strip("-")


def _flag_name(flag: str) -> str:
    return flag.lstrip("-").split("=", 1)[0]


def check_passthrough(flags: list[str]) -> None:
    """Launcher flags must be `--name[=value]`, and none of those the sweep sets per arm."""
    for flag in flags:
        if not flag.startswith("--"):
            raise ValueError(f"launcher flag {flag!r}: pass flags as --name=value")
        if _flag_name(flag) in OWNED_FLAGS or _flag_name(flag).removeprefix("no") in OWNED_FLAGS:
            raise ValueError(f"launcher flag {flag!r} is set by the sweep (it sets {', '.join(OWNED_FLAGS)})")


def launcher_command(python: str, arm: Arm, concurrency: list[int], out: str, tag: str,
                     launcher_flags: list[str]) -> list[str]:
    return [python, "-m", "experiments.launch", f"--strategy={arm.strategy}",
            f"--concurrency={','.join(map(str, concurrency))}", f"--out={out}", f"--tag={tag}-{arm.slug}",
            *launcher_flags, *arm.variant_flags]


def run_launcher(cmd: list[str], env: dict | None = None) -> str:
    """Runs one launcher command, streaming its output; returns the path of the JSON it wrote."""
    print("$", shlex.join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    written = None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        match = re.match(r"wrote (\S+\.json)\s*$", line)
        if match:
            written = match.group(1)
    if proc.wait() != 0:
        raise RuntimeError(f"launcher exited with {proc.returncode}: {shlex.join(cmd)}")
    if written is None:
        raise RuntimeError(f"launcher did not print 'wrote <path>.json': {shlex.join(cmd)}")
    return written


# ---------------------------------------------------------------------------------------------------------------
# The sweep's results record.

CONFIG_KEYS = ("model", "checkpoint", "num_devices", "group_size", "fetch", "expert_backend", "prefetch_depth",
               "dtype", "workload", "num_requests", "input_len", "output_len", "max_batch_size", "token_budget",
               "max_seq_len", "warmup")


def _median(values) -> float | None:
    v = [x for x in values if _finite(x)]
    return float(np.median(v)) if v else None


def compare(records: dict[str, dict], default_dwdp: str = "dwdp") -> tuple[dict, list[dict]]:
    """Metrics and rows of the sweep from each arm's launcher record ({arm name: record})."""
    curves = {name: curve_points(rec) for name, rec in records.items()}
    rows = [dict(kind="point", arm=name, strategy=records[name]["config"]["strategy"], concurrency=p.concurrency,
                 tps_per_user=p.tps_per_user, output_tps_per_gpu=p.tps_per_gpu, ttft_median_s=p.ttft_s,
                 tpot_median_s=p.tpot_s) for name, curve in curves.items() for p in curve]
    metrics: dict = {}
    comparisons = []
    if REFERENCE in curves:
        comparisons += [(name, REFERENCE) for name in curves if name != REFERENCE]
    if default_dwdp in curves:
        comparisons += [(name, default_dwdp) for name in curves if name.startswith("dwdp[")]
    for name, ref in comparisons:
        matches = match_curves(curves[name], curves[ref])
        summary = summarize_matches(matches)
        key = f"{name}_over_{ref}_tps_per_gpu"
        metrics[key] = summary["median"]
        metrics[f"{key}_best"] = summary["best"]
        metrics[f"{key}_points"] = summary["points"]
        metrics[f"{key}_tps_per_user_range"] = summary["tps_per_user_range"]
        for m in matches:
            rows.append(dict(kind="matched", arm=name, reference=ref, concurrency=m.point.concurrency,
                             tps_per_user=m.point.tps_per_user, output_tps_per_gpu=m.point.tps_per_gpu,
                             ref_output_tps_per_gpu=m.ref_tps_per_gpu, ratio=m.ratio, ttft_median_s=m.point.ttft_s,
                             ref_ttft_median_s=m.ref_ttft_s, tpot_median_s=m.point.tpot_s,
                             ref_tpot_median_s=m.ref_tpot_s))
        if ref == REFERENCE and name == default_dwdp:
            metrics["ttft_median_s"] = {name: _median(m.point.ttft_s for m in matches),
                                        ref: _median(m.ref_ttft_s for m in matches)}
            metrics["tpot_median_s"] = {name: _median(m.point.tpot_s for m in matches),
                                        ref: _median(m.ref_tpot_s for m in matches)}
    return metrics, rows


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def write_sweep(out: str, tag: str, records: dict[str, dict], files: dict[str, str], commands: dict[str, list],
                concurrency: list[int], launcher_flags: list[str], command: str) -> str:
    """Writes `e2e-<YYYYMMDD>-<device_kind>-<tag>.json` and returns its path."""
    first = next(iter(records.values()))
    kinds = {r["device_kind"] for r in records.values()}
    if len(kinds) != 1:
        raise ValueError(f"arms ran on different device kinds: {sorted(kinds)}")
    metrics, rows = compare(records)
    config = {k: first["config"].get(k) for k in CONFIG_KEYS if k in first["config"]}
    config.update(arms=list(records), concurrency=concurrency, launcher_flags=launcher_flags,
                  arm_files={k: os.path.basename(v) for k, v in files.items()},
                  arm_commands={k: shlex.join(v) for k, v in commands.items()},
                  matching="reference output TPS/GPU interpolated linearly in TPS/user (median over requests) at "
                           "the arm's points, inside the reference's TPS/user range")
    today = datetime.date.today()
    record = dict(part="e2e", date=today.isoformat(), commit=first.get("commit", "unknown"), command=command,
                  device_kind=first["device_kind"], num_devices=first["num_devices"],
                  jax_version=first.get("jax_version"), config=config, metrics=metrics, rows=rows)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"e2e-{today:%Y%m%d}-{first['device_kind']}-{tag}.json")
    with open(path, "w") as fh:
        json.dump(_json_safe(record), fh, indent=1, allow_nan=False)
    return path


def _summary(metrics: dict) -> str:
    lines = []
    for key, value in metrics.items():
        if key.endswith("_tps_per_gpu"):
            best = metrics.get(f"{key}_best")
            span = metrics.get(f"{key}_tps_per_user_range")
            if value is None:
                lines.append(f"{key}: no matched points (TPS/user ranges do not overlap)")
            else:
                lines.append(f"{key}: median {value:.3f}, best {best:.3f} over {metrics[key + '_points']} points, "
                             f"TPS/user {span[0]:.3g}-{span[1]:.3g}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--strategies", default="dwdp,dep", help="comma list of dwdp, dep, dp")
    parser.add_argument("--concurrency", default="4,8,16,32", help="comma list: requests in flight over all GPUs")
    parser.add_argument("--variant", action="append", default=[],
                        help="extra DWDP arm: launcher flags added to it, e.g. --variant=--prefetch_depth=0 "
                             "(repeatable; several flags space-separated in one value)")
    parser.add_argument("--out", default="experiments/results", help="directory for every JSON of the sweep")
    parser.add_argument("--tag", default="sweep", help="file tag of the sweep JSON; arm files add -<arm>")
    parser.add_argument("--jax_cache_dir", default="",
                        help="persistent compilation cache for the launcher runs (arms with the same programs, "
                             "e.g. DWDP variants, then compile once)")
    parser.add_argument("--dry_run", action="store_true", help="print the launcher commands and stop")
    parser.add_argument("--reuse", action="append", default=[], metavar="ARM=PATH",
                        help="read this arm's launcher JSON from PATH instead of running it (e.g. rerun only DEP "
                             "after a fix: --reuse=dwdp=experiments/results/e2e-...-dwdp.json); repeatable")
    args, launcher_flags = parser.parse_known_args(argv)
    strategies = [s for s in args.strategies.split(",") if s]
    try:
        args.concurrency_list = [int(c) for c in args.concurrency.split(",") if c]
    except ValueError:
        parser.error(f"--concurrency must be a comma list of integers, got {args.concurrency!r}")
    if len(args.concurrency_list) < 2:
        parser.error("--concurrency needs at least two values to draw a curve")
    try:
        check_passthrough(launcher_flags)
        args.arms = [Arm(s) for s in strategies]
        args.arms += [Arm("dwdp", tuple(shlex.split(v))) for v in args.variant]
        for arm in args.arms:
            check_passthrough(list(arm.variant_flags))
    except ValueError as e:
        parser.error(str(e))
    names = [a.name for a in args.arms]
    if len(set(names)) != len(names):
        parser.error(f"arms must differ, got {names}")
    if REFERENCE not in strategies:
        parser.error(f"--strategies must include {REFERENCE}, the reference of the comparison")
    args.reuse_files = {}
    for item in args.reuse:
        arm, sep, path = item.partition("=")
        if not sep or arm not in names:
            parser.error(f"--reuse={item!r}: expected ARM=PATH with ARM one of {names}")
        if not os.path.isfile(path):
            parser.error(f"--reuse={item!r}: no file {path}")
        args.reuse_files[arm] = path
    return args, launcher_flags


def main(argv: list[str] | None = None) -> str | None:
    argv = sys.argv[1:] if argv is None else argv
    args, launcher_flags = parse_args(argv)
    commands = {arm.name: launcher_command(sys.executable, arm, args.concurrency_list, args.out, args.tag,
                                           launcher_flags) for arm in args.arms}
    if args.dry_run:
        for cmd in commands.values():
            print(shlex.join(cmd))
        return None
    env = dict(os.environ)
    if args.jax_cache_dir:
        env.update(JAX_COMPILATION_CACHE_DIR=args.jax_cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    files, records = {}, {}
    for name, cmd in commands.items():
        files[name] = args.reuse_files.get(name) or run_launcher(cmd, env)
        with open(files[name]) as fh:
            records[name] = json.load(fh)
    command = shlex.join(["python", "-m", "experiments.e2e_sweep", *argv])
    path = write_sweep(args.out, args.tag, records, files, commands, args.concurrency_list, launcher_flags, command)
    with open(path) as fh:
        print("\n" + _summary(json.load(fh)["metrics"]))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
