"""Benchmark the MLA attention kernels (`pallas_kernels/mla_prefill.py`, `mla_decode.py`) on DeepSeek-R1 shapes
against the ceilings and baselines measured in the same run; writes a results JSON (part "kernels").

  python experiments/bench_mla.py --device_kind nvidia-h200 [--part prefill|decode|both] [--quick]
  python experiments/bench_mla.py --device_kind cpu --smoke      # CPU, interpret mode, tiny shapes

Prefill: TFLOP/s of useful causal FLOPs (2 x H x (192 + 128) per visible query-key pair) against a dense bf16
matmul (the better of XLA and cuBLAS through torch); baselines: cuDNN's fused attention (q/k 192, v 128,
k_pe broadcast into k beforehand, top-left causal: only cases without a prefix), jax's Mosaic GPU
`attention_mgpu` (equal head dims: run at 192 for q, k and v, its own FLOPs), and the einsum path of
`dwdp_jax.model.MLA` (scores materialized per query chunk).
Decode: cache bytes that must be read (each request's pages once) plus q and out, over time, against the
HBM copy rate; with 128 heads MLA decode is compute-bound, so also the fraction of max(bytes / HBM,
FLOPs / dense peak). Baseline: the einsum path (pages gathered into rows, then `_attend_absorbed`'s einsums).
Kernel times come from CUPTI (Mosaic kernels only), call times from the host clock (median of repeats).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import results_io  # noqa: E402
from experiments.bench_kernels import bench, hbm_ceiling  # noqa: E402
from pallas_kernels import mla_combine  # noqa: E402
from pallas_kernels import mla_decode as md  # noqa: E402
from pallas_kernels import mla_prefill as mp  # noqa: E402
from pallas_kernels import profiling  # noqa: E402

H, DN, DR, DV, DL = 128, 128, 64, 128, 512  # DeepSeek-R1 attention
SCALE = 192 ** -0.5
PREFILL_CONFIGS = {
    "kv128x2": mp.PrefillConfig(block_kv=128, max_concurrent_steps=2),
    "kv64x3": mp.PrefillConfig(block_kv=64, max_concurrent_steps=3),
}


def wall(f, *args, reps=5):
  """Host-timed seconds per call (median of `reps`; one untimed call first when reps == 1 is smoke mode)."""
  return bench(f, *args, reps=reps, inner=1 if reps == 1 else 3, warmup=0 if reps == 1 else 2)


def kernel_s(f, *args, mosaic_only=True):
  """Median GPU time of one call from CUPTI: its Mosaic kernels only, or every kernel."""
  calls = profiling.kernel_calls(f, *args)
  pick = profiling.is_mosaic if mosaic_only else (lambda _: True)
  return profiling.median_per_call(calls, lambda ks: sum(t for n, t in ks if pick(n)))


def kernel_breakdown(f, *args):
  """The kernels of one call (the call whose total is the median): [(name, microseconds)], in launch order;
  what an op's time beside its Mosaic kernel is made of (combine, schedule, casts)."""
  calls = profiling.kernel_calls(f, *args)
  totals = [sum(t for _, t in call) for call in calls]
  call = calls[totals.index(statistics.median_low(totals))]
  return [(name[:80], round(t * 1e6, 2)) for name, t in call]


def dense_peak_tflops(smoke):
  """Dense bf16 matmul ceiling: the better of XLA and torch (cuBLAS) on 8192^3 random data."""
  n = 256 if smoke else 8192
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  result = {"xla": 2 * n ** 3 / wall(jax.jit(lambda x: x @ x), a) / 1e12}
  try:
    import torch
    if torch.cuda.is_available() and not smoke:
      x = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
      for _ in range(3):
        x @ x
      torch.cuda.synchronize()
      ts = []
      for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(5):
          x @ x
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) / 5)
      result["cublas"] = 2 * n ** 3 / statistics.median(ts) / 1e12
      del x
      torch.cuda.empty_cache()
  except Exception as e:  # torch is optional
    print("cuBLAS matmul not measured:", e)
  return max(result.values()), result


# ---------------------------------------------------------------------------------------------
# Prefill
# ---------------------------------------------------------------------------------------------


