"""DWDP across processes on CPU: the control channel, the shared-memory stand-in for CUDA IPC, a process group
wired in threads, and real process groups (the check script and the launcher's local spawner) against the
in-process group and the single-device model; a dead peer is a clear error within the time-out."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dwdp_jax.config import TINY
from dwdp_jax.model import init_model
from dwdp_jax.parallel.dlpack_alias import alias, host_buffer, live_capsules
from dwdp_jax.parallel.coordination import ControlChannel, PeerError, PeerTimeout, ProcessGroupSpec
from dwdp_jax.parallel.dwdp import DwdpConfig
from dwdp_jax.parallel.fetch import DevicePutFetch
from dwdp_jax.parallel.multiprocess import DwdpProcessGroup, RemoteRank
from dwdp_jax.parallel.peer_memory import FabricTransport, FabricUnavailable, PeerArray, SharedMemoryTransport
from dwdp_jax.parallel.threads import run_in_threads
from dwdp_jax.planner.placement import Placement
from tests.forward_util import jitted_forward

REPO = pathlib.Path(__file__).resolve().parents[1]
SPEC = ProcessGroupSpec(startup_timeout_s=20, control_timeout_s=20)


class MemoryStore:
    """The key-value calls of jax's DistributedRuntimeClient over a dict: threads stand in for processes."""

    def __init__(self):
        self._values, self._cv = {}, threading.Condition()

    def key_value_set_bytes(self, key, value, allow_overwrite=False):
        with self._cv:
            if key in self._values and not allow_overwrite:
                raise RuntimeError(f"ALREADY_EXISTS: key {key} already exists.")
            self._values[key] = bytes(value)
            self._cv.notify_all()

    def key_value_set(self, key, value, allow_overwrite=False):
        self.key_value_set_bytes(key, value.encode(), allow_overwrite)

    def blocking_key_value_get_bytes(self, key, timeout_in_ms):
        with self._cv:
            if not self._cv.wait_for(lambda: key in self._values, timeout_in_ms / 1000):
                raise RuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out with key: {key}")
            return self._values[key]

    def key_value_dir_get(self, prefix):
        with self._cv:
            return [(k, v.decode()) for k, v in self._values.items() if k.startswith(prefix)]


def channels(n, spec=SPEC):
    store = MemoryStore()
    return [ControlChannel(store, p, n, spec) for p in range(n)]


def test_control_channel_gathers_chunked_values_and_barriers():
    chs = channels(3)
    big = os.urandom((5 << 20) // 2)  # 2.5 MiB: three 1 MiB entries
    values = [big, b"", b"two"]
    got = run_in_threads([lambda p=p: chs[p].all_gather("v", values[p], 5, "value") for p in range(3)])
    assert all(g == values for g in got)
    run_in_threads([lambda p=p: chs[p].scoped("g").barrier("b", 5) for p in range(3)])
    t0 = time.monotonic()
    with pytest.raises(PeerTimeout, match=r"processes \[2\] did not reach barrier dwdp/g/'late' within 0.5 s"):
        run_in_threads([lambda p=p: chs[p].scoped("g").barrier("late", 0.5) for p in range(2)])
    assert time.monotonic() - t0 < 3


def test_a_failed_peer_stops_the_others_at_once_naming_it():
    chs = channels(2)
    chs[1].report_failure("ValueError: no such checkpoint")
    t0 = time.monotonic()
    with pytest.raises(PeerError, match="process 1 failed: ValueError: no such checkpoint"):
        chs[0].read("never", 30, "process 1's expert handles")
    assert time.monotonic() - t0 < 3  # not the 30 s time-out
    with pytest.raises(PeerTimeout, match="process 0's hello did not arrive within 0.3 s"):
        channels(2)[1].read("hello/p0", 0.3, "process 0's hello")


def test_shared_memory_transport_round_trip():
    device = jax.devices()[1]
    arrays = [jnp.arange(24, dtype=jnp.float32).reshape(4, 3, 2),
              jnp.asarray(np.random.RandomState(0).randn(5, 7).astype(ml_dtypes.bfloat16)),
              jnp.asarray(np.linspace(-2, 2, 6).astype(ml_dtypes.float8_e4m3fn).reshape(3, 2))]
    exporter, reader = SharedMemoryTransport(), SharedMemoryTransport()
    descriptors = json.loads(json.dumps(exporter.export(arrays)))  # what travels through the key-value store
    for a, d in zip(arrays, descriptors):
        peer = reader.open(d, device)
        assert isinstance(peer, PeerArray) and peer.shape == a.shape and peer.dtype == a.dtype
        np.testing.assert_array_equal(np.asarray(peer.take_to(device)), np.asarray(a))
        np.testing.assert_array_equal(np.asarray(peer.take_to(device, [2, 0])), np.asarray(a)[[2, 0]])
        raw = np.empty(a.nbytes, np.uint8)  # what the device-ordered copy engine does on CPU: a memmove
        import ctypes

        ctypes.memmove(raw.ctypes.data, peer.unsafe_buffer_pointer(), a.nbytes)
        assert raw.tobytes() == np.asarray(a).tobytes()
        del peer
    reader.close_imports()
    exporter.release_exports()
    with pytest.raises(RuntimeError, match="is gone: its exporting process exited or released it"):
        SharedMemoryTransport().open(descriptors[0], device)


def test_fabric_transport_names_what_is_missing():
    with pytest.raises(FabricUnavailable, match="IMEX channel") as err:
        FabricTransport()
    assert "cuMemCreate(requestedHandleTypes=CU_MEM_HANDLE_TYPE_FABRIC)" in str(err.value)
    assert isinstance(err.value, NotImplementedError)


CFG = TINY.replace(num_layers=2, first_k_dense_replace=1, num_mtp_layers=0)


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, dtype=jnp.float32, seed=5)


