"""Write a widemoe model as a Hugging Face directory that transformers 5.24 (and vLLM, SGLang,
lm-eval through it) loads with identical logits.

Layout (what transformers' ``save_pretrained`` writes, shared/reference/ecosystem.md section 3):
``config.json`` (the family adapter's fields; transformers-convention families add the legacy
``rope_theta``/``rope_scaling`` beside the v5 ``rope_parameters`` so older readers agree),
``generation_config.json``, weights under the family's on-disk names (per-expert keys, the fp32
router gate and ``e_score_correction_bias``, MTP modules and any redundant copies the family's tooling
looks for, all chosen by the adapter). A family with several layouts (DeepSeek-V4: ``transformers``
or ``native``) takes ``layout=``. Shards above ``max_shard_size`` are written as
``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``. No
``quantization_config`` is ever written (weights are dequantised on load). ``tokenizer.json`` +
``tokenizer_config.json`` are written when a tokenizer is given (a ``tokenizers.Tokenizer``, a
tokenizer.json file, or a model directory to copy from).

Tensors stream one at a time from the model's own storage (expert slices are views), so saving needs
no second copy of the model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from widemoe.config import ModelConfig
from widemoe.hf.families.base import FamilyAdapter
from widemoe.hf.plan import model_targets
from widemoe.hf.registry import adapter_for_config
from widemoe.hf.safetensors_io import Pending, write_sharded

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


def checkpoint_layout(adapter: FamilyAdapter, layout: str | None) -> str:
    """``layout`` checked against what the family writes (None: its default)."""
    if layout is None:
        return adapter.layouts[0]
    if layout not in adapter.layouts:
        raise ValueError(
            f"layout={layout!r} must be one of {', '.join(map(repr, adapter.layouts))} for {adapter.name}"
        )
    return layout


def hf_tensors(model: nn.Module, layout: str | None = None) -> list[tuple[str, torch.Tensor]]:
    """(checkpoint key, tensor view) for every tensor the directory holds, in state_dict order."""
    cfg = model.config  # type: ignore[attr-defined]
    adapter = adapter_for_config(cfg)
    layout = checkpoint_layout(adapter, layout)
    targets = model_targets(model)
    out: list[tuple[str, torch.Tensor]] = []
    for name, t in targets.items():
        for key, slot in adapter.target_keys(name, tuple(t.shape), cfg, layout):
            out.append((key, slot.view(t.detach())))
    for key, src in adapter.redundant_keys(cfg):
        out.append((key, targets[src].detach()))
    return out


def dtype_name(dtype: torch.dtype) -> str:
    """config.json's name of the dtype the weights are written in."""
    return {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")


def save_pretrained(
    model: nn.Module,
    path: str | Path,
    *,
    max_shard_size: int | str = "5GB",
    tokenizer: Any = None,
    layout: str | None = None,
) -> Path:
    """Write ``model`` as an HF directory at ``path``; returns the path."""
    cfg = model.config  # type: ignore[attr-defined]
    layout = checkpoint_layout(adapter_for_config(cfg), layout)
    path = Path(path)
    hf = model_config_file(model, layout)  # raises before anything is written
    write_sharded(path, [Pending.of(k, t) for k, t in hf_tensors(model, layout)], max_shard_size)
    write_metadata(path, hf, cfg)
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is not None:
        write_tokenizer(tok, path, cfg)
    return path


def model_config_file(model: nn.Module, layout: str | None = None) -> dict[str, Any]:
    """The config.json dict of ``model`` as `save_pretrained` writes it (the weights' dtype, the layout)."""
    cfg = model.config  # type: ignore[attr-defined]
    adapter = adapter_for_config(cfg)
    dtype = dtype_name(model.model.embed_tokens.weight.dtype)  # type: ignore[union-attr]
    return adapter.config_file(cfg, dtype=dtype, layout=checkpoint_layout(adapter, layout))


def write_metadata(path: Path, hf: dict[str, Any], cfg: ModelConfig) -> None:
    """config.json (``hf``, as the adapter's `config_file` made it) and generation_config.json."""
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
    "TOKENIZER_FILES",
    "checkpoint_layout",
    "dtype_name",
    "hf_tensors",
    "model_config_file",
    "save_pretrained",
    "write_metadata",
    "write_tokenizer",
]
