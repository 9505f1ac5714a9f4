"""Resolve a model spec (the MODEL argument of generate, cost, inspect, a server) to what it names.

A spec is tried in this order:

    preset name                      config of the preset; no weights (random init), no tokenizer
    config file                      .toml / .json: a widemoe config (a `preset` key or widemoe
                                     fields) or a Hugging Face config.json (mapped by its family)
    Hugging Face model directory     config.json (+ *.safetensors, + tokenizer.json when present)
    training run directory           RUN/checkpoints/step-XXXXXXXX/ with COMMITTED: the newest one

`resolve_model` only reads config files (cheap: no weights, no model); `load_model` then builds or
loads the model and its tokenizer. Errors are `ConfigError`s (`SpecError` for what is wrong with the
spec itself), never `SystemExit`: the CLI turns them into messages.

Import it as `widemoe.hf.resolve` (the `widemoe.hf` package does not import this module: it imports
the package's public names, and the reverse edge would be a cycle).

The read side of the training checkpoint layout (`committed_checkpoints`, `latest_checkpoint`) lives
here, not in `train/`, so that resolving a run directory does not import the trainer; `train/`
writes checkpoints in this layout (see `widemoe.train.checkpoint`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from widemoe.config import ConfigError, ModelConfig
from widemoe.data.tokenizer import TOKENIZER_FILE, ModelTokenizer
from widemoe.hf import hf_to_model_config, load_pretrained
from widemoe.model.causal_lm import build_model
from widemoe.presets import PRESET_NAMES, config_from_file, get_preset

MARKER = "COMMITTED"  # written last into a checkpoint directory; one without it is ignored
STEP_DIR_RE = re.compile(r"^step-(\d{8})$")
# Refuse to materialise a random model bigger than this share of the machine's memory.
MAX_MEMORY_SHARE = 0.5

CONFIG_SUFFIXES = (".json", ".toml")
SpecKind = Literal["preset", "config", "directory", "run"]
_WIDEMOE_FIELDS = set(ModelConfig.__dataclass_fields__)


class SpecError(ConfigError):
    """A model spec that names nothing usable (an empty run, a directory without config.json, ...)."""


class UnknownPresetError(SpecError):
    """A spec that is neither a preset name nor a path: a usage error, as argparse's "invalid choice"."""

    exit_status = 2


@dataclass(frozen=True)
class ResolvedModel:
    """What a spec names. `weights` is the HF directory to load (None: a randomly initialised model);
    `tokenizer` the directory holding tokenizer.json (None: prompts as UTF-8 bytes). `config` is the
    declared config; a loaded checkpoint may drop MTP layers its weights lack."""

    spec: str
    kind: SpecKind
    config: ModelConfig
    weights: Path | None = None
    tokenizer: Path | None = None

    @property
    def description(self) -> str:
        if self.weights is not None:
            return f"checkpoint {self.weights}"
        return f"randomly initialised {self.spec} (output is noise)"


# --- training run directories ----------------------------------------------------------------------