@pytest.fixture(scope="module")
def reference(model):
    return jitted_forward(model)


def test_process_group_in_threads_matches_the_model(model, reference):
    """Two "processes" (threads on one store, shared memory between them) of two devices each: every rank reads
    one peer in its own process and two through the transport; each rank's logits are the model's."""
    placement, dwdp = Placement.from_config(CFG, 4), DwdpConfig(4)
    chs = channels(2)
    groups = run_in_threads([lambda p=p: DwdpProcessGroup(chs[p], jax.devices()[2 * p : 2 * p + 2], placement, dwdp,
                                                          DevicePutFetch(), SharedMemoryTransport(), model=model)
                             for p in range(2)])
    assert [g.rank_ids for g in groups] == [[0, 1], [2, 3]]
    group0 = groups[0].ranks[0].group
    assert group0[1] is groups[0].ranks[1] and isinstance(group0[2], RemoteRank)
    assert isinstance(group0[3].local_experts(1).w_gate_up, PeerArray)
    ids = [np.random.RandomState(r).randint(0, CFG.vocab_size, (2, 5)) for r in range(4)]
    forward = lambda rank, x: np.asarray(rank.forward(x))
    got = run_in_threads([lambda p=p: groups[p].run_parallel(forward, ids[2 * p : 2 * p + 2]) for p in range(2)])
    for r, logits in enumerate(got[0] + got[1]):
        ref = np.asarray(reference(jnp.asarray(ids[r])))
        assert np.abs(logits - ref).max() / np.abs(ref).max() <= 1e-5
    run_in_threads([g.close for g in groups])


class RelocatingTransport(SharedMemoryTransport):
    """Shared memory, plus what CudaIpcTransport does when XLA's memory cannot be exported: every expert array is
    copied into memory the transport owns (here an aligned host buffer) and handed back to be used instead."""

    def __init__(self):
        super().__init__()
        self.owned = []

    def exportable(self, arrays):
        out = []
        for a in arrays:
            buf = host_buffer(int(a.nbytes))
            buf[:] = np.asarray(a).reshape(-1).view(np.uint8)
            out.append(alias(buf.ctypes.data, a.shape, a.dtype, next(iter(a.devices())), buf))
            self.owned.append(buf.ctypes.data)
        return out


