"""An XLA buffer assignment (`*buffer-assignment.txt` of an `--xla_dump_to` dump) read as its largest HLO values:
which instruction's buffer is how big, and whether it lives in a parameter's, the output's or the temporary
allocation. No flags here (absl flags are process-wide; `decode_memory.py` is the command)."""

from __future__ import annotations

import re

_ALLOCATION = re.compile(r"^allocation (?P<index>\d+): size (?P<size>\d+)(?P<kind>.*?):?$")
_VALUE = re.compile(r"^\s*value: <\d+ (?P<name>\S+) @\S+> \(size=(?P<size>\d+),offset=\d+\): (?P<shape>\S+)")


def allocation_kind(header_rest: str) -> str:
    """'parameter 49', 'output', 'preallocated-temp' or 'temp' from an allocation header's tail."""
    rest = header_rest.strip(" ,:")
    if "parameter" in rest:
        return re.search(r"parameter \d+", rest).group(0)
    if "output" in rest or "live-out" in rest:
        return "output"
    if "preallocated-temp" in rest:
        return "preallocated-temp"
    return "temp"


def large_buffers(text: str, min_bytes: int) -> list[dict]:
    """Buffer-assignment text -> every HLO value of at least min_bytes with its allocation, largest first."""
    rows, allocation = [], None
    for line in text.splitlines():
        head = _ALLOCATION.match(line)
        if head:
            allocation = dict(index=int(head.group("index")), size=int(head.group("size")),
                              kind=allocation_kind(head.group("kind")))
            continue
        value = _VALUE.match(line)
        if value and allocation is not None and int(value.group("size")) >= min_bytes:
            rows.append(dict(value=value.group("name"), bytes=int(value.group("size")), shape=value.group("shape"),
                             allocation=allocation["index"], allocation_kind=allocation["kind"],
                             allocation_bytes=allocation["size"]))
    return sorted(rows, key=lambda r: -r["bytes"])