def committed_checkpoints(run_dir: str | Path) -> list[Path]:
    """Committed checkpoints, oldest first; temporary and unmarked directories are ignored."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR_RE.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR_RE.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = committed_checkpoints(run_dir)
    return found[-1] if found else None


def is_run_directory(path: Path) -> bool:
    """A training run directory: `checkpoints/` and no config.json of its own."""
    return not (path / "config.json").exists() and (path / "checkpoints").is_dir()


def checkpoint_dir_of(path: str | Path) -> Path:
    """``path`` itself, or for a training run directory its newest committed checkpoint."""
    path = Path(path)
    if not is_run_directory(path):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise SpecError(f"{path} is a run directory without a committed checkpoint yet")
    return latest


# --- resolving -------------------------------------------------------------------------------------


def resolve_model(spec: str | Path) -> ResolvedModel:
    """Resolve a preset name, config file, HF model directory or training run directory."""
    spec = str(spec)
    if spec in PRESET_NAMES:
        return ResolvedModel(spec, "preset", get_preset(spec))
    path = Path(spec)
    if path.is_dir():
        return _resolve_directory(spec, path)
    if not path.exists():
        raise _missing(spec, path)
    return ResolvedModel(spec, "config", read_config_file(path))


def looks_like_path(spec: str) -> bool:
    """A spec meant as a file or directory: a separator, a leading `.` or `~`, or a config suffix."""
    return "/" in spec or os.sep in spec or spec.startswith((".", "~")) or spec.endswith(CONFIG_SUFFIXES)


def _missing(spec: str, path: Path) -> SpecError:
    """A spec that names neither a preset nor an existing path: say which one the user meant."""
    if not looks_like_path(spec):
        return UnknownPresetError(f"unknown preset {spec!r}; presets: {', '.join(PRESET_NAMES)}")
    message = f"no such file or directory: {spec}"
    ancestor = next((a for a in path.parents if a.exists()), None)
    if ancestor is not None and ancestor not in (Path("."), Path(path.anchor)):
        message += f" (only {ancestor} exists)"
    return SpecError(message)


def _resolve_directory(spec: str, path: Path) -> ResolvedModel:
    kind: SpecKind = "run" if is_run_directory(path) else "directory"
    path = checkpoint_dir_of(path)
    if (path / ".metadata").is_file() and not any(path.glob("*.safetensors")):
        raise SpecError(f"{path}: a sharded training checkpoint (DCP, written under torchrun); write a "
                        f"Hugging Face directory from it first: widemoe export {spec} DIR")
    config_file = path / "config.json"
    if config_file.exists() and not config_file.is_file():
        raise SpecError(f"{config_file} is not a file")
    if not config_file.is_file():
        raise SpecError(
            f"{path}: directory has no config.json; expected a Hugging Face model directory "
            "(config.json + *.safetensors) or a training run directory"
        )
    tokenizer = path if (path / TOKENIZER_FILE).is_file() else None
    return ResolvedModel(spec, kind, read_config_file(config_file), weights=path, tokenizer=tokenizer)


def read_config_file(p: Path) -> ModelConfig:
    """A widemoe config (.toml, or .json with a `preset` or widemoe fields) or an HF config.json."""
    if p.suffix == ".toml":
        return config_from_file(p)
    try:
        d = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{p}: not a readable JSON config ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: expected a JSON object of config fields at the top level")
    if "preset" in d:
        return config_from_file(p)
    if "architectures" in d or set(d) - _WIDEMOE_FIELDS:
        return hf_to_model_config(d, source=str(p))[0]
    # a widemoe file without a preset: its sizes must be stated, defaults would cost a toy model
    sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in sizes if k not in d]
    if missing:
        raise ConfigError(f"{p}: missing required key(s) {missing} (or a 'preset' to start from)")
    return config_from_file(p)


# --- loading ---------------------------------------------------------------------------------------

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def load_model(
    resolved: ResolvedModel,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    max_memory_share: float = MAX_MEMORY_SHARE,
) -> tuple[torch.nn.Module, ModelTokenizer]:
    """The model (checkpoint weights, or randomly initialised with `seed`) and its tokenizer.

    A random model larger than `max_memory_share` of the available memory is refused (`SpecError`)
    before anything is allocated: a full-size preset would otherwise exhaust the machine.
    """
    if resolved.weights is not None:
        model = load_pretrained(resolved.weights, dtype=dtype)
    else:
        meta = build_model(resolved.config, device="meta")
        n_params = meta.num_parameters()
        nbytes = n_params * torch.tensor([], dtype=dtype).element_size()
        if nbytes > max_memory_share * available_memory_bytes():
            raise SpecError(
                f"{resolved.spec} has {n_params / 1e9:.1f}B parameters "
                f"({nbytes / 2**30:.1f} GiB in {_DTYPE_NAMES.get(dtype, str(dtype))}); that does not fit "
                "in this machine's memory. Use a small preset (tiny, micro) or a real checkpoint directory."
            )
        model = build_model(resolved.config, dtype=dtype, seed=seed)
    return model, load_tokenizer(resolved, model.config)


def load_tokenizer(resolved: ResolvedModel, config: ModelConfig | None = None) -> ModelTokenizer:
    """The tokenizer of a resolved spec; `config` (default: the resolved one) gives vocab, eos, pad."""
    c = config or resolved.config
    return ModelTokenizer.for_model(resolved.tokenizer, c.vocab_size, c.eos_token_id, c.pad_token_id or 0)


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo; 8 GiB where that cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


__all__ = [
    "checkpoint_dir_of",
    "is_run_directory",
    "MARKER",
    "STEP_DIR_RE",
    "ResolvedModel",
    "SpecError",
    "UnknownPresetError",
    "available_memory_bytes",
    "committed_checkpoints",
    "latest_checkpoint",
    "load_model",
    "load_tokenizer",
    "looks_like_path",
    "read_config_file",
    "resolve_model",
]
