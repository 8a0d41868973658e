"""Paged cache and step runners against full forwards of the tiny model (float32, CPU, simulated devices; the
einsum attention backend: the Pallas one is checked against it in tests/test_paged_attention.py).

Compile budget: every runner here uses one cache shape and the buckets ((4,), (8,)), so the prefill [4, 8]
(per block-table width) and decode [4, 1] programs compile once for the module; references are full forwards
of one [4, 32] shape.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dwdp_jax.config import TINY
from dwdp_jax.engine import paged_cache
from dwdp_jax.engine.paged_cache import PagedCacheSpec, PageTable
from dwdp_jax.engine.lockstep import LockstepScheduler
from dwdp_jax.engine.runner import (Buckets, DepRunner, DwdpRankRunner, ModelRunner, StepArrays, _Row,
                                    pack_rows, pages_bucket)
from dwdp_jax.engine.sampling import SamplingParams
from dwdp_jax.engine.scheduler import (PENDING, DecodeItem, FakeClock, PrefillChunk, Scheduler, SchedulerConfig, StepPlan,
                                      run_engine)
from dwdp_jax.engine.workload import Request, RequestError, split_by_rank
from dwdp_jax.model import init_model
from dwdp_jax.parallel.dep import DepModel
from dwdp_jax.parallel.dwdp import DwdpGroup
from tests.forward_util import jitted_forward

CFG = TINY
SLOTS, MAX_LEN = 4, 32
BUCKETS = Buckets(batch=(4,), length=(8,))
REF_ROWS, REF_LEN = 4, 32
TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, dtype=jnp.float32, seed=3)


@pytest.fixture(scope="module")
def full_logits(model):
    """seqs (token lists, each <= REF_LEN) -> per sequence [len, vocab] logits of one causal full forward."""
    forward = jitted_forward(model)

    def run(seqs):
        out = []
        for i in range(0, len(seqs), REF_ROWS):
            group = seqs[i : i + REF_ROWS]
            buf = np.zeros((REF_ROWS, REF_LEN), np.int32)  # end padding: causal, so it changes nothing before it
            for r, s in enumerate(group):
                buf[r, : len(s)] = s
            logits = np.asarray(forward(buf))
            out += [logits[r, : len(s)] for r, s in enumerate(group)]
        return out

    return run


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def runner(model, **kw):
    return ModelRunner(model, SLOTS, MAX_LEN, buckets=kw.pop("buckets", BUCKETS), **kw)


def tokens(seed, n):
    return np.random.RandomState(seed).randint(0, CFG.vocab_size, n).astype(np.int32)


# ---------------------------------------------------------------------------------------------------------------
# Cache


def test_cache_spec_sizes_and_allocation():
    spec = PagedCacheSpec.for_model(CFG, num_pages=5, num_slots=3, max_len=100, dtype=jnp.bfloat16)
    assert spec.bytes_per_token == CFG.num_layers * (CFG.kv_lora_rank + CFG.qk_rope_head_dim) * 2
    assert spec.width == 128 + 64 and spec.max_pages_per_slot == 2 and spec.scratch_page == 5
    assert spec.total_bytes == CFG.num_layers * 6 * 64 * spec.width * 2  # the scratch page included
    device = jax.devices()[1]
    pages = paged_cache.allocate(spec, device)
    assert len(pages) == CFG.num_layers and paged_cache.nbytes(pages) == spec.total_bytes
    assert pages[0].shape == (6, 64, spec.width) and pages[0].dtype == jnp.bfloat16
    assert pages[0].devices() == {device}
    # rows left-aligned, padding rows on the scratch page only; pages taken for the rows' tokens
    table = PageTable(spec)
    step = pack_rows([_Row(1, 63, np.array([7, 8], np.int32))], 2, 4, table, num_pages=2)
    np.testing.assert_array_equal(step.ids, [[7, 8, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(step.positions[0, :2], [63, 64])
    np.testing.assert_array_equal(step.q_lens, [2, 0])
    np.testing.assert_array_equal(step.lengths, [65, 0])
    np.testing.assert_array_equal(step.block_table, [[0, 1], [5, 5]])
    assert table.pages_of(1) == [0, 1] and pages_bucket(3, 8) == 4 and pages_bucket(9, 8) == 8


def test_block_table_follows_ensure_and_release():
    """The page table's block-table rows (kept as an array beside the held pages) after pages are taken,
    released and taken again by other slots: each slot's pages in order, then the scratch page; padding rows
    (-1) scratch only; narrower and wider tables than a slot's maximum."""
    spec = PagedCacheSpec.for_model(CFG, num_pages=6, num_slots=3, max_len=192, dtype=jnp.bfloat16)
    table = PageTable(spec)
    s = spec.scratch_page
    table.ensure(0, 130)  # 3 pages
    table.ensure(2, 10)
    table.release(0)
    table.ensure(1, 70)  # reuses released pages, lowest first
    table.ensure(2, 65)  # a second page for slot 2
    want = {1: table.pages_of(1), 2: table.pages_of(2)}
    assert len(want[1]) == 2 and len(want[2]) == 2 and table.pages_of(0) == []
    np.testing.assert_array_equal(table.block_table([2, -1, 1, 0]),
                                  [want[2] + [s], [s, s, s], want[1] + [s], [s, s, s]])
    np.testing.assert_array_equal(table.block_table([1], num_pages=1), [want[1][:1]])
    np.testing.assert_array_equal(table.block_table([2], num_pages=5), [want[2] + [s, s, s]])
    assert table.block_table([]).shape == (0, spec.max_pages_per_slot)


