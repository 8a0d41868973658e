"""Checking and listing conversions: `verify` (every stored byte against the source) and `inspect` (what a
conversion writes, or what a converted checkpoint holds)."""

from __future__ import annotations

import os
import sys

import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from dwdp_jax import checkpoint, weights
from dwdp_jax.convert_plan import Piece, make_plan, prod, read_hf_config
from dwdp_jax.convert_hash import SourceHasher
from dwdp_jax.convert_source import SourceReader
from dwdp_jax.planner.placement import Placement
from dwdp_jax.safetensors_io import CheckpointDir, CheckpointError


class VerifyError(CheckpointError):
    """A converted checkpoint does not match its source."""



def verify(output_dir: str, input_dir: str | None = None, *, check_hashes: bool = True, progress: bool = True) -> dict:
    """Restores every item through orbax (on the host, one at a time) and compares it bit-exactly with the
    tensors re-derived from the source (`weights.hf_source` + `weights.assemble`); also checks that the source
    files still have the recorded sizes and sha256 and that the stored parameters and items are exactly the
    planned ones. Raises VerifyError naming the item and array; returns a summary."""
    output_dir = os.path.abspath(output_dir)
    meta = checkpoint.read_metadata(output_dir)
    input_dir = os.path.abspath(input_dir or meta["source"]["path"])
    ckpt = CheckpointDir(input_dir)
    if check_hashes:
        recorded = {f["name"]: f for f in meta["source"]["files"]}
        with SourceHasher(input_dir, list(recorded)) as hasher:
            hashes = hasher.result()
        for now in hashes:
            then = recorded[now["name"]]
            if (now["bytes"], now["sha256"]) != (then["bytes"], then["sha256"]):
                raise VerifyError(
                    f"{os.path.join(input_dir, now['name'])}: changed since conversion ({now['bytes']} bytes,"
                    f" sha256 {now['sha256'][:16]}..., recorded {then['bytes']} bytes, {then['sha256'][:16]}...)"
                )
    placement = Placement.from_json_dict(meta["placement"]) if meta["placement"] else None
    plan = make_plan(ckpt, read_hf_config(input_dir), dtype_policy=meta["dtype_policy"],
                     group_size=meta["group_size"], placement=placement, mtp=meta["mtp"],
                     item_bytes=meta["item_bytes"])
    stored = {p["key"]: p for p in meta["params"]}
    planned = {p["key"]: p for p in plan.params}
    odd = sorted(set(stored) ^ set(planned))
    if odd:
        raise VerifyError(f"{output_dir}: parameter {odd[0]} is {'missing' if odd[0] in planned else 'unexpected'}")
    for key, p in planned.items():
        if p["arrays"] != stored[key]["arrays"] or p["dtype"] != stored[key]["dtype"]:
            raise VerifyError(f"{output_dir}: parameter {key}: stored arrays differ from the planned ones")
    expected = {item.name for item in plan.items}
    on_disk = {d for d in os.listdir(output_dir)
               if os.path.isdir(os.path.join(output_dir, d)) and d != checkpoint.METADATA_ITEM}
    odd = sorted(on_disk ^ expected)
    if odd:
        raise VerifyError(f"{output_dir}: item {odd[0]} is {'missing' if odd[0] in expected else 'unexpected'}")

    fp8_layout = plan.cfg.weight_block_size is not None
    reference = (None, None)  # (piece key, whole stored array): a piece's slabs lie in consecutive items
    with SourceReader(ckpt, plan.source_cfg.weight_block_size) as reader, tqdm(
        total=plan.output_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="dwdp-verify",
        disable=not progress, mininterval=1.0, file=sys.stderr,
    ) as bar:
        for item in plan.items:
            where = os.path.join(output_dir, item.name)
            try:
                restored = checkpoint.restore_items(
                    output_dir, {item.name: {piece.path: ocp.RestoreArgs(restore_type=np.ndarray)
                                             for piece, _, _ in item.slabs}})[item.name]
            except CheckpointError as e:
                raise VerifyError(str(e)) from e
            for piece, a, b in item.slabs:
                got = restored[piece.path]
                if piece.experts is not None:
                    for slot in range(a, b):
                        expert = piece.experts[slot]
                        ref = _reference(piece, weights.hf_source(piece.path, plan.cfg, [expert]), reader, fp8_layout)
                        _compare(f"{where}: {piece.key}", f"expert {expert} (slot {slot})",
                                 got[slot - a : slot - a + 1], ref)
                else:
                    if reference[0] != piece.key:
                        reference = (piece.key, _reference(piece, piece.source, reader, fp8_layout))
                    index = (slice(None),) * piece.axis + (slice(a, b),)
                    what = f"{'rows' if piece.axis == 0 else 'columns'} {a}:{b}"
                    _compare(f"{where}: {piece.key}", what, got, reference[1][index])
                bar.update(got.nbytes)
    return {"arrays": len(plan.pieces), "items": len(plan.items), "bytes": plan.output_bytes,
            "source_bytes": plan.source_bytes}


