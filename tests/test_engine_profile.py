"""experiments/engine_profile.py: HLO parsing and categories on a synthetic module, the per-step breakdown of a
synthetic GPU profile (overlapping streams, two programs of one name, fallbacks), the loud failure without kernel
events, and the real path on CPU (a tiny model's decode and two-program prefill under jax.profiler)."""

from __future__ import annotations

import dataclasses
import functools
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from dwdp_jax.config import TINY
from dwdp_jax.engine.runner import Buckets, ModelRunner
from dwdp_jax.engine.scheduler import DecodeItem, PrefillChunk
from dwdp_jax.model import init_model
from experiments import engine_profile as ep

# GPU-style compiled HLO: the op names carry the model's named scopes; one backend_config holds brackets, quotes
# and an op_name of its own that must not be taken for the instruction's.
HLO = r'''HloModule jit_step_fn, is_scheduled=true, entry_computation_layout={(bf16[8,128]{1,0}, f8e4m3fn[128,128]{1,0})->bf16[8,128]{1,0}}

FileNames
1 "/work/dwdp_jax/model.py"

%region_add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.9 = f32[] add(%a, %b), metadata={op_name="reduce_sum"}
}

%fused_quant (param_0: bf16[8,128]) -> (f8e4m3fn[8,128], f32[8,1]) {
  %param_0 = bf16[8,128]{1,0} parameter(0)
  %convert.1 = f32[8,128]{1,0} convert(%param_0), metadata={op_name="jit(step_fn)/linear/jit(grouped_gemm_fp8)/convert_element_type"}
  %zero = f32[] constant(0)
  %amax = f32[8]{0} reduce(%convert.1, %zero), dimensions={1}, to_apply=%region_add, metadata={op_name="jit(step_fn)/linear/jit(grouped_gemm_fp8)/reduce_max"}
  %q = f8e4m3fn[8,128]{1,0} convert(%convert.1), metadata={op_name="jit(step_fn)/linear/jit(grouped_gemm_fp8)/convert_element_type"}
  %s = f32[8,1]{1,0} reshape(%amax), metadata={op_name="jit(step_fn)/linear/jit(grouped_gemm_fp8)/reshape"}
  ROOT %t = (f8e4m3fn[8,128]{1,0}, f32[8,1]{1,0}) tuple(%q, %s)
}

%fused_dequant (param_0.1: f8e4m3fn[128,128], param_1.1: f32[1,1]) -> bf16[128,128] {
  %param_0.1 = f8e4m3fn[128,128]{1,0} parameter(0)
  %c = f32[128,128]{1,0} convert(%param_0.1), metadata={op_name="jit(step_fn)/attend/kv_b/convert_element_type"}
  %param_1.1 = f32[1,1]{1,0} parameter(1)
  %bs = f32[128,128]{1,0} broadcast(%param_1.1), dimensions={}
  %m = f32[128,128]{1,0} multiply(%c, %bs), metadata={op_name="jit(step_fn)/attend/kv_b/mul"}
  ROOT %d = bf16[128,128]{1,0} convert(%m), metadata={op_name="jit(step_fn)/attend/kv_b/convert_element_type"}
}

%fused_kvb (param_0.2: bf16[8,128], param_1.2: bf16[128,128]) -> bf16[8,128] {
  %param_0.2 = bf16[8,128]{1,0} parameter(0)
  %param_1.2 = bf16[128,128]{1,0} parameter(1)
  ROOT %dot.1 = bf16[8,128]{1,0} dot(%param_0.2, %param_1.2), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step_fn)/attend/kv_b/bkc,chn->bkhn/dot_general"}
}

%fused_softmax (param_0.3: f32[8,128]) -> bf16[8,128] {
  %param_0.3 = f32[8,128]{1,0} parameter(0)
  %e = f32[8,128]{1,0} exponential(%param_0.3), metadata={op_name="jit(step_fn)/attend/exp"}
  ROOT %r = bf16[8,128]{1,0} convert(%e), metadata={op_name="jit(step_fn)/attend/convert_element_type"}
}

%fused_replicate (param_0.5: f8e4m3fn[8,128], param_1.5: s32[32]) -> f8e4m3fn[32,128] {
  %param_0.5 = f8e4m3fn[8,128]{1,0} parameter(0)
  %param_1.5 = s32[32]{0} parameter(1)
  %c = s32[32]{0} clamp(%param_1.5, %param_1.5, %param_1.5), metadata={op_name="jit(step_fn)/select_n"}
  ROOT %g = f8e4m3fn[32,128]{1,0} gather(%param_0.5, %c), offset_dims={1}, collapsed_slice_dims={0}, start_index_map={0}, index_vector_dim=1, slice_sizes={1,128}, metadata={op_name="jit(step_fn)/routed_experts/gather"}
}

%fused_mixed (param_0.4: bf16[8,128]) -> bf16[8,128] {
  %param_0.4 = bf16[8,128]{1,0} parameter(0)
  %n = bf16[8,128]{1,0} negate(%param_0.4), metadata={op_name="jit(step_fn)/attend/kv_cache/neg"}
  ROOT %x = bf16[8,128]{1,0} abs(%n), metadata={op_name="jit(step_fn)/attend/abs"}
}

%fused_rows (param_0.5: f8e4m3fn[8,128], param_1.5: s32[32]) -> f8e4m3fn[32,128] {
  %param_0.5 = f8e4m3fn[8,128]{1,0} parameter(0)
  %param_1.5 = s32[32]{0} parameter(1)
  ROOT %g = f8e4m3fn[32,128]{1,0} gather(%param_0.5, %param_1.5), offset_dims={1}, collapsed_slice_dims={0}, start_index_map={0}, index_vector_dim=1, slice_sizes={1,128}, metadata={op_name="jit(step_fn)/routed_experts/gather"}
}

%fused_norm (param_0.6: bf16[8,128]) -> bf16[8,128] {
  %param_0.6 = bf16[8,128]{1,0} parameter(0)
  ROOT %y = bf16[8,128]{1,0} multiply(%param_0.6, %param_0.6), metadata={op_name="jit(step_fn)/mul"}
}

%fused_head (param_0.7: bf16[8,128], param_1.7: bf16[128,64]) -> bf16[8,64] {
  %param_0.7 = bf16[8,128]{1,0} parameter(0)
  %nrm = bf16[8,128]{1,0} multiply(%param_0.7, %param_0.7), metadata={op_name="jit(step_fn)/mul"}
  %param_1.7 = bf16[128,64]{1,0} parameter(1)
  ROOT %hd = bf16[8,64]{1,0} dot(%nrm, %param_1.7), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step_fn)/linear/dot_general"}
}

%body (bp: (s32[], bf16[8,128])) -> (s32[], bf16[8,128]) {
  %bp = (s32[], bf16[8,128]{1,0}) parameter(0)
  %bx = bf16[8,128]{1,0} get-tuple-element(%bp), index=1
  %loop_softmax = bf16[8,128]{1,0} fusion(%bx), kind=kLoop, calls=%fused_softmax, metadata={op_name="jit(step_fn)/attend/while/body/mul"}
  %bi = s32[] get-tuple-element(%bp), index=0
  ROOT %bt = (s32[], bf16[8,128]{1,0}) tuple(%bi, %loop_softmax)
}

ENTRY %main.1 (p0: bf16[8,128], p1: f8e4m3fn[128,128]) -> bf16[8,128] {
  %p0 = bf16[8,128]{1,0} parameter(0)
  %p1 = f8e4m3fn[128,128]{1,0} parameter(1)
  %quant = (f8e4m3fn[8,128]{1,0}, f32[8,1]{1,0}) fusion(%p0), kind=kLoop, calls=%fused_quant
  %xq = f8e4m3fn[8,128]{1,0} get-tuple-element(%quant), index=0
  %scale = f32[1,1]{1,0} constant({{1}})
  %dequant = bf16[128,128]{1,0} fusion(%p1, %scale), kind=kLoop, calls=%fused_dequant
  %kvb = bf16[8,128]{1,0} fusion(%p0, %dequant), kind=kCustom, calls=%fused_kvb, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %linear_gemm = (bf16[8,128]{1,0}, s8[1024]{0}) custom-call(bf16[8,128]{1,0} %p0, bf16[128,128]{1,0} %dequant), custom_call_target="__cublas$gemm", metadata={op_name="jit(step_fn)/linear/dot_general"}
  %ids = s32[32]{0} constant({...})
  %sort = (s32[32]{0}, s32[32]{0}) custom-call(%ids, %ids), custom_call_target="__cub$DeviceRadixSort", metadata={op_name="jit(step_fn)/routed_experts/jit(argsort)/sort"}
  %rows = f8e4m3fn[32,128]{1,0} fusion(%xq, %ids), kind=kInput, calls=%fused_rows
  %expert_gemm = bf16[32,128]{1,0} custom-call(%rows, %p1), custom_call_target="mosaic_gpu_v2", backend_config="kernel(a, (b)) {x} \"op_name=\\\"jit(step_fn)/attend\\\"\"", metadata={op_name="jit(step_fn)/routed_experts/jit(grouped_gemm_fp8)/pallas_call"}
  %mla = bf16[8,128]{1,0} custom-call(%p0), custom_call_target="mosaic_gpu_v2", metadata={op_name="jit(step_fn)/attend/jit(mla_decode)/pallas_call"}
  %topk = (f32[8,2]{1,0}, s32[8,2]{1,0}) custom-call(%p0), custom_call_target="TopK", metadata={op_name="jit(step_fn)/router/top_k"}
  %f32 = f32[8,128]{1,0} convert(%p0), metadata={op_name="jit(step_fn)/attend/convert_element_type"}
  %softmax = bf16[8,128]{1,0} fusion(%f32), kind=kLoop, calls=%fused_softmax
  %mixed = bf16[8,128]{1,0} fusion(%p0), kind=kLoop, calls=%fused_mixed
  %replicate = f8e4m3fn[32,128]{1,0} fusion(%xq, %ids), kind=kLoop, calls=%fused_replicate
  %pages = bf16[8,128]{1,0} scatter(%p0, %ids, %p0), update_window_dims={1}, inserted_window_dims={0}, scatter_dims_to_operand_dims={0}, index_vector_dim=1, to_apply=%region_add, metadata={op_name="jit(step_fn)/kv_cache/scatter"}
  %norm = bf16[8,128]{1,0} fusion(%p0), kind=kLoop, calls=%fused_norm
  %w_head = bf16[128,64]{1,0} constant({...})
  %head = bf16[8,64]{1,0} fusion(%p0, %w_head), kind=kCustom, calls=%fused_head
  %init = (s32[], bf16[8,128]{1,0}) tuple(%ids, %p0)
  %loop = (s32[], bf16[8,128]{1,0}) while(%init), condition=%body, body=%body, metadata={op_name="jit(step_fn)/attend/while"}
  ROOT %out = bf16[8,128]{1,0} add(%norm, %softmax), metadata={op_name="jit(step_fn)/add"}
}
'''