def causal_pairs(q_lens, kv_lens):
  """Visible (query, key) pairs: query i of a row sees kv_len - q_len + i + 1 keys."""
  return sum(q * (kv - q) + q * (q + 1) // 2 for q, kv in zip(q_lens, kv_lens))


def einsum_prefill(q, kv, k_pe, q_lens, kv_lens):
  """The model's expanded einsum path (`MLA._attend_expanded`): scores per query chunk in HBM."""
  from dwdp_jax.model import over_query_chunks
  dn = q.shape[-1] - k_pe.shape[-1]
  k_nope, v = kv[..., :dn], kv[..., dn:]
  qi = jnp.arange(q.shape[1])
  pos = (kv_lens - q_lens)[:, None] + qi[None, :]
  mask = jnp.arange(kv.shape[1])[None, None, :] <= pos[:, :, None]

  def rows(q_nope, q_pe, m):
    s = jnp.einsum("bqhn,bkhn->bhqk", q_nope, k_nope, preferred_element_type=jnp.float32)
    s += jnp.einsum("bqhr,bkr->bhqk", q_pe, k_pe, preferred_element_type=jnp.float32)
    p = jax.nn.softmax(jnp.where(m[:, None], s * SCALE, -jnp.inf), axis=-1).astype(q.dtype)
    return jnp.einsum("bhqk,bkhv->bqhv", p, v, preferred_element_type=jnp.float32)

  return over_query_chunks(rows, (q[..., :dn], q[..., dn:]), mask, q.shape[2]).astype(q.dtype)


def prefill_cases(smoke, quick):
  if smoke:
    return [dict(name="smoke", q_lens=[40, 9], kv_lens=[90, 9], sq=64, sk=128, h=2)]
  cases = [
      dict(name="8k_causal", q_lens=[8192], kv_lens=[8192], sq=8192, sk=8192, h=H),
      dict(name="4k_chunk_4k_prefix", q_lens=[4096], kv_lens=[8192], sq=4096, sk=8192, h=H),
      dict(name="2x2048_prefix_2048", q_lens=[2048, 2048], kv_lens=[4096, 4096], sq=2048, sk=4096, h=H),
      dict(name="ragged_4", q_lens=[4096, 1000, 3000, 17], kv_lens=[6000, 1000, 3000, 4000], sq=4096,
           sk=6016, h=H),
      dict(name="16k_causal", q_lens=[16384], kv_lens=[16384], sq=16384, sk=16384, h=H),
  ]
  return cases[:2] if quick else cases


def selected(cases, names: str, part: str):
  """The cases named in `names` (comma-separated; empty: all), or SystemExit naming the unknown ones."""
  wanted = {c for c in names.split(",") if c}
  unknown = wanted - {c["name"] for c in cases}
  if unknown:
    raise SystemExit(f"--cases: no {part} case named {sorted(unknown)}")
  return [c for c in cases if not wanted or c["name"] in wanted]


def run_prefill(args, peak, interp):
  rows = []
  key = jax.random.key(1)
  for case in selected(prefill_cases(args.smoke, args.quick), args.prefill_cases, "prefill"):
    b, h = len(case["q_lens"]), case["h"]
    dn, dr, dv = (16, 16, 16) if args.smoke else (DN, DR, DV)
    key, *ks = jax.random.split(key, 4)
    q = jax.random.normal(ks[0], (b, case["sq"], h, dn + dr), jnp.bfloat16)
    kv = jax.random.normal(ks[1], (b, case["sk"], h, dn + dv), jnp.bfloat16)
    k_pe = jax.random.normal(ks[2], (b, case["sk"], dr), jnp.bfloat16)
    ql, kl = jnp.asarray(case["q_lens"], jnp.int32), jnp.asarray(case["kv_lens"], jnp.int32)
    flops = 2 * h * (dn + dr + dv) * causal_pairs(case["q_lens"], case["kv_lens"])
    row = dict(part="prefill", case=case["name"], batch=b, q_lens=case["q_lens"], kv_lens=case["kv_lens"],
               heads=h, flops=flops, call_s={}, kernel_s={}, errors={})
    configs = {"smoke": mp.PrefillConfig(block_kv=64)} if args.smoke else PREFILL_CONFIGS
    for name, cfg in configs.items():
      f = jax.jit(functools.partial(mp.mla_prefill, softmax_scale=SCALE, config=cfg, interpret=interp))
      try:
        row["call_s"][name] = wall(f, q, kv, k_pe, ql, kl, reps=1 if interp else 5)
        if not interp:
          row["kernel_s"][name] = kernel_s(f, q, kv, k_pe, ql, kl)
      except Exception as e:  # one failing config must not hide the others
        row["errors"][name] = f"{type(e).__name__}: {str(e)[:400]}"
        print(f"  {case['name']} {name} failed: {row['errors'][name]}", flush=True)
    ours = {n: t for n, t in (row["kernel_s"] or row["call_s"]).items()}
    if ours:
      best = min(ours, key=ours.get)
      row["best_config"] = best
      out, _ = jax.jit(functools.partial(mp.mla_prefill, softmax_scale=SCALE, config=configs[best],
                                         interpret=interp))(q, kv, k_pe, ql, kl)
      row["rel_err_vs_reference"] = prefill_rel_err(out, q, kv, k_pe, ql, kl, case)
      row["tflops_kernel"] = flops / ours[best] / 1e12
      row["frac_of_dense"] = row["tflops_kernel"] / peak
      row["tflops_call"] = flops / row["call_s"][best] / 1e12
    if not interp:
      prefill_baselines(row, q, kv, k_pe, ql, kl, case, flops)
    rows.append(row)
    print(f"prefill {case['name']:20s} ours {row.get('tflops_kernel', 0):6.1f} TF/s kernel "
          f"({row.get('frac_of_dense', 0):.2f} of dense, {row.get('best_config')}), call "
          f"{row.get('tflops_call', 0):6.1f} | baselines TF/s "
          + " ".join(f"{k}={v:.1f}" for k, v in row.get("baseline_tflops", {}).items())
          + f" | err {row.get('rel_err_vs_reference', float('nan')):.1e}", flush=True)
    del q, kv, k_pe
  return rows


def prefill_rel_err(out, q, kv, k_pe, ql, kl, case):
  """Relative error against the f32 reference on the first query rows (the full reference is too big)."""
  n = min(256, case["sq"])
  keys = min(case["sk"], max(case["kv_lens"]) - max(case["q_lens"]) + n + 64)
  keys = -(-keys // 64) * 64
  kl_c = jnp.minimum(kl, kl - ql + jnp.minimum(ql, n))
  ql_c = jnp.minimum(ql, n)
  ref, _ = mp.reference(q[:, :n], kv[:, :keys], k_pe[:, :keys], ql_c, kl_c, softmax_scale=SCALE)
  live = np.arange(n)[None, :] < np.asarray(ql_c)[:, None]
  o, r = np.asarray(out[:, :n], np.float32)[live], np.asarray(ref, np.float32)[live]
  return float(np.linalg.norm(o - r) / np.linalg.norm(r))


def prefill_baselines(row, q, kv, k_pe, ql, kl, case, flops):
  """The other attention implementations on the same case: CUPTI time of each call's kernels
  (`baseline_kernel_s`, `baseline_tflops`) and, as for ours (`call_s`), host-timed calls (`baseline_call_s`,
  `baseline_tflops_call`): our kernel measured 4.52 ms under CUPTI against 4.22 ms by the wall clock (session
  5), so each comparison is made both ways."""
  times, calls = {}, {}
  no_prefix = case["q_lens"] == case["kv_lens"] and len(set(case["q_lens"])) == 1
  dn = q.shape[-1] - k_pe.shape[-1]
  k_full = jnp.concatenate([kv[..., :dn], jnp.broadcast_to(k_pe[:, :, None], kv.shape[:3] + k_pe.shape[-1:])],
                           -1)
  v = kv[..., dn:]
  if no_prefix:
    try:
      from jax._src.cudnn import fused_attention_stablehlo as cudnn
      f = jax.jit(lambda q, k, v: cudnn.dot_product_attention(q, k, v, scale=SCALE,
                                                              mask_type=cudnn.MaskType.CAUSAL))
      times["cudnn"] = (kernel_s(f, q, k_full, v, mosaic_only=False), flops)
      calls["cudnn"] = wall(f, q, k_full, v)
    except Exception as e:
      row["errors"]["cudnn"] = f"{type(e).__name__}: {str(e)[:400]}"
    try:
      from jax.experimental.pallas.ops.gpu import attention_mgpu as am
      v192 = jnp.concatenate([v, v[..., :64]], -1)  # equal head dims: its FLOPs count 192 for v
      cfg = am.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=True)
      f = jax.jit(lambda q, k, v: am.attention(q, k, v, cfg))
      am_flops = flops * (192 + 192) // (192 + 128)
      f16 = lambda x: x.astype(jnp.float16)  # its SMEM scratch is float16
      times["attention_mgpu_d192"] = (kernel_s(f, f16(q), f16(k_full), f16(v192)), am_flops)
      calls["attention_mgpu_d192"] = wall(f, f16(q), f16(k_full), f16(v192))
    except Exception as e:
      row["errors"]["attention_mgpu"] = f"{type(e).__name__}: {str(e)[:400]}"
  if case["sq"] * case["sk"] <= 4096 * 4096 * 2:
    try:
      f = jax.jit(einsum_prefill)
      times["einsum"] = (kernel_s(f, q, kv, k_pe, ql, kl, mosaic_only=False), flops)
      calls["einsum"] = wall(f, q, kv, k_pe, ql, kl)
    except Exception as e:
      row["errors"]["einsum"] = f"{type(e).__name__}: {str(e)[:400]}"
  row["baseline_kernel_s"] = {k: t for k, (t, _) in times.items()}
  row["baseline_tflops"] = {k: fl / t / 1e12 for k, (t, fl) in times.items()}
  row["baseline_call_s"] = calls
  row["baseline_tflops_call"] = {k: times[k][1] / t / 1e12 for k, t in calls.items()}


# ---------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------


def decode_cases(smoke, quick):
  if smoke:
    smoke = dict(name="smoke", batch=3, s_q=1, lengths=[1, 70, 130], h=4)
    return [smoke, dict(smoke, name="smoke_bal", balanced=True)]
  cases = [dict(name=f"b{b}_4k", batch=b, s_q=1, lengths=[4096] * b, h=H) for b in (1, 8, 32, 64, 128)]
  cases += [
      dict(name="b1_32k", batch=1, s_q=1, lengths=[32768], h=H),
      dict(name="b64_4k_mtp2", batch=64, s_q=2, lengths=[4096] * 64, h=H),
      dict(name="b64_mixed", batch=64, s_q=1, h=H,
           lengths=np.random.default_rng(0).integers(256, 8192, 64).tolist()),
      dict(name="b256_1k", batch=256, s_q=1, lengths=[1024] * 256, h=H),
  ]
  # B=1 at 32K with fewer splits than the default 66 (each split's bf16 partial, 128 KB at 128 heads, is
  # written and read again by the combine: 17 MB of 55 at 66 splits), to find the best count.
  cases += [dict(name=f"b1_32k_s{n}", batch=1, s_q=1, lengths=[32768], h=H, num_splits=n) for n in (16, 33)]
  # B=1 at 66 clustered splits (132 CTAs) and 2, 4, 16 pages a split (8K, 16K, 64K; 32K is b1_32k_cl): a CTA's
  # time against its pages, to separate its fixed cost from its cost per page.
  cases += [dict(name=f"b1_{n}k_s66_cl", batch=1, s_q=1, lengths=[n * 1024], h=H, num_splits=66, cluster=True)
            for n in (8, 16, 64)]
  # The same batches with units of equal pages over the batch (DecodeConfig.balanced), beside the default.
  cases += [dict(c, name=c["name"] + "_bal", balanced=True) for c in cases
            if c["name"] in ("b1_4k", "b64_4k", "b128_4k", "b1_32k", "b64_mixed")]
  # A unit's row tiles as one CTA cluster with each page multicast (DecodeConfig.cluster): the pages read from
  # HBM once per unit, where two waves of CTAs (B=128) or B=1's drifting tiles read them twice.
  cases += [dict(c, name=c["name"] + "_cl", cluster=True) for c in cases
            if c["name"] in ("b1_32k", "b64_4k", "b128_4k", "b256_1k", "b64_4k_mtp2", "b64_mixed_bal")]
  # Uniform splits merged by XLA's five-kernel combine (the form before `mla_combine`), beside the kernel.
  cases += [dict(c, name=c["name"] + "_xla", combine="xla") for c in cases
            if c["name"] in ("b1_4k", "b8_4k", "b1_32k_cl", "b1_8k_s66_cl", "b1_64k_s66_cl")]
  # The merge kernel's CTAs own 16 or 64 columns instead of 32 (`combine_columns`): 64 or 16 CTAs at B=1, TMA
  # rows of 32 or 128 bytes; which of bytes, rows or CTAs limits its 8.6 us (KERNELS.md, split combine).
  cases += [dict(c, name=c["name"] + f"_c{n}", combine_columns=n) for c in cases for n in (16, 64)
            if c["name"] in ("b1_32k_cl", "b1_64k_s66_cl")]
  if quick:
    cases = [c for c in cases if c["name"].removesuffix("_cl").removesuffix("_bal")
             in ("b64_4k", "b1_32k", "b1_4k", "b64_mixed")]
  return cases


def einsum_decode(q, pages, table, lens):
  """The model's absorbed einsum path over the same cache: pages gathered into rows, then the scores."""
  b, s_q, h, d = q.shape
  keys = pages[table].reshape(b, -1, d)
  pos = lens[:, None] - s_q + jnp.arange(s_q)[None, :]
  mask = jnp.arange(keys.shape[1])[None, None, :] <= pos[:, :, None]
  s = jnp.einsum("bqhc,bkc->bhqk", q, keys, preferred_element_type=jnp.float32) * SCALE
  p = jax.nn.softmax(jnp.where(mask[:, None], s, -jnp.inf), axis=-1).astype(q.dtype)
  return jnp.einsum("bhqk,bkc->bhqc", p, keys[..., :DL], preferred_element_type=jnp.float32)


def run_decode(args, peak, hbm, interp):
  rows = []
  key = jax.random.key(2)
  for case in selected(decode_cases(args.smoke, args.quick), args.cases, "decode"):
    b, s_q, h, lengths = case["batch"], case["s_q"], case["h"], case["lengths"]
    dl, dr = (32, 16) if args.smoke else (DL, DR)
    d = dl + dr
    pages_per = [-(-n // md.PAGE_SIZE) for n in lengths]
    max_pages = max(pages_per)
    key, k1, k2 = jax.random.split(key, 3)
    q = jax.random.normal(k1, (b, s_q, h, d), jnp.bfloat16)
    pages = jax.random.normal(k2, (b * max_pages, md.PAGE_SIZE, d), jnp.bfloat16)
    table = jnp.asarray(np.random.default_rng(0).permutation(b * max_pages).reshape(b, max_pages), jnp.int32)
    lens = jnp.asarray(lengths, jnp.int32)
    cache_bytes = sum(pages_per) * md.PAGE_SIZE * d * 2
    bytes_ = cache_bytes + b * s_q * h * (d + dl) * 2
    flops = 2 * h * s_q * sum(lengths) * (d + dl)
    config = md.DecodeConfig(num_splits=case.get("num_splits"), balanced=case.get("balanced", False),
                           cluster=case.get("cluster", False), combine=case.get("combine", "kernel"),
                           combine_columns=case.get("combine_columns", mla_combine.COLUMNS))
    f = jax.jit(functools.partial(md.mla_decode, kv_lora_rank=dl, softmax_scale=SCALE, config=config,
                                  interpret=interp))
    row = dict(part="decode", case=case["name"], batch=b, s_q=s_q, heads=h, context_tokens=sum(lengths),
               bytes=bytes_, flops=flops, schedule="balanced" if config.balanced else "uniform",
               cluster=config.cluster, combine=config.combine, combine_columns=config.combine_columns,
               errors={})
    try:
      row["call_s"] = wall(f, q, pages, table, lens, reps=1 if interp else 5)
      out, _ = f(q, pages, table, lens)
      ref, _ = md.reference(q[:4], pages, table[:4], lens[:4], kv_lora_rank=dl, softmax_scale=SCALE)
      o, r = np.asarray(out[:4], np.float32), np.asarray(ref, np.float32)
      row["rel_err_vs_reference"] = float(np.linalg.norm(o - r) / np.linalg.norm(r))
      if not interp:
        row["kernel_s"] = kernel_s(f, q, pages, table, lens)
        row["op_s"] = kernel_s(f, q, pages, table, lens, mosaic_only=False)  # + combine
        row["op_kernels_us"] = kernel_breakdown(f, q, pages, table, lens)
        t = row["kernel_s"]
        row["gbps_kernel"] = bytes_ / t / 1e9
        row["frac_of_hbm"] = row["gbps_kernel"] / hbm
        row["tflops_kernel"] = flops / t / 1e12
        row["frac_of_roof"] = max(bytes_ / (hbm * 1e9), flops / (peak * 1e12)) / t
        row["frac_of_hbm_op"] = bytes_ / row["op_s"] / 1e9 / hbm
        row["num_splits"] = case.get("num_splits") or md.choose_num_splits(
            b, -(-s_q * h // md.BLOCK_ROWS), max_pages, jax.devices()[0].core_count)
        if case["name"] in ("b64_4k", "b1_32k", "b8_4k"):
          row["einsum_s"] = kernel_s(jax.jit(einsum_decode), q, pages, table, lens, mosaic_only=False)
          row["speedup_vs_einsum"] = row["einsum_s"] / row["op_s"]
    except Exception as e:
      row["errors"]["kernel"] = f"{type(e).__name__}: {str(e)[:400]}"
      print(f"  {case['name']} failed: {row['errors']['kernel']}", flush=True)
    rows.append(row)
    print(f"decode {case['name']:12s} {row.get('gbps_kernel', 0):6.0f} GB/s = {row.get('frac_of_hbm', 0):.2f} "
          f"of HBM, {row.get('tflops_kernel', 0):5.0f} TF/s, roof {row.get('frac_of_roof', 0):.2f}, with combine "
          f"{row.get('frac_of_hbm_op', 0):.2f} | einsum x{row.get('speedup_vs_einsum', 0):.1f} | "
          f"err {row.get('rel_err_vs_reference', float('nan')):.1e}", flush=True)
    del q, pages
  return rows


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--device_kind", required=True)
  p.add_argument("--out_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  p.add_argument("--tag", default="mla")
  p.add_argument("--part", default="both", choices=["both", "prefill", "decode"])
  p.add_argument("--quick", action="store_true", help="the headline cases only")
  p.add_argument("--smoke", action="store_true", help="CPU: tiny shapes in interpret mode")
  p.add_argument("--cases", default="", help="decode: only these cases (comma-separated names, e.g. "
                 "b64_4k,b64_4k_cl); empty: all of the part")
  p.add_argument("--prefill_cases", default="", help="prefill: only these cases (e.g. 8k_causal,4x2048_causal)")
  args = p.parse_args()
  interp = args.smoke
  peak, peak_detail = dense_peak_tflops(args.smoke)
  hbm, hbm_detail = hbm_ceiling(small=args.smoke)
  print(f"dense bf16 {peak:.0f} TF/s {peak_detail}; HBM copy {hbm:.0f} GB/s {hbm_detail}", flush=True)
  rows = []
  if args.part in ("both", "prefill"):
    rows += run_prefill(args, peak, interp)
  if args.part in ("both", "decode"):
    rows += run_decode(args, peak, hbm, interp)

  def pick(part, case, field):
    return next((r.get(field) for r in rows if r["part"] == part and r["case"] == case), None)

  metrics = dict(dense_bf16_tflops=peak, dense_detail_tflops=peak_detail, hbm_copy_gbps=hbm,
                 hbm_copy_detail_gbps=hbm_detail,
                 mla_prefill_frac_of_dense=pick("prefill", "8k_causal", "frac_of_dense"),
                 mla_prefill_tflops_8k=pick("prefill", "8k_causal", "tflops_kernel"),
                 mla_prefill_cudnn_tflops_8k=(pick("prefill", "8k_causal", "baseline_tflops") or {}).get("cudnn"),
                 mla_prefill_tflops_call_8k=pick("prefill", "8k_causal", "tflops_call"),
                 mla_prefill_cudnn_tflops_call_8k=(pick("prefill", "8k_causal", "baseline_tflops_call") or {}).get(
                     "cudnn"),
                 mla_decode_frac_of_hbm=pick("decode", "b64_4k", "frac_of_hbm"),
                 mla_decode_frac_of_hbm_b1_32k=pick("decode", "b1_32k", "frac_of_hbm"),
                 mla_decode_frac_of_roof=pick("decode", "b64_4k", "frac_of_roof"),
                 mla_decode_frac_of_roof_b1_32k=pick("decode", "b1_32k", "frac_of_roof"))
  config = dict(heads=H, nope=DN, rope=DR, v=DV, kv_lora_rank=DL, page_size=md.PAGE_SIZE, smoke=args.smoke,
                prefill_configs={k: dataclasses.asdict(v) for k, v in PREFILL_CONFIGS.items()})
  path = results_io.write_result(os.environ.get("OUT") or args.out_dir, "kernels", args.device_kind, config,
                                 metrics, rows, tag=args.tag + ("-smoke" if args.smoke else ""))
  print("wrote", path)
  print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in metrics.items()
         if not k.endswith("detail_gbps") and not k.endswith("detail_tflops")})


if __name__ == "__main__":
  main()
