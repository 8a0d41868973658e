"""Sample GPU clocks and power with `nvidia-smi` (read-only) while a phase of a benchmark runs.

Used to tell apart two reasons why copies slow the compute beside them: memory contention (clocks
unchanged) and power or thermal limits (SM clock lower while the copies run).

    sampler = ClockSampler()                  # None-safe: no nvidia-smi -> phases report nothing
    with sampler.phase("no fetch T=4096"):
        run()
    sampler.summary()  # {phase: {gpu index: {"sm_mhz": ..., "mem_mhz": ..., "power_w": ..., ...}}}
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import subprocess
import threading

FIELDS = ("index", "clocks.sm", "clocks.mem", "power.draw", "temperature.gpu", "clocks_event_reasons.active")
OLD_REASONS_FIELD = "clocks_throttle_reasons.active"  # the same bitmask, named so by older drivers


def parse_line(line: str) -> dict | None:
    """One `--format=csv,noheader,nounits` line of FIELDS -> a sample dict, or None if malformed."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != len(FIELDS):
        return None
    try:
        return dict(gpu=int(parts[0]), sm_mhz=float(parts[1]), mem_mhz=float(parts[2]),
                    power_w=float(parts[3]), temp_c=float(parts[4]), reasons=int(parts[5], 16))
    except ValueError:
        return None


def summarize(samples: list[dict]) -> dict:
    """Per GPU: mean SM / memory clock (MHz), mean power (W), max temperature (C), sample count, and
    the share of samples with any clock-limiting reason other than idle (bit 0x1)."""
    out = {}
    for gpu in sorted({s["gpu"] for s in samples}):
        mine = [s for s in samples if s["gpu"] == gpu]
        out[gpu] = dict(sm_mhz=statistics.mean(s["sm_mhz"] for s in mine),
                        mem_mhz=statistics.mean(s["mem_mhz"] for s in mine),
                        power_w=statistics.mean(s["power_w"] for s in mine),
                        temp_c_max=max(s["temp_c"] for s in mine),
                        limited_frac=sum(bool(s["reasons"] & ~0x1) for s in mine) / len(mine),
                        reasons_seen=sorted({hex(s["reasons"]) for s in mine}),
                        samples=len(mine))
    return out


class ClockSampler:
    """Runs `nvidia-smi -lms <period>` during each phase and keeps its samples per phase name."""

    def __init__(self, period_ms: int = 50, command: str = "nvidia-smi"):
        self.period_ms = period_ms
        self.command = shutil.which(command)
        self.phases: dict[str, list[dict]] = {}
        self.fields = self._probe_fields()

    def _probe_fields(self):
        """The query fields this driver accepts (one query each way), or None (no usable nvidia-smi)."""
        if self.command is None:
            return None
        for fields in (FIELDS, FIELDS[:-1] + (OLD_REASONS_FIELD,)):
            try:
                out = subprocess.run([self.command, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                return None
            if out.returncode == 0 and any(parse_line(line) for line in out.stdout.splitlines()):
                return fields
        return None

    @property
    def available(self) -> bool:
        return self.fields is not None

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self.available:
            yield
            return
        proc = subprocess.Popen(
            [self.command, f"--query-gpu={','.join(self.fields)}", "--format=csv,noheader,nounits",
             "-lms", str(self.period_ms)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        samples: list[dict] = []

        def read():
            for line in proc.stdout:
                if (s := parse_line(line)) is not None:
                    samples.append(s)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            yield
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            reader.join(timeout=10)
            self.phases[name] = samples

    def summary(self) -> dict:
        return {name: summarize(s) for name, s in self.phases.items() if s}

    def table(self) -> str:
        """One line per (phase, GPU)."""
        lines = [f"{'phase':40s} gpu  sm MHz  mem MHz  power W  limited  samples"]
        for name, per_gpu in self.summary().items():
            for gpu, s in per_gpu.items():
                lines.append(f"{name:40s} {gpu:3d} {s['sm_mhz']:7.0f} {s['mem_mhz']:8.0f} {s['power_w']:8.1f}"
                             f" {s['limited_frac']:8.2f} {s['samples']:8d}")
        return "\n".join(lines)
