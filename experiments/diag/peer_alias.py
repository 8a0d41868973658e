"""Diagnosis: can an independent single-GPU program read a peer GPU's buffer directly (UVA), with no SPMD
launch and no barrier? A jax array on GPU 0 that *aliases* memory on GPU 1 (CuPy pointer wrapped as a DLPack
tensor claiming device 0, peer access enabled) fed to (1) an XLA gather and (2) the Pallas remote-DMA kernel
in its local mode. Checks bit-exactness against the source and times both with CUPTI.
python experiments/diag/peer_alias.py   (2+ GPUs)
"""
import cupy as cp
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.mosaic.gpu import profiler

from pallas_kernels import remote_dma as rd

d0, d1 = jax.devices()[:2]
e, r, c = 16, 2048, 7168
with jax.default_device(d1):
    src = jax.random.normal(jax.random.key(0), (e, r, c), jnp.bfloat16)  # lives on GPU 1
src.block_until_ready()
with cp.cuda.Device(0):
    try:
        cp.cuda.runtime.deviceEnablePeerAccess(1)
    except cp.cuda.runtime.CUDARuntimeError as err:
        print("peer access:", err)
ptr = src.unsafe_buffer_pointer()
mem = cp.cuda.UnownedMemory(ptr, src.nbytes, src, device_id=0)  # a GPU-1 address, claimed for device 0
alias_u16 = cp.ndarray((e, r, c), cp.uint16, cp.cuda.MemoryPointer(mem, 0))
view_u16 = jax.dlpack.from_dlpack(alias_u16)
print("alias device:", view_u16.devices(), "pointer equal:", view_u16.unsafe_buffer_pointer() == ptr)
ids = jnp.arange(12, dtype=jnp.int32, device=d0)
want = np.asarray(jax.device_get(src[jnp.arange(12)].view(jnp.uint16)))

gather = jax.jit(lambda v, i: v[i])
pallas = {m: jax.jit(lambda v, i, m=m: rd.fetch_experts(jax.lax.bitcast_convert_type(v, jnp.bfloat16), i,
                                                        config=rd.RemoteDmaConfig(num_sms=n, method=m)))
          for m, n in (("tma_pull", 16), ("ld_pull", 132))}
nbytes = 12 * r * c * 2
for name, f in [("xla gather", gather)] + [(f"pallas {m}", p) for m, p in pallas.items()]:
    out = f(view_u16, ids)
    got = np.asarray(jax.device_get(out)).view(np.uint16) if out.dtype != jnp.uint16 else np.asarray(out)
    exact = np.array_equal(got, want)
    _, timings = profiler.measure(f, aggregate=False, iterations=5)(view_u16, ids)
    ms = sorted(sum(t for _, t in call) for call in timings)[2]
    print(f"{name:18s} exact={exact} out on {out.devices()} {ms:.3f} ms = {nbytes / ms / 1e6:.0f} GB/s"
          f" kernels: {[n[:40] for n, _ in timings[-1]]}", flush=True)
