"""The asynchronous Pallas fetch (issue 20) on one GPU: does the remote-DMA kernel run beside a MoE layer's compute,
what does it cost that compute, and how does it compare with the copy engine.

One GPU stands in for a DWDP rank: the "peer" buffer is a second buffer on the same GPU (the same bytes through
HBM instead of NVLink: this measures SM and memory interference, not the link; the peer path is the same code).
A MoE layer is DWDP's expert path (`experts.pallas_sorted_ffn`: gate/up and down grouped GEMMs over the local and
the staged buffer, bf16, R1's expert shapes; by default 8K tokens x top-8 rows over 64 local + 64 staged experts,
and 64 x 88 MB = 5.6 GB fetched per layer: R1's FP8 bytes per layer at G=2). Each layer reads the staging fetched
during the previous layer (prefetch depth 1).

Parts (--parts; experiments/gpu_check_pallas_async.sh runs each in a process of its own, since a failing launch
outside XLA aborts the process):
  overlap: the copy engine (device-ordered `copy_engine_stream` and the host-ordered default `copy_engine`) and
    `pallas_async` with k = 4, 8, 16 fetch CTAs (the GEMMs get the other SMs). Per MoE layer: compute alone (the
    same GEMM grid, and all SMs), fetch alone, the layer with the fetch overlapped (exposed fetch = that minus the
    compute alone on all SMs), and the compute with the same fetches running beside it, never waited for
    (compute slowdown). One overlapped pass per backend under the profiler: the timeline shows the DMA kernel (or
    the copies) and the GEMMs on different streams at the same time. The last layer's output must equal the
    layer computed straight from the source buffer, bit for bit.
  xla_stream: XLA's route: the kernel inside the layer program, as a call annotated for GPU stream 1
    (`_compat.on_stream`), fetching the next layer's experts. Whether XLA compiled an async call, and whether it
    overlaps: layer time against the same program with the kernel on the compute stream.
  subset: the planner's partial fetches: one kernel launch per field gathering n scattered experts (n = 8..64)
    against n cudaMemcpyAsync calls per field; device time (CUDA events), host enqueue time, bytes compared.

  python3 experiments/bench_pallas_async.py --device_kind=nvidia-h100-x1 --parts=overlap --out=$OUT
  python experiments/bench_pallas_async.py --smoke --out=/tmp/smoke     # CPU: the overlap part's loops, tiny
"""

from __future__ import annotations

import gc
import os
import statistics
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from dwdp_jax import xla_flags  # noqa: E402
from dwdp_jax.experts import ExpertWeights, pallas_sorted_ffn  # noqa: E402
from experiments.results_io import write_result  # noqa: E402
from experiments.timing import median_wall_s  # noqa: E402
from experiments.stream_timeline import profiled, schedule_order  # noqa: E402

flags.DEFINE_list("parts", ["overlap", "xla_stream", "subset"], "what to measure")
flags.DEFINE_integer("tokens", 8192, "tokens per MoE layer (x top-8 rows)")
flags.DEFINE_integer("local_experts", 64, "experts in the local buffer")
flags.DEFINE_integer("fetch_experts", 64, "experts fetched per layer (the peer buffer)")
flags.DEFINE_integer("hidden", 7168, "hidden size")
flags.DEFINE_integer("inter", 2048, "expert intermediate size")
flags.DEFINE_integer("layers", 6, "MoE layers per timed pass")
flags.DEFINE_integer("repeats", 3, "timed passes (median)")
flags.DEFINE_list("ks", ["4", "8", "16"], "CTAs of the fetch kernel (the GEMMs get the SM count minus k)")
flags.DEFINE_list("subset_sizes", ["8", "16", "32", "64"], "subset part: experts gathered per fetch")
flags.DEFINE_integer("subset_source_experts", 128, "subset part: experts in the source buffer (R1 FP8 shapes)")
flags.DEFINE_bool("profile", True, "one overlapped pass per backend under jax.profiler (the timeline)")
flags.DEFINE_string("device_kind", "unknown", "the device tool's kind, for the results file")
flags.DEFINE_string("out", "experiments/results", "results directory (traces go to <out>/traces)")
flags.DEFINE_bool("smoke", False, "CPU check of the overlap part's loops: tiny shapes, the jnp expert path, the CPU "
                  "forms of the device-ordered backends (no CuPy, no timeline)")