EXPECTED = {
    "quant": "quantize", "dequant": "weight_dequant", "kvb": "attention_kv_b", "linear_gemm": "dense_gemm",
    "sort": "moe_glue", "rows": "moe_glue", "expert_gemm": "expert_gemm", "mla": "attention", "topk": "moe_glue",
    "f32": "attention", "softmax": "attention", "mixed": "attention", "pages": "cache", "norm": "other",
    "loop_softmax": "attention", "out": "other", "head": "dense_gemm", "replicate": "moe_glue",
}


def test_parse_hlo_features_and_categories():
    module, ops = ep.parse_hlo(HLO)
    assert module == "jit_step_fn"
    assert {name: ep.categorize(ops[name]) for name in EXPECTED} == EXPECTED
    assert ops["quant"].out_dtypes == {"f8e4m3fn", "f32"} and ops["quant"].in_dtypes == {"bf16"}
    assert ops["rows"].in_dtypes == {"f8e4m3fn", "s32"}  # the fusion's own parameters only
    assert ops["linear_gemm"].in_dtypes == {"bf16"} and ops["linear_gemm"].matmul
    assert ops["kvb"].matmul and not ops["sort"].matmul and ops["expert_gemm"].matmul
    # the op name of the instruction, not of its backend_config; a fusion's: its ops' longest common prefix
    assert ops["expert_gemm"].op_name == "jit(step_fn)/routed_experts/jit(grouped_gemm_fp8)/pallas_call"
    assert ops["mixed"].op_name == "jit(step_fn)/attend"
    # a GEMM fusion (a norm fused into the LM head's dot): the name of its matmul
    assert ops["head"].op_name == "jit(step_fn)/linear/dot_general"
    assert ops["quant"].op_name == "jit(step_fn)/linear/jit(grouped_gemm_fp8)"
    # a fusion whose ops share no known scope: its root's name (the MoE row replication, Finding 27)
    assert ops["replicate"].op_name == "jit(step_fn)/routed_experts/gather"
    with pytest.raises(ValueError, match="HloModule"):
        ep.parse_hlo("ENTRY %main { }")


