"""The asynchronous Pallas fetch (`PallasAsyncPull`) and what it stands on: the kernel launched outside XLA
(`pallas_kernels.stream_launch`) and XLA's stream annotation (`_compat.on_stream`).

On CPU the backend gathers with the same kernel in GPU interpret mode and its issue hook writes the rows into the
staging ring when the device reaches it (synchronous dispatch), so these tests check the header the kernel reads
(count, staging position, ids), the ring and the hooks, and DWDP's results against the copy-engine-equivalent
`StreamOrderedPull` bit for bit. The side-stream launch, the CUDA events and the overlap are checked on a GPU
(the GPU tests below, and `experiments/gpu_check_pallas_async.sh`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwdp_jax.config import TINY
from dwdp_jax.experts import ExpertWeights
from dwdp_jax.model import init_model
from dwdp_jax.parallel.dwdp import DwdpConfig, DwdpGroup
from dwdp_jax.parallel.fetch import StreamOrderedPull, fetch_backend
from dwdp_jax.parallel.pallas_async import PallasAsyncPull, _Header
from dwdp_jax.planner import FetchPolicy
from pallas_kernels import _compat
from pallas_kernels import remote_dma as rd
from pallas_kernels import stream_launch as sl
from tests.forward_util import jitted_forward

ON_GPU = _compat.on_gpu()
CFG = TINY.replace(num_layers=3, first_k_dense_replace=1)
SMALL = rd.RemoteDmaConfig(num_sms=2, max_in_flight=2)
needs_cpu = pytest.mark.skipif(ON_GPU, reason="the CPU form of the backend (interpret mode, host copies)")
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="launches on a CUDA stream")


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, dtype=jnp.float32, seed=3)


def _experts(device, e=6, seed=0, scales=False):
    k = jax.random.split(jax.random.key(seed), 4)
    with jax.default_device(device):
        s = (jax.random.normal(k[2], (e, 2, 3), jnp.float32), jax.random.normal(k[3], (e, 1, 3), jnp.float32))
        return ExpertWeights(jax.random.normal(k[0], (e, 64, 64), jnp.float32),
                             jax.random.normal(k[1], (e, 32, 64), jnp.bfloat16), *(s if scales else (None, None)))


@needs_cpu
def test_staged_bytes_equal_the_source(sync_dispatch):
    """Whole buffer, a permuted subset at an offset, an on-demand miss into the same staging; a field whose
    experts do not tile (12-byte rows: block scales) takes the copy path beside the kernel."""
    dst, src_dev = jax.devices()[0], jax.devices()[1]
    src = _experts(src_dev, scales=True)
    fetch = PallasAsyncPull(slots=2, config=SMALL)
    (whole,) = fetch.ready_all([fetch(src, dst)])
    fetch.sync(dst)
    assert whole.w_gate_up.devices() == {dst}
    for f in ("w_gate_up", "w_down", "s_gate_up", "s_down"):
        np.testing.assert_array_equal(np.asarray(getattr(whole, f)), np.asarray(getattr(src, f)))
    part = fetch.subset(src, dst, [4, 1], offset=3)
    more = fetch.subset(src, dst, [0], into=part, offset=0)
    assert fetch.subset(src, dst, [], into=more) is more
    (staged,) = fetch.ready_all([more])
    fetch.sync(dst)
    for f in ("w_gate_up", "w_down", "s_down"):
        got, want = np.asarray(getattr(staged, f)), np.asarray(getattr(src, f))
        np.testing.assert_array_equal(got[[0, 3, 4]], want[[0, 4, 1]])


@needs_cpu
@pytest.mark.parametrize("policy", [None, "top_k"])
def test_dwdp_equals_the_copy_engine_backend(sync_dispatch, model, policy):
    """Two steps (the ring of 2 wraps, the cross-step prefetch is read) on different batches per rank: the logits
    equal the device-ordered copy engine's bit for bit. top_k: planned subsets plus on-demand misses."""
    g = 2
    pol = None if policy is None else FetchPolicy("top_k", k=1, experts_per_token=CFG.num_experts_per_tok)
    rng = np.random.RandomState(7)
    batches = [[rng.randint(0, CFG.vocab_size, (1, 3) if policy else (2, 5)).astype(np.int32) for _ in range(g)] for _ in range(2)]
    logits = {}
    for fetch in (StreamOrderedPull(slots=2), PallasAsyncPull(slots=2, config=SMALL)):
        group = DwdpGroup(model, jax.devices()[:g], dwdp=DwdpConfig(g, 1, policy=pol), fetch=fetch)
        logits[fetch.name] = [group.run_parallel(lambda rank, ids: np.asarray(rank.forward(ids)), b) for b in batches]
        if policy:
            assert sum(rank.counters["miss_experts"] for rank in group.ranks) > 0
        group.close()
    np.testing.assert_array_equal(np.asarray(logits["pallas_async"]), np.asarray(logits["copy_engine_stream"]))
    ref = np.asarray(jitted_forward(model)(jnp.asarray(batches[0][0])))
    assert np.abs(logits["pallas_async"][0][0] - ref).max() / np.abs(ref).max() <= 1e-5


