"""Where an engine step's time goes: GPU time per category, GPU busy time and host dispatch/idle, from a profile of
the step programs that `bench_engine.py` times (its `--profile` flag).

Method (no CUPTI calls of our own): a few steps run under `jax.profiler.trace`, whose XSpace (`*.xplane.pb`, read
with `jax.profiler.ProfileData`) holds the kernel events (GPU: the CUDA stream lines of `/device:GPU:N`, from
CUPTI; CPU: XLA's thunk events) with the HLO instruction that launched them (stats `hlo_op`, `hlo_module`,
`program_id`). Kernels XLA runs inside a command buffer (CUDA graph) name only the command buffer (seen with jax
0.11.2 on an H100: a whole step unattributed), so bench_engine turns command buffers off for a profiled run;
should one remain, a fusion's kernel inside it is still found by its kernel name (the fusion's name). Each instruction is looked up in the compiled HLO text of the program that ran it
(`jitted.lower(args).compile().as_text()`, recorded on one untimed call: a compilation-cache hit; a module's
programs are matched to program ids in call order) and categorized by
  * its dtypes: an XLA pass that makes FP8 e4m3 values from bf16/f32 is activation quantization, one that turns
    FP8 into wider floats without a matmul is weight dequantization (whatever producer or consumer XLA fused
    into such a pass counts with it);
  * else the innermost named scope of its op name (`jax.named_scope` in `dwdp_jax/model.py` and
    `paged_attention.py`; a fusion's name is the longest common prefix of its ops' names, as XLA's own kernel
    annotation, or of its matmuls' names if it has any: a norm fused into the LM head's dot is the dot's; when
    that prefix holds no known scope, its root's name: a gather with an index clamp fused in is the gather's):
    `kv_cache` (page writes and gathers) -> cache; `linear` (every `Linear`: q/kv/o projections,
    dense and shared-expert MLPs, LM head; the FP8 GEMM kernel included) -> dense_gemm; `kv_b` (kv_b
    up-projection of the expanded form, query absorption and output projection of the absorbed form) ->
    attention_kv_b; `attend` (einsum attention, the MLA kernels and their split-KV combine) -> attention;
    `router` -> moe_glue; `routed_experts` -> expert_gemm for matmuls and Pallas/cuBLAS kernels, moe_glue for
    the rest (permutation, SwiGLU, combine);
  * anything else (norms, RoPE, residuals, embedding, the eager logits gather) -> other.
A kernel whose instruction cannot be found falls back to the op name in the event's own annotation (GPU: XLA's
`prefix`/`name`; scopes only, no dtype rules), else counts as `unattributed`. Kernels of other programs (the
runner's eager logits gather) and outside programs (memcpy) count as `other`. `attributed_by_gpu_s` says how much
GPU time each way categorized, `modules_gpu_s` GPU time per program, `top_ops` the costliest instructions,
`kernels_per_step_by_category` and `top_ops_by_category` the kernels and costliest instructions of each category.

Per step: GPU time per category (kernels on several streams may overlap, so the sum can exceed the busy time),
GPU busy = union of the kernel intervals, host wall = time of a blocking step as bench_engine times it, and
dispatch/idle = wall - busy. Profiling adds per-launch overhead, so the breakdown also sets the unprofiled step
time of the same point (same process: command buffers off as well) against the same busy time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable

import jax

CATEGORIES = ("attention", "attention_kv_b", "expert_gemm", "dense_gemm", "quantize", "weight_dequant", "cache",
              "moe_glue", "other", "unattributed")
# Innermost named scope -> category (`routed_experts`: its matmuls are expert_gemm, see `categorize`).
SCOPE_CATEGORY = {"kv_cache": "cache", "linear": "dense_gemm", "kv_b": "attention_kv_b", "attend": "attention",
                  "router": "moe_glue", "routed_experts": "moe_glue"}
_MATMUL_OPCODES = frozenset({"dot", "convolution", "ragged-dot"})
_CONTROL_FLOW = frozenset({"while", "conditional", "call"})
# Custom calls that are matmul or Pallas kernels (cuBLAS/cuBLASLt GEMMs, Mosaic GPU, Triton), not e.g. CUB sorts.
_KERNEL_TARGET = re.compile(r"cublas|gemm|matmul|mosaic|triton", re.IGNORECASE)
_GEMM_KERNEL_NAME = re.compile(r"gemm|mosaic|cutlass|xmma|nvjet|matmul", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------------------------
# Compiled HLO text -> per-instruction features


@dataclasses.dataclass(frozen=True)
class HloOp:
    """What the categories need of one HLO instruction: its op name (name stack), output and input dtypes, and
    whether it is or contains a matmul or a matmul/Pallas custom call."""

    name: str
    opcode: str
    op_name: str
    out_dtypes: frozenset
    in_dtypes: frozenset
    matmul: bool


@dataclasses.dataclass
class _Instr:
    name: str
    opcode: str
    type: str
    operands: list
    calls: list
    target: str
    op_name: str


def _matching(text: str, start: int) -> int:
    """Index just past the bracket that closes text[start] ('(' or '{'), skipping quoted strings."""
    close = {"(": ")", "{": "}"}[text[start]]
    depth, i, quoted = 0, start, False
    while i < len(text):
        c = text[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == text[start]:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return len(text)


def _split_top(text: str) -> list[str]:
    """text split at commas outside brackets."""
    parts, depth, cur = [], 0, []
    for c in text:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    if cur:
        parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*")
_OPCODE = re.compile(r"\s*([\w\-$.]+)\(")
_DTYPE = re.compile(r"\b([a-z][a-z0-9]*)\[")
_OP_NAME = re.compile(r'metadata=\{[^}]*?op_name="((?:[^"\\]|\\.)*)"')


def _parse_instr(line: str) -> _Instr | None:
    m = _INSTR.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):
        end = _matching(rest, 0)
    else:
        end = rest.find(" ")
        end = len(rest) if end < 0 else end
    type_str, rest = rest[:end], rest[end:]
    m_op = _OPCODE.match(rest)
    if not m_op:
        return None
    open_at = m_op.end() - 1
    close_at = _matching(rest, open_at)
    operands = [p.split()[-1].lstrip("%") for p in _split_top(rest[open_at + 1:close_at - 1])]
    attrs = rest[close_at:]
    calls = re.findall(r"%?([\w.\-]+)", " ".join(re.findall(r"(?:calls|called_computations)=(\{[^}]*\}|%?[\w.\-]+)",
                                                            attrs)))
    target = re.search(r'custom_call_target="([^"]*)"', attrs)
    op_name = _OP_NAME.search(attrs)
    return _Instr(m.group(1), m_op.group(1), type_str, operands, calls, target.group(1) if target else "",
                  op_name.group(1) if op_name else "")


def _common_prefix(names: list[str]) -> str:
    """Longest common prefix of '/'-separated names, in whole components."""
    if not names:
        return ""
    parts = [n.split("/") for n in names]
    out = []
    for comps in zip(*parts):
        if any(c != comps[0] for c in comps):
            break
        out.append(comps[0])
    return "/".join(out)


def parse_hlo(text: str) -> tuple[str, dict[str, HloOp]]:
    """(module name, {instruction name: HloOp}) of a compiled HLO module's text (`Compiled.as_text()`)."""
    module = re.search(r"^HloModule\s+([^\s,]+)", text, re.MULTILINE)
    if module is None:
        raise ValueError("not an HLO module's text (no 'HloModule' header)")
    computations: dict[str, list[_Instr]] = {}
    roots: dict[str, _Instr] = {}
    current = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():  # a computation header, its closing brace, or the module's header lines
            head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
            current = head.group(1) if head and not line.startswith("HloModule") else None
            if current is not None:
                computations[current] = []
            continue
        if current is not None:
            instr = _parse_instr(line)
            if instr is not None:
                computations[current].append(instr)
                if line.lstrip().startswith("ROOT "):
                    roots[current] = instr
    instrs = {i.name: i for body in computations.values() for i in body}

    def called(instr: _Instr, seen: set) -> list[_Instr]:
        out = []
        for c in instr.calls:
            if c in computations and c not in seen:
                seen.add(c)
                for inner in computations[c]:
                    out.append(inner)
                    out += called(inner, seen)
        return out

    def dtypes(type_str: str) -> frozenset:
        return frozenset(_DTYPE.findall(type_str))

    ops = {}
    for instr in instrs.values():
        inner = called(instr, set())
        named = [n for n in [instr.op_name] + [i.op_name for i in inner] if "/" in n]
        if instr.opcode == "fusion":  # the fused computation's parameters (not those of nested regions)
            ins = frozenset().union(*(dtypes(i.type) for c in instr.calls for i in computations.get(c, ())
                                      if i.opcode == "parameter"))
        else:
            ins = frozenset().union(*(dtypes(instrs[o].type) for o in instr.operands if o in instrs))
        matmuls = [i for i in [instr] + inner
                   if i.opcode in _MATMUL_OPCODES or (i.opcode == "custom-call" and _KERNEL_TARGET.search(i.target))]
        # a GEMM fusion is named by its matmuls (XLA fuses e.g. the final norm into the LM head's dot)
        named_mm = [i.op_name for i in matmuls if "/" in i.op_name]
        name = _common_prefix(named_mm or named)
        if instr.opcode == "fusion" and scope_category(name, False) == "other":
            # ops of several scopes share no known one (XLA fused e.g. an index clamp into the MoE row gather):
            # the fused computation's root says what the fusion makes
            root = next((roots[c] for c in instr.calls if c in roots), None)
            if root is not None and scope_category(root.op_name, False) != "other":
                name = root.op_name
        ops[instr.name] = HloOp(instr.name, instr.opcode, name, dtypes(instr.type), ins, bool(matmuls))
    return module.group(1), ops