def test_scope_category_takes_the_innermost_scope():
    assert ep.scope_category("jit(step_fn)/attend/kv_cache/gather", matmul=False) == "cache"
    assert ep.scope_category("jit(step_fn)/attend/kv_b/dot_general", matmul=True) == "attention_kv_b"
    assert ep.scope_category("jit(step_fn)/routed_experts/pallas_call", matmul=True) == "expert_gemm"
    assert ep.scope_category("jit(step_fn)/routed_experts/jit(argsort)/sort", matmul=False) == "moe_glue"
    assert ep.scope_category("jit(step_fn)/mul", matmul=False) == "other"


def _event(kernel, start_ns, dur_ns, **stats):
    return SimpleNamespace(name=kernel, start_ns=float(start_ns), duration_ns=float(dur_ns), stats=list(stats.items()))


def _plane(name, **lines):
    return SimpleNamespace(name=name, lines=[SimpleNamespace(name=n, events=evs) for n, evs in lines.items()])


def _other_program():
    """A second program named jit_step_fn whose fusion `quant` is no quantization but attention."""
    return HLO.replace("calls=%fused_quant", "calls=%fused_softmax").replace(
        "%quant = (f8e4m3fn[8,128]{1,0}, f32[8,1]{1,0}) fusion(%p0)", "%quant = bf16[8,128]{1,0} fusion(%p0)")


