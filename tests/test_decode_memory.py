"""experiments/diag/buffer_assignment.py (read by decode_memory.py): the largest buffers of an XLA buffer
assignment, by HLO value."""

from experiments.diag.buffer_assignment import large_buffers

ASSIGNMENT = """BufferAssignment:
allocation 0: size 4831838208, parameter 3, shape |bf16[65537,64,576]| at ShapeIndex {}, maybe-live-out:
 value: <1994 pages_2_.1 @0> (size=4831838208,offset=0): bf16[65537,64,576]{2,1,0}
 value: <2014 convert_bitcast_fusion.9 @0> (size=512,offset=0): bf16[4,64]{1,0}
allocation 1: size 4831838208, output shape is |bf16[65537,64,576]|, maybe-live-out:
 value: <2100 scatter.7 @0> (size=4831838208,offset=0): bf16[65537,64,576]{2,1,0}
allocation 2: size 5000000000, preallocated-temp:
 value: <2200 gather_fusion.3 @0> (size=4831838208,offset=0): bf16[256,16384,576]{2,1,0}
 value: <2201 add.1 @0> (size=1024,offset=4831838208): f32[256]{0}
"""


def test_large_buffers_by_value_and_allocation_kind():
    rows = large_buffers(ASSIGNMENT, 2**30)
    assert [(r["value"], r["allocation_kind"]) for r in rows] == [
        ("pages_2_.1", "parameter 3"), ("scatter.7", "output"), ("gather_fusion.3", "preallocated-temp")]
    assert rows[2]["shape"] == "bf16[256,16384,576]{2,1,0}" and rows[2]["allocation_bytes"] == 5000000000
    assert all(r["bytes"] == 4831838208 for r in rows)
    assert len(large_buffers(ASSIGNMENT, 512)) == 5  # the small values too, at a lower threshold