def test_step_arrays_pack_and_unpack():
    rng = np.random.RandomState(0)
    step = StepArrays(*(rng.randint(0, 99, shape).astype(np.int32) for shape in [(3, 5), (3, 5), (3,), (3,), (3, 4)]))
    ids, rest = step.pack()
    # positions, q_lens, lengths, block_table from 256-byte aligned offsets (a Mosaic GPU kernel refuses a view of
    # the vector that is not 256-byte aligned), block_table unpadded at the end
    assert ids is step.ids and rest.shape == (3 * 64 + 3 * 4,) and rest.dtype == np.int32
    np.testing.assert_array_equal(rest[[64, 65, 66, 128, 129, 130]], np.concatenate([step.q_lens, step.lengths]))
    back = jax.jit(StepArrays.unpack)(ids, rest)
    for f in dataclasses.fields(StepArrays):
        np.testing.assert_array_equal(getattr(back, f.name), getattr(step, f.name))
    # a decode step of one row (where the unaligned pack failed on the GPU) and a wide prefill step
    for rows, length, pages in [(1, 1, 64), (128, 1, 64), (4, 2048, 32)]:
        step = StepArrays(*(rng.randint(0, 99, shape).astype(np.int32) for shape in
                            [(rows, length), (rows, length), (rows,), (rows,), (rows, pages)]))
        back = StepArrays.unpack(*step.pack())
        for f in dataclasses.fields(StepArrays):
            np.testing.assert_array_equal(getattr(back, f.name), getattr(step, f.name))


def test_buckets():
    b = Buckets.default(max_batch_size=5, max_chunk_len=100, min_len=16)
    assert b.batch == (1, 2, 4, 8) and b.length == (16, 32, 64, 128)
    assert b.batch_for(3) == 4 and b.length_for(17) == 32
    with pytest.raises(ValueError, match="largest batch bucket"):
        b.batch_for(9)
    with pytest.raises(ValueError, match="ascending"):
        Buckets((4, 2), (8,))


# ---------------------------------------------------------------------------------------------------------------
# Cache equivalence


@pytest.mark.parametrize("form", ["absorbed", "expanded"])
def test_prefill_then_decode_matches_full_forward(model, full_logits, form):
    """S = 11 prompt tokens (prefill runs in pieces 8 + 3: the largest length bucket is 8), then k = 3
    decode tokens, each through the absorbed (decode) or the expanded (prefill) MLA form."""
    seq, s = tokens(0, 14), 11
    ref = full_logits([seq])[0]
    r = runner(model)
    got = [r.prefill([PrefillChunk("a", 2, 0, seq[:s], True)])[0]]
    for p in range(s, len(seq)):
        if form == "absorbed":
            got.append(r.decode([DecodeItem("a", 2, int(seq[p]), p)])[0])
        else:
            got.append(r.prefill([PrefillChunk("a", 2, p, seq[p : p + 1], True)])[0])
    for j, logits in enumerate(got):
        assert rel_err(logits, ref[s - 1 + j]) <= TOL, (form, j)