def test_ranks_compute_from_the_relocated_exported_memory(model, reference):
    """When the transport relocates the expert buffers (XLA's memory not exportable), each rank reads its own
    experts from the new memory in its programs and peers, and the logits stay the model's."""
    placement, dwdp = Placement.from_config(CFG, 2), DwdpConfig(2)
    chs = channels(2)
    transports = [RelocatingTransport(), SharedMemoryTransport()]  # (CPU DLPack imports land on device 0 only)
    groups = run_in_threads([lambda p=p: DwdpProcessGroup(chs[p], [jax.devices()[p]], placement, dwdp,
                                                          DevicePutFetch(), transports[p], model=model)
                             for p in range(2)])
    (rank,), owned = groups[0].ranks, set(transports[0].owned)
    pointers = {a.unsafe_buffer_pointer() for w in rank.expert_buffers.values() for a in (w.w_gate_up, w.w_down)}
    assert pointers == owned and len(owned) == 2 * len(rank.expert_buffers)
    layer_pointers = {x.unsafe_buffer_pointer() for i in rank.expert_buffers for x in rank._layer_leaves[i]}
    assert pointers <= layer_pointers
    ids = [np.random.RandomState(r).randint(0, CFG.vocab_size, (2, 5)) for r in range(2)]
    forward = lambda rank, x: np.asarray(rank.forward(x))
    got = run_in_threads([lambda p=p: groups[p].run_parallel(forward, ids[p : p + 1]) for p in range(2)])
    for r in range(2):
        ref = np.asarray(reference(jnp.asarray(ids[r])))
        assert np.abs(got[r][0] - ref).max() / np.abs(ref).max() <= 1e-5
    run_in_threads([g.close for g in groups])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float8_e4m3fn, jnp.float32])
def test_dlpack_alias_is_typed_zero_copy_and_released(dtype):
    values = np.random.RandomState(0).randn(3, 5).astype(dtype)
    buf = host_buffer(values.nbytes)
    buf[:] = values.reshape(-1).view(np.uint8)
    before = live_capsules()
    a = alias(buf.ctypes.data, (3, 5), dtype, jax.devices()[0], buf)
    assert a.dtype == jnp.dtype(dtype) and a.unsafe_buffer_pointer() == buf.ctypes.data
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8), values.view(np.uint8))
    assert live_capsules() == before + 1
    del a
    assert live_capsules() == before


def test_processes_that_disagree_on_the_placement_are_refused(model):
    chs = channels(2)
    contiguous = Placement.from_config(CFG, 2)
    permuted = Placement(num_ranks=2, home_le=contiguous.home_le[:, ::-1].copy())
    with pytest.raises(ValueError, match=r"process [01] \(.*\) runs a different model config, placement"):
        run_in_threads([lambda p=p: DwdpProcessGroup(chs[p], [jax.devices()[p]], [contiguous, permuted][p],
                                                     DwdpConfig(2), DevicePutFetch(), SharedMemoryTransport(),
                                                     model=model) for p in range(2)])


# ---------------------------------------------------------------------------------------------------------------
# Real processes


# Processes of this module run with one simulated device each and share a compilation cache (equal XLA_FLAGS:
# the flags are part of its key), so a program compiled by one (the tiny model's initialization, the ranks' layer
# programs) is read by the next.
ONE_DEVICE = "--xla_force_host_platform_device_count=1"


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def check_script(tmp_path, jax_cache, *flags, timeout=240):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=ONE_DEVICE, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "gpu_check_multiprocess.py"), "--platform=cpu",
                           f"--out={tmp_path}", f"--jax_cache_dir={jax_cache}", *flags], env=env, capture_output=True,
                          text=True, timeout=timeout)
    results = list(tmp_path.glob("dwdp-*-cpu-multiprocess*.json"))
    return proc, json.loads(results[0].read_text()) if results else None


def test_two_processes_give_the_in_process_groups_logits(tmp_path, jax_cache):
    """Two processes, shared memory between them (the check script the GPUs run with CUDA IPC): bit-exact against
    the same group in one process, greedy tokens of the single-device model; the device-ordered copy engine
    (memmoves from the peer's segment) and planned fetches (subsets of the peer's experts). Service-only
    coordination, so that both workers read the compilation cache the in-process references fill."""
    proc, record = check_script(tmp_path, jax_cache, "--variants=copy_engine_stream,device_put+top_k",
                                "--no-join_devices", "--timeout_s=60")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    m = record["metrics"]
    assert m["multiprocess_max_rel_diff"] == 0.0 and m["multiprocess_tokens_equal"] and m["passed"]
    assert m["multiprocess_vs_single_device_max_rel_diff"] < 1e-5
    assert len(record["rows"]) == 2 * 2 and record["part"] == "dwdp"


