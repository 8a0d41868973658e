"""Disaggregated serving with the tiny model on 8 simulated CPU devices: roles, KV hand-off, equivalence.

Compile budget: the runners of the module are built once (a DWDP group of 4 on devices 0-3, a DEP group on
devices 4-5, the single-device reference on device 6) with the buckets ((4,), (8,)); every hand-off copies 16
positions (prompts <= 14 tokens), so each device compiles one gather and one write program. Swapping the
roles of the same runners gives the DEP-context variant without new model programs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwdp_jax.config import TINY
from dwdp_jax.engine import disagg, timeline
from dwdp_jax.engine.kv_transfer import DevicePutTransport
from dwdp_jax.engine.runner import Buckets, DepRunner, DwdpRankRunner, ModelRunner
from dwdp_jax.engine.scheduler import (DecodeItem, FakeClock, PrefillChunk, Scheduler, SchedulerConfig, StepPlan,
                                       run_engine)
from dwdp_jax.engine.workload import Request
from dwdp_jax.model import init_model
from dwdp_jax.parallel.dep import DepModel
from dwdp_jax.parallel.dwdp import DwdpGroup

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

CFG = TINY
SLOTS, MAX_LEN = 4, 32
BUCKETS = Buckets(batch=(4,), length=(8,))
# (prompt_len, max_new_tokens); q7 ends with its first token, on its context server
REQUESTS = [(9, 4), (4, 6), (14, 3), (6, 5), (11, 2), (3, 6), (7, 4), (5, 1)]
TOL = 1e-5


def tokens(seed, n):
    return np.random.RandomState(seed).randint(0, CFG.vocab_size, n).astype(np.int32)


def requests():
    return [Request(f"q{i}", tokens(10 + i, n), out) for i, (n, out) in enumerate(REQUESTS)]


def sched_config(budget=8):
    return SchedulerConfig(max_batch_size=SLOTS, max_seq_len=MAX_LEN, token_budget=budget)


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, dtype=jnp.float32, seed=3)


@pytest.fixture(scope="module")
def runners(model):
    devices = jax.devices()
    group = DwdpGroup(model, devices[:4])
    return dict(
        dwdp=[DwdpRankRunner(rank, SLOTS, MAX_LEN, buckets=BUCKETS) for rank in group.ranks],
        dep=DepRunner(DepModel(model, devices[4:6]), SLOTS, MAX_LEN, buckets=BUCKETS),
        single=ModelRunner(model, SLOTS, MAX_LEN, buckets=BUCKETS, device=devices[6]),
    )


@pytest.fixture(scope="module")
def single_tokens(runners):
    sched = Scheduler(sched_config())
    run_engine(sched, runners["single"].step_fn, FakeClock(), requests=requests())
    return {f.request_id: list(f.output_tokens) for f in sched.finished}


def rel_err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---------------------------------------------------------------------------------------------------------------
# Roles


def test_role_specs_and_device_split():
    dwdp = disagg.RoleSpec("dwdp", 4, 2, name="context")
    dep = disagg.RoleSpec("dep", 4, 2, name="generation")
    assert (dwdp.group, dwdp.num_engines) == (2, 4) and (dep.group, dep.num_engines) == (2, 2)
    assert disagg.RoleSpec("dp", 3).group == 1 and disagg.RoleSpec("dep", 4).group == 4
    ctx, gen = disagg.split_devices(list(range(8)), dwdp, dep)
    assert ctx == [0, 1, 2, 3] and gen == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="only 6 devices"):
        disagg.split_devices(list(range(6)), dwdp, dep)
    for args, message in [
        (("dwdp", 4, 3), "context_group_size=3 must divide context_devices=4"),
        (("single", 2), "context_strategy=single runs on one device"),
        (("ep", 2), "context_strategy='ep'"),
        (("dp", 4, 2), "context_strategy=dp has no groups"),
        (("dep", 0), "context_devices must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            disagg.RoleSpec(*args, name="context")
    with pytest.raises(ValueError, match="generation_group_size=3 must divide the 16 routed experts"):
        disagg.RoleSpec("dep", 3, name="generation").check_experts(16)


# ---------------------------------------------------------------------------------------------------------------
# The KV hand-off


def test_handoff_continues_generation_exactly(runners):
    """A prompt prefilled on a DWDP rank, its cache rows moved to another device: decoding there gives the
    logits (single device) and tokens (DEP slot group 1) of decoding on the context rank itself."""
    ctx, single, dep = runners["dwdp"][1], runners["single"], runners["dep"]
    spec = ctx.spec
    prompt = tokens(99, 13)
    first = ctx.prefill([PrefillChunk("a", 2, 0, prompt, True)])
    token = int(jnp.argmax(first[0]))
    transport = DevicePutTransport()
    moved = {}
    for name, device in (("single", single.device), ("dep", dep.group_devices[1])):
        handle = transport.send(ctx.read_slot(0, 2, 16), device)
        transport.wait_source(handle)
        moved[name] = transport.wait_arrival(handle)
        assert moved[name].devices() == {device}
        assert moved[name].shape == (CFG.num_layers, 16, CFG.kv_lora_rank + CFG.qk_rope_head_dim)
        assert moved[name].nbytes == 16 * spec.bytes_per_token
    single.write_slot(0, 3, moved["single"])
    dep.write_slot(1, 0, moved["dep"])
    want, got_dep = [], []
    for p in range(13, 17):
        here = ctx.decode([DecodeItem("a", 2, token, p)])
        there = single.decode([DecodeItem("a", 3, token, p)])
        assert rel_err(there, here) <= TOL
        plan = StepPlan(p, 0, (), ())
        out = dep._step_groups([plan, StepPlan(p, 1, (), (DecodeItem("a", 0, token, p),))])
        got_dep.append(out["a"])
        token = int(jnp.argmax(here[0]))
        want.append(token)
    assert got_dep == want


def test_write_slot_checks_rows(runners):
    single = runners["single"]
    rows = jnp.zeros((CFG.num_layers, 8, CFG.kv_lora_rank), jnp.float32, device=single.device)
    with pytest.raises(ValueError, match="do not fit a cache of 3 layers"):
        single.write_slot(0, 0, rows)
    with pytest.raises(ValueError, match="slot group 1 of a runner with one group"):
        single.read_slot(1, 0, 8)


# ---------------------------------------------------------------------------------------------------------------
# End to end


def check_records(run, engine):
    by_id = {r.request_id: r for r in run.requests}
    for req in requests():
        r = by_id[req.request_id]
        assert r.num_output_tokens == req.max_new_tokens and r.prompt_len == req.prompt_len
        assert r.arrival_s <= r.context_admitted_s <= r.context_first_token_s <= r.first_token_s <= r.last_token_s
        if req.max_new_tokens == 1:
            assert not r.handed_off and r.kv_bytes == 0 and r.first_token_s == r.context_first_token_s
            continue
        assert r.handed_off and r.kv_len == 16 and r.kv_bytes == engine.transfer_bytes(req.prompt_len)
        assert r.kv_bytes == 16 * CFG.num_layers * (CFG.kv_lora_rank + CFG.qk_rope_head_dim) * 4  # float32
        assert (r.context_first_token_s <= r.handoff_start_s <= r.handoff_source_done_s <= r.handoff_end_s
                <= r.generation_admitted_s == r.first_token_s)
    # every prompt token was prefilled on a context device, every later token decoded on a generation device
    ev = run.events
    assert sum(e.prefill_tokens for e in ev if e.role == "context") == sum(n for n, _ in REQUESTS)
    assert sum(e.decode_tokens for e in ev if e.role == "generation") == sum(o - 1 for _, o in REQUESTS)
    assert not any(e.decode_tokens for e in ev if e.role == "context")
    assert not any(e.prefill_tokens for e in ev if e.role == "generation")
    summary = disagg.summarize(run)
    m = summary["metrics"]
    assert m["num_gpus"] == run.num_gpus == engine.num_context_gpus + engine.num_generation_gpus
    assert m["handoff_count"] == len(REQUESTS) - 1
    assert m["handoff_bytes_total"] == sum(r.kv_bytes for r in run.requests)
    assert m["output_tps_per_gpu"] == pytest.approx(sum(o for _, o in REQUESTS) / run.wall_s / run.num_gpus)
    assert [row["role"] for row in summary["roles"]] == ["context", "handoff", "generation"]
    assert len(summary["requests"]) == len(REQUESTS) and timeline.columns(ev)["role"]


def test_dwdp_context_dep_generation_matches_single_device(runners, single_tokens):
    engine = disagg.DisaggEngine(runners["dwdp"], [runners["dep"]],
                                 disagg.DisaggConfig(sched_config(), sched_config()), verify_handoff=True)
    bad = [Request("too_long", tokens(1, 40), 2), Request("q0", tokens(2, 4), 2)]
    finished = []
    run = engine.serve(requests() + bad, on_finish=finished.append)
    assert run.outputs() == single_tokens and sorted(finished, key=lambda r: r.request_id) == list(run.requests)
    assert [rid for rid, _ in run.rejected] == ["too_long", "q0"]
    assert "exceeds the cache slot" in run.rejected[0][1] and "duplicate" in run.rejected[1][1]
    assert run.num_context_gpus == 4 and run.num_generation_gpus == 2
    assert {r.context_engine for r in run.requests} == {0, 1, 2, 3}  # every DWDP rank prefilled
    assert {r.generation_device for r in run.requests if r.handed_off} == {4, 5}  # both DEP devices decoded
    check_records(run, engine)


def test_dep_context_dwdp_generation_closed_loop_matches_single_device(runners, single_tokens, monkeypatch):
    """The same runners with their roles swapped (two ranks of the DWDP group generate, all four hold experts);
    a closed loop of 3 requests in flight, a budget of 4 tokens per prefill step (chunked prefill) and 2
    generation slots per device (hand-offs wait for credits). The generation ranks run decode steps ahead
    (tokens fed on the device from the step before)."""
    config = disagg.DisaggConfig(sched_config(budget=4), SchedulerConfig(2, MAX_LEN, 4))
    engine = disagg.DisaggEngine([runners["dep"]], runners["dwdp"][:2], config)
    chained = []
    for r in runners["dwdp"][:2]:
        dispatch = r.dispatch
        monkeypatch.setattr(r, "dispatch", lambda plan, prev, d=dispatch: chained.append(prev is not None)
                            or d(plan, prev))
    run = engine.serve(requests(), concurrency=3)
    assert run.outputs() == single_tokens and any(chained)
    assert {r.context_device for r in run.requests} == {4, 5}
    assert max(e.prefill_tokens for e in run.events if e.role == "context") <= 4
    in_flight = [sum(r.arrival_s <= t < r.last_token_s for r in run.requests) for t in
                 sorted(r.arrival_s for r in run.requests)]
    assert max(in_flight) <= 3
    check_records(run, engine)


class FailingTransport(DevicePutTransport):
    def wait_arrival(self, handle):
        raise OSError("link down")


class CorruptingTransport(DevicePutTransport):
    def wait_arrival(self, handle):
        rows = super().wait_arrival(handle)
        return rows.at[0, 0, 0].add(1.0)


def test_bad_configurations_and_a_failing_transport(runners):
    dwdp, dep, single = runners["dwdp"], runners["dep"], runners["single"]
    config = disagg.DisaggConfig(sched_config(), sched_config())
    with pytest.raises(ValueError, match="serves both"):
        disagg.DisaggEngine(dwdp[:2], dwdp[1:3], config)
    with pytest.raises(ValueError, match="needs context and generation runners"):
        disagg.DisaggEngine(dwdp, [], config)
    with pytest.raises(ValueError, match="smaller than its scheduler's 8 x 32"):
        disagg.DisaggEngine(dwdp, [dep], disagg.DisaggConfig(sched_config(), SchedulerConfig(8, MAX_LEN, 8)))
    with pytest.raises(ValueError, match="eos_id"):
        disagg.DisaggConfig(sched_config(), SchedulerConfig(SLOTS, MAX_LEN, 8, eos_id=1))
    engine = disagg.DisaggEngine([dep], [single], config, transport=FailingTransport())
    with pytest.raises(RuntimeError, match="KV hand-off of request 'q[01]' failed"):
        engine.serve(requests()[:2])
    engine = disagg.DisaggEngine([dep], [single], config, transport=CorruptingTransport(), verify_handoff=True)
    with pytest.raises(RuntimeError, match="KV hand-off of request 'q[01]' failed") as failure:
        engine.serve(requests()[:2])
    assert "differ from the source's" in str(failure.value.__cause__)
