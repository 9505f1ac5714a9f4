"""Load a Hugging Face model directory into widemoe, with strict accounting and bounded memory.

What it guarantees (shared/reference/user-needs.md items 1, 3, 14, 19, 23):

- **Strict accounting** (`widemoe.hf.source.account_checkpoint`, the one check `inspect` and `convert`
  run too): every source tensor is mapped by the family adapter and checked before a weight is loaded,
  redundant copies are verified against what they copy; a gap is a :class:`LoadError` listing the
  keys. A missing or truncated weight file is a `DamagedCheckpointError` (a `LoadError`) naming it.
- **Memory.** The model is built with parameters on ``meta`` (buffers real), then allocated empty in
  the target dtype. Tensors are read one at a time straight from the safetensors file into the
  preallocated parameter (``readinto``, no mmap, no intermediate copy) when the dtype matches, or
  through one temporary tensor when converting / dequantising FP8 or FP4. Peak RSS stays near the
  model size plus the largest tensor.
- **Safety.** Weights come only from safetensors (`widemoe.hf.safetensors_io`); pickle checkpoints are
  refused; ``auto_map`` / remote code are ignored with a notice; nothing is executed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from widemoe.config import ModelConfig
from widemoe.hf import fp8 as fp8mod
from widemoe.hf.plan import LoadReport, Read, model_targets, read_source, target_shapes
from widemoe.hf.safetensors_io import OpenFiles, read_into, read_tensor
from widemoe.hf.source import CheckpointSource, account_checkpoint, open_checkpoint

log = logging.getLogger("widemoe.hf")


def _by_file(items: Iterable[Any]) -> list[Any]:
    """Reads in file order, then byte order within each file (sequential I/O)."""
    return sorted(items, key=lambda it: (str(it.info.file), it.info.start))


@torch.no_grad()
def execute_load(
    targets: dict[str, torch.Tensor],
    reads: list[Read],
    report: LoadReport,
    *,
    fp8: fp8mod.Fp8Spec | None = None,
) -> LoadReport:
    """Fill ``targets`` (name -> preallocated tensor) from the planned reads, file by file (the
    redundant copies were verified by the accounting)."""
    t0 = time.perf_counter()
    for name in report.zero_filled:
        targets[name].zero_()
    with OpenFiles() as files:
        for r in _by_file(reads):
            dst = r.slot.view(targets[r.slot.target])
            if (
                r.fmt == "plain"
                and r.info.dtype == dst.dtype
                and dst.is_contiguous()
                and dst.device.type == "cpu"
            ):
                read_into(r.info, dst, files(r.info.file))
            elif r.fmt == "fp8":  # dequantised straight into the destination
                assert fp8 is not None and r.scale is not None
                w_q, s = read_tensor(r.info, files(r.info.file)), read_tensor(r.scale, files(r.scale.file))
                fp8mod.dequantize(w_q, s, fp8.block, out=dst)
            else:
                dst.copy_(read_source(r, files, fp8, torch.float32 if r.fmt == "fp4" else r.info.dtype))
            report.dequantized += int(r.fmt != "plain")
            report.tensors_read += 1
            report.bytes_read += r.nbytes
    report.seconds = time.perf_counter() - t0
    return report


def load_into(
    model: nn.Module,
    path: str | Path,
    cfg: ModelConfig | None = None,
    *,
    ignore: Iterable[str] = (),
    source: CheckpointSource | None = None,
) -> LoadReport:
    """Load the weights of HF directory ``path`` into an allocated ``model`` (strict accounting:
    `widemoe.hf.source.account_checkpoint`, the same check `inspect` and `convert` run)."""
    src = source if source is not None else open_checkpoint(path)
    targets = model_targets(model)
    cfg = cfg if cfg is not None else model.config  # type: ignore[assignment]
    plan = account_checkpoint(src, target_shapes(targets), cfg=cfg, ignore=ignore)
    return execute_load(targets, plan.reads, plan.report, fp8=src.fp8)


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Create parameters on ``meta`` (no memory, no init cost) while buffers stay real (RoPE tables)."""
    orig = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        orig(self, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = orig  # type: ignore[method-assign]


def allocate_empty(model: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """Replace meta parameters by uninitialised ones on ``device``, keeping dtypes and ties."""
    memo: dict[int, nn.Parameter] = {}
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in memo:
                memo[id(p)] = nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=p.requires_grad
                )
            mod._parameters[name] = memo[id(p)]
    return model


_DTYPE_NAMES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None, hf: dict[str, Any]) -> torch.dtype:
    """``auto``/None: the checkpoint's dtype (FP8 checkpoints: bf16), else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype={dtype!r}: choose bf16, fp32 or fp16")
        return _DTYPE_NAMES[dtype]
    if hf.get("quantization_config"):
        return torch.bfloat16
    return _DTYPE_NAMES.get(str(hf.get("dtype") or hf.get("torch_dtype")), torch.float32)


def load_pretrained(
    path: str | Path,
    dtype: str | torch.dtype | None = "auto",
    *,
    ignore: Iterable[str] = (),
    device: str | torch.device = "cpu",
    model_cls: type[nn.Module] | None = None,
) -> nn.Module:
    """Load an HF model directory (config.json + safetensors) as a widemoe model in eval mode.

    The family comes from ``model_type`` / ``architectures``. The load report (notices, counts,
    verified copies, timing) is attached as ``model.load_report``.
    """
    src = open_checkpoint(path)
    for n in src.notices:
        log.warning("%s: %s", src.path, n)
    notices = src.all_notices()
    if any(src.path.glob("*.py")):
        notices.append("python files in the directory were ignored (never imported)")
    if model_cls is None:
        from widemoe.model.causal_lm import WideMoeForCausalLM as model_cls
    dt = resolve_dtype(dtype, src.hf)
    with params_on_meta():
        model = model_cls(src.cfg)
    model.to(dt)  # params are meta (free); the model's own rules keep the router fp32
    allocate_empty(model, device)
    report = load_into(model, src.path, src.cfg, ignore=ignore, source=src)
    report.notices = notices + report.notices
    report.family = src.cfg.model_type
    model.load_report = report  # type: ignore[attr-defined]
    return model.to(device).eval()  # parameters are there already; this moves the RoPE buffers


__all__ = [
    "allocate_empty",
    "execute_load",
    "load_into",
    "load_pretrained",
    "params_on_meta",
    "resolve_dtype",
]
