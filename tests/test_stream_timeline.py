"""The overlap analysis of experiments/stream_timeline.py on hand-made stream events (the GPU trace is read on a GPU)."""

import jax
import jax.numpy as jnp

from experiments import stream_timeline as st


def _ev(line, name, start, dur):
    return dict(line=line, name=name, start_us=start, dur_us=dur)


def test_interval_union_and_overlap():
    assert st.union([(5, 7), (0, 2), (1, 3), (7, 8)]) == [[0, 3], [5, 8]]
    assert st.overlap([(0, 10)], [(2, 3), (9, 12), (2.5, 4)]) == 3.0
    assert st.overlap([(0, 1)], [(1, 2)]) == 0.0


def test_fetch_beside_compute_is_found_on_its_own_stream():
    events = [_ev("GPU:0 Stream #7", "gemm_mosaic_gpu_kernel", 0, 100), _ev("GPU:0 Stream #7", "fusion", 100, 20),
              _ev("GPU:0 Stream #21", "remote_dma_gather_mosaic_gpu_kernel", 30, 60),
              _ev("GPU:0 Stream #21", "remote_dma_gather_mosaic_gpu_kernel", 110, 40)]
    s = st.timeline_summary(events, lambda n: "remote_dma_gather" in n)
    assert s["fetch_line"] == "GPU:0 Stream #21" and s["compute_lines"] == ["GPU:0 Stream #7"]
    assert s["fetch_busy_us"] == 100 and s["overlap_us"] == 70 and s["concurrent"]
    serial = [_ev("a", "gemm", 0, 100), _ev("b", "remote_dma_gather", 100, 50)]
    assert not st.timeline_summary(serial, lambda n: "remote_dma_gather" in n)["concurrent"]


def test_a_trace_without_the_fetch_says_what_it_holds(tmp_path):
    s = st.timeline_summary([_ev("GPU:0 Stream #7", "gemm", 0, 1)], lambda n: "memcpy" in n)
    assert not s["found_fetch"] and s["lines"] == {"GPU:0 Stream #7": ["gemm"]}
    # A trace of a program without the fetch: no fetch found, not an error (a CPU trace has no GPU stream lines at
    # all; on a GPU the program's own kernels are listed).
    out = st.profiled(lambda: (jnp.ones(8) * 2).block_until_ready(), str(tmp_path), lambda n: "remote_dma" in n)
    assert not out["found_fetch"]
    assert out["events"] == 0 if jax.default_backend() == "cpu" else out["events"] > 0


def test_schedule_order_reads_the_entry_computation():
    hlo = """HloModule m
%async_computation {
  %g = f32[8]{0} custom-call(%p), custom_call_target="mosaic_gpu_v2"
}
ENTRY %main {
  %a = f32[8]{0} custom-call(%x), custom_call_target="mosaic_gpu_v2"
  %s = ((f32[8]), f32[8]) call-start(%y), async_execution_thread="explicit", to_apply=%async_computation
  %b = f32[8]{0} custom-call(%a), custom_call_target="mosaic_gpu_v2"
  %d = f32[8]{0} call-done(%s)
  ROOT %t = (f32[8], f32[8]) tuple(%b, %d)
}
"""
    # the fetch's start after the first GEMM call: only the second can overlap it
    assert st.schedule_order(hlo) == ["mosaic", "call-start", "mosaic", "call-done"]
