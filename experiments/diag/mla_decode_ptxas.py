"""Compiles the MLA decode kernel at R1 shapes (one query a row) in each given variant (plain: the engine's
clustered kernel; unclustered) and runs it once:
for ptxas's register and spill report (under MOSAIC_GPU_DUMP_PTXAS=1; its lines go to stderr), or as the target
of an ncu profile (one launch per variant, no split combine at B=64). GPU only.

  MOSAIC_GPU_DUMP_PTXAS=1 python3 experiments/diag/mla_decode_ptxas.py --variants=plain,unclustered 2>&1 \
    | grep -E "variant|registers|spill"
  ncu --kernel-name regex:mosaic --metrics launch__registers_per_thread,... \
    python3 experiments/diag/mla_decode_ptxas.py --variants=plain,unclustered --batch=64 --pages=64
"""

import sys

import jax
import jax.numpy as jnp
from absl import app, flags

from pallas_kernels import mla_decode as md

VARIANTS = {
    "plain": md.DecodeConfig(cluster=True),
    "unclustered": md.DecodeConfig(),
}
_VARIANTS = flags.DEFINE_list("variants", ["plain"], f"variants to compile: {sorted(VARIANTS)}")
_BATCH = flags.DEFINE_integer("batch", 8, "requests")
_PAGES = flags.DEFINE_integer("pages", 4, "pages (64 tokens) a request")


def main(_):
  b, pages_each, d = _BATCH.value, _PAGES.value, 576
  k1, k2 = jax.random.split(jax.random.key(0))
  q = jax.random.normal(k1, (b, 1, 128, d), jnp.bfloat16)
  pages = jax.random.normal(k2, (b * pages_each, md.PAGE_SIZE, d), jnp.bfloat16)
  table = jnp.arange(b * pages_each, dtype=jnp.int32).reshape(b, pages_each)
  lens = jnp.full((b,), pages_each * md.PAGE_SIZE - 5, jnp.int32)
  for name in _VARIANTS.value:
    print(f"== variant {name}", file=sys.stderr, flush=True)
    out, _ = md.mla_decode(q, pages, table, lens, kv_lora_rank=512, softmax_scale=0.1, config=VARIANTS[name])
    out.block_until_ready()


if __name__ == "__main__":
  app.run(main)