# ---------------------------------------------------------------------------------------------------------------
# Categories


def _is_fp8(dtype: str) -> bool:
    return dtype.startswith("f8")


def _is_wide_float(dtype: str) -> bool:
    return dtype in ("bf16", "f16", "f32", "f64")


def scope_category(op_name: str, matmul: bool) -> str:
    """Category from the innermost known named scope of an op name; `matmul`: the op is or contains a matmul or a
    matmul/Pallas kernel (under `routed_experts` that makes it an expert GEMM)."""
    for scope in reversed(op_name.split("/")):
        if scope in SCOPE_CATEGORY:
            return "expert_gemm" if scope == "routed_experts" and matmul else SCOPE_CATEGORY[scope]
    return "other"


def categorize(op: HloOp) -> str:
    """Category of one HLO instruction (see the module docstring)."""
    if not op.matmul:
        if any(map(_is_fp8, op.out_dtypes)) and any(map(_is_wide_float, op.in_dtypes)):
            return "quantize"
        if any(map(_is_fp8, op.in_dtypes)) and not any(map(_is_fp8, op.out_dtypes)):
            return "weight_dequant"
    return scope_category(op.op_name, op.matmul)


# ---------------------------------------------------------------------------------------------------------------
# Trace events


@dataclasses.dataclass(frozen=True)
class OpEvent:
    """One kernel (GPU) or XLA thunk (CPU) execution: start and duration in microseconds, the kernel name and
    what the event's args say of the HLO instruction behind it."""

    start_us: float
    dur_us: float
    name: str
    module: str | None = None
    hlo_op: str | None = None
    program_id: str | None = None
    annotation: str = ""  # the op name the GPU annotation carries ("prefix/name"), when present
    on_gpu: bool = False