def _reference(piece: Piece, src: weights.Source, reader: SourceReader, fp8_layout: bool) -> np.ndarray:
    """What the stored array (or one expert of it) must hold, built by the HF loader's `weights.assemble`."""
    array = weights.assemble(src, reader, keep_fp8=not piece.dequantize, block=reader.block, fp8_experts=fp8_layout)
    return array.astype(piece.dtype, copy=False)


def _compare(where: str, what: str, got: np.ndarray, ref: np.ndarray):
    if got.shape != ref.shape or got.dtype != ref.dtype:
        raise VerifyError(f"{where}: {what}: stored {got.dtype}{got.shape}, source gives {ref.dtype}{ref.shape}")
    a, b = got.reshape(-1).view(np.uint8), np.ascontiguousarray(ref).reshape(-1).view(np.uint8)
    if not np.array_equal(a, b):
        raise VerifyError(f"{where}: {what}: {int((a != b).sum())} of {a.size} bytes differ from the source")


# ---------------------------------------------------------------------------------------------------- inspect


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def inspect(
    path: str,
    *,
    dtype_policy: str = "keep_fp8",
    group_size: int | None = None,
    placement: Placement | None = None,
    mtp: bool | None = None,
) -> str:
    """A table of the parameters a conversion of HF dir `path` would write (or converted checkpoint `path`
    holds): shape, stored and source dtype, bytes, arrays; then totals per kind. Writes nothing."""
    if checkpoint.is_checkpoint(path):
        meta = checkpoint.read_metadata(path)
        params = meta["params"]
        header = (f"{path}: converted checkpoint (dtype_policy={meta['dtype_policy']}, group_size="
                  f"{meta['group_size']}, placement={meta['placement_source']}, mtp={meta['mtp']}; orbax composite"
                  f" checkpoint of {len(meta['items'])} items)")
    else:
        ckpt = CheckpointDir(path)
        plan = make_plan(ckpt, read_hf_config(path), dtype_policy=dtype_policy, group_size=group_size,
                         placement=placement, mtp=mtp)
        params = plan.params
        files = len(ckpt.shards)
        header = (f"{path}: HF checkpoint, {len(ckpt.names())} tensors in {files} shard(s); conversion with"
                  f" dtype_policy={dtype_policy}, group_size={plan.group_size}, mtp={plan.mtp}, into"
                  f" {len(plan.items)} orbax items of at most {fmt_bytes(plan.item_bytes)}"
                  + (f"; {len(plan.ignored)} tensors not converted" if plan.ignored else ""))
    lines = [header, f"{'parameter':<48} {'kind':<15} {'shape':<22} {'dtype':<14} {'source':<14} {'bytes':>11}  arrays"]
    totals: dict[str, list] = {}
    for p in params:
        out_bytes = sum(prod(a["shape"]) * np.dtype(a["dtype"]).itemsize for a in p["arrays"])
        arrays = f"{len(p['arrays'])} ranks" if len(p["arrays"]) > 1 else "1"
        slabs = sum(len(a["slabs"]) for a in p["arrays"])
        arrays += f", {slabs} slabs" if slabs > len(p["arrays"]) else ""
        lines.append(f"{p['key']:<48} {p['kind']:<15} {str(p['shape']):<22} {p['dtype']:<14} {p['source_dtype']:<14}"
                     f" {fmt_bytes(out_bytes):>11}  {arrays}")
        t = totals.setdefault(p["kind"], [0, 0, 0])
        t[0] += 1
        t[1] += p["source_bytes"]
        t[2] += out_bytes
    lines.append("")
    lines.append(f"{'kind':<16} {'params':>7} {'source bytes':>14} {'output bytes':>14}")
    for kind, (n, src, out) in sorted(totals.items()):
        lines.append(f"{kind:<16} {n:>7} {fmt_bytes(src):>14} {fmt_bytes(out):>14}")
    n, src, out = (sum(t[i] for t in totals.values()) for i in range(3))
    lines.append(f"{'total':<16} {n:>7} {fmt_bytes(src):>14} {fmt_bytes(out):>14}")
    return "\n".join(lines)
