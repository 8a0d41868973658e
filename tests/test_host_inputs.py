"""dwdp_jax/host_inputs.py: a step's integer host inputs packed into one int32 vector and sliced back."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwdp_jax import host_inputs
from dwdp_jax.paged_attention import PagedAttention


def test_pack_unpack_round_trip_keeps_device_leaves_apart_and_aligns_every_slice():
    rng = np.random.default_rng(0)
    ids_on_device = jnp.asarray(rng.integers(0, 1000, (3, 1)), jnp.int32)
    positions = np.broadcast_to(np.arange(5, dtype=np.int64), (3, 5))  # a non-contiguous int64 view
    meta = PagedAttention(8, "einsum").layer(None, rng.integers(0, 50, (3, 7)).astype(np.int32),
                                             np.array([5, 70, 0], np.int32), np.array([1, 1, 0], np.int32))
    tree = (ids_on_device, positions, meta, None, np.array([4, 0, 2], np.int32))
    packed, apart, layout = host_inputs.pack(tree)
    assert packed.dtype == np.int32 and len(apart) == 1 and apart[0] is ids_on_device
    offsets = [slot[1] for slot in layout.leaves if slot[0] == "host"]
    assert len(offsets) == 5 and all(o % host_inputs.ALIGN == 0 for o in offsets)
    hash(layout)  # a static jit argument

    out = jax.jit(host_inputs.unpack, static_argnums=2)(jnp.asarray(packed), apart, layout)
    ids, pos, m, none, last = out
    assert none is None and isinstance(m, type(meta)) and m.latent_width == 8 and m.pages is None
    np.testing.assert_array_equal(ids, ids_on_device)
    np.testing.assert_array_equal(pos, positions)
    assert pos.dtype == jnp.int32
    for name in ("block_table", "lengths", "q_lens"):
        np.testing.assert_array_equal(getattr(m, name), getattr(meta, name))
    np.testing.assert_array_equal(last, [4, 0, 2])


def test_pack_refuses_values_beyond_int32_and_takes_trees_without_host_leaves():
    with pytest.raises(ValueError, match="int32"):
        host_inputs.pack((np.array([2 ** 40]),))
    packed, apart, layout = host_inputs.pack((jnp.ones(3), None))
    assert packed.shape == (1,) and len(apart) == 1
    assert host_inputs.unpack(jnp.asarray(packed), apart, layout)[1] is None
