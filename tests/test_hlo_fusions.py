"""experiments/diag/hlo_fusions.py: a named fusion's call site and fused body, read from an XLA dump's text."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HLO = """HloModule jit_step_fn, entry_computation_layout={()->f8e4m3fn[4,8]{1,0}}

%fused_gather (param_0: f8e4m3fn[2,8], param_1: s32[4]) -> f8e4m3fn[4,8] {
  %param_0 = f8e4m3fn[2,8]{1,0} parameter(0)
  %param_1 = s32[4]{0} parameter(1)
  %bitcast = s32[4,1]{1,0} bitcast(%param_1)
  ROOT %gather.1 = f8e4m3fn[4,8]{1,0} gather(%param_0, %bitcast), offset_dims={1}, collapsed_slice_dims={0}, start_index_map={0}, index_vector_dim=1, slice_sizes={1,8}
}

%fused_add (param_0.1: bf16[4,8]) -> bf16[4,8] {
  %param_0.1 = bf16[4,8]{1,0} parameter(0)
  ROOT %add.1 = bf16[4,8]{1,0} add(%param_0.1, %param_0.1)
}

ENTRY %main (p0: f8e4m3fn[2,8], p1: s32[4], p2: bf16[4,8]) -> f8e4m3fn[4,8] {
  %p0 = f8e4m3fn[2,8]{1,0} parameter(0)
  %p1 = s32[4]{0} parameter(1)
  %p2 = bf16[4,8]{1,0} parameter(2)
  %loop_add_fusion = bf16[4,8]{1,0} fusion(%p2), kind=kLoop, calls=%fused_add
  ROOT %loop_gather_fusion.3 = f8e4m3fn[4,8]{1,0} fusion(%p0, %p1), kind=kLoop, calls=%fused_gather
}
"""


def _module():
    spec = importlib.util.spec_from_file_location("hlo_fusions", os.path.join(ROOT, "experiments", "diag",
                                                                               "hlo_fusions.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_named_fusions_with_their_bodies(tmp_path):
    hf = _module()
    path = tmp_path / "module_0001.jit_step_fn.sm_9.0_gpu_after_optimizations.txt"
    path.write_text(HLO)
    comps = hf.parse_computations(HLO)
    assert set(comps) == {"fused_gather", "fused_add", "main"}
    (site,) = hf.fusion_sites(comps, "loop_gather_fusion.*")
    assert site[0] == "loop_gather_fusion.3" and site[2] == "fused_gather"
    text = hf.describe(str(path), ["loop_gather_fusion.*"], max_body_lines=2)
    assert "### loop_gather_fusion.3" in text and "%param_0 = f8e4m3fn[2,8]" in text
    assert "... 2 more lines" in text and "loop_add_fusion" not in text