def test_fp8_kv_b_is_dequantized_once_for_decode():
    """An FP8 checkpoint's kv_b: the runner holds it dequantized once (`with_absorbed_kv_b`) and its programs
    read that copy, not the FP8 weight (poisoned here with NaN scales after the copy was made), and still
    match the causal forward of the user's model, which keeps no copy and dequantizes kv_b in place."""
    from dwdp_jax.model import AbsorbedKvB

    cfg = dataclasses.replace(CFG, weight_block_size=(16, 16))
    fp8 = init_model(cfg, dtype=jnp.float32, seed=5)
    graph, state = nnx.split(fp8)
    seq, s = tokens(7, 12), 10
    ref = np.asarray(jax.jit(lambda st, ids: nnx.merge(graph, st)(ids))(state, seq[None]))[0]
    r = runner(fp8)
    copies = [x for x in jax.tree.leaves(r.state, is_leaf=lambda x: isinstance(x, AbsorbedKvB))
              if isinstance(x, AbsorbedKvB)]
    assert len(copies) == cfg.num_layers + cfg.num_mtp_layers
    assert all(layer.self_attn.kv_b_absorbed is None for layer in fp8.layers)
    for i in range(cfg.num_layers):
        scale = r.state["layers"][i]["self_attn"]["kv_b_proj"]["scale"]
        scale[...] = jnp.full_like(scale[...], jnp.nan)
    r._leaves, r._state_def = jax.tree.flatten(r.state)
    got = [r.prefill([PrefillChunk("a", 0, 0, seq[:s], True)])[0]]
    for p in range(s, len(seq)):
        got.append(r.decode([DecodeItem("a", 0, int(seq[p]), p)])[0])
    for j, logits in enumerate(got):
        assert rel_err(logits, ref[s - 1 + j]) <= TOL, j


def test_logits_of_every_row_in_order_need_no_gather():
    from dwdp_jax.engine.runner import _Call, _SlotRunner

    logits = jnp.arange(12.0).reshape(3, 4)
    calls = [_Call(logits, {(0, 0): 0, (0, 1): 1, (0, 2): 2})]
    assert _SlotRunner._gather_logits(calls, [(0, 0), (0, 1), (0, 2)]) is logits  # no program dispatched
    np.testing.assert_array_equal(_SlotRunner._gather_logits(calls, [(0, 2), (0, 0)]), logits[jnp.array([2, 0])])
    np.testing.assert_array_equal(_SlotRunner._gather_logits(calls, [(0, 0), (0, 1)]), logits[:2])  # padding row


def test_chunked_prefill_equals_one_shot(model):
    seq = tokens(1, 13)
    one, two = runner(model), runner(model)
    a = one.prefill([PrefillChunk("a", 0, 0, seq[:11], True)])[0]
    two.prefill([PrefillChunk("a", 0, 0, seq[:5], False)])
    b = two.prefill([PrefillChunk("a", 0, 5, seq[5:11], True)])[0]
    assert rel_err(b, a) <= TOL
    rows_one = one.read_slot(0, 0, 11)
    assert rel_err(two.read_slot(0, 0, 11), rows_one) <= TOL
    assert rows_one.shape == (CFG.num_layers, 11, CFG.kv_lora_rank + CFG.qk_rope_head_dim)
    da = one.decode([DecodeItem("a", 0, int(seq[11]), 11)])[0]
    db = two.decode([DecodeItem("a", 0, int(seq[11]), 11)])[0]
    assert rel_err(db, da) <= TOL


