"""Write a widemoe model as a Hugging Face directory that transformers 5.24 (and vLLM, SGLang,
lm-eval through it) loads with identical logits.

Layout (what transformers' ``save_pretrained`` writes, shared/reference/ecosystem.md section 3):
``config.json`` (the family's fields, both the v5 ``rope_parameters`` and the legacy
``rope_theta``/``rope_scaling`` so older readers agree), ``generation_config.json``, weights under the
family's on-disk names with **per-expert** keys, the fp32 router gate and ``e_score_correction_bias``,
DeepSeek MTP module k as ``model.layers.{num_hidden_layers + k}.*`` including the redundant
``embed_tokens`` / ``shared_head.head`` copies DeepSeek tooling looks for. Shards above
``max_shard_size`` are written as ``model-0000i-of-0000N.safetensors`` plus
``model.safetensors.index.json``. No ``quantization_config`` is ever written (weights are
dequantised on load). ``tokenizer.json`` + ``tokenizer_config.json`` are written when a tokenizer is
given (a ``tokenizers.Tokenizer``, a tokenizer.json file, or a model directory to copy from).

The safetensors writer is local: it streams one tensor at a time from the model's own storage
(expert slices are views), so saving needs no second copy of the model.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from widemoe.hf.config_map import model_config_to_hf
from widemoe.hf.keymap import redundant_hf_keys, slot_to_hf
from widemoe.hf.loader import ST_DTYPES, model_targets

_ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
_OUR_FILES = re.compile(
    r"^(model\.safetensors|model\.safetensors\.index\.json|model-\d{5}-of-\d{5}\.safetensors)$"
)
# Files copied from a source model directory: data only, never code.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
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


def hf_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(HF key, tensor view) for every tensor the directory holds, in state_dict order."""
    cfg = model.config  # type: ignore[attr-defined]
    targets = model_targets(model)
    out: list[tuple[str, torch.Tensor]] = []
    for name, t in targets.items():
        for key, slot in slot_to_hf(name, tuple(t.shape), cfg):
            out.append((key, slot.view(t.detach())))
    for key, src in redundant_hf_keys(cfg):
        out.append((key, targets[src].detach()))
    return out


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


def _dtype_name(model: nn.Module) -> str:
    dt = model.model.embed_tokens.weight.dtype  # type: ignore[union-attr]
    return {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dt, "float32")


def save_pretrained(
    model: nn.Module, path: str | Path, *, max_shard_size: int | str = "5GB", tokenizer: Any = None
) -> Path:
    """Write ``model`` as an HF directory at ``path``; returns the path."""
    cfg = model.config  # type: ignore[attr-defined]
    if cfg.is_v4:  # DeepSeek-V4: transformers' layout (widemoe.hf.deepseek_v4.save_v4 also writes native)
        from widemoe.hf.deepseek_v4 import save_v4

        return save_v4(model, path, max_shard_size=max_shard_size, tokenizer=tokenizer)
    path = Path(path)
    hf = model_config_to_hf(cfg, dtype=_dtype_name(model))  # raises before anything is written
    write_sharded(path, [Pending.of(k, t) for k, t in hf_tensors(model)], max_shard_size)
    write_metadata(path, hf, cfg)
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is not None:
        write_tokenizer(tok, path, cfg)
    return path


def write_metadata(path: Path, hf: dict[str, Any], cfg: Any) -> None:
    """config.json (plus the legacy rope keys) and generation_config.json."""
    # legacy keys too: transformers 4.x, vLLM and DeepSeek's own scripts read rope_theta/rope_scaling
    hf = {
        **hf,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
    }
    (path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    gen = {
        k: getattr(cfg, k)
        for k in ("bos_token_id", "eos_token_id", "pad_token_id")
        if getattr(cfg, k) is not None
    }
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def write_tokenizer(tok: Any, path: Path, cfg: Any) -> None:
    """tokenizer.json + tokenizer_config.json from a Tokenizer, a tokenizer.json path, or a model dir."""
    if isinstance(tok, (str, Path)):
        src = Path(tok)
        if src.is_dir():
            for name in TOKENIZER_FILES:
                if (src / name).is_file() and (src / name).resolve() != (path / name).resolve():
                    shutil.copyfile(src / name, path / name)
            if (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
                _write_tokenizer_config(path, cfg, None)
            return
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(src))
    tok.save(str(path / "tokenizer.json"))
    _write_tokenizer_config(path, cfg, tok)


def _write_tokenizer_config(path: Path, cfg: Any, tok: Any) -> None:
    if tok is None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    conf: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }
    for field in ("bos", "eos", "pad"):
        tid = getattr(cfg, f"{field}_token_id")
        if tid is not None and tok.id_to_token(tid) is not None:
            conf[f"{field}_token"] = tok.id_to_token(tid)
    (path / "tokenizer_config.json").write_text(json.dumps(conf, indent=2) + "\n")


__all__ = [
    "Pending",
    "TOKENIZER_FILES",
    "hf_tensors",
    "parse_size",
    "save_pretrained",
    "write_metadata",
    "write_safetensors",
    "write_sharded",
]
