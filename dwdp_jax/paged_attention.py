"""MLA over a paged latent cache: the cache write and the attention of one step, behind one small type.

`PagedKV` is what a layer's attention receives instead of whole cache rows: that layer's pages and the step's
view of them (block table, lengths). The model calls `kv.write(...)` and `kv.attend(...)`; the layout and the
kernels stay here. Two backends compute the same function:
  * "einsum": gathers each row's pages and runs the model's own einsum forms (`MLA._attend_expanded` /
    `_attend_absorbed`): the reference, and the CPU path;
  * "pallas": `pallas_kernels.mla_decode` on the pages in place (absorbed form: queries projected through
    W_uk, output through W_uv), and `pallas_kernels.mla_prefill` on the keys up-projected through kv_b
    (expanded form). `interpret=True` runs the kernels in Mosaic GPU interpret mode (CPU tests).

A step's rows are left-aligned: row b's q_lens[b] new tokens are its first columns, at positions
lengths[b] - q_lens[b] + [0, q_lens[b]); columns past q_lens are padding (written to the scratch page,
outputs unspecified). A padding row has q_lens = lengths = 0.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import mla_decode, mla_prefill

BACKENDS = ("einsum", "pallas")


def default_backend(dtype) -> str:
    """"pallas" on a GPU for a bf16 cache (the kernels' dtype), else "einsum"."""
    on_gpu = jax.devices()[0].platform == "gpu"
    return "pallas" if on_gpu and jnp.dtype(dtype) == jnp.bfloat16 else "einsum"


@dataclasses.dataclass(frozen=True)
class PagedAttention:
    """How a runner's layers attend over their pages: the stored latent width and the backend (static).
    decode_cluster: the Pallas decode kernel's clustered form for one query per row
    (`mla_decode.DecodeConfig.cluster`: a work unit's row tiles as one CTA cluster, each page multicast). Measured on an H100 (WORKSPACE Finding 26):
    the engine's B=128 decode step at 4K 0.838 -> 0.884 of HBM step ahead, the kernel at B=128 0.54 -> 0.84;
    with two queries per row (MTP) the clustered kernel was slower (0.43 -> 0.31), so those stay unclustered."""

    latent_width: int
    backend: str = "einsum"
    interpret: bool = False
    decode_cluster: bool = True

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {self.backend!r}")

    def layer(self, pages, block_table, lengths, q_lens) -> PagedKV:
        return PagedKV(pages, block_table, lengths, q_lens, self.latent_width, self.backend, self.interpret,
                       self.decode_cluster)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKV:
    """One layer's pages and this step's view of them.

    pages: [num_pages + 1, page_size, latent_width + rope_width] (the last page is the scratch page);
    block_table: [b, max_pages] int32, row b's pages in order (scratch past its own);
    lengths: [b] int32, tokens cached for row b after this step; q_lens: [b] int32, its new tokens.
    """

    pages: jax.Array
    block_table: jax.Array
    lengths: jax.Array
    q_lens: jax.Array
    latent_width: int = dataclasses.field(metadata=dict(static=True), default=0)
    backend: str = dataclasses.field(metadata=dict(static=True), default="einsum")
    interpret: bool = dataclasses.field(metadata=dict(static=True), default=False)
    decode_cluster: bool = dataclasses.field(metadata=dict(static=True), default=True)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {self.backend!r}")

    @property
    def page_size(self) -> int:
        return self.pages.shape[1]

    def with_pages(self, pages) -> PagedKV:
        return dataclasses.replace(self, pages=pages)

    def write(self, latent_bsc, k_pe_bsr, positions_bs) -> PagedKV:
        """Writes the step's new rows (latent [b, s, kv_lora_rank], rotated k_pe [b, s, rope_dim]) at their
        positions; padding columns go to the scratch page. In place when the caller donates the pages."""
        b, s = positions_bs.shape
        lw = self.latent_width
        rw = self.pages.shape[-1] - lw
        pad = lambda x, w: jnp.pad(x, [(0, 0), (0, 0), (0, w - x.shape[-1])])
        rows = jnp.concatenate([pad(latent_bsc, lw), pad(k_pe_bsr, rw)], -1).astype(self.pages.dtype)
        real = jnp.arange(s)[None, :] < self.q_lens[:, None]
        pos = jnp.where(real, positions_bs, 0)
        page = jnp.take_along_axis(self.block_table, pos // self.page_size, axis=1)
        page = jnp.where(real, page, self.pages.shape[0] - 1)
        with jax.named_scope("kv_cache"):  # the profile's categories (experiments/engine_profile.py)
            return self.with_pages(self.pages.at[page, pos % self.page_size].set(rows))

    def gather_rows(self):
        """Every row's cached tokens in order: [b, max_pages * page_size, width] (the einsum path's view)."""
        b = self.block_table.shape[0]
        with jax.named_scope("kv_cache"):
            return self.pages[self.block_table].reshape(b, -1, self.pages.shape[-1])

    def attend(self, mla, q_nope, q_pe, positions_bs, absorbed: bool, q_projected):
        """Attention of the step's queries (q_nope [b, s, h, nope], rotated q_pe [b, s, h, rope]) over the
        cache, which must already hold the step's own rows (`write`). q_projected: the query projection's output
        [b, s, h, nope + rope] whose first columns are q_nope: the prefill kernel reads q_nope there and q_pe
        apart, with no concatenated copy of the queries. Returns [b, s, h, v_head_dim]."""
        if self.backend == "einsum":
            return self._attend_einsum(mla, q_nope, q_pe, positions_bs, absorbed)
        if absorbed:
            return self._attend_decode_kernel(mla, q_nope, q_pe)
        return self._attend_prefill_kernel(mla, q_pe, q_projected)

    # -- backends -------------------------------------------------------------------------------------------

    def _split(self, rows, cfg):
        lw = self.latent_width
        return rows[..., : cfg.kv_lora_rank], rows[..., lw: lw + cfg.qk_rope_head_dim]

    def _attend_einsum(self, mla, q_nope, q_pe, positions_bs, absorbed):
        cfg = mla.cfg
        latent, k_pe = self._split(self.gather_rows(), cfg)
        s = positions_bs.shape[1]
        key = jnp.arange(latent.shape[1])[None, None, :]
        real = (jnp.arange(s)[None, :] < self.q_lens[:, None])[:, :, None]
        mask = (key <= positions_bs[:, :, None]) & (key < self.lengths[:, None, None])
        mask = jnp.where(real, mask, key == 0)  # padding queries see one key (no NaN); their output is dropped
        attend = mla._attend_absorbed if absorbed else mla._attend_expanded
        return attend(q_nope, q_pe, latent, k_pe, mask)

    def _attend_decode_kernel(self, mla, q_nope, q_pe):
        cfg = mla.cfg
        dt = q_nope.dtype
        with jax.named_scope("kv_b"):
            w = mla._kv_b(dt)  # [kv_lora, heads, nope + v]
            w_k, w_v = w[..., : cfg.qk_nope_head_dim], w[..., cfg.qk_nope_head_dim:]
            q_lat = jnp.einsum("bqhn,chn->bqhc", q_nope, w_k, preferred_element_type=jnp.float32)
        lw, rw = self.latent_width, self.pages.shape[-1] - self.latent_width
        pad = lambda x, width: jnp.pad(x, [(0, 0)] * 3 + [(0, width - x.shape[-1])])
        q = jnp.concatenate([pad(q_lat, lw), pad(q_pe.astype(jnp.float32), rw)], -1).astype(self.pages.dtype)
        cluster = self.decode_cluster and q.shape[1] == 1  # two MTP queries measured slower clustered
        out_lat, _ = mla_decode.mla_decode(q, self.pages, self.block_table, self.lengths, kv_lora_rank=lw,
                                           softmax_scale=cfg.softmax_scale, interpret=self.interpret,
                                           config=mla_decode.DecodeConfig(cluster=cluster))
        out_lat = out_lat[..., : cfg.kv_lora_rank].astype(dt)
        with jax.named_scope("kv_b"):
            return jnp.einsum("bqhc,chv->bqhv", out_lat, w_v, preferred_element_type=jnp.float32)

    def _attend_prefill_kernel(self, mla, q_pe, q_projected):
        cfg = mla.cfg
        dt = self.pages.dtype
        latent, k_pe = self._split(self.gather_rows(), cfg)
        with jax.named_scope("kv_b"):
            # through the layer itself: the block-scaled FP8 GEMM where the model runs its FP8 linears on it
            # (activations quantized per token per 128 columns, as DeepSeek's inference does for wkv_b), else
            # the same product as the einsum reference's
            kv = mla.kv_b_proj(latent.astype(dt)).reshape(*latent.shape[:2], cfg.num_heads, -1)
        # q_pe apart: concatenating [q_nope, q_pe] was a [tokens, heads, 192] copy per layer (0.6 ms at 8K tokens)
        out, _ = mla_prefill.mla_prefill(q_projected.astype(dt), kv, k_pe.astype(dt), self.q_lens, self.lengths,
                                         q_pe=q_pe.astype(dt), softmax_scale=cfg.softmax_scale,
                                         interpret=self.interpret)
        return out