def test_requests_in_different_slots_do_not_disturb_each_other(model, full_logits):
    """Interleaved prefill chunks and decodes of three requests; a slot reused by a shorter request; the
    scratch page filled with large values first, so that reading it would show."""
    r = runner(model)
    r.pages = [p.at[r.spec.scratch_page].set(1e4) for p in r.pages]
    a, b, c, d = tokens(2, 12), tokens(3, 9), tokens(4, 15), tokens(5, 6)
    ref = dict(zip("abcd", full_logits([a, b, c, d])))
    check = lambda name, logits, pos: rel_err(logits, ref[name][pos]) <= TOL or pytest.fail(f"{name} at {pos}")

    out = r.prefill([PrefillChunk("a", 0, 0, a[:10], True), PrefillChunk("c", 3, 0, c[:4], False)])
    check("a", out[0], 9)
    check("c", out[1], 3)
    slot0 = np.asarray(r.read_slot(0, 0, 10))
    out = r.prefill([PrefillChunk("c", 3, 4, c[4:12], True), PrefillChunk("b", 1, 0, b[:7], True)])
    check("c", out[0], 11)
    check("b", out[1], 6)
    np.testing.assert_array_equal(np.asarray(r.read_slot(0, 0, 10)), slot0)  # untouched by a step without it
    out = r.decode([DecodeItem("c", 3, int(c[12]), 12), DecodeItem("a", 0, int(a[10]), 10),
                    DecodeItem("b", 1, int(b[7]), 7)])
    check("c", out[0], 12)
    check("a", out[1], 10)
    check("b", out[2], 7)
    # slot 3 freed and reused by a shorter request, with no clearing, while the others decode
    out = r.prefill([PrefillChunk("d", 3, 0, d[:5], True)])
    check("d", out[0], 4)
    out = r.decode([DecodeItem("a", 0, int(a[11]), 11), DecodeItem("d", 3, int(d[5]), 5),
                    DecodeItem("b", 1, int(b[8]), 8)])
    check("a", out[0], 11)
    check("d", out[1], 5)
    check("b", out[2], 8)


def test_bucket_padding_does_not_change_results(model):
    """The same request through exact-fit shapes (one row, the prompt's length) and padded buckets."""
    seq = tokens(6, 12)
    exact = runner(model, buckets=Buckets(batch=(4,), length=(10,)))  # 10: no padding for the prompt
    padded = runner(model, buckets=Buckets(batch=(4,), length=(8, 16)))  # 16: 6 padding tokens, 3 padding rows
    got = []
    for r in (exact, padded):
        got.append([r.prefill([PrefillChunk("a", 1, 0, seq[:10], True)])[0]])
        got[-1] += [r.decode([DecodeItem("a", 1, int(seq[p]), p)])[0] for p in (10, 11)]
    for x, y in zip(*got):
        assert rel_err(y, x) <= TOL


# ---------------------------------------------------------------------------------------------------------------
# Engine runs: greedy tokens against a naive loop of full forwards


REQUESTS = [(9, 4), (4, 6), (14, 3), (6, 5), (11, 2), (3, 6), (7, 4)]  # (prompt_len, max_new_tokens)


def engine_requests():
    return [Request(f"q{i}", tokens(10 + i, n), out) for i, (n, out) in enumerate(REQUESTS)]


def sched_config():
    return SchedulerConfig(max_batch_size=SLOTS, max_seq_len=MAX_LEN, token_budget=8)


@pytest.fixture(scope="module")
def naive_tokens(full_logits):
    """Greedy continuation of every request by full re-forwards (no cache)."""
    seqs = {r.request_id: list(r.prompt) for r in engine_requests()}
    want = {r.request_id: r.max_new_tokens for r in engine_requests()}
    while any(len(seqs[k]) - len(p.prompt) < want[k] for k, p in zip(seqs, engine_requests())):
        ids = list(seqs)
        for k, logits in zip(ids, full_logits([seqs[k] for k in ids])):
            seqs[k].append(int(np.argmax(logits[-1])))
    return {r.request_id: seqs[r.request_id][r.prompt_len : r.prompt_len + r.max_new_tokens]
            for r in engine_requests()}


def outputs(finished):
    return {f.request_id: list(f.output_tokens) for f in finished}


