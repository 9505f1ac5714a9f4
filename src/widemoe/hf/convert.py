"""Streaming conversion of a Hugging Face model directory (e.g. an FP8 DeepSeek-V3/R1/Kimi-K2 release
to bf16 that any tool reads), without holding the model in memory.

The books are checked first exactly as `load_pretrained` does (`widemoe.hf.plan.plan_load` against
the model built on ``meta``, the same family adapter), then each output tensor is read, dequantised
and cast on its own and written straight into its shard under the names `save_pretrained` would
write, so peak memory is about one tensor (plus the main tensors that redundant copies are verified
against, e.g. DeepSeek's MTP embed/head copies), never the model. A 671B FP8 checkpoint converts on a
machine with a few GB of RAM. No ``quantization_config`` is written; tokenizer files (data only,
never code) are copied from the source.

Nothing is lost on an error or a kill: every check runs before the destination is touched, and the
output is staged beside it and swapped in whole (`widemoe.hf.staging`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from widemoe.hf.families.base import Slot
from widemoe.hf.loader import resolve_dtype
from widemoe.hf.plan import LoadPlan, check_patterns, model_targets, read_source, target_shapes
from widemoe.hf.safetensors_io import OpenFiles, Pending, parse_size, write_sharded
from widemoe.hf.saver import TOKENIZER_FILES, dtype_name, write_metadata, write_tokenizer
from widemoe.hf.source import CheckpointSource, account_checkpoint, open_checkpoint
from widemoe.hf.staging import check_destination, staged_directory


@dataclass
class ConvertSummary:
    family: str
    notices: list[str] = field(default_factory=list)
    params: int = 0  # floating-point parameters of the model
    tensors: int = 0  # tensors written
    dequantized: int = 0
    scales: int = 0
    shards: int = 0
    verified_copies: int = 0
    ignored: list[str] = field(default_factory=list)  # source keys skipped because --ignore matched
    zero_filled: list[str] = field(default_factory=list)  # model tensors left zero because --ignore matched
    unused_ignores: list[str] = field(default_factory=list)  # patterns that excused nothing


class _Producer:
    """Makes each output tensor on demand from the planned reads (one tensor alive at a time; a fused
    source tensor is kept while its per-expert slices are written)."""

    def __init__(self, src: CheckpointSource, plan: LoadPlan, targets: dict[str, torch.Tensor]) -> None:
        self.src, self.plan, self.targets = src, plan, targets
        self.by_slot = {r.slot: r for r in plan.reads}
        self.files = OpenFiles()
        self.cache: dict[str, torch.Tensor] = {}  # the last whole tensor read

    def __call__(self, slot: Slot, dtype: torch.dtype) -> torch.Tensor:
        r = self.by_slot.get(slot)
        if r is not None:
            self.plan.report.dequantized += int(r.fmt != "plain")
            return read_source(r, self.files, self.src.fp8, dtype)
        whole = Slot(slot.target)  # a slice of a whole-tensor read (fused v5 experts) or a zero-filled ignore
        if whole not in self.by_slot:
            return torch.zeros(slot.shape(tuple(self.targets[slot.target].shape)), dtype=dtype)
        if slot.target not in self.cache:
            self.cache.clear()
            self.cache[slot.target] = self(whole, dtype)
        return slot.view(self.cache[slot.target])


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    dtype: str = "bf16",
    *,
    max_shard_size: int | str = "5GB",
    ignore: list[str] | tuple[str, ...] = (),
    overwrite: bool = False,
) -> ConvertSummary:
    """Stream-convert HF directory ``src`` into ``dst`` (see the module docstring).

    Everything is checked before ``dst`` is touched: the options, the destination
    (`widemoe.hf.staging.check_destination`: a non-empty ``dst`` needs ``overwrite=True``, which
    replaces its model files and keeps the rest) and the source's accounting. The output is written
    into a temporary directory beside ``dst`` and swapped in only when complete, so a failure or a
    kill leaves ``dst`` exactly as it was.
    """
    from widemoe.model.causal_lm import build_model  # the model layer, on meta: no weights

    limit = parse_size(max_shard_size)
    check_patterns(ignore)
    source, dst = open_checkpoint(src), Path(dst)
    check_destination(dst, source.path, overwrite=overwrite)
    cfg, adapter = source.cfg, source.adapter
    dt = resolve_dtype(dtype, source.hf)
    targets = model_targets(build_model(cfg, device="meta").to(dt))  # the router stays fp32
    plan = account_checkpoint(source, target_shapes(targets), ignore=ignore)
    produce = _Producer(source, plan, targets)
    layout = adapter.layouts[0]
    hf = adapter.config_file(cfg, dtype=dtype_name(dt), layout=layout)  # raises before any write
    items: list[Pending] = []
    for name, t in targets.items():
        for key, slot in adapter.target_keys(name, tuple(t.shape), cfg, layout):
            make = lambda slot=slot, d=t.dtype: produce(slot, d)  # noqa: E731
            items.append(Pending(key, t.dtype, slot.shape(tuple(t.shape)), make))
    for key, of in adapter.redundant_keys(cfg):  # verified by the accounting; written from the main
        t = targets[of]
        items.append(Pending(key, t.dtype, tuple(t.shape), lambda of=of, d=t.dtype: produce(Slot(of), d)))
    with staged_directory(dst, TOKENIZER_FILES) as tmp, produce.files:
        shards = write_sharded(tmp, items, limit)
        write_metadata(tmp, hf, cfg)
        write_tokenizer(source.path, tmp, cfg)
    report = plan.report
    return ConvertSummary(
        family=cfg.model_type,
        notices=source.all_notices(),
        params=sum(t.numel() for t in targets.values() if t.dtype.is_floating_point),
        tensors=len(items),
        dequantized=report.dequantized,
        scales=report.scales,
        shards=shards,
        verified_copies=len(report.verified_copies),
        ignored=list(report.ignored),
        zero_filled=list(report.zero_filled),
        unused_ignores=list(report.unused_ignores),
    )


__all__ = ["ConvertSummary", "convert_checkpoint"]
