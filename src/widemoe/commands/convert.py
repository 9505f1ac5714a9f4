"""`widemoe convert SRC DST [--dtype bf16|fp32]`: rewrite a Hugging Face model directory.

Typical use: an FP8 DeepSeek-V3/R1/Kimi-K2 directory to a bf16 one that any tool reads. SRC is loaded
strictly through ``widemoe.hf.load_pretrained`` (every tensor accounted for, FP8 dequantised on CPU),
and written by ``widemoe.hf.save_pretrained`` with the family's on-disk names, per-expert keys, MTP
layers, an index when sharded, and no ``quantization_config``. Tokenizer files (data only, never
code) are copied from SRC.

Memory: the conversion streams. The books are checked first exactly as ``load_pretrained`` does
(strict accounting against the model built on ``meta``), then each output tensor is read, dequantised
and cast on its own and written straight into its shard, so peak memory is about one tensor (plus
the embedding, held while the MTP copies of it are verified), never the model. A 671B FP8 checkpoint
converts on a machine with a few GB of RAM.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert",
        help="convert a Hugging Face MoE checkpoint (e.g. FP8 -> bf16)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", type=Path, help="source Hugging Face model directory")
    p.add_argument("dst", type=Path, help="destination directory (created)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="dtype of the written weights")
    p.add_argument("--max-shard-size", default="5GB", help="shard the weights above this size (default 5GB)")
    p.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="REGEX",
        help="skip source tensors (or leave model tensors zero) matching REGEX; repeatable",
    )
    p.set_defaults(func=run)
    return p


def convert(
    src: Path,
    dst: Path,
    dtype: str = "bf16",
    *,
    max_shard_size: int | str = "5GB",
    ignore: list[str] | tuple[str, ...] = (),
) -> dict:
    """Stream-convert HF directory ``src`` into ``dst`` (see the module docstring); returns a summary."""
    import torch

    from widemoe.hf import fp8 as fp8mod
    from widemoe.hf.config_map import hf_to_model_config, model_config_to_hf
    from widemoe.hf.keymap import Slot, redundant_hf_keys, slot_to_hf
    from widemoe.hf.loader import (
        LoadError,
        drop_absent_mtp,
        find_weight_files,
        model_targets,
        plan_load,
        read_hf_config,
        read_tensor,
        read_tensor_table,
        resolve_dtype,
        target_shapes,
    )
    from widemoe.hf.saver import Pending, write_metadata, write_sharded, write_tokenizer
    from widemoe.model.transformer import build_model

    hf = read_hf_config(src)
    cfg, notices = hf_to_model_config(hf, source=str(src / "config.json"))
    spec = fp8mod.parse_quantization_config(hf.get("quantization_config"), source=str(src / "config.json"))
    table = read_tensor_table(src, find_weight_files(src))
    cfg, notice = drop_absent_mtp(cfg, table)
    if notice:
        notices.append(notice)
    dt = resolve_dtype(dtype, hf)
    meta = build_model(cfg, device="meta").to(dt)  # the router stays fp32, as in a loaded model
    targets = model_targets(meta)
    reads, verifies, report = plan_load(
        cfg,
        target_shapes(targets),
        table,
        fp8=spec,
        ignore=ignore,
        path=str(src),
    )
    by_slot = {r.slot: r for r in reads}
    handles: dict[Path, object] = {}

    def fh(p: Path):  # noqa: ANN202 - one open handle per source shard
        if p not in handles:
            handles[p] = open(p, "rb", buffering=0)  # noqa: SIM115 - closed in the finally below
        return handles[p]

    cache: dict[str, torch.Tensor] = {}  # the last whole tensor read (fused experts are sliced from it)

    def produce(slot: Slot, out_dtype: torch.dtype) -> torch.Tensor:
        r = by_slot.get(slot)
        if r is None:  # a slice of a whole-tensor read (fused v5 experts) or a zero-filled ignore
            whole = Slot(slot.target)
            if whole not in by_slot:
                return torch.zeros(slot.shape(tuple(targets[slot.target].shape)), dtype=out_dtype)
            if slot.target not in cache:
                cache.clear()
                cache[slot.target] = produce(whole, out_dtype)
            return slot.view(cache[slot.target])
        t = read_tensor(r.info, fh(r.info.file))
        if r.scale is not None:
            assert spec is not None
            report.dequantized += 1
            return fp8mod.dequantize(
                t, read_tensor(r.scale, fh(r.scale.file)), spec.block, out_dtype=out_dtype
            )
        return t.to(out_dtype)

    items: list[Pending] = []
    for name, t in targets.items():
        for key, slot in slot_to_hf(name, tuple(t.shape), cfg):
            items.append(
                Pending(
                    key, t.dtype, slot.shape(tuple(t.shape)), lambda slot=slot, d=t.dtype: produce(slot, d)
                )
            )
    copies = redundant_hf_keys(cfg)
    if copies:  # verify the MTP copies against their main tensors, then write them from the main ones
        mains = {of: produce(Slot(of), targets[of].dtype) for _, of in copies}
        bad = [
            f"{v.info.key}: differs from {v.of} (expected an identical copy)"
            for v in verifies
            if not torch.equal(read_tensor(v.info, fh(v.info.file)).to(mains[v.of].dtype), mains[v.of])
        ]
        if bad:
            raise LoadError(str(src), [], [], [], bad)
        report.verified_copies = [v.info.key for v in verifies]
        items += [Pending.of(key, mains[of]) for key, of in copies]
    try:
        shards = write_sharded(dst, items, max_shard_size)
    finally:
        for h in handles.values():
            h.close()
    write_metadata(dst, model_config_to_hf(cfg, dtype=str(dt).replace("torch.", "")), cfg)
    write_tokenizer(src, dst, cfg)
    n_params = sum(t.numel() for t in targets.values() if t.dtype.is_floating_point)
    return {
        "family": cfg.model_type,
        "notices": notices,
        "params": n_params,
        "tensors": len(items),
        "dequantized": report.dequantized,
        "scales": report.scales,
        "shards": shards,
        "verified_copies": len(report.verified_copies),
        "ignored": len(report.ignored),
    }


def run(args: argparse.Namespace) -> int:
    from widemoe.config import ConfigError
    from widemoe.hf import LoadError, PickleCheckpointError

    src, dst = Path(args.src), Path(args.dst)
    if dst.resolve() == src.resolve():
        print("error: DST must differ from SRC (the source shards are read while writing)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        info = convert(src, dst, args.dtype, max_shard_size=args.max_shard_size, ignore=args.ignore)
    except (LoadError, PickleCheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for n in info["notices"]:
        print(f"note: {n}")
    print(
        f"{src} -> {dst}: {info['family']}, {info['params'] / 1e6:.2f}M parameters as {args.dtype} in "
        f"{info['shards']} shard(s); {info['tensors']} tensors written "
        f"({info['dequantized']} FP8-dequantised, "
        f"{info['scales']} scales consumed), {info['verified_copies']} MTP copies verified, "
        f"{info['ignored']} ignored; {time.perf_counter() - t0:.1f}s"
    )
    return 0