def test_factory_and_config():
    if not ON_GPU and jax.config.values["jax_cpu_enable_async_dispatch"]:
        with pytest.raises(ValueError, match="jax_cpu_enable_async_dispatch"):
            fetch_backend("pallas_async")
    with pytest.raises(ValueError, match="tma_push"):
        PallasAsyncPull(config=rd.RemoteDmaConfig(method="tma_push"), platform="gpu" if ON_GPU else "cpu")
    with pytest.raises(ValueError, match="gemm_sms"):
        DwdpConfig(2, gemm_sms=0)


def test_header_is_dropped_only_after_its_last_launch_completed():
    class Event:
        done = False

    entry = _Header(array=None)
    assert entry.idle()  # never launched
    entry.event, entry.recorded = Event(), False
    Event.done = True  # an event not yet recorded reads as complete in CUDA: the flag must decide
    assert not entry.idle()
    entry.recorded = True
    assert entry.idle()
    Event.done = False
    assert not entry.idle()


def test_mosaic_module_of_the_gather_kernel():
    """The module XLA would compile, lowered for CUDA on any machine: launch order = (header, source, output)."""
    call, operand_shape, out_shape = rd.gather_kernel((4, 64, 256), jnp.bfloat16, 6, config=SMALL)
    args = (jax.ShapeDtypeStruct((rd.HEADER + 6,), jnp.int32), jax.ShapeDtypeStruct(operand_shape, jnp.bfloat16))
    module = sl.mosaic_module(call, *args)
    assert module.module[:4] == b"ML\xefR"  # MLIR bytecode
    assert module.num_buffers == 3 and module.results[0].shape == out_shape
    with pytest.raises(ValueError, match="in order"):
        sl.mosaic_module(lambda h, s: call(h + 1, s), *args)  # work before the kernel would be skipped
    with pytest.raises(ValueError, match="one Mosaic"):
        sl.mosaic_module(lambda h, s: (call(h, s), call(h, s)), *args)


def test_stream_annotation_lowers_to_an_annotated_call():
    """XLA's route: the kernel as a call on GPU stream 1 beside a matmul (the GPU script checks what XLA does)."""
    call, operand_shape, _ = rd.gather_kernel((4, 64, 256), jnp.bfloat16, 4, config=SMALL)

    def f(x, hdr, src):
        return x @ x, _compat.on_stream(call, 1)(hdr, src)

    args = (jax.ShapeDtypeStruct((128, 128), jnp.float32), jax.ShapeDtypeStruct((rd.HEADER + 4,), jnp.int32),
            jax.ShapeDtypeStruct(operand_shape, jnp.bfloat16))
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert '_xla_stream_annotation = "1"' in text and "mosaic_gpu_v2" in text


@needs_gpu
def test_kernel_on_a_side_stream_is_exact():
    """The compiled kernel launched by us on a CuPy stream: a scattered subset at an offset, the other rows untouched."""
    import cupy as cp

    e, shape = 8, (8, 128, 512)
    src = jax.random.normal(jax.random.key(1), shape, jnp.float32).astype(jnp.bfloat16)
    out = jnp.full(shape, 7, jnp.bfloat16).block_until_ready()
    call, operand_shape, _ = rd.gather_kernel(shape, jnp.bfloat16, e)
    module = sl.mosaic_module(call, jax.ShapeDtypeStruct((rd.HEADER + e,), jnp.int32),
                              jax.ShapeDtypeStruct(operand_shape, jnp.bfloat16))
    kernel = sl.StreamKernel(module, 0)
    ids, first = [6, 1, 3], 2
    with cp.cuda.Device(0):
        hdr = cp.asarray(rd.gather_header(ids, first, e, e))
        stream = cp.cuda.Stream(non_blocking=True)
        kernel.launch(stream.ptr, [hdr.data.ptr, src.unsafe_buffer_pointer(), out.unsafe_buffer_pointer()])
        stream.synchronize()
    got, want = np.asarray(out.astype(jnp.float32)), np.asarray(src.astype(jnp.float32))
    np.testing.assert_array_equal(got[first:first + 3], want[ids])
    assert (got[:first] == 7).all() and (got[first + 3:] == 7).all()
    kernel.close()


@needs_gpu
def test_backend_equals_the_copy_engine_on_one_gpu():
    """Source and staging on the same GPU (the one-GPU stand-in for a peer): whole buffer and subsets with a miss,
    against `CopyEnginePull` on the same source; then a jitted reader of the staging after `ready_all`."""
    from dwdp_jax.parallel.fetch import CopyEnginePull

    dev = jax.devices()[0]
    k = jax.random.split(jax.random.key(2), 2)
    src = ExpertWeights(jax.random.normal(k[0], (16, 256, 512), jnp.float32).astype(jnp.bfloat16),
                        jax.random.normal(k[1], (16, 128, 512), jnp.float32).astype(jnp.bfloat16))
    ce, pa = CopyEnginePull(slots=2), PallasAsyncPull(slots=2)
    for slots, offset in ((range(16), 0), ([13, 2, 7, 5], 3)):
        want = ce.ready(ce.subset(src, dev, list(slots), offset=offset))
        (got,) = pa.ready_all([pa.subset(src, dev, list(slots), offset=offset)])
        total = jax.jit(lambda w: w.w_gate_up.astype(jnp.float32).sum() + w.w_down.astype(jnp.float32).sum())
        pa.sync(dev)
        n = len(list(slots))
        for f in ("w_gate_up", "w_down"):
            np.testing.assert_array_equal(np.asarray(getattr(got, f))[offset:offset + n],
                                          np.asarray(getattr(want, f))[offset:offset + n])
        assert np.isfinite(float(total(got)))