@pytest.fixture(scope="module")
def single_tokens(model):
    r = runner(model)
    sched = Scheduler(sched_config(), page_table=r.page_table)
    shapes = set()
    call = r._call

    def spy(step, absorbed):
        shapes.add((step.ids.shape, absorbed))
        return call(step, absorbed)

    r._call = spy
    run = run_engine(sched, r.step_fn, FakeClock(), requests=engine_requests())
    assert not run.rejected and len(sched.finished) == len(REQUESTS)
    assert shapes == {((4, 8), False), ((4, 1), True)}  # the buckets' two programs, nothing per request
    return outputs(sched.finished)


def test_engine_run_matches_naive_greedy_loop(single_tokens, naive_tokens):
    assert single_tokens == naive_tokens


def test_expert_counts_cover_the_real_tokens_only(model):
    """ModelRunner(expert_counts=True): per MoE layer, the tokens routed to each expert in the last call; padding
    (rows past the batch, columns past a chunk's length) is not counted; the logits are unchanged."""
    r, plain = runner(model, expert_counts=True), runner(model)
    chunks = [PrefillChunk("a", 0, 0, tokens(1, 5), True), PrefillChunk("b", 1, 0, tokens(2, 8), True)]
    np.testing.assert_array_equal(np.asarray(r.prefill(chunks)), np.asarray(plain.prefill(chunks)))
    counts = np.asarray(r.last_expert_counts)
    k = model.cfg.num_experts_per_tok
    assert counts.shape == (model.cfg.num_moe_layers, model.cfg.n_routed_experts)
    assert (counts.sum(1) == 13 * k).all()  # 5 + 8 tokens in a [4, 8] block
    r.decode([DecodeItem("a", 0, 7, 5)])
    assert (np.asarray(r.last_expert_counts).sum(1) == k).all() and ((r.last_expert_counts > 0).sum(1) == k).all()


def test_step_ahead_matches_step_by_step(model, single_tokens):
    """run_engine(step_ahead=runner): decode steps dispatched before the tokens of the step in flight are read,
    fed on the device from its samples: the same greedy tokens."""
    r = runner(model)
    sched = Scheduler(sched_config(), page_table=r.page_table)
    chained = []
    dispatch = r.dispatch

    def spy(plan, prev):
        chained.append(sum(d.token == PENDING for d in plan.decode))
        return dispatch(plan, prev)

    r.dispatch = spy
    run = run_engine(sched, None, FakeClock(), requests=engine_requests(), step_ahead=r)
    assert not run.rejected and outputs(sched.finished) == single_tokens
    assert sum(chained) > 0 and r.page_table.num_free == r.spec.num_pages
    # ids fed on the device and ids from the host reach the decode program with the same input shardings: one
    # compilation for its one shape (a second one costs ~1 minute on a GPU at R1 shapes)
    decode_program = next(p for (_, absorbed), p in r._programs.items() if absorbed)
    assert decode_program._cache_size() == 1
    with pytest.raises(ValueError, match="waits for a token"):
        r.dispatch(StepPlan(0, 0, (), (DecodeItem("x", 0, PENDING, 3),)), None)


@pytest.mark.parametrize("step_ahead", [False, True])
def test_dwdp_rank_runners_match_single_device(model, single_tokens, step_ahead):
    group = DwdpGroup(model, jax.devices()[:2])
    runners = [DwdpRankRunner(rank, SLOTS, MAX_LEN, buckets=BUCKETS) for rank in group.ranks]
    assert runners[1].pages[0].devices() == {jax.devices()[1]}
    scheds = [Scheduler(sched_config(), rank=r, page_table=runners[r].page_table) for r in range(2)]
    per_rank = split_by_rank(engine_requests(), 2)

    def serve(rank, reqs):
        r = runners[rank.rank]
        run_engine(scheds[rank.rank], None if step_ahead else r.step_fn, FakeClock(), requests=reqs,
                   step_ahead=r if step_ahead else None)

    group.run_parallel(serve, per_rank)
    got = outputs(scheds[0].finished + scheds[1].finished)
    assert got == single_tokens
    assert all(f.rank == 1 for f in scheds[1].finished) and len(scheds[1].finished) == len(per_rank[1])


