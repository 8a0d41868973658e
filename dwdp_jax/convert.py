"""Converts an HF DeepSeek-V3/R1 checkpoint into our orbax checkpoint (`dwdp_jax.checkpoint`), streaming.

    python -m dwdp_jax.convert --input=HF_DIR --output=OUT_DIR [--dtype_policy=keep_fp8|bf16]
        [--group_size=G | --placement=placement.json] [--mtp|--nomtp] [--inspect] [--verify] [--workers=N]

Every model parameter is built from its HF tensors by the same table the loader uses (`weights.hf_source`).
Orbax saves an item from memory, so the output is cut into items of at most about ITEM_BYTES (whole parameters,
or slabs of a larger one: experts, rows of a copied tensor, columns of a transposed one). A pool of `workers`
threads each builds one item and saves it (orbax syncs each item to disk before returning), so the reads,
transposes and dequantization of some items overlap the writes of others: source bytes are read with `pread`
into fresh buffers (no memmap, whose resident pages would count against the process), at most about
CHUNK_BYTES of source at a time when transposing or dequantizing, transposed and dequantized with vectorized
numpy (`quant.transpose_np`, `quant.dequantize_np`: numpy releases the GIL), assembled into the item's arrays
and handed to orbax. Peak memory is about `workers` items plus the interpreter, whatever the checkpoint size. A
progress bar shows source bytes converted, throughput and ETA; another thread hashes the source files.

Routed experts are laid out for a DWDP group: with group size G (contiguous split) or a planner placement,
each MoE layer's expert parameters become one array per rank holding that rank's experts (replicas included),
in that rank's own items, so a rank restores only its own items (`checkpoint.rank_experts`). The MTP modules,
which the placement does not cover, use the contiguous split.

dtype policies: keep_fp8 stores FP8 weights with their block scales as in the source; bf16 dequantizes them
(value * scale in float32, rounded to bfloat16). Everything else keeps its source dtype, except a weight the
model keeps unquantized but the source has in FP8 (the MTP eh_proj): dequantized, float32 under keep_fp8.

--inspect lists the parameters the conversion would write (or a converted checkpoint holds), with shapes,
dtypes and per-kind byte totals, and writes nothing. --verify restores every item through orbax and compares it
bit-exactly with the tensors re-derived from the source through `weights.hf_source`/`weights.assemble` (after
converting, or alone when OUT_DIR already holds a converted checkpoint).
"""

from __future__ import annotations

import concurrent.futures
import datetime
import os
import sys
import threading

import orbax.checkpoint as ocp
from absl import app, flags, logging
from tqdm import tqdm

from dwdp_jax import checkpoint
from dwdp_jax import config as config_lib
from dwdp_jax.convert_check import VerifyError, fmt_bytes, inspect, verify  # noqa: F401 (VerifyError: public here)
from dwdp_jax.convert_plan import POLICIES, Item, Plan, make_plan, read_hf_config, slab_bytes
from dwdp_jax.convert_source import Arena, SourceReader, hash_files, read_slab, source_files
from dwdp_jax.planner.placement import Placement
from dwdp_jax.safetensors_io import CheckpointDir

CONVERTER_VERSION = "2.0"
# Items built and saved at once (each thread holds one): 3 on the 2-core machine of experiments/bench_convert.py
# (2: 12.0 s, 3: 10.5 s for 5.9 GB of keep_fp8); more cores and faster disks take more.
WORKERS = min(8, (os.cpu_count() or 2) + 1)


