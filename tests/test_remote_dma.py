"""Remote expert DMA: local path in GPU interpret mode on CPU (natively on a GPU), remote path on >= 2 GPUs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _compat
from pallas_kernels import remote_dma as rd

ON_GPU = _compat.on_gpu()
P = jax.sharding.PartitionSpec

CASES = [
    # (name, shape [E, R, C], dtype, ids, config)
    ("bf16_dup_and_clamped_ids", (5, 64, 512), jnp.bfloat16, [3, 0, 4, 3, 9],
     rd.RemoteDmaConfig(num_sms=3, block_rows=32, max_in_flight=2)),
    ("fp8_more_sms_than_tiles", (3, 128, 256), jnp.float8_e4m3fn, [2, 1],
     rd.RemoteDmaConfig(num_sms=8, block_rows=128, max_in_flight=4)),
    ("f32_scales_rows_not_pow2", (4, 56, 32), jnp.float32, [1, 3, 0],
     rd.RemoteDmaConfig(num_sms=2, max_in_flight=3)),
    # ld_pull: register copies of flat tiles; 2 tiles per expert for 5 x 32 KiB over 3 CTAs
    ("ld_bf16_dup_and_clamped_ids", (5, 64, 512), jnp.bfloat16, [3, 0, 4, 3, 9],
     rd.RemoteDmaConfig(num_sms=3, method="ld_pull", tile_bytes=32768)),
    ("ld_fp8_more_ctas_than_tiles", (3, 128, 256), jnp.float8_e4m3fn, [2, 1],
     rd.RemoteDmaConfig(num_sms=8, method="ld_pull", tile_bytes=16384)),
    # 1792 f32 per expert: no 16-byte-vector tile divides it, 8-byte vectors (256-element tiles) do
    ("ld_f32_small_expert", (4, 56, 32), jnp.float32, [1, 3, 0],
     rd.RemoteDmaConfig(num_sms=2, method="ld_pull", tile_bytes=4096)),
]


def poison_device_memory(shape, dtype):
  """Best effort on the GPU: leave a freed buffer of a sentinel value (1234, not a value the random sources
  hold) where the kernel's output is likely to be allocated, so unwritten rows cannot pass by chance."""
  if ON_GPU:
    jnp.full(shape, 1234, dtype).block_until_ready()


def random_buffer(key, shape, dtype):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)  # never zeros


@pytest.mark.parametrize("name,shape,dtype,ids,cfg", CASES, ids=[c[0] for c in CASES])
def test_fetch_local(name, shape, dtype, ids, cfg):
  src = random_buffer(jax.random.key(len(name)), shape, dtype)
  ids = jnp.asarray(ids, jnp.int32)
  poison_device_memory((ids.shape[0], *shape[1:]), dtype)
  out = rd.fetch_experts(src, ids, config=cfg, interpret=not ON_GPU)
  assert out.shape == (ids.shape[0], *shape[1:]) and out.dtype == dtype
  np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)),
                                np.asarray(rd.reference(src, ids).astype(jnp.float32)))


def test_flat_tile_choice():
  cfg = rd.RemoteDmaConfig(method="ld_pull", tile_bytes=16384)
  assert rd._flat_tile(2048 * 7168, 2, cfg) == (8192, 8)  # R1 down expert, bf16: 16 KiB, 16 B vectors
  assert rd._flat_tile(56 * 32, 4, cfg) == (256, 2)
  with pytest.raises(ValueError, match="warpgroup tiles"):
    rd._flat_tile(100, 2, cfg)
  with pytest.raises(ValueError, match="method"):
    rd.RemoteDmaConfig(method="nvshmem")