def test_fp8_strategies_match_single_device():
    """An FP8 checkpoint (kv_b among its FP8 weights): DWDP rank runners (steps ahead) and the DEP runner, each
    holding its own dequantized kv_b copy, give the single-device runner's greedy tokens. Two layers (a dense one,
    then a MoE one; the MTP layer besides): every kind of layer holding an FP8 kv_b, a third compiled for nothing."""
    fp8 = init_model(dataclasses.replace(CFG, weight_block_size=(16, 16), num_layers=2), dtype=jnp.float32, seed=9,
                     jitted=True)  # one compiled program, not the eager ops of each weight and its quantization
    single = runner(fp8)
    sched = Scheduler(sched_config(), page_table=single.page_table)
    run_engine(sched, single.step_fn, FakeClock(), requests=engine_requests())
    want = outputs(sched.finished)

    group = DwdpGroup(fp8, jax.devices()[:2])
    ranks = [DwdpRankRunner(rank, SLOTS, MAX_LEN, buckets=BUCKETS) for rank in group.ranks]
    scheds = [Scheduler(sched_config(), rank=r, page_table=ranks[r].page_table) for r in range(2)]
    group.run_parallel(lambda rank, reqs: run_engine(scheds[rank.rank], None, FakeClock(), requests=reqs,
                                                     step_ahead=ranks[rank.rank]),
                       split_by_rank(engine_requests(), 2))
    assert outputs(scheds[0].finished + scheds[1].finished) == want

    dep = DepRunner(DepModel(fp8, jax.devices()[:2]), SLOTS, MAX_LEN, buckets=BUCKETS)
    lock = LockstepScheduler([Scheduler(sched_config(), rank=r, page_table=dep.page_tables[r]) for r in range(2)])
    run_engine(lock, dep.step_fn, FakeClock(), requests=engine_requests())
    assert outputs(lock.finished) == want


def test_dep_lockstep_runner_matches_single_device(model, single_tokens):
    dep = DepRunner(DepModel(model, jax.devices()[:2]), SLOTS, MAX_LEN, buckets=BUCKETS)
    sched = LockstepScheduler([Scheduler(sched_config(), rank=r, page_table=dep.page_tables[r]) for r in range(2)])
    run = run_engine(sched, dep.step_fn, FakeClock(), requests=engine_requests())
    assert not run.rejected
    assert outputs(sched.finished) == single_tokens
    assert {f.rank for f in sched.finished} == {0, 1}  # both devices served requests


def test_temperature_sampling_is_reproducible_per_seed(model, single_tokens):
    def serve(seed):
        r = runner(model, sampling=SamplingParams(temperature=1.0, top_k=8), seed=seed)
        sched = Scheduler(sched_config(), page_table=r.page_table)
        run_engine(sched, r.step_fn, FakeClock(), requests=engine_requests())
        return outputs(sched.finished)

    a, b, c = serve(0), serve(0), serve(1)
    assert a == b and a != c and a != single_tokens
    assert all(len(a[r.request_id]) == r.max_new_tokens for r in engine_requests())


def test_admission_by_free_pages(model, single_tokens):
    """A pool of 2 pages (64 tokens each) for 4 slots: requests are admitted only while their prompt + output
    fits beside the others' promises, so fewer run at once; every request still completes with the same
    greedy tokens, and a request larger than the whole pool is refused at submit."""
    r = runner(model, num_pages=2)
    sched = Scheduler(sched_config(), page_table=r.page_table)
    peak = []
    step = r.step_fn

    def spy(plan):
        peak.append(sched.num_running)
        assert r.page_table.num_free >= 0
        return step(plan)

    run = run_engine(sched, spy, FakeClock(), requests=engine_requests())
    assert not run.rejected and outputs(sched.finished) == single_tokens
    assert max(peak) == 2  # each request needs one page: two in flight at most
    assert r.page_table.num_free == 2  # every page back in the pool
    big = Request("big", tokens(30, 30), 120)  # 150 tokens: 3 pages
    with pytest.raises(RequestError, match="pages"):
        Scheduler(SchedulerConfig(4, 200, 8), page_table=r.page_table).submit(big)
