"""Which family adapter handles a checkpoint or a config, and the config.json <-> ModelConfig entry
points built on it.

Adapters are found, not listed: every module of `widemoe.hf.families` that defines ``ADAPTERS``
contributes its adapters (in module-name order), so adding a family adds a module there (or a class to
a family group's module) and touches nothing here. A config.json is matched by ``model_type`` first,
then by ``architectures``; a ModelConfig by its ``model_type``. widemoe-native configs (a model_type
no adapter claims) are written as DeepSeek-V3, the architecture widemoe's defaults follow.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from typing import Any

import widemoe.hf.families as families
from widemoe.config import ConfigError, ModelConfig
from widemoe.hf.families.base import FamilyAdapter

DEFAULT_FAMILY = "deepseek_v3"  # what a ModelConfig no adapter claims is written as


@cache
def adapters() -> tuple[FamilyAdapter, ...]:
    """Every family adapter, from the ``ADAPTERS`` of each `widemoe.hf.families` module."""
    found: list[FamilyAdapter] = []
    for mod in sorted(pkgutil.iter_modules(families.__path__), key=lambda m: m.name):
        found += getattr(importlib.import_module(f"{families.__name__}.{mod.name}"), "ADAPTERS", ())
    return tuple(found)


def family_names() -> tuple[str, ...]:
    return tuple(a.name for a in adapters())


def adapter_for_hf(hf: dict[str, Any], *, source: str = "config.json") -> FamilyAdapter:
    """The adapter of an HF config.json dict, from ``model_type`` and then ``architectures``."""
    mt = hf.get("model_type")
    for a in adapters():
        if mt in a.model_types:
            return a
    archs = hf.get("architectures") or []
    for a in adapters():
        if any(arch in a.architectures for arch in archs):
            return a
    types = sorted({t for a in adapters() for t in a.model_types})
    raise ConfigError(
        f"{source}: model_type={mt!r} / architectures={hf.get('architectures')!r} is not a supported "
        f"family; widemoe reads {', '.join(types)}"
    )


def adapter_for_config(cfg: ModelConfig) -> FamilyAdapter:
    """The adapter that writes (and names the tensors of) a model with config ``cfg``."""
    for a in adapters():
        if a.owns(cfg):
            return a
    return next(a for a in adapters() if a.name == DEFAULT_FAMILY)


def detect_family(hf: dict[str, Any], *, source: str = "config.json") -> str:
    """The widemoe family of an HF config (``kimi_k2`` reads as ``deepseek_v3``)."""
    return adapter_for_hf(hf, source=source).name


def hf_to_model_config(hf: dict[str, Any], *, source: str = "config.json") -> tuple[ModelConfig, list[str]]:
    """Map an HF config.json dict onto ModelConfig. Returns (config, notices).

    widemoe only accepts what it can run: an unsupported value is a ConfigError naming the field;
    fields that do not change the computation are ignored; unknown fields are reported as notices.
    """
    return adapter_for_hf(hf, source=source).config_from_hf(hf, source=source)


def model_config_to_hf(
    cfg: ModelConfig, *, dtype: str | None = None, layout: str | None = None
) -> dict[str, Any]:
    """An HF config.json dict that transformers 5.24 builds the same model from (ConfigError naming the
    field when the family's transformers implementation cannot express the config)."""
    return adapter_for_config(cfg).config_to_hf(cfg, dtype=dtype, layout=layout)


__all__ = [
    "DEFAULT_FAMILY",
    "adapter_for_config",
    "adapter_for_hf",
    "adapters",
    "detect_family",
    "family_names",
    "hf_to_model_config",
    "model_config_to_hf",
]