def convert(
    input_dir: str,
    output_dir: str,
    *,
    dtype_policy: str = "keep_fp8",
    group_size: int | None = None,
    placement: Placement | None = None,
    placement_source: str = "contiguous",
    mtp: bool | None = None,
    progress: bool = True,
    workers: int = WORKERS,
) -> dict:
    """Converts HF_DIR into OUT_DIR (which must not exist). Returns the metadata.

    `workers` threads each build one item at a time (pread, transposes, dequantization: numpy releases the GIL)
    and save it (orbax, which syncs it to disk), so reads, compute and writes of different items overlap while at
    most `workers` items are in memory; a thread hashes the source files meanwhile."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    input_dir = os.path.abspath(input_dir)
    ckpt = CheckpointDir(input_dir)
    hf_config = read_hf_config(input_dir)
    plan = make_plan(ckpt, hf_config, dtype_policy=dtype_policy, group_size=group_size, placement=placement, mtp=mtp)
    fp8_layout = plan.cfg.weight_block_size is not None
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as hasher, checkpoint.Writer(output_dir) as writer:
        hashes = hasher.submit(hash_files, input_dir, source_files(ckpt), stop)
        try:
            with SourceReader(ckpt, plan.source_cfg.weight_block_size) as reader, tqdm(
                total=plan.source_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="dwdp-convert",
                disable=not progress, mininterval=1.0, file=sys.stderr,
            ) as bar:
                lock = threading.Lock()

                def update(nbytes: int):
                    with lock:
                        bar.update(nbytes)

                arenas = threading.local()

                def write(item: Item):
                    if stop.is_set():  # another item failed: do not start this one
                        return
                    if not hasattr(arenas, "item"):
                        arenas.item, arenas.scratch = Arena(), Arena()
                    arenas.item.reset(sum(slab_bytes(piece, a, b) + 64 for piece, a, b in item.slabs))
                    arrays = {piece.path: read_slab(piece, a, b, reader, fp8_layout, update, arenas.item,
                                                    arenas.scratch)
                              for piece, a, b in item.slabs}
                    writer.save_item(item.name, arrays)

                with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="dwdp-convert") as pool:
                    futures = [pool.submit(write, item) for item in plan.items]
                    try:
                        for future in concurrent.futures.as_completed(futures):
                            future.result()
                    except BaseException:
                        stop.set()
                        for future in futures:
                            future.cancel()
                        raise
            metadata = _metadata(plan, input_dir, hf_config, hashes.result(), placement_source)
        finally:
            stop.set()
        writer.commit(metadata, {"config.json": _output_hf_config(hf_config, plan.cfg)})
    return metadata


def _output_hf_config(hf_config: dict, cfg: config_lib.ModelConfig) -> dict:
    """The source's config.json, edited to describe what the output holds (`from_hf_json(OUT_DIR)` == cfg)."""
    out = dict(hf_config)
    if cfg.weight_block_size is None:
        out.pop("quantization_config", None)
    if not cfg.num_mtp_layers:
        out["num_nextn_predict_layers"] = 0
    return out


def _metadata(plan: Plan, input_dir: str, hf_config: dict, files: list[dict], placement_source: str) -> dict:
    return {
        "format": checkpoint.FORMAT,
        "format_version": checkpoint.FORMAT_VERSION,
        "converter": {"name": "dwdp_jax.convert", "version": CONVERTER_VERSION},
        "orbax_checkpoint_version": ocp.__version__,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": input_dir, "files": files, "ignored_tensors": plan.ignored},
        "hf_config": hf_config,
        "model_config": checkpoint.config_to_json(plan.cfg),
        "dtype_policy": plan.dtype_policy,
        "group_size": plan.group_size,
        "placement_source": placement_source,
        "placement": plan.placement.to_json_dict() if plan.placement is not None else None,
        "mtp": plan.mtp,
        "source_bytes": plan.source_bytes,
        "output_bytes": plan.output_bytes,
        "item_bytes": plan.item_bytes,
        "items": [dict(name=item.name, group=item.group, bytes=item.nbytes) for item in plan.items],
        "params": plan.params,
    }


# --------------------------------------------------------------------------------------------------------- CLI

FLAGS = flags.FLAGS