def load_profile(log_dir: str):
    """The planes of the newest profile that `jax.profiler.trace(log_dir)` wrote (`plugins/profile/<run>/
    *.xplane.pb`, read with `jax.profiler.ProfileData`; its trace-viewer JSON drops the events' program ids)."""
    runs = sorted(glob.glob(os.path.join(log_dir, "plugins", "profile", "*")), key=os.path.getmtime)
    files = glob.glob(os.path.join(runs[-1], "*.xplane.pb")) if runs else []
    if len(files) != 1:
        raise RuntimeError(f"expected one *.xplane.pb under {log_dir}/plugins/profile/<newest run>, found {files}")
    return list(jax.profiler.ProfileData.from_file(files[0]).planes)


def op_events(planes) -> list[OpEvent]:
    """The kernel events of a profile's planes (objects with `name` and `lines`; a line has `name` and `events`;
    an event `name`, `start_ns`, `duration_ns` and `stats`, (name, value) pairs: `jax.profiler.ProfileData`).
    With a GPU plane (`/device:GPU...`): every event on its CUDA stream lines (`Stream #...`). Without one (CPU):
    every event that names an HLO instruction. Raises, listing the planes and lines, if there are none (no device
    tracer, e.g. no CUPTI, or a profile layout this code does not know)."""
    planes = list(planes)
    gpu = [p for p in planes if p.name.startswith("/device:GPU")]
    out = []
    for plane in gpu or planes:
        for line in plane.lines:
            if gpu and not line.name.startswith("Stream"):
                continue
            for e in line.events:
                stats = dict(e.stats)
                if not gpu and "hlo_op" not in stats:
                    continue
                named = "/".join(str(stats[k]) for k in ("prefix", "name") if stats.get(k))
                pid = stats.get("program_id")
                out.append(OpEvent(e.start_ns / 1e3, e.duration_ns / 1e3, e.name, stats.get("hlo_module"),
                                   stats.get("hlo_op"), None if pid is None else str(pid),
                                   named if "hlo_op" in stats else "", bool(gpu)))
    if not out:
        lines = [f"{p.name} / {line.name}" for p in planes for line in p.lines]
        raise RuntimeError(
            "the profile has no kernel events: " + ("no event on a 'Stream #' line of the GPU planes" if gpu
                                                    else "no event names an HLO op")
            + f" (device tracer missing, e.g. no CUPTI?). Planes / lines in the profile: {lines[:40]}")
    return out


