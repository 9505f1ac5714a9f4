"""Load a Hugging Face model directory into widemoe, with strict accounting and bounded memory.

What it guarantees (shared/reference/user-needs.md items 1, 3, 14, 19, 23):

- **Strict accounting.** Before a byte of weights is read, every source tensor is mapped to a
  destination (keymap.py) and checked against the model's parameters and persistent buffers. The load
  fails with :class:`LoadError` listing missing keys, unexpected keys and shape mismatches (expected vs
  found) unless every source tensor is consumed and every destination is written exactly once. FP8
  ``weight_scale_inv`` tensors and the redundant MTP embed/head copies are accounted for too (the
  copies are verified equal to the main ones). ``ignore=`` (regular expressions, ``re.search``) is the
  explicit escape hatch; ignored missing destinations are zero-filled and reported.
- **Memory.** The model is built with parameters on ``meta`` (buffers real), then allocated empty in
  the target dtype. Tensors are read one at a time straight from the safetensors file into the
  preallocated parameter (``readinto``, no mmap, no intermediate copy) when the dtype matches, or
  through one temporary tensor when converting / dequantising FP8. Peak RSS stays near the model
  size plus the largest tensor.
- **Safety.** Weights come only from safetensors (format: 8-byte little-endian header length, JSON
  header, raw bytes), parsed here with bounds checks. Pickle checkpoints (``.bin``/``.pt``) are
  refused; ``auto_map`` / remote code are ignored with a notice; nothing is executed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from widemoe.config import ModelConfig
from widemoe.hf import fp8 as fp8mod
from widemoe.hf.config_map import hf_to_model_config
from widemoe.hf.keymap import SCALE_SUFFIX, Redundant, Slot, hf_to_slot, slot_to_hf

log = logging.getLogger("widemoe.hf")

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
if hasattr(torch, "float8_e8m0fnu"):
    ST_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_PICKLE_GLOBS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_MAX_HEADER = 100 * 2**20


class PickleCheckpointError(ValueError):
    """The directory holds only pickle weights, which widemoe never loads."""


class LoadError(ValueError):
    """Strict accounting failed: the message lists every offending key."""

    def __init__(
        self,
        path: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[str],
        other: list[str] | None = None,
    ) -> None:
        self.missing, self.unexpected, self.mismatched, self.other = (
            missing,
            unexpected,
            mismatched,
            other or [],
        )
        parts = [f"{path}: checkpoint does not match the model"]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches (key: expected vs found)", mismatched),
            ("other problems", self.other),
        ):
            if items:
                shown = items[:40] + ([f"... and {len(items) - 40} more"] if len(items) > 40 else [])
                parts.append(f"{len(items)} {title}:\n  " + "\n  ".join(shown))
        parts.append("Pass ignore=[regex, ...] (CLI: --ignore) only for keys you mean to skip.")
        super().__init__("\n".join(parts))


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


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
    bytes_read: int = 0
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------
# safetensors reading


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor table of one safetensors file, validated (dtype known, offsets inside the file)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path}: not a safetensors file (header length {n} exceeds the file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: safetensors header is not valid JSON ({e})") from None
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        dt = ST_DTYPES.get(meta.get("dtype"))
        if dt is None:
            raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {meta.get('dtype')!r}")
        shape = tuple(int(s) for s in meta["shape"])
        s0, s1 = (int(o) for o in meta["data_offsets"])
        nbytes = math.prod(shape) * torch.empty((), dtype=dt).element_size()
        if s1 - s0 != nbytes or s0 < 0 or base + s1 > size:
            raise ValueError(
                f"{path}: tensor {key!r} has data_offsets {[s0, s1]} inconsistent with its shape "
                f"{list(shape)} or the file size"
            )
        out[key] = TensorInfo(path, key, dt, shape, base + s0, base + s1)
    return out


def read_into(info: TensorInfo, out: torch.Tensor, fh: Any) -> None:
    """Read the raw bytes of ``info`` into the contiguous tensor ``out`` (same dtype and numel)."""
    buf = memoryview(out.detach().reshape(-1).view(torch.uint8).numpy())
    fh.seek(info.start)
    pos, n = 0, info.end - info.start
    while pos < n:  # raw reads may return short counts
        got = fh.readinto(buf[pos:])
        if not got:
            raise OSError(f"{info.file}: unexpected end of file reading {info.key!r}")
        pos += got


def read_tensor(info: TensorInfo, fh: Any) -> torch.Tensor:
    t = torch.empty(info.shape, dtype=info.dtype)
    read_into(info, t, fh)
    return t


def find_weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory; pickle-only directories are refused."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        names = sorted(set(wm.values()))
        for name in names:
            if Path(name).name != name or not name.endswith(".safetensors"):
                raise ValueError(
                    f"{index}: shard name {name!r} must be a plain .safetensors file name in the directory"
                )
            if not (path / name).exists():
                raise FileNotFoundError(f"{index}: shard {name!r} listed in weight_map does not exist")
        return [path / n for n in names]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    pickles = [p.name for g in _PICKLE_GLOBS for p in sorted(path.glob(g))]
    if pickles:
        raise PickleCheckpointError(
            f"{path}: only pickle checkpoints found ({', '.join(pickles[:4])}); widemoe never unpickles "
            "weights (unpickling can execute code). Convert them once, in an environment you trust, with "
            "transformers: AutoModelForCausalLM.from_pretrained(SRC).save_pretrained(DST) (writes "
            "safetensors), then load DST."
        )
    others = sorted(p.name for p in path.glob("*.safetensors"))
    if others:
        raise FileNotFoundError(
            f"{path}: no model.safetensors or model.safetensors.index.json (found "
            f"{', '.join(others[:4])}; name it model.safetensors or add an index)"
        )
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def read_tensor_table(path: Path, files: list[Path]) -> dict[str, TensorInfo]:
    table: dict[str, TensorInfo] = {}
    for f in files:
        for key, info in read_safetensors_header(f).items():
            if key in table:
                raise ValueError(
                    f"{path}: tensor {key!r} appears in both {table[key].file.name} and {f.name}"
                )
            table[key] = info
    index = path / "model.safetensors.index.json"
    if index.exists():
        wm = json.loads(index.read_text())["weight_map"]
        for key, name in wm.items():
            if key not in table or table[key].file.name != name:
                raise ValueError(
                    f"{index}: weight_map says {key!r} is in {name}, but that shard does not hold it"
                )
    return table


# ------------------------------------------------------------------------------------------------
# planning (strict accounting)


@dataclass(frozen=True)
class Read:
    info: TensorInfo
    slot: Slot
    scale: TensorInfo | None = None  # FP8: the weight_scale_inv to multiply by


@dataclass(frozen=True)
class Verify:
    info: TensorInfo
    of: str


def plan_load(
    cfg: ModelConfig,
    targets: dict[str, tuple[tuple[int, ...], torch.dtype]],
    table: dict[str, TensorInfo],
    *,
    fp8: fp8mod.Fp8Spec | None = None,
    ignore: Iterable[str] = (),
    path: str = "checkpoint",
) -> tuple[list[Read], list[Verify], LoadReport]:
    """Map every source tensor to a destination and check the books; raise LoadError on any gap.

    DeepSeek-V4 has its own names and formats: its accounting runs in `widemoe.hf.deepseek_v4.plan_v4`
    and only the report comes back here (`load_into` executes V4 loads there too).
    """
    if cfg.is_v4:
        from widemoe.hf.deepseek_v4 import plan_v4

        _, v4_report = plan_v4(targets, table, block=fp8.block if fp8 else None, ignore=ignore, path=path)
        return [], [], v4_report
    pats = [re.compile(p) for p in ignore]
    ignored = lambda k: any(p.search(k) for p in pats)  # noqa: E731
    report = LoadReport(path)
    missing: list[str] = []
    unexpected: list[str] = []
    mismatched: list[str] = []
    other: list[str] = []
    reads: list[Read] = []
    verifies: list[Verify] = []
    covered: dict[str, dict[Slot, str]] = {}
    shapes = {k: v[0] for k, v in targets.items()}

    scale_keys = {k for k in table if k.endswith(".weight" + SCALE_SUFFIX)}
    used_scales: set[str] = set()
    for key in sorted(table):
        if key in scale_keys:
            continue
        info = table[key]
        dest = hf_to_slot(key, cfg, shapes)
        if isinstance(dest, Redundant):
            if dest.of not in shapes:
                dest = None
            elif info.shape != shapes[dest.of]:
                mismatched.append(
                    f"{key}: expected {list(shapes[dest.of])} (copy of {dest.of}) vs found {list(info.shape)}"
                )
                continue
            else:
                if ignored(key):
                    report.ignored.append(key)
                else:
                    verifies.append(Verify(info, dest.of))
                continue
        if dest is None or dest.target not in shapes:
            if ignored(key):
                report.ignored.append(key)
            else:
                renamed = dest is not None and dest.target != key
                unexpected.append(key + (f" (-> {dest.target}, not a model parameter)" if renamed else ""))
            continue
        if dest.expert is not None and dest.expert >= shapes[dest.target][0]:
            if ignored(key):
                report.ignored.append(key)
            else:
                unexpected.append(f"{key} (expert {dest.expert} >= {shapes[dest.target][0]} experts)")
            continue
        want = dest.shape(shapes[dest.target])
        if info.shape != want:
            mismatched.append(f"{key}: expected {list(want)} vs found {list(info.shape)}")
            continue
        scale = None
        if info.dtype in _FP8:
            sk = key + SCALE_SUFFIX
            if fp8 is None:
                other.append(f"{key}: stored as {info.dtype} but config.json has no FP8 quantization_config")
                continue
            if sk not in table:
                missing.append(f"{sk} (scale of the FP8 weight {key})")
                continue
            scale = table[sk]
            used_scales.add(sk)
            gwant = fp8mod.scale_grid_shape(info.shape, fp8.block)
            if scale.shape != gwant:
                mismatched.append(
                    f"{sk}: expected {list(gwant)} (block {list(fp8.block)}) vs found {list(scale.shape)}"
                )
                continue
        prev = covered.setdefault(dest.target, {})
        whole = Slot(dest.target)
        clash = None  # a destination is written exactly once: fused and per-expert keys must not overlap
        if dest in prev:
            clash = prev[dest]
        elif whole in prev:
            clash = prev[whole]
        elif dest == whole and prev:
            clash = next(iter(prev.values()))
        if clash:
            other.append(f"{key}: writes {dest.target} already written by {clash}")
            continue
        prev[dest] = key
        reads.append(Read(info, dest, scale))
    for sk in sorted(scale_keys - used_scales):
        (report.ignored if ignored(sk) else unexpected).append(sk)

    for name, (shape, _) in targets.items():
        got = covered.get(name, {})
        if Slot(name) in got:
            continue
        need = slot_to_hf(name, shape, cfg)
        lacking = [hk for hk, slot in need if slot not in got]
        if not lacking and need:
            continue
        if ignored(name) or all(ignored(hk) for hk in lacking):
            report.zero_filled.append(name)
            continue
        if len(need) == 1:
            missing.append(f"{need[0][0]} (-> {name} {list(shape)})")
        else:
            missing.extend(f"{hk} (part of {name})" for hk in lacking)
    if missing or unexpected or mismatched or other:
        raise LoadError(path, missing, unexpected, mismatched, other)
    report.scales = len(used_scales)
    return reads, verifies, report


# ------------------------------------------------------------------------------------------------
# execution


def _group_by_file(items: Iterable[Any]) -> Iterator[tuple[Path, list[Any]]]:
    by: dict[Path, list[Any]] = {}
    for it in items:
        by.setdefault(it.info.file, []).append(it)
    for f in sorted(by):
        yield f, sorted(by[f], key=lambda it: it.info.start)


@torch.no_grad()
def execute_load(
    targets: dict[str, torch.Tensor],
    reads: list[Read],
    verifies: list[Verify],
    report: LoadReport,
    *,
    fp8: fp8mod.Fp8Spec | None = None,
) -> LoadReport:
    """Fill ``targets`` (name -> preallocated tensor) from the planned reads, file by file."""
    t0 = time.perf_counter()
    for name in report.zero_filled:
        targets[name].zero_()
    for f, items in _group_by_file(reads):
        with open(f, "rb", buffering=0) as fh:
            for r in items:
                dst = r.slot.view(targets[r.slot.target])
                if (
                    r.scale is None
                    and r.info.dtype == dst.dtype
                    and dst.is_contiguous()
                    and dst.device.type == "cpu"
                ):
                    read_into(r.info, dst, fh)
                elif r.scale is not None:
                    assert fp8 is not None
                    w_q, s = read_tensor(r.info, fh), read_tensor(r.scale, fh)
                    fp8mod.dequantize(w_q, s, fp8.block, out=dst)
                    report.dequantized += 1
                else:
                    dst.copy_(read_tensor(r.info, fh))
                report.tensors_read += 1
                report.bytes_read += (
                    r.info.end - r.info.start + (r.scale.end - r.scale.start if r.scale else 0)
                )
    bad = []
    for f, items in _group_by_file(verifies):
        with open(f, "rb", buffering=0) as fh:
            for v in items:
                main = targets[v.of]
                copy = read_tensor(v.info, fh).to(main.dtype)
                report.bytes_read += v.info.end - v.info.start
                if not torch.equal(copy, main):
                    bad.append(f"{v.info.key}: differs from {v.of} (expected an identical copy)")
                else:
                    report.verified_copies.append(v.info.key)
    if bad:
        raise LoadError(report.path, [], [], [], bad)
    report.seconds = time.perf_counter() - t0
    return report


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


def load_into(
    model: nn.Module,
    path: str | Path,
    cfg: ModelConfig | None = None,
    *,
    ignore: Iterable[str] = (),
    hf_config: dict[str, Any] | None = None,
    table: dict[str, TensorInfo] | None = None,
) -> LoadReport:
    """Load the weights of HF directory ``path`` into an allocated ``model`` (strict accounting)."""
    path = Path(path)
    hf = hf_config if hf_config is not None else read_hf_config(path)
    cfg = cfg if cfg is not None else model.config  # type: ignore[assignment]
    fp8 = fp8mod.parse_quantization_config(hf.get("quantization_config"), source=str(path / "config.json"))
    if table is None:
        table = read_tensor_table(path, find_weight_files(path))
    if cfg.is_v4:  # native / transformers names, FP8 + FP4 experts
        from widemoe.hf.deepseek_v4 import load_v4_into

        return load_v4_into(model, path, cfg, hf, table, ignore=ignore)
    targets = model_targets(model)
    reads, verifies, report = plan_load(
        cfg,
        target_shapes(targets),
        table,
        fp8=fp8,
        ignore=ignore,
        path=str(path),
    )
    return execute_load(targets, reads, verifies, report, fp8=fp8)


def layer_index(key: str) -> int:
    m = re.match(r"^model\.layers\.(\d+)\.", key)
    return int(m[1]) if m else -1


def mtp_keys(table: Iterable[str], num_hidden_layers: int) -> list[str]:
    """Checkpoint keys of MTP modules: DeepSeek-V3 stores them as extra layers model.layers.{L+k}.*,
    DeepSeek-V4 as mtp.{k}.* (native names) or model.mtp.{k}.* (transformers names)."""
    return [k for k in table if layer_index(k) >= num_hidden_layers or re.match(r"^(model\.)?mtp\.", k)]


def drop_absent_mtp(cfg: ModelConfig, table: Iterable[str]) -> tuple[ModelConfig, str | None]:
    """The config without MTP modules when the checkpoint has none, and the notice that says so.

    transformers' save_pretrained drops DeepSeek MTP layers (it has no MTP module): load the main
    model and say so once, rather than failing on a checkpoint that never had them.
    """
    if not cfg.num_nextn_predict_layers or mtp_keys(table, cfg.num_hidden_layers):
        return cfg, None
    notice = (f"config declares num_nextn_predict_layers={cfg.num_nextn_predict_layers} but the checkpoint "
              "has no MTP weights; loaded without MTP")
    return cfg.replace(num_nextn_predict_layers=0), notice


def target_shapes(targets: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """What `plan_load` checks a checkpoint against: shape and dtype per model tensor."""
    return {k: (tuple(v.shape), v.dtype) for k, v in targets.items()}


def read_hf_config(path: Path) -> dict[str, Any]:
    p = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory (expected a Hugging Face model directory)")
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no config.json") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{p}: expected a JSON object")
    return d


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
    path = Path(path)
    hf = read_hf_config(path)
    cfg, notices = hf_to_model_config(hf, source=str(path / "config.json"))
    for n in notices:
        log.warning("%s: %s", path, n)
    fp8mod.parse_quantization_config(hf.get("quantization_config"), source=str(path / "config.json"))
    table = read_tensor_table(path, find_weight_files(path))
    cfg, notice = drop_absent_mtp(cfg, table)
    if notice:
        notices.append(notice)
    if any(path.glob("*.py")):
        notices.append("python files in the directory were ignored (never imported)")
    if model_cls is None:
        from widemoe.model.transformer import WideMoeForCausalLM as model_cls
    dt = resolve_dtype(dtype, hf)
    with params_on_meta():
        model = model_cls(cfg)
    model.to(dt)  # params are meta (free); the model's own rules keep the router fp32
    allocate_empty(model, device)
    report = load_into(model, path, cfg, ignore=ignore, hf_config=hf, table=table)
    report.notices = notices + report.notices
    report.family = cfg.model_type
    model.load_report = report  # type: ignore[attr-defined]
    return model.to(device).eval()  # parameters are there already; this moves the RoPE buffers


__all__ = [
    "LoadError",
    "LoadReport",
    "PickleCheckpointError",
    "TensorInfo",
    "find_weight_files",
    "load_into",
    "load_pretrained",
    "plan_load",
    "read_hf_config",
    "read_safetensors_header",
    "read_tensor_table",
    "resolve_dtype",
]