def test_breakdown_of_a_synthetic_gpu_profile():
    step = dict(hlo_module="jit_step_fn")
    stream7 = [
        # program 41 (called first): quant is a quantization; 17 (called second): attention
        _event("quant_kernel", 0, 1000, hlo_op="quant", program_id=41, **step),
        _event("cutlass_gemm", 1000, 4000, hlo_op="expert_gemm", program_id=41, **step),
        _event("quant_kernel", 10_000, 2000, hlo_op="quant", program_id=17, **step),
        # an instruction the HLO lacks: its own annotation decides, else it is unattributed
        _event("loop_fusion", 20_000, 500, hlo_op="fusion.99", program_id=41, prefix="jit(step_fn)",
               name="attend/exp", **step),
        _event("loop_fusion", 21_000, 1000, hlo_op="fusion.98", program_id=41, **step),
        _event("gather_kernel", 30_000, 300, hlo_op="gather.1", program_id=5, hlo_module="jit_gather"),
        _event("MemcpyH2D", 31_000, 200),
    ]
    stream8 = [_event("sm90_kernel", 2000, 5000, hlo_op="linear_gemm", program_id=41, **step)]  # overlaps
    planes = [
        _plane("/host:CPU", python=[_event("host_op", 0, 9e9, hlo_op="quant", hlo_module="jit_step_fn")]),
        _plane("/device:GPU:0", **{"Stream #7(Kernel,MemcpyH2D)": stream7, "Stream #8(Kernel)": stream8,
                                   "CUPTI overhead": [_event("overhead", 0, 9e9)]}),
    ]
    events = ep.op_events(planes)
    assert len(events) == 8 and all(e.on_gpu for e in events)
    _, first = ep.parse_hlo(HLO)
    _, second = ep.parse_hlo(_other_program())
    b = ep.breakdown(events, {"jit_step_fn": [first, second]}, steps=2, wall_s=0.0001)
    us = {k: v * 1e6 * 2 for k, v in b["gpu_s"].items()}  # totals over both steps, microseconds
    assert us == pytest.approx(dict(dict.fromkeys(ep.CATEGORIES, 0.0), quantize=1, expert_gemm=4, attention=2.5,
                                    dense_gemm=5, unattributed=1, other=0.5))
    assert b["gpu_busy_s"] * 2 == pytest.approx(7e-6 + 2e-6 + 0.5e-6 + 1e-6 + 0.3e-6 + 0.2e-6)
    assert b["wall_s"] == pytest.approx(5e-5) and b["dispatch_idle_s"] == pytest.approx(5e-5 - b["gpu_busy_s"])
    assert b["kernels_per_step"] == 4 and b["steps"] == 2
    assert sum(b["kernels_per_step_by_category"].values()) == 4
    assert set(b["kernels_per_step_by_category"]) == {c for c, v in us.items() if v}
    assert b["top_ops_by_category"]["dense_gemm"][0]["op"] == "linear_gemm"
    assert all(r["category"] == c for c, rows in b["top_ops_by_category"].items() for r in rows)
    assert {k: v * 1e6 * 2 for k, v in b["attributed_by_gpu_s"].items()} == pytest.approx(
        dict(hlo=12, annotation=0.5, none=1, other_programs=0.5))
    assert b["modules_gpu_s"]["jit_gather"] * 2 == pytest.approx(0.3e-6)
    assert b["top_ops"][0] == dict(category="dense_gemm", op_name="jit(step_fn)/linear/dot_general",
                                   op="linear_gemm", gpu_s=pytest.approx(2.5e-6))
    assert b["warnings"] == ["7% of the GPU time is unattributed"]
    # idle: 3 + 8 + 0.5 us between kernels of jit_step_fn, 8 (to the gather) + 0.7 (to the memcpy) between
    assert b["idle_inside_programs_s"] * 2 == pytest.approx(11.5e-6)
    assert b["idle_between_programs_s"] * 2 == pytest.approx(8.7e-6)
    assert b["idle_edges_s"] * 2 == pytest.approx(1e-4 - 2 * b["gpu_busy_s"] - 20.2e-6)
    assert [(g["after"], g["before"], g["count"]) for g in b["top_idle_gaps"]] == [
        ("quant", "fusion.99", 1), ("linear_gemm", "quant", 1), ("fusion.99", "fusion.98", 1)]
    assert b["top_idle_gaps"][0]["idle_s"] * 2 == pytest.approx(8e-6)
    table = ep.format_table({"decode 64x4096": ep.with_unprofiled(b, 1e-4)})
    assert "expert_gemm" in table and "dispatch/idle, unprofiled" in table and "weight_dequant" not in table
    assert "  unattributed" in table  # kernels per step by category
    # a module's programs whose count does not match the recorded ones: annotations only, and a warning
    b = ep.breakdown(events, {"jit_step_fn": [first]}, steps=2, wall_s=0.0001)
    assert b["gpu_s"]["attention"] * 2 == pytest.approx(0.5e-6) and any("matched" in w for w in b["warnings"])


