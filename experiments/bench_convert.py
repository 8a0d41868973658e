"""Converter memory and throughput, and restore time, on a multi-GB synthetic FP8 checkpoint with R1's shapes.

    PYTHONPATH=. python experiments/bench_convert.py [--layers=2 --experts=128 --group_size=8]
        [--policies=keep_fp8,bf16] [--repeats=N] [--baseline_repo=/path/to/another/checkout] [--tag=...]

Writes an HF-layout checkpoint (config.json, FP8 [out, in] weights with float32 block scales, bf16 embeddings,
sharded with an index) of random bytes straight to disk, never holding a tensor in memory; syncs it and drops
it from the page cache (posix_fadvise), so the conversion reads from disk. Then runs the real CLI
(`dwdp_jax.convert.run`, the `dwdp-convert` entry point) in a child process that reports its own peak RSS
(getrusage ru_maxrss) and CPU time (user + system, all threads) at exit, and takes its wall time; then
`convert.verify` the same way, and the RSS of a child that only imports what a conversion imports (the fixed
overhead). With --repeats=N every policy converts N times, a copy after each round. For the first policy it
also times restores from a cold page cache, each in its own child: the full model (`load_model(OUT)`) and DWDP
rank 0's share (replicated weights + its experts, `checkpoint.rank_experts`), both onto the CPU device. With
--baseline_repo, the same conversions (every policy) and restores run with that checkout's code (e.g. an export
of an earlier commit), in the same run, for comparison. Source and outputs are deleted afterwards. The machine
may be shared, and other work slows a CPU-bound conversion: every copy and conversion first waits (up to
--wait_quiet_s) until the rest of the machine is idle, and each conversion records the CPU time the rest of the
machine used while it ran (`others_cpu_s`) and the 1-minute load average before and after.

Headline metrics (results schema, part "converter"): `peak_rss_over_largest_tensor` = the converter's peak
resident memory / the largest single output array (here the bf16 embedding, also the largest source tensor);
`throughput_gbps` = source GB converted per second of wall time (process start to exit, fsync included), and
`throughput_frac_of_copy` = that / the speed of the fastest copy of the same shards on the same disk (cold,
fsynced) in the same run, the ceiling for a conversion that reads and writes every byte once; per policy (median
over the repeats) as `throughput_frac_of_copy_<policy>` with `cpu_s_<policy>` (the median child CPU time: the
machine may be shared, CPU time is the steadier measure of our work), the lowest as
`throughput_frac_of_copy_min`, and without importing the converter's module (timed inside the child) as
`throughput_frac_of_copy_excl_startup_<policy>`. `io_frac_of_copy_<policy>`: bytes read + written per second
over the copy's (2 x the source's): a policy whose output is larger than its source (bf16 from FP8: 1.6x) moves
more bytes than the copy, so on a disk-bound machine its `throughput_frac_of_copy` is capped at
2 source / (source + output) (0.76 for bf16) while this one can reach 1. `restore_full_gbps` and
`restore_rank0_gbps`: stored bytes restored per second of restore call (imports and JAX start excluded), and
`restore_full_frac_of_copy` / `restore_rank0_frac_of_copy`: that over the same disk copy's speed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx, traverse_util

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from dwdp_jax import checkpoint, config as config_lib, weights  # noqa: E402
from dwdp_jax.model import DeepseekV3  # noqa: E402
from experiments.results_io import write_result  # noqa: E402

flags.DEFINE_integer("layers", 2, "decoder layers (the first dense, the rest MoE), R1 shapes")
flags.DEFINE_integer("experts", 128, "routed experts per MoE layer (R1: 256; 128 keeps the source near 10 GB)")
flags.DEFINE_integer("vocab_size", 129280, "vocabulary (R1's by default; smaller for a quick smoke run)")
flags.DEFINE_integer("group_size", 8, "DWDP group size of the converted layout")
flags.DEFINE_float("shard_gb", 4.0, "maximum source shard size, GB")
flags.DEFINE_string("workdir", None, "where to write the synthetic checkpoint and the output (default: a temp dir)")
flags.DEFINE_list("policies", ["keep_fp8"], "dtype policies to convert with, one run each")
flags.DEFINE_bool("verify", True, "also time --verify on the first converted output")
flags.DEFINE_bool("restore", True, "also time full-model and rank-0 restores of the first converted output")
flags.DEFINE_string("baseline_repo", None, "another checkout of this repository whose converter and restore are run"
                    " the same way (first policy only), for comparison")
flags.DEFINE_integer("repeats", 1, "conversions per policy (the median is reported; a copy after each round)")
flags.DEFINE_float("wait_quiet_s", 120, "before each copy and conversion, wait up to this long for the rest of the"
                   " machine to be idle")
flags.DEFINE_string("tag", "", "suffix of the results file name")
flags.DEFINE_string("out_dir", os.path.join(REPO, "experiments", "results"), "results directory")
FLAGS = flags.FLAGS

_POOL = np.random.default_rng(0).integers(0, 256, 64 << 20, dtype=np.uint8)  # random bytes, reused at offsets


def bench_config(layers: int, experts: int, vocab_size: int) -> config_lib.ModelConfig:
    return config_lib.preset(f"r1-layers-{layers}").replace(n_routed_experts=experts, vocab_size=vocab_size)


def hf_config_json(cfg: config_lib.ModelConfig) -> dict:
    rope = cfg.rope_scaling
    return {
        "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_heads, "q_lora_rank": cfg.q_lora_rank,
        "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim,
        "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok, "n_group": cfg.n_group, "topk_group": cfg.topk_group,
        "norm_topk_prob": cfg.norm_topk_prob, "routed_scaling_factor": cfg.routed_scaling_factor,
        "first_k_dense_replace": cfg.first_k_dense_replace, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_position_embeddings,
        "rope_scaling": {"type": "yarn", "factor": rope.factor, "beta_fast": rope.beta_fast,
                         "beta_slow": rope.beta_slow, "mscale": rope.mscale, "mscale_all_dim": rope.mscale_all_dim,
                         "original_max_position_embeddings": rope.original_max_position_embeddings},
        "tie_word_embeddings": False, "num_nextn_predict_layers": 0,
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": list(cfg.weight_block_size)},
    }


def hf_tensors(cfg: config_lib.ModelConfig) -> list[tuple[str, str, tuple]]:
    """(name, safetensors dtype, shape) of every tensor of an HF checkpoint for `cfg`, from `weights.hf_source`."""
    abstract = nnx.eval_shape(lambda: DeepseekV3(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.split(abstract)[1]))
    out = {}
    for path, target in flat.items():
        src = weights.hf_source(path, cfg)
        shape = tuple(target.shape)
        if jnp.dtype(target.dtype).name.startswith("float8"):
            dtype = "F8_E4M3"
        elif path[-1] in ("scale", "s_gate_up", "s_down", "bias"):
            dtype = "F32"
        else:
            dtype = "BF16"
        if src.kind == "experts":  # every policy's source is FP8: [out, in] per expert (as stored, unpadded)
            for names in src.names:
                for name in names:
                    out[name] = (dtype, src.shape)
        else:
            out[src.names[0]] = (dtype, shape if src.kind == "copy" else shape[::-1])
    return [(name, dtype, shape) for name, (dtype, shape) in out.items()]


_ITEMSIZE = {"F8_E4M3": 1, "BF16": 2, "F32": 4}


def write_synthetic_checkpoint(path: str, cfg: config_lib.ModelConfig, shard_bytes: float) -> int:
    """Writes the checkpoint tensor by tensor from a pool of random bytes (scales: small positive floats).
    Returns total tensor bytes."""
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config_json(cfg), f, indent=1)
    shards, current, size = [], [], 0
    for name, dtype, shape in hf_tensors(cfg):
        nbytes = int(np.prod(shape)) * _ITEMSIZE[dtype]
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, dtype, shape, nbytes))
        size += nbytes
    shards.append(current)
    rng = np.random.default_rng(1)
    weight_map, total, cursor = {}, 0, 0
    for i, tensors in enumerate(shards):
        shard = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name, dtype, shape, nbytes in tensors:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = shard
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(path, shard), "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for name, dtype, shape, nbytes in tensors:
                if dtype == "F32":
                    f.write(rng.uniform(1e-4, 1e-2, shape).astype(np.float32).tobytes())
                    continue
                left = nbytes
                while left:
                    n = min(left, _POOL.size - cursor)
                    f.write(memoryview(_POOL)[cursor : cursor + n])
                    cursor = (cursor + n) % _POOL.size
                    left -= n
            total += offset
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # cold reads in the conversion
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def _drop_cache(root: str):
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _measured(code: str, repo: str = REPO) -> tuple[float, int, str]:
    """Runs `code` in a child Python (importing from `repo`) that prints its own CPU time (user + system, all
    threads) and peak RSS at exit (after any sys.exit). Returns (wall seconds, peak RSS bytes, stdout)."""
    prologue = ("import atexit, resource; atexit.register(lambda: print('cpu_s', sum(resource.getrusage("
                "resource.RUSAGE_SELF)[:2]), 'peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
                " flush=True)); ")
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", prologue + code], cwd=repo,
                            env=dict(os.environ, PYTHONPATH=repo), capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if result.returncode:
        raise RuntimeError(f"{code} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    rss = int(result.stdout.strip().splitlines()[-1].split()[-1]) * 1024
    return wall, rss, result.stdout


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _busy_s() -> float:
    """CPU seconds the whole machine has been busy (all processes, /proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def _wait_until_quiet():
    """Waits (at most --wait_quiet_s) until the rest of the machine is idle: a shared machine's other work slows a
    CPU-bound conversion, and its load average still counts our previous run for a minute."""
    deadline = time.monotonic() + FLAGS.wait_quiet_s
    while True:
        busy = _busy_s()
        time.sleep(1.0)
        if _busy_s() - busy < 0.15 or time.monotonic() > deadline:
            return


def _commit_of(repo: str) -> str:
    try:
        return subprocess.check_output(["git", "-C", repo, "rev-parse", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def copy_baseline(source: str, dst: str) -> float:
    """Seconds to copy the source shards (kernel copy, cold cache) and fsync them: the disk's own ceiling for
    a conversion that reads and writes every byte once."""
    _drop_cache(source)
    _wait_until_quiet()
    os.makedirs(dst)
    t0 = time.perf_counter()
    for name in sorted(os.listdir(source)):
        shutil.copyfile(os.path.join(source, name), os.path.join(dst, name))
        fd = os.open(os.path.join(dst, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    wall = time.perf_counter() - t0
    shutil.rmtree(dst)
    return wall


_RESTORE = """
import time
import jax, jax.numpy as jnp
from flax import nnx
from dwdp_jax import checkpoint, load_model
out, rank = {out!r}, {rank!r}
kwargs = {{}}
if rank is not None:
    expert_ids, n_local = checkpoint.rank_experts(out, rank)
    kwargs = dict(expert_ids=expert_ids, n_local_experts=n_local)
t0 = time.perf_counter()
leaves = jax.tree.leaves(nnx.state(load_model(out, dtype=jnp.bfloat16, device=jax.devices("cpu")[0], **kwargs)))
jax.block_until_ready(leaves)
print("restore_s", time.perf_counter() - t0, sum(x.nbytes for x in leaves), flush=True)
"""


def convert_once(repo: str, source: str, out: str, policy: str) -> dict:
    """Runs the console-script entry point of `repo`'s converter (absl app.run, exits through sys.exit) in a
    child, from a cold page cache."""
    _drop_cache(source)
    argv = ["dwdp-convert", f"--input={source}", f"--output={out}", f"--dtype_policy={policy}",
            f"--group_size={FLAGS.group_size}", "--noprogress"]
    _wait_until_quiet()
    load_before, busy_before = _load(), _busy_s()
    code = ("import time; t0 = time.perf_counter(); from dwdp_jax import convert; t1 = time.perf_counter()\n"
            f"try:\n    convert.run({argv!r})\nfinally:\n"
            "    print('startup_s', t1 - t0, 'convert_s', time.perf_counter() - t1, flush=True)")
    wall, peak, stdout = _measured(code, repo)
    lines = stdout.strip().splitlines()
    startup_s, convert_s = (float(x) for x in next(l for l in lines if l.startswith("startup_s")).split()[1::2])
    cpu_s = float(next(l for l in lines if l.startswith("cpu_s")).split()[1])
    others_cpu_s = max(0.0, _busy_s() - busy_before - cpu_s)  # the machine's other work meanwhile (kernel too)
    print(f"{lines[0]} ({wall:.1f} s, {startup_s:.1f} s of it importing the converter's module, {cpu_s:.1f} CPU s;"
          f" other CPU meanwhile {others_cpu_s:.1f} s; load average {load_before} -> {_load()})")
    return dict(wall_s=wall, startup_s=startup_s, convert_s=convert_s, cpu_s=cpu_s, others_cpu_s=others_cpu_s,
                peak_rss_bytes=peak, command=" ".join(argv), load_before=load_before, load_after=_load())


def restore_times(repo: str, out: str) -> dict:
    """Full-model and rank-0 restores of `out` with `repo`'s code, each in a child from a cold page cache."""
    row = {}
    for name, rank in (("full", None), ("rank0", 0)):
        _drop_cache(out)
        _wait_until_quiet()
        _, peak, stdout = _measured(_RESTORE.format(out=out, rank=rank), repo)
        seconds, nbytes = next(line.split()[1:] for line in stdout.splitlines() if line.startswith("restore_s"))
        row.update({f"restore_{name}_s": float(seconds), f"restore_{name}_bytes": int(nbytes),
                    f"restore_{name}_gbps": int(nbytes) / float(seconds) / 1e9,
                    f"restore_{name}_peak_rss_bytes": peak})
        print(f"restore {name} ({repo}): {float(seconds):.1f} s, {int(nbytes) / 1e9:.2f} GB")
    return row


def main(argv):
    del argv
    cfg = bench_config(FLAGS.layers, FLAGS.experts, FLAGS.vocab_size)
    work = tempfile.mkdtemp(prefix="dwdp_bench_convert_", dir=FLAGS.workdir)
    source = os.path.join(work, "hf")
    rows, baseline_rows = [], []
    try:
        t0 = time.perf_counter()
        source_bytes = write_synthetic_checkpoint(source, cfg, FLAGS.shard_gb * 1e9)
        print(f"synthetic checkpoint: {source_bytes / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s")
        copy_load = [_load()]
        copy_s = [copy_baseline(source, os.path.join(work, "copy"))]
        largest_source = max(int(np.prod(s)) * _ITEMSIZE[d] for _, d, s in hf_tensors(cfg))
        for rep in range(FLAGS.repeats):
            for i, policy in enumerate(FLAGS.policies):
                first = rep == 0 and i == 0
                out = os.path.join(work, f"out_{policy}")
                row = dict(dtype_policy=policy, repeat=rep, **convert_once(REPO, source, out, policy))
                meta = checkpoint.read_metadata(out)
                arrays = [a for p in meta["params"] for a in p["arrays"]]
                largest_array = max(int(np.prod(a["shape"])) * np.dtype(a["dtype"]).itemsize for a in arrays)
                row.update(
                    source_bytes=meta["source_bytes"], output_bytes=meta["output_bytes"], arrays=len(arrays),
                    items=len(meta["items"]), item_bytes=meta["item_bytes"],
                    largest_output_array_bytes=largest_array, largest_source_tensor_bytes=largest_source,
                    peak_rss_over_largest_tensor=row["peak_rss_bytes"] / largest_array,
                    throughput_gbps=meta["source_bytes"] / row["wall_s"] / 1e9,
                )
                if FLAGS.verify and first:
                    _drop_cache(source)
                    _drop_cache(out)
                    v_wall, v_peak, _ = _measured(
                        f"from dwdp_jax import convert; convert.verify({out!r}, progress=False)")
                    row.update(verify_wall_s=v_wall, verify_peak_rss_bytes=v_peak,
                               verify_gbps=(meta["source_bytes"] + meta["output_bytes"]) / v_wall / 1e9)
                if FLAGS.restore and first:
                    row.update(restore_times(REPO, out))
                shutil.rmtree(out)
                rows.append(row)
                if FLAGS.baseline_repo:
                    out = os.path.join(work, f"baseline_{policy}")
                    commit = os.environ.get("BASELINE_COMMIT") or _commit_of(FLAGS.baseline_repo)
                    row = dict(dtype_policy=policy, repeat=rep, code=FLAGS.baseline_repo, baseline_commit=commit,
                               **convert_once(FLAGS.baseline_repo, source, out, policy))
                    row["throughput_gbps"] = source_bytes / row["wall_s"] / 1e9
                    row["peak_rss_over_largest_tensor"] = row["peak_rss_bytes"] / largest_source
                    if FLAGS.restore and first:
                        row.update(restore_times(FLAGS.baseline_repo, out))
                    shutil.rmtree(out)
                    baseline_rows.append(row)
            copy_load.append(_load())
            copy_s.append(copy_baseline(source, os.path.join(work, "copy")))
        copy_gbps = source_bytes / min(copy_s) / 1e9
        print(f"copy baseline: {', '.join(f'{t:.1f}' for t in copy_s)} s (before the conversions, after each round)")
        _, baseline, _ = _measured("from dwdp_jax import convert_pipeline")  # what a conversion imports
        for row in rows + baseline_rows:
            row["copy_baseline_gbps"] = copy_gbps
            row["throughput_frac_of_copy"] = row["throughput_gbps"] / copy_gbps
            # Without importing the converter's module (JAX, orbax and the model until 0275843, ~2 s here; since
            # then they load inside the run, beside the hashing).
            row["throughput_frac_of_copy_excl_startup"] = source_bytes / row["convert_s"] / 1e9 / copy_gbps
            if "output_bytes" in row:  # a baseline checkout's rows may lack it
                row["io_frac_of_copy"] = io_frac_of_copy(source_bytes, row["output_bytes"], row["wall_s"], copy_gbps)
            for kind in ("full", "rank0"):
                if f"restore_{kind}_gbps" in row:
                    row[f"restore_{kind}_frac_of_copy"] = row[f"restore_{kind}_gbps"] / copy_gbps
        for row in rows:
            row["import_baseline_rss_bytes"] = baseline
            row["peak_rss_minus_baseline_over_largest_tensor"] = (row["peak_rss_bytes"] - baseline) / row[
                "largest_output_array_bytes"]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    head = rows[0]
    config = dict(preset=f"r1-layers-{FLAGS.layers}", n_routed_experts=FLAGS.experts, vocab_size=FLAGS.vocab_size,
                  group_size=FLAGS.group_size, shard_gb=FLAGS.shard_gb, item_bytes=head["item_bytes"],
                  source="synthetic FP8 (random bytes), page cache dropped before each run", cpu_count=os.cpu_count(),
                  baseline_repo=FLAGS.baseline_repo, copy_s=copy_s,
                  load_before_copy=copy_load)
    metrics = {k: head[k] for k in ("peak_rss_over_largest_tensor", "throughput_gbps", "peak_rss_bytes",
                                    "largest_output_array_bytes", "import_baseline_rss_bytes", "wall_s",
                                    "source_bytes", "peak_rss_minus_baseline_over_largest_tensor",
                                    "copy_baseline_gbps", "throughput_frac_of_copy")}
    for k in ("verify_wall_s", "verify_gbps", "verify_peak_rss_bytes", "restore_full_s", "restore_full_gbps",
              "restore_full_frac_of_copy", "restore_full_peak_rss_bytes", "restore_rank0_s", "restore_rank0_gbps",
              "restore_rank0_frac_of_copy", "restore_rank0_peak_rss_bytes"):
        if k in head:
            metrics[k] = head[k]
    for prefix, group in (("", rows), ("baseline_", baseline_rows)):
        for policy in FLAGS.policies:
            runs = [row for row in group if row["dtype_policy"] == policy]
            for k in ("throughput_gbps", "throughput_frac_of_copy", "throughput_frac_of_copy_excl_startup",
                      "io_frac_of_copy", "wall_s", "cpu_s", "others_cpu_s"):  # medians over the repeats
                if runs and all(k in row for row in runs):
                    metrics[f"{prefix}{k}_{policy}"] = float(np.median([row[k] for row in runs]))
            for k in ("peak_rss_over_largest_tensor", "peak_rss_bytes"):  # the worst repeat
                if runs:
                    metrics[f"{prefix}{k}_{policy}"] = max(row[k] for row in runs)
    for k in ("throughput_gbps", "throughput_frac_of_copy", "wall_s", "peak_rss_over_largest_tensor", "peak_rss_bytes"):
        metrics[k] = metrics[f"{k}_{FLAGS.policies[0]}"]  # the headline: the first policy's
    metrics["throughput_frac_of_copy_min"] = min(metrics[f"throughput_frac_of_copy_{p}"] for p in FLAGS.policies)
    for row in baseline_rows[:1]:
        for k in ("restore_full_s", "restore_rank0_s"):
            if k in row:
                metrics[f"baseline_{k}"] = row[k]
                metrics[f"{k}_over_baseline"] = head[k] / row[k]
    rows += baseline_rows
    path = write_result(FLAGS.out_dir, "converter", "cpu", config, metrics, rows, tag=FLAGS.tag)
    print(f"\n{'policy':<10} {'source GB':>9} {'out GB':>7} {'wall s':>7} {'CPU s':>6} {'other':>6} {'GB/s':>6}"
          f" {'of copy':>7} {'I/O of copy':>11}"
          f" {'peak RSS GB':>11} {'largest GB':>10} {'RSS/largest':>11} {'verify GB/s':>11}")
    for r in rows:
        name = r["dtype_policy"] + (" (baseline)" if "code" in r else "")
        print(f"{name:<10} {source_bytes / 1e9:>9.2f} {r.get('output_bytes', float('nan')) / 1e9:>7.2f}"
              f" {r['wall_s']:>7.1f} {r['cpu_s']:>6.1f} {r['others_cpu_s']:>6.1f} {r['throughput_gbps']:>6.2f}"
              f" {r['throughput_frac_of_copy']:>7.2f} {r.get('io_frac_of_copy', float('nan')):>11.2f}"
              f" {r['peak_rss_bytes'] / 1e9:>11.2f}"
              f" {largest_source / 1e9:>10.2f} {r['peak_rss_over_largest_tensor']:>11.2f}"
              f" {r.get('verify_gbps', float('nan')):>11.2f}")
    for r in rows:
        if "restore_full_s" in r:
            print(f"restore ({r.get('code', 'this checkout')}): full model {r['restore_full_s']:.1f} s"
                  f" ({r['restore_full_gbps']:.2f} GB/s, {r['restore_full_frac_of_copy']:.2f} of the copy), rank 0"
                  f" {r['restore_rank0_s']:.1f} s ({r['restore_rank0_gbps']:.2f} GB/s,"
                  f" {r['restore_rank0_frac_of_copy']:.2f} of the copy)")
    print(f"copy baseline {copy_gbps:.2f} GB/s (the fastest copy); import-only RSS {baseline / 1e9:.2f} GB;"
          f" medians: " + ", ".join(f"{p} {metrics[f'throughput_frac_of_copy_{p}']:.2f}" for p in FLAGS.policies)
          + f" of the copy; wrote {path}")


def io_frac_of_copy(source_bytes: int, output_bytes: int, wall_s: float, copy_gbps: float) -> float:
    """Bytes a conversion read and wrote per second over a copy's (which reads and writes the source once):
    (source + output) / wall_s against 2 x copy_gbps (GB/s of source copied)."""
    return (source_bytes + output_bytes) / wall_s / 1e9 / (2 * copy_gbps)


if __name__ == "__main__":
    app.run(main)
