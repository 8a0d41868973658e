"""What a named fusion of an XLA dump holds: its call site (operand and result shapes, metadata) and the body
of its fused computation, for fusions a profile named (e.g. `loop_gather_fusion.3`).

    XLA_FLAGS=--xla_dump_to=/tmp/hlo python3 experiments/bench_engine.py ...
    python3 experiments/diag/hlo_fusions.py /tmp/hlo --module=jit_step_fn --fusion='loop_gather_fusion.*' \
        --fusion='loop_add_fusion.*' > fusions.txt

Reads every `*<module>*after_optimizations.txt` of the dump directory (one per compiled program of that name)."""

from __future__ import annotations

import glob
import os
import re

from absl import app, flags

flags.DEFINE_string("module", "jit_step_fn", "program name in the dump's file names")
flags.DEFINE_multi_string("fusion", ["loop_gather_fusion.*"], "regular expressions of fusion names to show")
flags.DEFINE_integer("max_body_lines", 60, "lines of each fused computation shown")
F = flags.FLAGS

_INSTR = re.compile(r"^\s*(ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<rest>.*)$")
_CALLS = re.compile(r"calls=%?(?P<comp>[\w.\-]+)")
_COMP_HEAD = re.compile(r"^(ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")


def parse_computations(text: str) -> dict[str, list[str]]:
    """HLO module text -> {computation name: its instruction lines}."""
    comps, current = {}, None
    for line in text.splitlines():
        head = _COMP_HEAD.match(line)
        if head and "=" not in line.split("{")[0]:
            current = head.group("name")
            comps[current] = []
        elif line.strip() == "}":
            current = None
        elif current is not None:
            comps[current].append(line.strip())
    return comps


def fusion_sites(comps: dict[str, list[str]], pattern: str) -> list[tuple[str, str, str | None]]:
    """(fusion instruction name, its line, the fused computation it calls) for every instruction named by
    `pattern` (full match) in any computation."""
    sites = []
    for lines in comps.values():
        for line in lines:
            m = _INSTR.match(line)
            if m and re.fullmatch(pattern, m.group("name")):
                called = _CALLS.search(m.group("rest"))
                sites.append((m.group("name"), line, called.group("comp") if called else None))
    return sites


def describe(path: str, patterns: list[str], max_body_lines: int) -> str:
    comps = parse_computations(open(path).read())
    out = [f"## {os.path.basename(path)}"]
    for pattern in patterns:
        for name, line, comp in sorted(fusion_sites(comps, pattern)):
            out.append(f"### {name}\n{line}")
            body = comps.get(comp, [])
            out.extend("    " + b for b in body[:max_body_lines])
            if len(body) > max_body_lines:
                out.append(f"    ... {len(body) - max_body_lines} more lines")
    return "\n".join(out)


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("usage: hlo_fusions.py DUMP_DIR [--module=...] [--fusion=REGEX ...]")
    paths = sorted(glob.glob(os.path.join(argv[1], f"*{F.module}*after_optimizations.txt")))
    if not paths:
        raise SystemExit(f"no '*{F.module}*after_optimizations.txt' under {argv[1]}")
    for path in paths:
        print(describe(path, F.fusion, F.max_body_lines))


if __name__ == "__main__":
    app.run(main)