def union_us(events: list[OpEvent]) -> float:
    """Length of the union of the events' [start, start + dur) intervals."""
    total, end = 0.0, float("-inf")
    for e in sorted(events, key=lambda e: e.start_us):
        lo, hi = max(e.start_us, end), e.start_us + e.dur_us
        if hi > lo:
            total += hi - lo
        end = max(end, hi)
    return total


def program_keys(events: list[OpEvent], texts_by_module: dict[str, list[str]]) -> dict:
    """{(module, program_id): index into texts_by_module[module]}: a module's programs (same name, e.g. the
    prefill program at two block-table widths) are matched in order of first appearance in the trace against the
    order of their first calls. Events without program ids (CPU) match only a module with one program."""
    first_seen: dict[str, list] = {}
    for e in sorted(events, key=lambda e: e.start_us):
        if e.module in texts_by_module:
            seen = first_seen.setdefault(e.module, [])
            if e.program_id not in seen:
                seen.append(e.program_id)
    keys = {}
    for module, pids in first_seen.items():
        n = len(texts_by_module[module])
        if pids == [None]:
            if n == 1:
                keys[(module, None)] = 0
        elif len(pids) == n and None not in pids:
            keys.update({(module, pid): i for i, pid in enumerate(pids)})
    return keys


def _kernel_index(ops: dict[str, HloOp]) -> dict[str, HloOp]:
    """The ops of a program by the name XLA:GPU gives a fusion's kernel ('loop_add_fusion.3' ->
    'loop_add_fusion_3'): how a kernel run inside a command buffer, whose events carry only the command buffer's
    name, finds its instruction. Kernels of custom calls (cuBLAS, Mosaic) have names of their own and stay
    unattributed there."""
    return {name.replace(".", "_"): op for name, op in ops.items()}


