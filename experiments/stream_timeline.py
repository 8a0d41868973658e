"""Did two GPU streams run at the same time? Kernel and copy events of a jax.profiler trace, per stream, and the
overlap between a fetch stream and the compute streams (experiments/bench_pallas_async.py). The analysis is pure
Python (tests/test_stream_timeline.py). The trace is XLA's CUPTI trace; that it also records kernels and copies
launched outside XLA on our own streams is what the GPU run checks (a summary without the fetch says so and lists
what each stream held). `schedule_order`: where a compiled program's async call starts and ends among its Mosaic
GPU kernels (XLA's stream-annotation route)."""

from __future__ import annotations

import glob
import os

import jax


def union(intervals):
    """Sorted, merged [start, end) intervals."""
    out = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def overlap(a, b) -> float:
    """Total length of the intersection of two interval unions."""
    a, b, total, i, j = union(a), union(b), 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def timeline_summary(events, is_fetch) -> dict:
    """events: dicts (line, name, start_us, dur_us) of a GPU's stream lines. The fetch line is the stream with the
    most fetch time (`is_fetch(name)`); compute is every kernel on the other streams. Returns the streams, busy
    times and their overlap (us), and whether they ran at the same time."""
    fetch_time = {}
    for e in events:
        if is_fetch(e["name"]):
            fetch_time[e["line"]] = fetch_time.get(e["line"], 0.0) + e["dur_us"]
    if not fetch_time:  # say what the trace holds instead
        names = {}
        for e in events:
            names.setdefault(e["line"], set()).add(e["name"][:60])
        return dict(found_fetch=False, lines={line: sorted(n)[:8] for line, n in names.items()})
    fetch_line = max(fetch_time, key=fetch_time.get)
    fetch = [(e["start_us"], e["start_us"] + e["dur_us"]) for e in events if e["line"] == fetch_line]
    compute = [(e["start_us"], e["start_us"] + e["dur_us"]) for e in events if e["line"] != fetch_line]
    busy_f, busy_c = sum(e - s for s, e in union(fetch)), sum(e - s for s, e in union(compute))
    both = overlap(fetch, compute)
    return dict(found_fetch=True, fetch_line=fetch_line, compute_lines=sorted({e["line"] for e in events} - {fetch_line}),
                fetch_busy_us=busy_f, compute_busy_us=busy_c, overlap_us=both,
                overlap_frac_of_fetch=both / busy_f if busy_f else 0.0, concurrent=both > 0.1 * busy_f)


def timeline_from_xplane(path: str) -> list[dict]:
    """Kernel and copy events of every GPU stream line ("Stream #..."; not XLA's derived op/module lines)."""
    from jax.profiler import ProfileData

    events = []
    for plane in ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            events += [dict(line=f"{plane.name} {line.name}", name=e.name, start_us=e.start_ns / 1e3,
                            dur_us=e.duration_ns / 1e3) for e in line.events]
    return events


def profiled(run, trace_dir: str, is_fetch) -> dict:
    """Runs `run()` under jax.profiler; the overlap summary and the first events of the trace."""
    try:
        jax.profiler.start_trace(trace_dir)
        try:
            run()
        finally:
            jax.profiler.stop_trace()
        paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
        events = sorted(timeline_from_xplane(paths[-1]), key=lambda e: e["start_us"])
    except Exception as exc:  # the timeline is evidence, not the measurement: report and go on
        return dict(error=f"{type(exc).__name__}: {str(exc)[:300]}")
    t0 = events[0]["start_us"] if events else 0.0
    excerpt = [dict(e, start_us=round(e["start_us"] - t0, 1), dur_us=round(e["dur_us"], 1)) for e in events[:80]]
    return dict(timeline_summary(events, is_fetch), trace=paths[-1], events=len(events), excerpt=excerpt)


def schedule_order(hlo_text: str) -> list[str]:
    """The entry computation's async calls and Mosaic GPU custom calls in schedule order, e.g. ['call-start',
    'mosaic', 'mosaic', 'call-done']: the fetch can overlap the GEMM only if its start precedes the GEMM."""
    order, in_entry = [], False
    for line in hlo_text.splitlines():
        if line.startswith("ENTRY"):
            in_entry = True
        elif in_entry and line.strip() == "}":
            break
        elif in_entry:
            for token in ("call-start", "call-done"):
                if f" {token}(" in line:
                    order.append(token)
            if "custom-call(" in line and "mosaic" in line:
                order.append("mosaic")
    return order
