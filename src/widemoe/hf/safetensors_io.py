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

from widemoe.hf.errors import DamagedCheckpointError, PickleCheckpointError

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
# Pickles beside the weights that hold training state, not weights (widemoe's and transformers' Trainer).
_STATE_PICKLES = re.compile(
    r"^(trainer_state\.pt|training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state.*\.pth)$"
)
_MAX_HEADER = 100 * 2**20


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


def _raw_header(path: Path) -> tuple[Any, int, int]:
    """(parsed JSON header, data start, file size) of one safetensors file; damage is named."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DamagedCheckpointError(f"{path}: missing (the directory lists it but it was deleted)") from None
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise DamagedCheckpointError(
                f"{path}: truncated: {size} bytes, shorter than a safetensors header length (8 bytes)"
            )
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise DamagedCheckpointError(
                f"{path}: not a safetensors file (header length {n} is over {_MAX_HEADER} bytes)"
            )
        if 8 + n > size:
            raise DamagedCheckpointError(
                f"{path}: truncated: header says its JSON header is {n} bytes, file has {size - 8} "
                "after the length field"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DamagedCheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise DamagedCheckpointError(f"{path}: safetensors header is not a JSON object")
    return header, 8 + n, size


def _tensor_info(path: Path, key: str, meta: Any, base: int) -> TensorInfo:
    """One header entry, checked: known dtype, integer shape, offsets that match the shape."""
    try:
        dt = ST_DTYPES.get(meta.get("dtype"))
        if dt is None:
            raise DamagedCheckpointError(
                f"{path}: tensor {key!r} has unsupported dtype {meta.get('dtype')!r}"
            )
        shape = tuple(int(s) for s in meta["shape"])
        s0, s1 = (int(o) for o in meta["data_offsets"])
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, DamagedCheckpointError):
            raise
        raise DamagedCheckpointError(
            f"{path}: tensor {key!r} has a malformed header entry (need dtype, shape, data_offsets: "
            f"{type(e).__name__}: {e})"
        ) from None
    nbytes = math.prod(shape) * torch.empty((), dtype=dt).element_size()
    if s1 - s0 != nbytes or s0 < 0 or min(shape, default=0) < 0:
        raise DamagedCheckpointError(
            f"{path}: tensor {key!r} has data_offsets {[s0, s1]} inconsistent with its shape {list(shape)}"
        )
    return TensorInfo(path, key, dt, shape, base + s0, base + s1)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor table of one safetensors file, validated (dtype known, offsets inside the file).

    A missing, truncated or malformed file raises `DamagedCheckpointError` naming the file and the
    damage (``<file>: truncated: header says 1234 bytes of tensor data, file has 1000``)."""
    header, base, size = _raw_header(path)
    out = {key: _tensor_info(path, key, meta, base) for key, meta in header.items() if key != "__metadata__"}
    data = max((info.end for info in out.values()), default=base) - base
    if base + data > size:
        raise DamagedCheckpointError(
            f"{path}: truncated: header says {data} bytes of tensor data, file has {size - base}"
        )
    return out


def read_into(info: TensorInfo, out: torch.Tensor, fh: Any) -> None:
    """Read the raw bytes of ``info`` into the contiguous tensor ``out`` (same dtype and numel)."""
    buf = memoryview(out.detach().reshape(-1).view(torch.uint8).numpy())
    fh.seek(info.start)
    pos, n = 0, info.end - info.start
    while pos < n:  # raw reads may return short counts
        got = fh.readinto(buf[pos:])
        if not got:
            raise DamagedCheckpointError(
                f"{info.file}: truncated: ends at byte {info.start + pos} while reading {info.key!r} "
                f"(bytes {info.start}-{info.end})"
            )
        pos += got


def read_tensor(info: TensorInfo, fh: Any) -> torch.Tensor:
    t = torch.empty(info.shape, dtype=info.dtype)
    read_into(info, t, fh)
    return t


def _read_index(index: Path) -> dict[str, str]:
    """The weight_map of model.safetensors.index.json (key -> shard name), checked."""
    try:
        wm = json.loads(index.read_text())["weight_map"]
    except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedCheckpointError(
            f"{index}: not a valid safetensors index ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise DamagedCheckpointError(f"{index}: weight_map must map tensor names to shard file names")
    for name in set(wm.values()):
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise DamagedCheckpointError(
                f"{index}: shard name {name!r} must be a plain .safetensors file name in the directory"
            )
    return wm


def find_weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory; pickle-only directories are refused, and a shard
    that the index lists but that is gone is named (`DamagedCheckpointError`)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        wm = _read_index(index)
        names = sorted(set(wm.values()))
        for name in names:
            if not (path / name).exists():
                n = sum(v == name for v in wm.values())
                raise DamagedCheckpointError(
                    f"{path / name}: missing (listed in {index.name}'s weight_map for {n} tensors)"
                )
        return [path / n for n in names]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    pickles = [
        p.name for g in _PICKLE_GLOBS for p in sorted(path.glob(g)) if not _STATE_PICKLES.match(p.name)
    ]
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
    state = sorted(p.name for p in path.iterdir() if _STATE_PICKLES.match(p.name) or p.name == "COMMITTED")
    if state:  # a training checkpoint whose weights are gone
        raise DamagedCheckpointError(
            f"{path / 'model.safetensors'}: missing (the checkpoint has {', '.join(state)} but no weights)"
        )
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def read_tensor_table(path: Path, files: list[Path]) -> dict[str, TensorInfo]:
    table: dict[str, TensorInfo] = {}
    for f in files:
        for key, info in read_safetensors_header(f).items():
            if key in table:
                raise DamagedCheckpointError(
                    f"{path}: tensor {key!r} appears in both {table[key].file.name} and {f.name}"
                )
            table[key] = info
    index = path / "model.safetensors.index.json"
    if index.exists():
        for key, name in _read_index(index).items():
            if key not in table or table[key].file.name != name:
                raise DamagedCheckpointError(
                    f"{index}: weight_map says {key!r} is in {name}, but that shard does not hold it"
                )
    return table


def read_hf_config(path: Path) -> dict[str, Any]:
    p = path / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise NotADirectoryError(f"{path}: not a directory (expected a Hugging Face model directory)")
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no config.json") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
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


def is_weight_file(name: str) -> bool:
    """A file name that `write_sharded` writes (and replaces): weights, shards, the index."""
    return bool(_OUR_FILES.match(name))


def parse_size(size: int | str) -> int:
    """``5GB`` / ``500MB`` / ``2GiB`` / an int of bytes."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size={size!r}: expected a positive byte count")
        return size
    if not isinstance(size, str):
        raise ValueError(f"max_shard_size={size!r}: expected a byte count like '5GB' or an int")
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, re.I)
    if not m or float(m[1]) <= 0:
        raise ValueError(f"max_shard_size={size!r}: expected a positive byte count like '5GB' or '500MB'")
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
        if is_weight_file(old.name):
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
    "DamagedCheckpointError",
    "OpenFiles",
    "Pending",
    "PickleCheckpointError",
    "TensorInfo",
    "find_weight_files",
    "is_weight_file",
    "parse_size",
    "read_hf_config",
    "read_into",
    "read_safetensors_header",
    "read_tensor",
    "read_tensor_table",
    "write_safetensors",
    "write_sharded",
]
