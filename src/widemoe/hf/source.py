"""A Hugging Face model directory opened for reading: config.json mapped by its family adapter, the
FP8 quantisation spec, and the tensor table of its safetensors headers (no tensor data read yet),
and `account_checkpoint`, the one accounting of a checkpoint against a model. The loader, the
streaming converter and `inspect` all start here and run that same accounting."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from widemoe.config import ModelConfig
from widemoe.hf import fp8 as fp8mod
from widemoe.hf.errors import LoadError
from widemoe.hf.families.base import FamilyAdapter
from widemoe.hf.plan import LoadPlan, TargetShapes, drop_absent_mtp, plan_load, verify_copies
from widemoe.hf.registry import adapter_for_hf
from widemoe.hf.safetensors_io import (
    OpenFiles,
    TensorInfo,
    find_weight_files,
    read_hf_config,
    read_tensor_table,
)


@dataclass
class CheckpointSource:
    path: Path
    hf: dict[str, Any]  # config.json as read
    adapter: FamilyAdapter
    declared: ModelConfig  # what config.json says (MTP modules included)
    notices: list[str]  # what the config mapping noticed (ignored remote code, unused fields, ...)
    fp8: fp8mod.Fp8Spec | None
    files: list[Path]
    table: dict[str, TensorInfo]
    cfg: ModelConfig  # what loads: `declared` without MTP modules when the weights have none
    mtp_notice: str | None = None  # says so when it happened

    def all_notices(self) -> list[str]:
        return self.notices + ([self.mtp_notice] if self.mtp_notice else [])


def open_checkpoint(path: str | Path) -> CheckpointSource:
    """Read config.json and the safetensors headers of ``path`` (ConfigError / LoadError-free: the
    books are checked later, by `widemoe.hf.plan.plan_load`)."""
    path = Path(path)
    hf = read_hf_config(path)
    source = str(path / "config.json")
    adapter = adapter_for_hf(hf, source=source)
    declared, notices = adapter.config_from_hf(hf, source=source)
    spec = fp8mod.parse_quantization_config(hf.get("quantization_config"), source=source)
    files = find_weight_files(path)
    table = read_tensor_table(path, files)
    cfg, notice = drop_absent_mtp(declared, table, adapter)
    return CheckpointSource(path, hf, adapter, declared, notices, spec, files, table, cfg, notice)


def account_checkpoint(
    src: CheckpointSource,
    targets: TargetShapes,
    *,
    cfg: ModelConfig | None = None,
    ignore: Iterable[str] = (),
) -> LoadPlan:
    """The accounting of checkpoint ``src`` against a model's ``targets`` (built from ``cfg``, default
    ``src.cfg``): `plan_load`'s books, then the redundant copies verified against what they copy.

    The one check that the loader, the converter and `inspect` all run, so they agree: a directory
    passes here exactly when it loads. Raises `LoadError` listing every problem. Reads only the
    redundant copies and the tensors they copy, in bounded chunks where their dtypes match.
    """
    plan = plan_load(
        cfg or src.cfg,
        targets,
        src.table,
        adapter=src.adapter,
        fp8=src.fp8,
        ignore=ignore,
        path=str(src.path),
    )
    with OpenFiles() as files:
        bad = verify_copies(plan, targets, files, src.fp8)
    if bad:
        raise LoadError(str(src.path), [], [], [], bad)
    plan.report.verified_copies = [v.info.key for v in plan.verifies]
    return plan


__all__ = ["CheckpointSource", "account_checkpoint", "open_checkpoint"]
