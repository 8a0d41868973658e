"""`dwdp-convert`: converts an HF DeepSeek-V3/R1 checkpoint into our orbax checkpoint (`dwdp_jax.checkpoint`).

    dwdp-convert --input=HF_DIR --output=OUT_DIR [--dtype_policy=keep_fp8|bf16]
        [--group_size=G | --placement=placement.json] [--mtp|--nomtp] [--inspect] [--verify] [--workers=N]
    (or python -m dwdp_jax.convert ...)

Every model parameter is built from its HF tensors by the same table the loader uses (`weights.hf_source`):
`convert_plan` decides what is written (stored dtypes per policy, per-rank expert arrays, orbax items),
`convert_source` reads and lays out each slab, `convert_pipeline` builds and saves the items in threads and
commits the checkpoint, `convert_hash` hashes the source files meanwhile. This module is the command line; it
loads no JAX before the hashing has started, and gives the library's names (`convert`, `verify`, `inspect`, ...)
on first use.

--inspect lists the parameters the conversion would write (or a converted checkpoint holds), with shapes,
dtypes and per-kind byte totals, and writes nothing. --verify restores every item through orbax and compares it
bit-exactly with the tensors re-derived from the source through `weights.hf_source`/`weights.assemble` (after
converting, or alone when OUT_DIR already holds a converted checkpoint).
"""

from __future__ import annotations

import importlib
import os
import sys

from absl import app, flags, logging

from dwdp_jax.convert_hash import SourceHasher, source_files

_LIBRARY = {  # name -> module, loaded on first use
    "CONVERTER_VERSION": "convert_pipeline", "WORKERS": "convert_pipeline", "convert": "convert_pipeline",
    "POLICIES": "convert_plan", "make_plan": "convert_plan", "SourceReader": "convert_source",
    "VerifyError": "convert_check", "inspect": "convert_check", "verify": "convert_check",
}


def __getattr__(name: str):
    if name not in _LIBRARY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"dwdp_jax.{_LIBRARY[name]}"), name)


# --------------------------------------------------------------------------------------------------------- CLI

FLAGS = flags.FLAGS


_FLAGS = [
    (flags.DEFINE_string, "input", None, "HF checkpoint directory: config.json + *.safetensors (+ index if sharded).",
     {}),
    (flags.DEFINE_string, "output", None, "Output directory; must not exist (written to a temporary sibling).", {}),
    (flags.DEFINE_string, "dtype_policy", "keep_fp8", "keep_fp8: FP8 + block scales as in the source; bf16: "
     "dequantize FP8 weights to bfloat16.", {}),
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
    if len(argv) > 1:
        print(f"dwdp-convert: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    converting = bool(FLAGS.input and FLAGS.output and not FLAGS.inspect)
    hasher = _start_hashing(FLAGS.input) if converting else None
    # JAX, orbax and the model load here, while the hasher's threads run (`dwdp_jax` loads its names lazily).
    from dwdp_jax import checkpoint, convert_check, convert_pipeline
    from dwdp_jax.planner.placement import Placement

    if not FLAGS["verbosity"].present:  # orbax logs every item it saves or restores at INFO
        logging.set_verbosity(logging.WARNING)
    try:
        placement = Placement.load(FLAGS.placement) if FLAGS.placement else None
        if FLAGS.inspect:
            target = FLAGS.input or FLAGS.output
            if not target:
                print("dwdp-convert: --inspect needs --input (or a converted --output)", file=sys.stderr)
                return 2
            print(convert_check.inspect(target, dtype_policy=FLAGS.dtype_policy, group_size=FLAGS.group_size,
                                        placement=placement, mtp=FLAGS.mtp))
            return 0
        if not FLAGS.output or not (FLAGS.input or FLAGS.verify):
            print("dwdp-convert: needs --input and --output", file=sys.stderr)
            return 2
        if not (FLAGS.verify and checkpoint.is_checkpoint(FLAGS.output)):
            meta = convert_pipeline.convert(
                FLAGS.input, FLAGS.output, dtype_policy=FLAGS.dtype_policy, group_size=FLAGS.group_size,
                placement=placement, placement_source=FLAGS.placement or "contiguous", mtp=FLAGS.mtp,
                progress=FLAGS.progress, workers=FLAGS.workers, hasher=hasher)
            print(f"dwdp-convert: wrote {FLAGS.output}: {len(meta['params'])} parameters, "
                  f"{convert_check.fmt_bytes(meta['output_bytes'])} from"
                  f" {convert_check.fmt_bytes(meta['source_bytes'])} of source")
        if FLAGS.verify:
            summary = convert_check.verify(FLAGS.output, FLAGS.input, progress=FLAGS.progress)
            print(f"dwdp-convert: verified {FLAGS.output}: {summary['arrays']} arrays in {summary['items']} items, "
                  f"{convert_check.fmt_bytes(summary['bytes'])} bit-exact with the source")
        return 0
    except (ValueError, OSError) as e:  # CheckpointError, ConfigError, PlacementError are ValueErrors
        print(f"dwdp-convert: error: {e}", file=sys.stderr)
        return 1
    finally:
        if hasher is not None:  # unless the conversion used it (and closed it): stop it, or exit waits for it
            hasher.close()


def _start_hashing(input_dir: str) -> SourceHasher | None:
    """The source's hasher, started before anything else; None when the directory is not readable as a
    checkpoint (the conversion then reports why)."""
    try:
        return SourceHasher(os.path.abspath(input_dir), source_files(input_dir))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def run(argv=None):
    """Console-script entry point (`dwdp-convert`)."""
    _define_flags()
    app.run(main, argv=argv)


if __name__ == "__main__":
    run()
