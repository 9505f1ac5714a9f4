"""Strict accounting of a checkpoint against a model, before a byte of weights is read.

Every source tensor is mapped to a destination by the family adapter and checked against the model's
parameters and persistent buffers (shape and, for quantised tensors, the scale grid). The plan fails
with :class:`LoadError` listing missing keys, unexpected keys and shape mismatches (expected vs found)
unless every source tensor is consumed and every destination is written exactly once. Quantisation
scales (FP8 ``weight_scale_inv`` / FP4 ``scale``) and redundant copies (DeepSeek MTP embed/head, a tied
``lm_head``) are accounted for too. ``ignore=`` (regular expressions, ``re.search``) is the explicit
escape hatch: ignored sources are skipped, ignored missing destinations are zero-filled, and both are
reported. The loader (`widemoe.hf.loader`), the streaming converter (`widemoe.hf.convert`) and
`widemoe.hf.inspect` all execute or report this one plan.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from widemoe.config import ModelConfig
from widemoe.hf import fp4 as fp4mod
from widemoe.hf import fp8 as fp8mod
from widemoe.hf.errors import DamagedCheckpointError, LoadError
from widemoe.hf.families.base import FamilyAdapter, Redundant, Slot
from widemoe.hf.safetensors_io import TensorInfo, read_tensor

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_PACKED = (torch.int8, torch.uint8)
TargetShapes = dict[str, tuple[tuple[int, ...], torch.dtype]]  # name -> (shape, dtype)


@dataclass
class LoadReport:
    path: str
    family: str = ""
    notices: list[str] = field(default_factory=list)
    tensors_read: int = 0
    dequantized: int = 0
    scales: int = 0
    verified_copies: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    zero_filled: list[str] = field(default_factory=list)
    unused_ignores: list[str] = field(default_factory=list)  # `ignore` patterns that excused nothing
    bytes_read: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class Read:
    info: TensorInfo
    slot: Slot
    scale: TensorInfo | None = None  # quantised weights: the scale to multiply by
    fmt: str = "plain"  # plain | fp8 | fp4

    @property
    def nbytes(self) -> int:
        return self.info.end - self.info.start + (self.scale.end - self.scale.start if self.scale else 0)


@dataclass(frozen=True)
class Verify:
    info: TensorInfo
    of: str


@dataclass
class LoadPlan:
    reads: list[Read]
    verifies: list[Verify]
    report: LoadReport


def read_source(
    r: Read, files: Callable[[Any], Any], fp8: fp8mod.Fp8Spec | None, dtype: torch.dtype
) -> torch.Tensor:
    """The tensor a planned read produces, dequantised and cast to ``dtype`` (``files``: path -> handle)."""
    t = read_tensor(r.info, files(r.info.file))
    if r.fmt == "plain":
        return t.to(dtype)
    assert r.scale is not None
    scale = read_tensor(r.scale, files(r.scale.file))
    if r.fmt == "fp8":
        assert fp8 is not None
        return fp8mod.dequantize(t, scale, fp8.block, out_dtype=dtype)
    return fp4mod.dequantize_fp4(t, scale, dtype)


def check_patterns(ignore: Iterable[str]) -> list[re.Pattern[str]]:
    """The ``ignore`` regular expressions, compiled; a bad one is a ValueError naming it."""
    out = []
    for p in ignore:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(
                f"ignore pattern {p!r} (--ignore): not a valid regular expression ({e})"
            ) from None
    return out


class _Books:
    """The running account of one plan: problems by kind, what each destination was written by."""

    def __init__(self, ignore: Iterable[str], path: str, family: str) -> None:
        self.pats = check_patterns(ignore)
        self.report = LoadReport(path, family=family)
        self.missing: list[str] = []
        self.unexpected: list[str] = []
        self.mismatched: list[str] = []
        self.other: list[str] = []
        self.covered: dict[str, dict[Slot, str]] = {}
        self.used_scales: set[str] = set()
        self.faulted: set[str] = set()  # source keys with a problem booked: not "missing" as well

    def count(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.mismatched) + len(self.other)

    def ignored(self, key: str) -> bool:
        return any(p.search(key) for p in self.pats)

    def skip(self, key: str, problem: str) -> None:
        """An unwanted source tensor: reported as ignored when the user said so, else unexpected."""
        if self.ignored(key):
            self.report.ignored.append(key)
        else:
            self.unexpected.append(problem)

    def claim(self, key: str, dest: Slot) -> bool:
        """Record that ``key`` writes ``dest``; False (and a problem) when that part is already written:
        fused and per-expert keys must not overlap."""
        prev = self.covered.setdefault(dest.target, {})
        whole = Slot(dest.target)
        clash = prev.get(dest) or prev.get(whole)
        if clash is None and dest == whole and prev:
            clash = next(iter(prev.values()))
        if clash:
            self.other.append(f"{key}: writes {dest.target} already written by {clash}")
            return False
        prev[dest] = key
        return True

    def raise_if_any(self) -> None:
        if self.missing or self.unexpected or self.mismatched or self.other:
            raise LoadError(self.report.path, self.missing, self.unexpected, self.mismatched, self.other)


def _quant_format(info: TensorInfo, target_dtype: torch.dtype, adapter: FamilyAdapter) -> str:
    if adapter.fp4 and info.dtype in _PACKED and target_dtype.is_floating_point:
        return "fp4"
    return "fp8" if info.dtype in _FP8 else "plain"


def _scale_of(
    key: str,
    info: TensorInfo,
    fmt: str,
    table: dict[str, TensorInfo],
    adapter: FamilyAdapter,
    fp8: fp8mod.Fp8Spec | None,
    books: _Books,
) -> TensorInfo | None:
    """The scale tensor of quantised ``key``, checked against its grid (None: a problem was booked)."""
    if fp8 is None:
        books.other.append(f"{key}: stored as {info.dtype} but config.json has no FP8 quantization_config")
        return None
    names = adapter.scale_keys(key)
    sk = next((k for k in names if k in table), None)
    if sk is None:
        books.missing.append(f"{names[0]} (scale of the {fmt.upper()} weight {key})")
        return None
    scale = table[sk]
    books.used_scales.add(sk)
    if fmt == "fp8":
        want, how = fp8mod.scale_grid_shape(info.shape, fp8.block), f" (block {list(fp8.block)})"
    else:
        want, how = fp4mod.fp4_scale_shape(info.shape), ""
    if tuple(scale.shape) != tuple(want):
        books.mismatched.append(f"{sk}: expected {list(want)}{how} vs found {list(scale.shape)}")
        return None
    return scale


def _plan_source(
    key: str,
    dest: Slot | Redundant | None,
    table: dict[str, TensorInfo],
    targets: TargetShapes,
    adapter: FamilyAdapter,
    fp8: fp8mod.Fp8Spec | None,
    books: _Books,
) -> Read | Verify | None:
    """The read (or copy to verify) of one source tensor; None when it is skipped or has a problem."""
    info = table[key]
    if isinstance(dest, Redundant):
        if dest.of in targets:
            want = targets[dest.of][0]
            if info.shape != want:
                books.mismatched.append(
                    f"{key}: expected {list(want)} (copy of {dest.of}) vs found {list(info.shape)}"
                )
                return None
            if books.ignored(key):
                books.report.ignored.append(key)
                return None
            return Verify(info, dest.of)
        dest = None
    if dest is None or dest.target not in targets:
        renamed = dest is not None and dest.target != key
        books.skip(key, key + (f" (-> {dest.target}, not a model parameter)" if renamed else ""))
        return None
    shape, dtype = targets[dest.target]
    if dest.expert is not None and dest.expert >= shape[0]:
        books.skip(key, f"{key} (expert {dest.expert} >= {shape[0]} experts)")
        return None
    want = dest.shape(shape)
    fmt = _quant_format(info, dtype, adapter)
    if fmt == "plain" and info.dtype.is_floating_point != dtype.is_floating_point:
        kind = "a floating-point" if dtype.is_floating_point else "an integer"
        books.mismatched.append(f"{key}: expected {kind} tensor vs found {str(info.dtype)[6:]}")
        return None
    got = fp4mod.unpacked_shape(info.shape) if fmt == "fp4" else info.shape
    if tuple(got) != tuple(want):
        note = " (FP4: two values per byte)" if fmt == "fp4" else ""
        books.mismatched.append(f"{key}: expected {list(want)} vs found {list(got)}{note}")
        return None
    scale = None
    if fmt != "plain":
        scale = _scale_of(key, info, fmt, table, adapter, fp8, books)
        if scale is None:
            return None
    if not books.claim(key, dest):
        return None
    return Read(info, dest, scale, fmt)


def _account_targets(adapter: FamilyAdapter, cfg: ModelConfig, targets: TargetShapes, books: _Books) -> None:
    """Every destination must be written: name the checkpoint keys of each part that is not."""
    for name, (shape, _) in targets.items():
        got = books.covered.get(name, {})
        if Slot(name) in got:
            continue
        need = adapter.target_keys(name, shape, cfg, adapter.accounting_layout)
        lacking = [hk for hk, slot in need if slot not in got and hk not in books.faulted]
        if not lacking and need:
            continue
        if books.ignored(name) or all(books.ignored(hk) for hk in lacking):
            books.report.zero_filled.append(name)
        elif len(need) == 1:
            books.missing.append(f"{need[0][0]} (-> {name} {list(shape)})")
        else:
            books.missing.extend(f"{hk} (part of {name})" for hk in lacking)


def plan_load(
    cfg: ModelConfig,
    targets: TargetShapes,
    table: dict[str, TensorInfo],
    *,
    adapter: FamilyAdapter,
    fp8: fp8mod.Fp8Spec | None = None,
    ignore: Iterable[str] = (),
    path: str = "checkpoint",
) -> LoadPlan:
    """Map every source tensor to a destination and check the books; raise LoadError on any gap."""
    books = _Books(ignore, path, cfg.model_type)
    shapes = {k: v[0] for k, v in targets.items()}
    scale_keys = {k for k in table if adapter.is_scale_key(k)}
    reads: list[Read] = []
    verifies: list[Verify] = []
    for key in sorted(set(table) - scale_keys):
        before = books.count()
        step = _plan_source(key, adapter.source_slot(key, cfg, shapes), table, targets, adapter, fp8, books)
        if books.count() > before:  # mis-shaped, wrong dtype, scale missing...: said once, under its kind
            books.faulted.add(key)
        if isinstance(step, Read):
            reads.append(step)
        elif isinstance(step, Verify):
            verifies.append(step)
    for sk in sorted(scale_keys - books.used_scales):
        books.skip(sk, sk)
    _account_targets(adapter, cfg, targets, books)
    books.raise_if_any()
    books.report.scales = len(books.used_scales)
    excused = books.report.ignored + books.report.zero_filled
    books.report.unused_ignores = [p.pattern for p in books.pats if not any(p.search(k) for k in excused)]
    return LoadPlan(reads, verifies, books.report)


_CHUNK = 64 * 2**20  # bytes compared at a time when a copy is verified


def _read_at(info: TensorInfo, fh: Any, off: int, n: int) -> bytes:
    fh.seek(info.start + off)
    got = b""
    while len(got) < n:  # raw reads may return short counts
        more = fh.read(n - len(got))
        if not more:
            raise DamagedCheckpointError(
                f"{info.file}: truncated: ends at byte {info.start + off + len(got)} while reading "
                f"{info.key!r} (bytes {info.start}-{info.end})"
            )
        got += more
    return got


def _same_bytes(a: TensorInfo, b: TensorInfo, files: Callable[[Any], Any]) -> bool:
    """Whether two stored tensors of one dtype and shape are bit-identical (read in bounded chunks)."""
    for off in range(0, a.end - a.start, _CHUNK):
        n = min(_CHUNK, a.end - a.start - off)
        if _read_at(a, files(a.file), off, n) != _read_at(b, files(b.file), off, n):
            return False
    return True


def _main_fp32(of: str, plan: LoadPlan, shape: tuple[int, ...], files: Any, fp8: Any) -> torch.Tensor:
    """The tensor ``of`` as the plan would load it, in fp32 (exact for every source dtype)."""
    out = torch.zeros(shape, dtype=torch.float32)
    for r in plan.reads:
        if r.slot.target == of:
            r.slot.view(out).copy_(read_source(r, files, fp8, torch.float32))
    return out


def verify_copies(
    plan: LoadPlan, targets: TargetShapes, files: Callable[[Any], Any], fp8: fp8mod.Fp8Spec | None
) -> list[str]:
    """The redundant copies (DeepSeek MTP embed/head, a tied lm_head) that differ from their main
    tensor as stored, one problem line each. Independent of the dtype the model is loaded in."""
    bad = []
    whole = {r.slot.target: r for r in plan.reads if r.slot == Slot(r.slot.target)}
    for v in plan.verifies:
        r = whole.get(v.of)
        if r is not None and r.fmt == "plain" and r.info.dtype == v.info.dtype:
            same = _same_bytes(v.info, r.info, files)
        else:
            main = _main_fp32(v.of, plan, targets[v.of][0], files, fp8)
            same = torch.equal(read_tensor(v.info, files(v.info.file)).float(), main)
        if not same:
            bad.append(f"{v.info.key}: differs from {v.of} (expected an identical copy)")
    return bad


def model_targets(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by state_dict name, aliases (tied weights) listed once."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = t.data if isinstance(t, nn.Parameter) else t
    return out


def target_shapes(targets: dict[str, torch.Tensor]) -> TargetShapes:
    """What `plan_load` checks a checkpoint against: shape and dtype per model tensor."""
    return {k: (tuple(v.shape), v.dtype) for k, v in targets.items()}


def drop_absent_mtp(
    cfg: ModelConfig, keys: Iterable[str], adapter: FamilyAdapter
) -> tuple[ModelConfig, str | None]:
    """The config without MTP modules when the checkpoint has none, and the notice that says so.

    transformers' save_pretrained drops DeepSeek MTP layers (it has no MTP module): load the main
    model and say so once, rather than failing on a checkpoint that never had them.
    """
    if not cfg.num_nextn_predict_layers or adapter.mtp_keys(list(keys), cfg):
        return cfg, None
    notice = (
        f"config declares num_nextn_predict_layers={cfg.num_nextn_predict_layers} but the checkpoint "
        "has no MTP weights; loaded without MTP"
    )
    return cfg.replace(num_nextn_predict_layers=0), notice


__all__ = [
    "LoadError",
    "LoadPlan",
    "LoadReport",
    "Read",
    "Verify",
    "check_patterns",
    "drop_absent_mtp",
    "model_targets",
    "plan_load",
    "read_source",
    "target_shapes",
    "verify_copies",
]