def breakdown(events: list[OpEvent], programs: dict[str, list[dict[str, HloOp]]], steps: int, wall_s: float,
              top: int = 25) -> dict:
    """Per-step breakdown of `steps` steps' events. programs: {module name: [ops of each program of that name, in
    the order of their first calls]}; wall_s: host wall seconds of all the steps together."""
    keys = program_keys(events, {m: list(p) for m, p in programs.items()})
    gpu_us = dict.fromkeys(CATEGORIES, 0.0)
    by_source = dict.fromkeys(("hlo", "annotation", "none", "other_programs"), 0.0)
    modules_us: dict[str, float] = {}
    per_op: dict[tuple, float] = {}
    kernels_by_category = dict.fromkeys(CATEGORIES, 0)
    warnings = []
    unmatched = {e.module for e in events if e.module in programs and (e.module, e.program_id) not in keys}
    if unmatched:
        warnings.append(f"programs of {sorted(unmatched)} could not be matched to their compiled HLO (counts of "
                        "program ids and recorded programs differ): the events' own annotations are used")
    kept = []
    by_kernel: dict[int, dict[str, HloOp]] = {}  # a program's ops by kernel name, built once when needed
    for e in events:
        op = None
        if (e.module, e.program_id) in keys:
            ops = programs[e.module][keys[(e.module, e.program_id)]]
            op = ops.get(e.hlo_op)
            if op is None and (e.hlo_op or "").startswith("command_buffer"):
                if id(ops) not in by_kernel:
                    by_kernel[id(ops)] = _kernel_index(ops)
                op = by_kernel[id(ops)].get(e.name)  # a fusion's kernel inside a CUDA graph: named after it
        if op is not None and op.opcode in _CONTROL_FLOW and not e.on_gpu:
            continue  # a CPU thunk that spans the thunks of its body, which are counted themselves
        kept.append(e)
        if op is not None:
            source, category, op_name = "hlo", categorize(op), op.op_name
        elif e.module in programs and e.annotation:
            source, op_name = "annotation", e.annotation
            category = scope_category(op_name, bool(_GEMM_KERNEL_NAME.search(e.name)))
        elif e.module in programs:
            source, category, op_name = "none", "unattributed", ""
        else:  # another program (the eager logits gather), or no program (a memcpy)
            source, category, op_name = "other_programs", "other", ""
        gpu_us[category] += e.dur_us
        kernels_by_category[category] += 1
        by_source[source] += e.dur_us
        module = e.module or "(no module)"
        modules_us[module] = modules_us.get(module, 0.0) + e.dur_us
        key = (category, op_name, e.hlo_op or e.name)
        per_op[key] = per_op.get(key, 0.0) + e.dur_us
    busy_s = union_us(kept) / 1e6 / steps
    wall = wall_s / steps
    idle = idle_gaps(kept, top)
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1])
    top_ops = ranked[:top]
    op_row = lambda c, n, o, us: dict(category=c, op_name=n, op=o, gpu_s=us / 1e6 / steps)
    if gpu_us["unattributed"] > 0.05 * sum(gpu_us.values()):
        warnings.append(f"{gpu_us['unattributed'] / sum(gpu_us.values()):.0%} of the GPU time is unattributed")
    return {
        "steps": steps,
        "wall_s": wall,
        "gpu_busy_s": busy_s,
        "dispatch_idle_s": wall - busy_s,
        "gpu_s": {k: v / 1e6 / steps for k, v in gpu_us.items()},
        "kernels_per_step": len(kept) / steps,
        # how each kernel's category was found: its HLO instruction, its annotation's op name, neither, or it
        # ran outside the step programs
        "attributed_by_gpu_s": {k: v / 1e6 / steps for k, v in by_source.items()},
        "modules_gpu_s": {k: v / 1e6 / steps for k, v in sorted(modules_us.items(), key=lambda kv: -kv[1])},
        "top_ops": [op_row(c, n, o, us) for (c, n, o), us in top_ops],
        # where a step's kernels are (a decode step of a few rows is bound by their number) and, per category,
        # its costliest instructions (what "other" holds)
        "kernels_per_step_by_category": {k: v / steps for k, v in kernels_by_category.items() if v},
        "top_ops_by_category": {cat: [op_row(c, n, o, us) for (c, n, o), us in ranked if c == cat][:12]
                                for cat in CATEGORIES if kernels_by_category[cat]},
        # where the GPU waits: between two kernels of one program (the host launching too slowly), between
        # programs (the host's work between calls: packing, transfers, dispatch, the blocking read), and before
        # the first / after the last kernel of the profile (wall minus the events' span)
        "idle_inside_programs_s": idle["inside_us"] / 1e6 / steps,
        "idle_between_programs_s": idle["between_us"] / 1e6 / steps,
        "idle_edges_s": max(0.0, wall - busy_s - (idle["inside_us"] + idle["between_us"]) / 1e6 / steps),
        "top_idle_gaps": [dict(after=a, before=b, count=n, idle_s=us / 1e6 / steps)
                          for (a, b), (n, us) in idle["top"]],
        "warnings": warnings,
    }