def test_kernels_inside_a_command_buffer_are_found_by_their_fusion_names():
    """Inside a CUDA graph the events name the command buffer, not the instruction: a fusion's kernel is named after
    the fusion (dots as underscores) and is found that way; a custom call's kernel (cuBLAS) stays unattributed."""
    step = dict(hlo_module="jit_step_fn", program_id=41)
    events = ep.op_events([_plane("/device:GPU:0", **{"Stream #7(Kernel)": [
        _event("quant", 0, 1000, hlo_op="command_buffer_3", **step),
        _event("loop_softmax", 1000, 2000, hlo_op="command_buffer_3", **step),
        _event("sm90_xmma_gemm_bf16", 3000, 4000, hlo_op="command_buffer_3", **step)]})])
    _, ops = ep.parse_hlo(HLO)
    b = ep.breakdown(events, {"jit_step_fn": [ops]}, steps=1, wall_s=1e-5)
    us = {k: v * 1e6 for k, v in b["gpu_s"].items() if v}
    assert us == pytest.approx(dict(quantize=1, attention=2, unattributed=4))


def test_no_kernel_events_fails_loudly():
    planes = [_plane("/device:GPU:0", **{"CUPTI overhead": [_event("overhead", 0, 10)]}), _plane("/host:CPU")]
    with pytest.raises(RuntimeError, match="no kernel events.*CUPTI overhead"):
        ep.op_events(planes)
    with pytest.raises(RuntimeError, match="no event names an HLO op"):
        ep.op_events([_plane("/host:CPU", python=[_event("PjitFunction(f)", 0, 10)])])


