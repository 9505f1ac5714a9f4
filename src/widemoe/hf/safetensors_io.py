"""safetensors files and model directories, read and written without the safetensors package.

Format: an 8-byte little-endian header length, a JSON header (dtype, shape and byte offsets per
tensor), then the raw bytes. Headers are parsed here with bounds checks; tensors are read one at a
time straight into their destination (``readinto``, no mmap) and written one at a time from views of
the model's own storage, so neither direction needs a second copy of the model. Pickle weights
(``.bin``/``.pt``) are refused: unpickling can execute code.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

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


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


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


class OpenFiles:
    """One unbuffered read handle per file, opened on first use and closed by ``close`` (a context)."""

    def __init__(self) -> None:
        self._handles: dict[Path, BinaryIO] = {}

    def __call__(self, path: Path) -> BinaryIO:
        fh = self._handles.get(path)
        if fh is None:
            fh = self._handles[path] = open(path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
        return fh

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()

    def __enter__(self) -> OpenFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------
# writing

_ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
_OUR_FILES = re.compile(
    r"^(model\.safetensors|model\.safetensors\.index\.json|model-\d{5}-of-\d{5}\.safetensors)$"
)


def parse_size(size: int | str) -> int:
    """``5GB`` / ``500MB`` / ``2GiB`` / an int of bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, re.I)
    if not m:
        raise ValueError(f"max_shard_size={size!r}: expected a byte count like '5GB' or '500MB'")
    unit = (m[2] or "B").upper()
    mult = {
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }[unit]
    return int(float(m[1]) * mult)


@dataclass(frozen=True)
class Pending:
    """A tensor to write: its header entry up front, its bytes produced only when written."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    @classmethod
    def of(cls, key: str, t: torch.Tensor) -> Pending:
        return cls(key, t.dtype, tuple(t.shape), lambda: t)


def write_safetensors(path: Path, items: list[Pending], metadata: dict[str, str]) -> None:
    """Stream ``items`` into one safetensors file (written as ``path.tmp``, then renamed).

    The header is built from the declared dtypes/shapes, then each tensor is produced and written in
    turn, so at most one produced tensor is alive at a time.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    off = 0
    for it in items:
        if it.dtype not in _ST_NAMES:
            raise ValueError(f"{it.key}: dtype {it.dtype} cannot be stored in safetensors")
        header[it.key] = {
            "dtype": _ST_NAMES[it.dtype],
            "shape": list(it.shape),
            "data_offsets": [off, off + it.nbytes],
        }
        off += it.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for it in items:
            t = it.make().detach().to("cpu").contiguous()
            if t.dtype != it.dtype or tuple(t.shape) != it.shape:
                raise ValueError(
                    f"{it.key}: produced {t.dtype} {list(t.shape)}, declared {it.dtype} {list(it.shape)}"
                )
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    os.replace(tmp, path)


def write_sharded(path: Path, items: list[Pending], max_shard_size: int | str) -> int:
    """Write ``items`` as model.safetensors, or shards + model.safetensors.index.json; returns the count."""
    path.mkdir(parents=True, exist_ok=True)
    for old in path.iterdir():  # stale shards of an earlier save would confuse readers
        if _OUR_FILES.match(old.name):
            old.unlink()
    limit = parse_size(max_shard_size)
    shards: list[list[Pending]] = [[]]
    size = 0
    for it in items:
        if shards[-1] and size + it.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += it.nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        write_safetensors(path / "model.safetensors", shards[0], meta)
        return 1
    N = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{N:05d}.safetensors"
        write_safetensors(path / name, shard, meta)
        weight_map.update({it.key: name for it in shard})
    index = {
        "metadata": {"total_size": sum(it.nbytes for it in items)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return N


__all__ = [
    "ST_DTYPES",
    "OpenFiles",
    "Pending",
    "PickleCheckpointError",
    "TensorInfo",
    "find_weight_files",
    "parse_size",
    "read_hf_config",
    "read_into",
    "read_safetensors_header",
    "read_tensor",
    "read_tensor_table",
    "write_safetensors",
    "write_sharded",
]