def test_rejects_bad_inputs():
  src = jnp.ones((2, 64, 100), jnp.bfloat16)  # 100 columns: no 16-byte tiles
  with pytest.raises(ValueError):
    rd.fetch_experts(src, jnp.zeros((1,), jnp.int32), interpret=True)
  with pytest.raises(ValueError, match="interpret"):
    rd.fetch_experts(jnp.ones((2, 64, 256), jnp.bfloat16), jnp.zeros((1,), jnp.int32),
                     peer_offset=1, axis_name="x", interpret=True)


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs >= 2 devices for the mesh")
@pytest.mark.parametrize("method", rd.METHODS)
def test_remote_path_lowers_for_gpu(method):
  """The remote path cannot run in interpret mode; check at least that it lowers to Mosaic GPU."""
  if ON_GPU:
    pytest.skip("covered by test_ring_fetch_multigpu")
  mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2])
  src = jax.device_put(jnp.zeros((8, 64, 512), jnp.bfloat16), jax.sharding.NamedSharding(mesh, P("x")))
  f = jax.jit(jax.shard_map(
      lambda s, i: rd.fetch_experts(s, i, peer_offset=1, axis_name="x",
                                    config=rd.RemoteDmaConfig(method=method))[None],
      mesh=mesh, in_specs=(P("x"), P()), out_specs=P("x"), check_vma=False))
  text = f.trace(src, jnp.array([1, 3], jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


@pytest.mark.multigpu
@pytest.mark.skipif(sum(d.platform == "gpu" for d in jax.devices()) < 2, reason="needs >= 2 GPUs")
def test_ring_fetch_multigpu():
  devs = jax.devices()
  n = len(devs)
  mesh = jax.make_mesh((n,), ("x",), devices=devs)
  src = jax.device_put(random_buffer(jax.random.key(0), (4 * n, 128, 1024), jnp.bfloat16),
                       jax.sharding.NamedSharding(mesh, P("x")))
  ids = jnp.array([3, 0, 2, 2, 1], jnp.int32)
  for cfg in (rd.RemoteDmaConfig(), rd.RemoteDmaConfig(num_sms=4, max_in_flight=2),
              rd.RemoteDmaConfig(method="tma_push"), rd.RemoteDmaConfig(num_sms=4, method="tma_push"),
              rd.RemoteDmaConfig(method="ld_pull"), rd.RemoteDmaConfig(num_sms=160, method="ld_pull")):
    for d in devs:
      with jax.default_device(d):
        poison_device_memory((ids.shape[0], 128, 1024), jnp.bfloat16)
    got = rd.ring_fetch(src, ids, mesh, cfg)
    shards = sorted(src.addressable_shards, key=lambda s: s.device.id)
    for d, shard in enumerate(sorted(got.addressable_shards, key=lambda s: s.device.id)):
      want = rd.reference(shards[(d + 1) % n].data, ids)
      np.testing.assert_array_equal(np.asarray(shard.data[0].astype(jnp.float32)),
                                    np.asarray(want.astype(jnp.float32)))


def test_gather_header():
  hdr = rd.gather_header([4, 9, 0], first=2, capacity=5, num_src=6)
  np.testing.assert_array_equal(hdr, [3, 2, 4, 5, 0, 0, 0])  # id 9 clamped to 5
  with pytest.raises(ValueError, match="capacity"):
    rd.gather_header(range(6), first=0, capacity=5, num_src=6)


@pytest.mark.parametrize("cfg", [rd.RemoteDmaConfig(num_sms=3, block_rows=32, max_in_flight=2),
                                 rd.RemoteDmaConfig(num_sms=2, method="ld_pull", tile_bytes=8192)],
                         ids=["tma_pull", "ld_pull"])
def test_gather_kernel_reads_count_and_position_from_the_header(cfg):
  """One compiled kernel for any expert list and staging position (what a side-stream launch reuses): two
  headers through the same jitted call, each writing exactly its rows."""
  e, r, c, out_e = 6, 64, 256, 8
  src = random_buffer(jax.random.key(7), (e, r, c), jnp.bfloat16)
  call, operand_shape, out_shape = rd.gather_kernel((e, r, c), jnp.bfloat16, out_e, config=cfg, interpret=not ON_GPU)
  f = jax.jit(lambda hdr, s: call(hdr, s.reshape(operand_shape)).reshape(out_e, r, c))
  for ids, first in (([5, 1, 1], 4), ([0, 3, 2, 4, 5], 0)):
    out = np.asarray(f(jnp.asarray(rd.gather_header(ids, first, out_e, e)), src).astype(jnp.float32))
    np.testing.assert_array_equal(out[first:first + len(ids)], np.asarray(src.astype(jnp.float32))[ids])
  assert out_shape[0] == out_e and f._cache_size() == 1