def test_a_dead_peer_is_a_clear_error_within_the_timeout(tmp_path, jax_cache):
    """Process 1 dies right after joining; process 0, waiting for its hello, stops with a PeerTimeout naming it
    after the 3 s start-up time-out (JAX's heartbeat would only notice after 300 s here)."""
    proc, record = check_script(tmp_path, jax_cache, "--kill_process=1", "--kill_at=startup", "--timeout_s=3",
                                "--heartbeat_timeout_s=300", timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "PeerTimeout: process 1's hello (rank count, configuration) did not arrive within 3 s" in proc.stdout
    assert record["metrics"]["dead_peer_detected"] and record["metrics"]["dead_peer_wall_s"] < 60


@pytest.fixture(scope="module")
def launcher_flags():
    from experiments import launch

    yield launch
    launch.undefine_flags()


def greedy_tokens(prompts: list[np.ndarray], new: int) -> list[list[int]]:
    """The tiny preset's greedy continuations by full re-forwards (the weights every launcher run builds)."""
    forward = jitted_forward(init_model(TINY.replace(num_mtp_layers=0), seed=0, dtype=jnp.float32))
    s = len(prompts[0])
    buf = np.zeros((len(prompts), s + new), np.int32)
    buf[:, :s] = prompts
    for j in range(new):
        buf[:, s + j] = np.asarray(forward(buf))[:, s + j - 1].argmax(-1)
    return buf[:, s:].tolist()


def test_launcher_spawns_a_group_with_the_single_device_tokens(launcher_flags, tmp_path, monkeypatch, jax_cache):
    """`--spawn_local_processes=2`: two launcher processes of one simulated CPU device each (jax.distributed, shared
    memory), one record with the in-process layout: every request, the greedy tokens of the single-device model,
    the group's ranks and step timeline."""
    from dwdp_jax.engine import workload

    for key, value in dict(XLA_FLAGS=ONE_DEVICE, JAX_COMPILATION_CACHE_DIR=str(jax_cache),
                           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0").items():
        monkeypatch.setenv(key, value)  # the launcher processes inherit it
    record = launcher_flags.run_main([
        "launch", "--spawn_local_processes=2", "--peer_timeout_s=120", "--preset=tiny", "--strategy=dwdp",
        "--num_devices=2", "--num_requests=4", "--input_len=8", "--output_len=4", "--max_batch_size=2",
        "--warmup=none", "--progress=false", f"--out={tmp_path}"])
    assert record["path"].endswith("-dwdp-tiny-g2-p2.json") and record["num_devices"] == 2
    requests = workload.generate(workload.WorkloadSpec(4, workload.FixedLength(8), workload.FixedLength(4),
                                                       vocab_size=TINY.vocab_size, seed=0))
    expected = dict(zip([r.request_id for r in requests], greedy_tokens([r.prompt for r in requests], 4)))
    assert record["rows"][0]["outputs"] == expected
    config, m = record["config"], record["metrics"]
    assert (config["num_processes"], config["devices_per_process"], config["peer_memory"]) == (2, 1, "shm")
    assert (m["num_requests"], m["output_tokens"], m["num_gpus"]) == (4, 16, 2) and m["fetch_prefetched_bytes"] > 0
    steps = record["rows"][0]["timeline"]
    assert sorted(set(steps["device"])) == [0, 1] and sum(steps["prefill_tokens"]) == 4 * 8
    assert sorted(r["rank"] for r in record["rows"] if r["kind"] == "request") == [0, 0, 1, 1]


@pytest.mark.parametrize("flags, message", [
    (["--num_processes=2"], "needs --num_processes >= 2 and --coordinator_address"),
    (["--spawn_local_processes=2", "--strategy=dep"], "--strategy=dwdp or dp"),
    (["--spawn_local_processes=2", "--process_id=1"], "sets --process_id for each process"),
    (["--num_processes=2", "--coordinator_address=localhost:1", "--mode=disagg"], "--mode=colocated"),
])
def test_bad_process_flags_raise_before_joining(launcher_flags, flags, message, tmp_path):
    from absl import app

    with pytest.raises(app.UsageError, match=message):
        launcher_flags.run_main(["launch", *flags, f"--out={tmp_path}", "--preset=tiny"])