@pytest.fixture(scope="module")
def model():
    """A dense and a MoE layer, FP8 linears and experts (dequantized on CPU: the jnp and "dequantize" paths)."""
    cfg = dataclasses.replace(TINY, num_layers=2, num_mtp_layers=0, weight_block_size=(16, 16))
    return init_model(cfg, seed=0)


def test_profile_decode_on_cpu(model):
    runner = ModelRunner(model, 4, 32, buckets=Buckets((4,), (16,)))
    items = [DecodeItem(request_id=f"d{i}", slot=i, token=i + 1, position=31) for i in range(4)]
    call = functools.partial(runner.decode, items)
    jax.block_until_ready(call())
    b = ep.profile_steps(runner, call, calls=2)
    assert b["programs"] == {"jit_step_fn": 1} and b["warnings"] == [] and b["steps"] == 2
    gpu = b["gpu_s"]
    for category in ("attention", "attention_kv_b", "expert_gemm", "dense_gemm", "weight_dequant", "cache",
                     "moe_glue", "other"):
        assert gpu[category] > 0, category
    assert gpu["unattributed"] == gpu["quantize"] == 0  # activations are quantized on the Pallas paths only
    assert b["attributed_by_gpu_s"]["annotation"] == b["attributed_by_gpu_s"]["none"] == 0
    assert 0 < b["gpu_busy_s"] <= sum(gpu.values()) + 1e-9 and 0 < b["gpu_busy_s"] < b["wall_s"]
    assert b["modules_gpu_s"]["jit_step_fn"] == max(b["modules_gpu_s"].values())
    np.testing.assert_allclose(np.asarray(call()), np.asarray(call()))  # the runner's programs are restored
    assert type(runner._programs[(runner.executor, True)]).__name__ != "_Recorder"


def test_profile_prefill_matches_two_programs_of_one_name(model):
    """Two chunk rounds at two block-table widths: two compiled programs named jit_step_fn, told apart by the
    order in which their program ids appear."""
    runner = ModelRunner(model, 2, 128, buckets=Buckets((2,), (64,)))
    chunks = [PrefillChunk(request_id=f"p{i}", slot=i, start=0, tokens=np.arange(128, dtype=np.int32) % 200,
                           is_last=True) for i in range(2)]
    call = functools.partial(runner.prefill, chunks)
    jax.block_until_ready(call())
    b = ep.profile_steps(runner, call, calls=1, steps_per_call=2)
    assert b["programs"] == {"jit_step_fn": 2} and b["warnings"] == [] and b["steps"] == 2
    assert b["gpu_s"]["unattributed"] == 0 and b["gpu_s"]["attention"] > 0 and b["gpu_s"]["expert_gemm"] > 0
