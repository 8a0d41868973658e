"""Diagnosis: the Pallas remote-DMA kernel plateaus at ~205-220 GB/s per GPU for every method (TMA pull,
TMA push, register loads) and every SM count, while cudaMemcpyPeerAsync gets ~383. Is the plateau the
kernel, or something else the timed program runs (its compiled HLO has a `copy`)? Per-kernel CUPTI
times of one ring_fetch call, and the HLO ops around the copy.
python experiments/diag/remote_dma_profile.py   (2+ GPUs)
"""
import re

import jax
import jax.numpy as jnp
from jax.experimental.mosaic.gpu import profiler

from pallas_kernels import remote_dma as rd

devs = jax.devices()
n = len(devs)
mesh = jax.make_mesh((n,), ("x",), devices=devs)
P = jax.sharding.PartitionSpec
experts_per_dev, k, nn = 16, 2048, 7168
src = jax.device_put(jax.random.normal(jax.random.key(0), (n * experts_per_dev, k, nn), jnp.bfloat16),
                     jax.sharding.NamedSharding(mesh, P("x")))
ids = jnp.arange(0, 12, dtype=jnp.int32) % experts_per_dev
nbytes = ids.shape[0] * k * nn * 2
src_bytes = experts_per_dev * k * nn * 2
print(f"fetch {nbytes / 1e6:.0f} MB per GPU; source shard {src_bytes / 1e6:.0f} MB")

configs = [rd.RemoteDmaConfig(num_sms=66, max_in_flight=2), rd.RemoteDmaConfig(num_sms=16, max_in_flight=4),
           rd.RemoteDmaConfig(num_sms=132, max_in_flight=4, method="tma_push"),
           rd.RemoteDmaConfig(num_sms=8, max_in_flight=4, method="tma_push"),
           rd.RemoteDmaConfig(num_sms=132, method="ld_pull", tile_bytes=32768)]
for i, cfg in enumerate(configs):
    fn = rd._ring_fetch_fn(mesh, cfg)
    if i == 0:
        text = fn.lower(src, ids).compile().as_text()
        for line in text.splitlines():
            if re.search(r"\b(copy|custom-call)(-start|-done)?\(", line):
                print("HLO:", line.strip()[:300])
    _, timings = profiler.measure(fn, aggregate=False, iterations=3)(src, ids)
    print(f"{cfg.method} num_sms={cfg.num_sms} in_flight={cfg.max_in_flight} tile={cfg.tile_bytes}")
    for it in timings:
        print("   ", "; ".join(f"{name[:60]} {ms:.3f} ms" for name, ms in it))
    kern = [ms for name, ms in timings[-1] if "mosaic" in name.lower() or "fetch" in name.lower()
            or "body" in name.lower()]
    for ms in kern:
        print(f"    kernel-only: {ms:.3f} ms -> {nbytes / ms / 1e6:.1f} GB/s")
