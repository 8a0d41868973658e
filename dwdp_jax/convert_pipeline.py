"""The conversion: the planned items (`convert_plan`) built by a pool of threads from the source
(`convert_source`), saved by `checkpoint.Writer` and committed with the metadata record.

Orbax saves an item from memory, so the output is cut into items of at most about ITEM_BYTES. Each of `workers`
threads builds one item and saves it (orbax and the writer sync it to disk before returning), so the reads,
transposes and dequantization of some items overlap the writes of others, while threads of `convert_hash.
SourceHasher` hash the source files. Peak memory is about `workers` items plus the interpreter, whatever the
checkpoint size. A progress bar shows source bytes converted, throughput and ETA.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import os
import sys
import threading

import orbax.checkpoint as ocp
from tqdm import tqdm

from dwdp_jax import checkpoint
from dwdp_jax import config as config_lib
from dwdp_jax.convert_hash import SourceHasher, source_files
from dwdp_jax.convert_plan import Item, Plan, make_plan, read_hf_config, slab_bytes
from dwdp_jax.convert_source import Arena, SourceReader, is_view, read_slab
from dwdp_jax.planner.placement import Placement
from dwdp_jax.safetensors_io import CheckpointDir

CONVERTER_VERSION = "2.0"
# Items built and saved at once (each thread holds one): 3 on the 2-core machine of experiments/bench_convert.py
# (3 to 8 give the same times there, within its noise; 2 was slower); more cores and faster disks take more.
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
    workers: int | None = None,
    hasher: SourceHasher | None = None,
) -> dict:
    """Converts HF_DIR into OUT_DIR (which must not exist). Returns the metadata.

    `workers` (default WORKERS) threads each build one item at a time (reads, transposes, dequantization: numpy
    releases the GIL) and save it (orbax and the writer sync it to disk), so reads, compute and writes of
    different items overlap while at most `workers` items are in memory; `hasher` (started here when None or
    hashing other files; closed here) hashes the source files meanwhile."""
    workers = WORKERS if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    input_dir = os.path.abspath(input_dir)
    with contextlib.ExitStack() as stack:
        if hasher is not None:
            stack.enter_context(hasher)
        ckpt = CheckpointDir(input_dir)
        if hasher is None or (hasher.root, hasher.names) != (input_dir, source_files(input_dir)):
            hasher = stack.enter_context(SourceHasher(input_dir, source_files(input_dir)))
        hf_config = read_hf_config(input_dir)
        plan = make_plan(ckpt, hf_config, dtype_policy=dtype_policy, group_size=group_size, placement=placement,
                         mtp=mtp)
        fp8_layout = plan.cfg.weight_block_size is not None
        writer = stack.enter_context(checkpoint.Writer(output_dir))
        reader = stack.enter_context(SourceReader(ckpt, plan.source_cfg.weight_block_size))
        bar = stack.enter_context(tqdm(
            total=plan.source_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="dwdp-convert",
            disable=not progress, mininterval=1.0, file=sys.stderr))
        lock, stop, arenas = threading.Lock(), threading.Event(), threading.local()

        def update(nbytes: int):
            with lock:
                bar.update(nbytes)

        def write(item: Item):
            if stop.is_set():  # another item failed: do not start this one
                return
            if not hasattr(arenas, "item"):
                arenas.item, arenas.scratch = Arena(), Arena()
            arenas.item.reset(sum(slab_bytes(piece, a, b) + 64 for piece, a, b in item.slabs if not is_view(piece)))
            arrays = {piece.path: read_slab(piece, a, b, reader, fp8_layout, update, arenas.item, arenas.scratch)
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
        bar.close()
        metadata = _metadata(plan, input_dir, hf_config, hasher.result(), placement_source)
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