_FLAGS = [
    (flags.DEFINE_string, "input", None, "HF checkpoint directory: config.json + *.safetensors (+ index if sharded).",
     {}),
    (flags.DEFINE_string, "output", None, "Output directory; must not exist (written to a temporary sibling).", {}),
    (flags.DEFINE_enum, "dtype_policy", "keep_fp8", "keep_fp8: FP8 + block scales as in the source; bf16: "
     "dequantize FP8 weights to bfloat16.", dict(enum_values=POLICIES)),
    (flags.DEFINE_integer, "group_size", None, "DWDP group size: routed experts split contiguously over this many "
     "ranks (default 1, or the placement's rank count).", {}),
    (flags.DEFINE_string, "placement", None, "Placement JSON from the planner (Placement.save) instead of the "
     "contiguous split.", {}),
    (flags.DEFINE_bool, "mtp", None, "Convert the MTP modules (default: when the checkpoint has them).", {}),
    (flags.DEFINE_bool, "inspect", False, "List parameters, shapes, dtypes and per-kind bytes; write nothing.", {}),
    (flags.DEFINE_bool, "verify", False, "Compare every stored tensor bit-exactly with the source (after "
     "converting, or alone when --output already holds a converted checkpoint).", {}),
    (flags.DEFINE_bool, "progress", True, "Show a progress bar (bytes, throughput, ETA).", {}),
    (flags.DEFINE_integer, "workers", None, "Threads building and saving items at once (default: CPUs + 1, at most"
     " 8); each holds one item in memory.", {}),
]


def _define_flags():
    """Defines the CLI's flags at run time, each unless another entry point in this process already has it
    (the launcher shares --group_size and --progress)."""
    for define, name, default, help_text, extra in _FLAGS:
        if name not in FLAGS:
            define(name, default, help=help_text, **extra)


def _pin_mmap_threshold(nbytes: int = 1 << 20):
    """Has glibc serve every allocation above `nbytes` with its own mmap, returned to the OS when freed.

    By default glibc raises its mmap threshold after each large free (up to 32 MiB), so chunk-sized buffers
    then come from the heap and per-thread arenas, where the converter's and TensorStore's threads leave them
    fragmented: peak RSS creeps up by hundreds of MB. Only the CLI process does this (a library must not)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def main(argv) -> int:
    _pin_mmap_threshold()
    if not FLAGS["verbosity"].present:  # orbax logs every item it saves or restores at INFO
        logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        print(f"dwdp-convert: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    try:
        placement = Placement.load(FLAGS.placement) if FLAGS.placement else None
        if FLAGS.inspect:
            target = FLAGS.input or FLAGS.output
            if not target:
                print("dwdp-convert: --inspect needs --input (or a converted --output)", file=sys.stderr)
                return 2
            print(inspect(target, dtype_policy=FLAGS.dtype_policy, group_size=FLAGS.group_size,
                          placement=placement, mtp=FLAGS.mtp))
            return 0
        if not FLAGS.output or not (FLAGS.input or FLAGS.verify):
            print("dwdp-convert: needs --input and --output", file=sys.stderr)
            return 2
        if not (FLAGS.verify and checkpoint.is_checkpoint(FLAGS.output)):
            meta = convert(FLAGS.input, FLAGS.output, dtype_policy=FLAGS.dtype_policy, group_size=FLAGS.group_size,
                           placement=placement, placement_source=FLAGS.placement or "contiguous", mtp=FLAGS.mtp,
                           progress=FLAGS.progress, workers=FLAGS.workers or WORKERS)
            print(f"dwdp-convert: wrote {FLAGS.output}: {len(meta['params'])} parameters, "
                  f"{fmt_bytes(meta['output_bytes'])} from {fmt_bytes(meta['source_bytes'])} of source")
        if FLAGS.verify:
            summary = verify(FLAGS.output, FLAGS.input, progress=FLAGS.progress)
            print(f"dwdp-convert: verified {FLAGS.output}: {summary['arrays']} arrays in {summary['items']} items, "
                  f"{fmt_bytes(summary['bytes'])} bit-exact with the source")
        return 0
    except (ValueError, OSError) as e:  # CheckpointError, ConfigError, PlacementError are ValueErrors
        print(f"dwdp-convert: error: {e}", file=sys.stderr)
        return 1


def run(argv=None):
    """Console-script entry point (`dwdp-convert`)."""
    _define_flags()
    app.run(main, argv=argv)


if __name__ == "__main__":
    run()