def idle_gaps(events: list[OpEvent], top: int = 10) -> dict:
    """The GPU's idle gaps between the union intervals of `events` (microseconds, all steps together):
    inside_us (both neighbours ran in the same program, `module`), between_us (a change of program, or a kernel
    outside any program such as a memcpy), and the `top` inside gaps by total time, keyed by (op or kernel
    before, op or kernel after): [((after, before), (count, us))]."""
    inside = between = 0.0
    per_pair: dict[tuple, list] = {}
    last = None  # the event that ends the current union interval
    for e in sorted(events, key=lambda e: e.start_us):
        if last is not None:
            gap = e.start_us - (last.start_us + last.dur_us)
            if gap > 0:
                if e.module is not None and e.module == last.module:
                    inside += gap
                    cell = per_pair.setdefault((last.hlo_op or last.name, e.hlo_op or e.name), [0, 0.0])
                    cell[0] += 1
                    cell[1] += gap
                else:
                    between += gap
        if last is None or e.start_us + e.dur_us > last.start_us + last.dur_us:
            last = e
    ranked = sorted(per_pair.items(), key=lambda kv: -kv[1][1])[:top]
    return {"inside_us": inside, "between_us": between, "top": [(k, tuple(v)) for k, v in ranked]}


# ---------------------------------------------------------------------------------------------------------------
# Driving a runner's steps


class _Recorder:
    """Stands in for a jitted step program: records the compiled HLO text of each distinct argument signature
    (first-call order), then calls the program."""

    def __init__(self, program, texts: list, seen: set):
        self.program, self.texts, self.seen = program, texts, seen

    def __call__(self, *args):
        signature = (id(self.program), str(jax.tree.map(lambda a: (a.shape, str(a.dtype)), args)))
        if signature not in self.seen:
            self.seen.add(signature)
            self.texts.append(self.program.lower(*args).compile().as_text())
        return self.program(*args)


@contextlib.contextmanager
def recording_programs(runner):
    """Within the block, the runner's step programs (`ModelRunner._programs`: {(executor, absorbed): jitted})
    record their compiled HLO texts into the list this yields."""
    programs = getattr(runner, "_programs", None)
    if not isinstance(programs, dict):
        raise TypeError(f"{type(runner).__name__} has no `_programs` dict of jitted step programs (ModelRunner has)")
    texts, seen, saved = [], set(), dict(programs)
    programs.update({k: _Recorder(p, texts, seen) for k, p in saved.items()})
    try:
        yield texts
    finally:
        programs.clear()
        programs.update(saved)