F = flags.FLAGS

DMA_KERNEL = "remote_dma_gather"  # the fetch kernel's name in profiles


# ------------------------------------------------------------------------------------------------------------
# Setup


median_s = median_wall_s  # the untimed first call compiles and allocates the ring


def experts(key, e: int, hidden: int, inter: int) -> ExpertWeights:
    k1, k2 = jax.random.split(key)
    scale = 0.02  # keeps the chained values finite (a wrong expert still changes the output)
    return ExpertWeights((jax.random.normal(k1, (e, hidden, inter * 2), jnp.float32) * scale).astype(jnp.bfloat16),
                         (jax.random.normal(k2, (e, inter, hidden), jnp.float32) * scale).astype(jnp.bfloat16))


class Layer:
    """The DWDP expert path of one MoE layer over (local, staged) on a persistent GEMM grid of `gemm_sms` CTAs."""

    def __init__(self, rows: int, e_local: int, e_staged: int, gemm_sms: int | None):
        groups = e_local + e_staged
        self.sizes = jnp.full((groups,), rows // groups, jnp.int32)
        self.where = jnp.stack([jnp.repeat(jnp.arange(2, dtype=jnp.int32), jnp.array([e_local, e_staged]),
                                           total_repeat_length=groups),
                                jnp.concatenate([jnp.arange(e_local), jnp.arange(e_staged)]).astype(jnp.int32)], -1)
        if F.smoke:  # CPU: ragged_dot over the two buffers concatenated
            from dwdp_jax.experts import _swiglu_ffn

            self.fn = jax.jit(lambda x, local, staged, sizes, where: _swiglu_ffn(
                x, sizes, jax.tree.map(lambda a, b: jnp.concatenate([a, b]), local, staged), jnp.float32))
        else:
            self.fn = jax.jit(lambda x, local, staged, sizes, where: pallas_sorted_ffn(
                x, sizes, [local, staged], where, num_sms=gemm_sms))

    def __call__(self, x, local, staged):
        return self.fn(x, local, staged, self.sizes, self.where)


def _drain(fetch, handle, dev):
    if handle is not None:
        fetch.ready_all([handle])
    fetch.sync(dev)
    if hasattr(fetch, "_streams"):
        for stream in fetch._streams.values():
            stream.synchronize()


def event_timeline(dev, fetch, src, layer) -> dict:
    """The profiler-free proof: CUDA events on both streams of one layer with one whole-buffer fetch beside it, the
    fetch enqueued when the layer starts. Times (ms) relative to the layer's start on the compute stream; the
    fetch ran beside the layer if it started before the layer ended."""
    import cupy as cp

    from dwdp_jax.parallel.fetch import DeviceHook, _copy_async
    from dwdp_jax.parallel.peer_memory import cuda_ordinal
    from pallas_kernels import remote_dma as rd

    ordinal, hook = cuda_ordinal(dev), DeviceHook(dev)
    with cp.cuda.Device(ordinal):
        side = cp.cuda.Stream(non_blocking=True)
        ev = {n: cp.cuda.Event() for n in ("layer_start", "layer_end", "fetch_start", "fetch_end")}
        staging = {f: cp.empty(getattr(src, f).nbytes, cp.uint8) for f in ("w_gate_up", "w_down")}
        e = src.num_experts
        hdr = cp.asarray(rd.gather_header(range(e), 0, e, e))
    kernels = {f: fetch._kernel(ordinal, getattr(src, f).shape, getattr(src, f).dtype) for f in staging} if hasattr(
        fetch, "_kernel") else None

    def start(compute_stream):
        with cp.cuda.Device(ordinal):
            cp.cuda.runtime.eventRecord(ev["layer_start"].ptr, compute_stream)
            side.wait_event(ev["layer_start"])
            ev["fetch_start"].record(side)
            for f, dst in staging.items():
                a = getattr(src, f)
                if kernels:
                    kernels[f].launch(side.ptr, [hdr.data.ptr, a.unsafe_buffer_pointer(), dst.data.ptr])
                else:
                    _copy_async(dst.data.ptr, dev, a.unsafe_buffer_pointer(), dev, a.nbytes, side.ptr)
            ev["fetch_end"].record(side)

    def end(compute_stream):
        cp.cuda.runtime.eventRecord(ev["layer_end"].ptr, compute_stream)

    try:
        for _ in range(2):  # the second pass is the measured one
            hook.run(start)
            y = layer()
            hook.run(end).block_until_ready()
            y.block_until_ready()
            side.synchronize()
        t = {n: cp.cuda.get_elapsed_time(ev["layer_start"], v) for n, v in ev.items() if n != "layer_start"}
    except Exception as exc:
        return dict(error=f"{type(exc).__name__}: {str(exc)[:300]}")
    finally:
        staging.clear()
        cp.get_default_memory_pool().free_all_blocks()  # give the staging back (XLA allocates on demand)
    both = max(0.0, min(t["fetch_end"], t["layer_end"]) - max(t["fetch_start"], 0.0))
    fetch_ms = t["fetch_end"] - t["fetch_start"]
    return dict(t, overlap_ms=both, overlap_frac_of_fetch=both / fetch_ms if fetch_ms else 0.0,
                concurrent=both > 0.1 * fetch_ms)


# ------------------------------------------------------------------------------------------------------------
# Part 1: overlap of the side-stream kernel (and the copy engine) with the layer


def part_overlap(dev, sms: int, trace_root: str):
    from dwdp_jax.parallel.fetch import CopyEnginePull, StreamOrderedPull
    from dwdp_jax.parallel.pallas_async import PallasAsyncPull
    from pallas_kernels import remote_dma as rd

    rows_n, L, reps = F.tokens * 8, F.layers, F.repeats
    keys = jax.random.split(jax.random.key(0), 3)
    local = experts(keys[0], F.local_experts, F.hidden, F.inter)
    src = experts(keys[1], F.fetch_experts, F.hidden, F.inter)  # the "peer" buffer: same GPU
    x = (jax.random.normal(keys[2], (rows_n, F.hidden), jnp.float32)).astype(jnp.bfloat16)
    fetch_bytes = src.nbytes()
    ks = [int(k) for k in F.ks]
    layers = {g: Layer(rows_n, F.local_experts, F.fetch_experts, g) for g in [sms] + [sms - k for k in ks]}
    want = {g: layer(x, local, src) for g, layer in layers.items()}  # read straight from the source

    def compute_alone(g):
        def run():
            for _ in range(L):
                y = layers[g](x, local, src)
            y.block_until_ready()
        return median_s(run, reps) / L

    t_compute = {g: compute_alone(g) for g in layers}
    print("compute alone per MoE layer: " + ", ".join(f"{g} SMs {t * 1e3:.2f} ms" for g, t in t_compute.items()),
          flush=True)

    def fetch_alone(fetch):
        def run():
            h = None
            for _ in range(L):
                h = fetch(src, dev)
            _drain(fetch, h, dev)
        return median_s(run, reps) / L

    def overlapped(fetch, g, out):
        """DWDP's loop at depth 1: issue layer l+1's fetch, then dispatch layer l on the staging fetched during
        l-1 (the first layer's fetch is done before the clock starts, as the previous step's prefetch would be;
        the last layer's fetch stands for the next step's)."""
        def run():
            h = fetch(src, dev)
            _drain(fetch, h, dev)
            y = None
            t0 = time.perf_counter()
            for _ in range(L):
                nxt = fetch(src, dev)
                (w,) = fetch.ready_all([h])
                y = layers[g](x, local, w)
                fetch.consumed(h, y)
                h = nxt
            y.block_until_ready()
            out["t"] = time.perf_counter() - t0
            out["y"] = y
            _drain(fetch, h, dev)
        return run

    def beside(fetch, g):
        def run():
            h = None
            for _ in range(L):
                h = fetch(src, dev)  # never waited for, never read
                y = layers[g](x, local, src)
            y.block_until_ready()
            _drain(fetch, h, dev)
        return run

    backends = [("copy_engine_stream", None, lambda: StreamOrderedPull(slots=3))]
    backends += [] if F.smoke else [("copy_engine", None, lambda: CopyEnginePull(slots=3))]
    backends += [(f"pallas_async_k{k}", k, lambda k=k: PallasAsyncPull(
        slots=3, config=rd.RemoteDmaConfig(num_sms=k, max_in_flight=4, method="tma_pull"))) for k in ks]
    rows = []
    for name, k, make in backends:
        g = sms if k is None else sms - k
        fetch = make()
        row = dict(backend=name, fetch_ctas=k, gemm_sms=g, fetch_bytes=fetch_bytes)
        try:
            row["fetch_alone_ms"] = fetch_alone(fetch) * 1e3
            out = {}
            run = overlapped(fetch, g, out)
            samples = []
            run()
            for _ in range(reps):
                run()
                samples.append(out["t"] / L)
            row["layer_ms"] = statistics.median(samples) * 1e3
            row["exact"] = bool(jnp.array_equal(out["y"], want[g]))
            row["beside_ms"] = median_s(beside(fetch, g), reps) / L * 1e3
            if name in ("copy_engine_stream", f"pallas_async_k{max(ks)}") and not F.smoke:
                row["event_timeline"] = event_timeline(dev, fetch, src, lambda: layers[g](x, local, src))
                if F.profile:
                    is_fetch = (lambda n: DMA_KERNEL in n) if k else (lambda n: "memcpy" in n.lower())
                    row["timeline"] = profiled(overlapped(fetch, g, {}), os.path.join(trace_root, name), is_fetch)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
            print(f"[{name}] failed: {row['error']}", flush=True)
        finally:
            del fetch
            gc.collect()
        c_full, c_same = t_compute[sms] * 1e3, t_compute[g] * 1e3
        row.update(compute_alone_ms=c_same, compute_full_sms_ms=c_full)
        if "layer_ms" in row:
            row.update(fetch_gbps=fetch_bytes / row["fetch_alone_ms"] / 1e6,
                       exposed_fetch_ms=row["layer_ms"] - c_full,
                       exposed_fetch_frac=(row["layer_ms"] - c_full) / row["layer_ms"],
                       serial_ms=c_same + row["fetch_alone_ms"],
                       hidden_frac_of_fetch=(c_same + row["fetch_alone_ms"] - row["layer_ms"]) / row["fetch_alone_ms"],
                       sm_loss_frac=c_same / c_full - 1,
                       compute_slowdown=row["beside_ms"] / c_full - 1,
                       interference_slowdown=row["beside_ms"] / c_same - 1)
            tl = row.get("timeline", {})
            print(f"[{name}] fetch alone {row['fetch_alone_ms']:.2f} ms ({row['fetch_gbps']:.0f} GB/s); layer "
                  f"{row['layer_ms']:.2f} ms vs compute {c_full:.2f} ms on {sms} SMs ({c_same:.2f} on {g}): exposed "
                  f"{row['exposed_fetch_frac'] * 100:.1f}%, compute slowdown beside {row['compute_slowdown'] * 100:.1f}% "
                  f"exact={row['exact']} timeline overlap={tl.get('overlap_frac_of_fetch')}", flush=True)
        rows.append(row)
    ok = [r for r in rows if "layer_ms" in r]
    best = min((r for r in ok if r["fetch_ctas"]), key=lambda r: r["layer_ms"], default=None)
    ce = next((r for r in ok if r["backend"] == "copy_engine_stream"), None)
    metrics = dict(sms=sms, compute_full_sms_ms=t_compute[sms] * 1e3,
                   all_exact=all(r.get("exact") for r in ok) and len(ok) == len(rows))
    if best:
        metrics.update(pallas_async_exposed_fetch_frac=best["exposed_fetch_frac"],
                       pallas_async_compute_slowdown=best["compute_slowdown"], pallas_async_best_k=best["fetch_ctas"],
                       pallas_async_fetch_gbps=best["fetch_gbps"])
        for r in ok:
            if r["fetch_ctas"]:
                metrics[f"pallas_async_k{r['fetch_ctas']}_exposed_fetch_frac"] = r["exposed_fetch_frac"]
                metrics[f"pallas_async_k{r['fetch_ctas']}_compute_slowdown"] = r["compute_slowdown"]
    if ce:  # the device-ordered copy engine: the same ordering as pallas_async, another engine
        metrics.update(copy_engine_exposed_fetch_frac=ce["exposed_fetch_frac"],
                       copy_engine_compute_slowdown=ce["compute_slowdown"], copy_engine_fetch_gbps=ce["fetch_gbps"])
    host = next((r for r in ok if r["backend"] == "copy_engine"), None)
    if host:  # the default backend (host-ordered)
        metrics.update(copy_engine_host_ordered_exposed_fetch_frac=host["exposed_fetch_frac"],
                       copy_engine_host_ordered_compute_slowdown=host["compute_slowdown"])
    for r in ok:
        if "timeline" in r and "overlap_frac_of_fetch" in r["timeline"]:
            metrics[f"timeline_overlap_frac_{r['backend']}"] = r["timeline"]["overlap_frac_of_fetch"]
    config = dict(tokens=F.tokens, rows=rows_n, local_experts=F.local_experts, fetch_experts=F.fetch_experts,
                  hidden=F.hidden, inter=F.inter, dtype="bf16", layers=L, repeats=reps, ks=ks,
                  source="a second buffer on the same GPU (HBM to HBM)",
                  definitions=dict(
                      exposed_fetch_frac="(layer with its fetch overlapped - compute alone on all SMs) / layer",
                      compute_slowdown="compute with the same fetches beside it, never waited for / compute alone on "
                                       "all SMs - 1 (SMs given to the fetch + interference)",
                      interference_slowdown="the same over compute alone on the GEMM grid it ran with",
                      hidden_frac_of_fetch="(compute alone + fetch alone - layer) / fetch alone"))
    return config, metrics, rows


# ------------------------------------------------------------------------------------------------------------
# Part 2: XLA's stream annotation


def part_xla_stream(dev, sms: int, trace_root: str):
    from pallas_kernels import _compat
    from pallas_kernels import remote_dma as rd

    k = max(int(k) for k in F.ks)
    rows_n, L, reps = F.tokens * 8, F.layers, F.repeats
    keys = jax.random.split(jax.random.key(0), 3)
    local = experts(keys[0], F.local_experts, F.hidden, F.inter)
    src = experts(keys[1], F.fetch_experts, F.hidden, F.inter)
    x = jax.random.normal(keys[2], (rows_n, F.hidden), jnp.float32).astype(jnp.bfloat16)
    e = F.fetch_experts
    cfg = rd.RemoteDmaConfig(num_sms=k, max_in_flight=4)
    calls = {f: rd.gather_kernel(getattr(src, f).shape, jnp.bfloat16, e, config=cfg)[0] for f in ("w_gate_up", "w_down")}
    hdr = jnp.asarray(rd.gather_header(range(e), 0, e, e))
    layer = Layer(rows_n, F.local_experts, e, sms - k)

    def gather(h, gu, dn):
        return calls["w_gate_up"](h, gu), calls["w_down"](h, dn)

    def program(stream):
        fetch = _compat.on_stream(gather, 1) if stream else gather

        def f(x, local, staged, gu, dn, h, sizes, where):
            y = pallas_sorted_ffn(x, sizes, [local, staged], where, num_sms=sms - k)
            return y, ExpertWeights(*fetch(h, gu, dn))
        return f

    args = (x, local, src, src.w_gate_up, src.w_down, hdr, layer.sizes, layer.where)
    info, compiled = {}, {}
    annotation = {"xla_gpu_experimental_stream_annotation": True}
    # stream_nocb: without command buffers, which XLA's default puts custom calls (so the annotated call) into:
    # an async start's nested thunks are inlined into the graph, serially (Finding 32). stream_lhs: also under
    # XLA's latency-hiding scheduler (off by default on GPUs): without it the call ran on a second stream but
    # was scheduled after both GEMMs, right before its done (session 15, Finding 32)
    nocb = {**annotation, **xla_flags.NO_COMMAND_BUFFERS}
    for name, stream, options in (("serial", False, annotation), ("stream", True, annotation),
                                  ("stream_nocb", True, nocb),
                                  ("stream_lhs", True, {**nocb, "xla_gpu_enable_latency_hiding_scheduler": True})):
        try:
            lowered = jax.jit(program(stream)).lower(*args)
            try:
                compiled[name] = lowered.compile(options)
                info[f"{name}_compile_options"] = options
            except Exception as exc:  # an unknown option in this XLA: compile with its defaults
                info[f"{name}_compile_option_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                compiled[name] = lowered.compile()
            text = compiled[name].as_text()
            info[f"{name}_async_call"] = "call-start" in text
            info[f"{name}_stream_annotation_in_hlo"] = "_xla_stream_annotation" in text
            info[f"{name}_schedule"] = schedule_order(text)
        except Exception as exc:
            info[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
            print(f"[xla_stream] {name} program failed: {info[f'{name}_error']}", flush=True)
    fetch_only = jax.jit(gather)

    def chain(fn):
        def run():
            staged = src
            for _ in range(L):
                y, staged = fn(x, local, staged, src.w_gate_up, src.w_down, hdr, layer.sizes, layer.where)
            jax.block_until_ready((y, staged))
            return y
        return run

    def compute_run():
        for _ in range(L):
            y = layer(x, local, src)
        y.block_until_ready()

    def fetch_run():
        for _ in range(L):
            out = fetch_only(hdr, src.w_gate_up, src.w_down)
        jax.block_until_ready(out)

    t_compute, t_fetch = median_s(compute_run, reps) / L * 1e3, median_s(fetch_run, reps) / L * 1e3
    row = dict(fetch_ctas=k, gemm_sms=sms - k, compute_alone_ms=t_compute, fetch_alone_ms=t_fetch, **info)
    for name, fn in compiled.items():
        try:
            row[f"{name}_ms"] = median_s(chain(fn), reps) / L * 1e3
            row[f"{name}_exact"] = bool(jnp.array_equal(chain(fn)(), layer(x, local, src)))
        except Exception as exc:
            row[f"{name}_run_error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
    # the variants beside the plain annotated program: (program, row suffix, metric suffix)
    variants = (("stream_nocb", "nocb", "no_command_buffers"), ("stream_lhs", "lhs", "latency_hiding_scheduler"))
    for name, suffix, _ in variants:
        if row.get(f"{name}_exact") and "serial_ms" in row:
            row[f"hidden_frac_{suffix}"] = (row["serial_ms"] - row[f"{name}_ms"]) / min(t_compute, t_fetch)
    works = "stream_ms" in row and row.get("stream_exact", False)
    metrics = dict(xla_stream_compiles=info.get("stream_async_call") is not None,
                   xla_stream_async_call=info.get("stream_async_call", False), xla_stream_exact=works)
    if works and "serial_ms" in row:
        row["hidden_frac"] = (row["serial_ms"] - row["stream_ms"]) / min(t_compute, t_fetch)
        metrics.update(xla_stream_hidden_frac=row["hidden_frac"],
                       xla_stream_exposed_fetch_frac=(row["stream_ms"] - t_compute) / row["stream_ms"])
        if F.profile:
            row["timeline"] = profiled(chain(compiled["stream"]), os.path.join(trace_root, "xla_stream"),
                                       lambda n: DMA_KERNEL in n)
            metrics["timeline_overlap_frac_xla_stream"] = row["timeline"].get("overlap_frac_of_fetch")
    for name, suffix, metric in variants:
        if f"hidden_frac_{suffix}" not in row:
            continue
        metrics[f"xla_stream_hidden_frac_{metric}"] = row[f"hidden_frac_{suffix}"]
        if F.profile:
            row[f"timeline_{suffix}"] = profiled(chain(compiled[name]), os.path.join(trace_root, f"xla_{name}"),
                                                 lambda n: DMA_KERNEL in n)
            metrics[f"timeline_overlap_frac_xla_stream_{metric}"] = row[f"timeline_{suffix}"].get(
                "overlap_frac_of_fetch")
    print(f"[xla_stream k={k}] {({k2: v for k2, v in row.items() if not k2.startswith('timeline')})}; timeline "
          f"overlap={row.get('timeline', {}).get('overlap_frac_of_fetch')}, without command buffers "
          f"{row.get('timeline_nocb', {}).get('overlap_frac_of_fetch')}, latency-hiding scheduler "
          f"{row.get('timeline_lhs', {}).get('overlap_frac_of_fetch')}", flush=True)
    return dict(tokens=F.tokens, layers=L, fetch_experts=e), metrics, [row]


# ------------------------------------------------------------------------------------------------------------
# Part 3: planner subsets, one launch vs many cudaMemcpyAsync


def part_subset(dev, sms: int):
    import cupy as cp

    from pallas_kernels import remote_dma as rd
    from pallas_kernels.stream_launch import StreamKernel, mosaic_module

    e_src, cap = F.subset_source_experts, max(int(n) for n in F.subset_sizes)
    shapes = {"w_gate_up": (e_src, 2 * F.inter, F.hidden), "w_down": (e_src, F.hidden, F.inter)}  # R1 FP8 [out, in]
    with cp.cuda.Device(0):
        src = {f: cp.random.randint(0, 255, s, dtype=cp.uint8) for f, s in shapes.items()}
        dst = {m: {f: cp.zeros((cap,) + s[1:], cp.uint8) for f, s in shapes.items()} for m in ("pallas", "memcpy")}
        stream = cp.cuda.Stream(non_blocking=True)
        ev = (cp.cuda.Event(), cp.cuda.Event())
    kernels = {}
    for k in sorted({16, sms}):
        cfg = rd.RemoteDmaConfig(num_sms=k, max_in_flight=4)
        for f, s in shapes.items():
            call, operand_shape, _ = rd.gather_kernel(s, jnp.uint8, cap, config=cfg)
            kernels[k, f] = StreamKernel(mosaic_module(call, jax.ShapeDtypeStruct((rd.HEADER + cap,), jnp.int32),
                                                       jax.ShapeDtypeStruct(operand_shape, jnp.uint8)), 0)
    rng = np.random.RandomState(0)
    rows, reps, keep = [], max(F.repeats, 5), []

    def timed(enqueue):
        samples = []
        for _ in range(reps + 1):
            stream.synchronize()
            t0 = time.perf_counter()
            ev[0].record(stream)
            enqueue()
            ev[1].record(stream)
            host = time.perf_counter() - t0
            stream.synchronize()
            samples.append((cp.cuda.get_elapsed_time(ev[0], ev[1]) / 1e3, host))
        samples = samples[1:]
        return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)

    for n in map(int, F.subset_sizes):
        ids = np.sort(rng.choice(np.arange(0, e_src, 2), n, replace=False))  # no two adjacent: n runs per field
        nbytes = n * sum(int(np.prod(s[1:])) for s in shapes.values())

        def memcpy():
            for f, s in shapes.items():
                row = int(np.prod(s[1:]))
                for i, e in enumerate(ids):
                    cp.cuda.runtime.memcpyAsync(dst["memcpy"][f].data.ptr + i * row, src[f].data.ptr + int(e) * row,
                                                row, cp.cuda.runtime.memcpyDeviceToDevice, stream.ptr)

        dev_s, host_s = timed(memcpy)
        rows.append(dict(method="memcpy", experts=n, device_ms=dev_s * 1e3, host_enqueue_us=host_s * 1e6,
                         calls=n * len(shapes), gbps=nbytes / dev_s / 1e9))
        for k in sorted({16, sms}):
            def pallas(k=k):
                with stream:  # a new expert list per fetch: the header upload is part of the cost
                    hdr = cp.asarray(rd.gather_header(ids, 0, cap, e_src))
                keep.append(hdr)  # alive until the stream has run the launch
                for f in shapes:
                    kernels[k, f].launch(stream.ptr, [hdr.data.ptr, src[f].data.ptr, dst["pallas"][f].data.ptr])

            dev_s, host_s = timed(pallas)
            same = all(bool(cp.array_equal(dst["pallas"][f][:n], dst["memcpy"][f][:n])) for f in shapes)
            rows.append(dict(method=f"pallas_k{k}", experts=n, device_ms=dev_s * 1e3, host_enqueue_us=host_s * 1e6,
                             calls=len(shapes) + 1, gbps=nbytes / dev_s / 1e9, equal_to_memcpy=same))
        print("  ".join(f"{r['method']} n={r['experts']}: {r['device_ms']:.2f} ms ({r['gbps']:.0f} GB/s), host "
                        f"{r['host_enqueue_us']:.0f} us" for r in rows[-3:]), flush=True)
    for kern in kernels.values():
        kern.close()
    metrics = dict(subset_all_equal=all(r.get("equal_to_memcpy", True) for r in rows))
    for n in map(int, F.subset_sizes):
        mc = next(r for r in rows if r["method"] == "memcpy" and r["experts"] == n)
        best = min((r for r in rows if r["method"] != "memcpy" and r["experts"] == n), key=lambda r: r["device_ms"])
        metrics[f"subset_{n}_pallas_over_memcpy_time"] = best["device_ms"] / mc["device_ms"]
        metrics[f"subset_{n}_pallas_host_us"], metrics[f"subset_{n}_memcpy_host_us"] = (
            best["host_enqueue_us"], mc["host_enqueue_us"])
    return dict(source_experts=e_src, shapes={f: list(s) for f, s in shapes.items()}, dtype="uint8 (FP8 bytes)",
                ids="sorted, no two adjacent"), metrics, rows


def main(_):
    dev = jax.devices()[0]
    if F.smoke:
        jax.config.update("jax_cpu_enable_async_dispatch", False)  # the CPU backends run at their hooks
        F.parts, F.tokens, F.local_experts, F.fetch_experts, F.hidden, F.inter = ["overlap"], 64, 4, 4, 64, 64
        F.layers, F.repeats, F.ks, F.profile = 3, 1, ["2"], False
    elif dev.platform != "gpu":
        raise SystemExit("bench_pallas_async needs a GPU (or --smoke)")
    sms = getattr(dev, "core_count", 8) if dev.platform == "gpu" else 8
    trace_root = os.path.join(F.out, "traces")
    parts = {"overlap": lambda: part_overlap(dev, sms, trace_root),
             "xla_stream": lambda: part_xla_stream(dev, sms, trace_root),
             "subset": lambda: part_subset(dev, sms)}
    for part in F.parts:
        config, metrics, rows = parts[part]()
        config.update(part=part, sms=sms, gpu=dev.device_kind)
        path = write_result(F.out, "dwdp", F.device_kind, config, metrics, rows, tag=f"pallas-async-{part}")
        print("wrote", path, flush=True)


if __name__ == "__main__":
    app.run(main)
