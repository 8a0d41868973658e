"""A step's host-made integer inputs in one host-to-device transfer.

Every `jax.device_put` of a numpy array is a copy the host issues and orders (~0.1-0.2 ms of host time each on
an H100: a DWDP rank's six step inputs took ~1 ms of its decode step, `bench_dwdp_dispatch`). `pack` gathers the
integer numpy leaves of any pytree into one int32 vector, each leaf from an offset that is a multiple of
`ALIGN` elements (256 bytes: XLA hands a contiguous slice of an input to a kernel as a view, and a Mosaic GPU
kernel refuses an input that is not 256-byte aligned); leaves that are already device arrays (e.g. token ids
fed from the previous step's samples) stay apart. `unpack`, inside the step's first program, slices the vector
back into the pytree.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

ALIGN = 64  # int32 elements: 256 bytes


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where `pack` put each leaf: treedef of the packed pytree; per leaf, ("host", offset, shape) for a slice of
    the vector or ("device", index) for the index-th array passed apart. Hashable: a static jit argument."""

    treedef: jax.tree_util.PyTreeDef
    leaves: tuple


def _packable(leaf) -> bool:
    return isinstance(leaf, np.ndarray) and np.issubdtype(leaf.dtype, np.integer)


def pack(tree) -> tuple[np.ndarray, list, Layout]:
    """(int32 vector holding every integer numpy leaf, [the other leaves in order], Layout). Integer values must
    fit int32. A tree without numpy leaves gives an empty vector (one element, for a valid buffer)."""
    leaves, treedef = jax.tree.flatten(tree)
    slots, apart, offset = [], [], 0
    for leaf in leaves:
        if _packable(leaf):
            slots.append(("host", offset, leaf.shape))
            offset += -(-leaf.size // ALIGN) * ALIGN
        else:
            slots.append(("device", len(apart)))
            apart.append(leaf)
    vector = np.zeros((max(offset, 1),), np.int32)
    for leaf, slot in zip(leaves, slots):
        if slot[0] == "host":
            wide = not np.can_cast(leaf.dtype, np.int32)  # int32 and narrower leaves fit: no scan on the hot path
            if wide and leaf.size and (leaf.min() < np.iinfo(np.int32).min or leaf.max() > np.iinfo(np.int32).max):
                raise ValueError(f"a packed input leaf of shape {leaf.shape} does not fit int32")
            vector[slot[1]:slot[1] + leaf.size] = leaf.ravel()
    return vector, apart, Layout(treedef, tuple(slots))


def unpack(vector, apart, layout: Layout):
    """The pytree `pack` took apart (traceable: call it inside the program that receives the vector). Packed
    leaves come back as int32."""
    leaves = []
    for slot in layout.leaves:
        if slot[0] == "host":
            _, offset, shape = slot
            leaves.append(vector[offset:offset + int(np.prod(shape, dtype=np.int64))].reshape(shape))
        else:
            leaves.append(apart[slot[1]])
    return jax.tree.unflatten(layout.treedef, leaves)