def profile_steps(runner, call: Callable[[], object], calls: int, steps_per_call: int = 1,
                  trace_dir: str | None = None) -> dict:
    """Per-step breakdown of `calls` blocking calls of `call` (each runs `steps_per_call` engine steps on
    `runner`, e.g. `runner.prefill(chunks)` of several chunk rounds), profiled after one recording call.
    trace_dir: keep the trace there (default: a temporary directory, removed)."""
    t = time.perf_counter()
    with recording_programs(runner) as texts:
        jax.block_until_ready(call())
    record_s = time.perf_counter() - t  # a call plus cache hits; long if the compilation cache missed
    if not texts:
        raise RuntimeError("the recording call ran none of the runner's step programs")
    programs: dict[str, list] = {}
    for text in texts:
        module, ops = parse_hlo(text)
        programs.setdefault(module, []).append(ops)
    log_dir = trace_dir or tempfile.mkdtemp(prefix="engine_profile-")
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # Python function events: large traces, and not what we measure
    options.host_tracer_level = 1
    try:
        wall = 0.0
        with jax.profiler.trace(log_dir, profiler_options=options):
            for _ in range(calls):
                t = time.perf_counter()
                jax.block_until_ready(call())
                wall += time.perf_counter() - t
        events = op_events(load_profile(log_dir))
    finally:
        if trace_dir is None:
            shutil.rmtree(log_dir, ignore_errors=True)
    out = breakdown(events, programs, calls * steps_per_call, wall)
    out.update(programs={m: len(p) for m, p in programs.items()}, record_call_s=record_s)
    if trace_dir is not None:
        out["trace_dir"] = trace_dir
    return out


def with_unprofiled(b: dict, step_s: float) -> dict:
    """b plus the unprofiled step time of the same point and its dispatch/idle against the profiled busy time."""
    return dict(b, unprofiled_step_s=step_s, dispatch_idle_unprofiled_s=step_s - b["gpu_busy_s"])


def format_table(columns: dict[str, dict]) -> str:
    """A table of breakdowns, one column per label: milliseconds per step (percent of the GPU busy time)."""
    labels = list(columns)
    width = max([24] + [len(l) + 2 for l in labels])
    rows = [f"{'ms per step':26s}" + "".join(f"{l:>{width}s}" for l in labels)]

    def line(name, values, percent=False):
        cells = []
        for v, b in zip(values, columns.values()):
            if v is None:
                cells.append(f"{'-':>{width}s}")
            elif percent and b["gpu_busy_s"] > 0:
                cells.append(f"{v * 1e3:>{width - 7}.3f} ({v / b['gpu_busy_s']:4.0%})")
            else:
                cells.append(f"{v * 1e3:>{width}.3f}")
        rows.append(f"{name:26s}" + "".join(cells))

    for c in CATEGORIES:  # percent of the GPU busy time
        if any(b["gpu_s"].get(c) for b in columns.values()):
            line(c, [b["gpu_s"].get(c, 0.0) for b in columns.values()], percent=True)
    line("GPU busy (union)", [b["gpu_busy_s"] for b in columns.values()])
    line("host wall, profiled", [b["wall_s"] for b in columns.values()])
    line("dispatch/idle, profiled", [b["dispatch_idle_s"] for b in columns.values()])
    line("  inside programs", [b.get("idle_inside_programs_s") for b in columns.values()])
    line("  between programs", [b.get("idle_between_programs_s") for b in columns.values()])
    line("  edges", [b.get("idle_edges_s") for b in columns.values()])
    line("step, unprofiled", [b.get("unprofiled_step_s") for b in columns.values()])
    line("dispatch/idle, unprofiled", [b.get("dispatch_idle_unprofiled_s") for b in columns.values()])
    rows.append(f"{'kernels per step':26s}" + "".join(f"{b['kernels_per_step']:>{width}.0f}"
                                                       for b in columns.values()))
    for c in CATEGORIES:
        if any(b.get("kernels_per_step_by_category", {}).get(c) for b in columns.values()):
            rows.append(f"{'  ' + c:26s}" + "".join(
                f"{b.get('kernels_per_step_by_category', {}).get(c, 0):>{width}.0f}" for b in columns.values()))
    for label, b in columns.items():
        for g in b.get("top_idle_gaps", [])[:6]:
            rows.append(f"idle ({label}): {g['idle_s'] * 1e3:.3f} ms in {g['count']} gaps after {g['after']} "
                        f"before {g['before']}")
    for label, b in columns.items():
        for w in b.get("warnings", []):
            rows.append(f"WARNING ({label}): {w}")
    return "\n".join(rows)
