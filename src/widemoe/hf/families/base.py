"""What a Hugging Face model family adapter provides, and the destinations its key mapping names.

An adapter owns everything family-specific about checkpoints: the config.json <-> ModelConfig mapping
(both directions), the on-disk tensor names <-> widemoe state_dict names (both directions, every
layout it writes), where quantisation scales sit, and where MTP modules live. The generic pipelines
(`widemoe.hf.plan`, `loader`, `saver`, `convert`, `inspect`) only call these methods; the registry
(`widemoe.hf.registry`) picks the adapter from config.json's ``model_type`` / ``architectures`` or from
a ModelConfig's ``model_type``.

A destination is a :class:`Slot`: a target tensor, optionally one expert ``e`` and a row range.
Loading maps each source key to a Slot (or a :class:`Redundant` copy to verify); saving maps each
target tensor to the list of (checkpoint key, Slot) it is written as. The loader uses the second
direction too, to name the exact checkpoint keys that are missing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from widemoe.config import ModelConfig

Shapes = dict[str, tuple[int, ...]]  # target state_dict name -> shape
_LAYER_RE = re.compile(r"^model\.layers\.(?P<n>\d+)\.")


@dataclass(frozen=True)
class Slot:
    """Where a source tensor lands: ``target[expert][row0:row1]`` (each part optional)."""

    target: str
    expert: int | None = None
    rows: tuple[int, int] | None = None

    def view(self, t: torch.Tensor) -> torch.Tensor:
        if self.expert is not None:
            t = t[self.expert]
        if self.rows is not None:
            t = t[self.rows[0] : self.rows[1]]
        return t

    def shape(self, target_shape: tuple[int, ...]) -> tuple[int, ...]:
        s = list(target_shape)
        if self.expert is not None:
            s = s[1:]
        if self.rows is not None:
            s[0] = self.rows[1] - self.rows[0]
        return tuple(s)


@dataclass(frozen=True)
class Redundant:
    """A source tensor that duplicates a target (DeepSeek MTP embed/head copies, a tied lm_head)."""

    of: str


def stacked_expert_keys(
    prefix: str, target: str, shape: tuple[int, ...], leaves: tuple[str, str, str]
) -> list[tuple[str, Slot]]:
    """Per-expert keys ``{prefix}.{e}.{leaf}`` of a stacked ``gate_up_proj [E, 2I, D]`` or
    ``down_proj [E, D, I]`` target; ``leaves`` names (gate, up, down) in the family's spelling."""
    gate, up, down = leaves
    out: list[tuple[str, Slot]] = []
    for e in range(shape[0]):
        if target.endswith("down_proj"):
            out.append((f"{prefix}.{e}.{down}", Slot(target, e)))
        else:
            I = shape[1] // 2
            out += [
                (f"{prefix}.{e}.{gate}", Slot(target, e, (0, I))),
                (f"{prefix}.{e}.{up}", Slot(target, e, (I, 2 * I))),
            ]
    return out


def expert_slot(stack: str, e: int, proj: str, shapes: Shapes) -> Slot | None:
    """The part of the stacked expert tensors under ``stack`` (``...mlp.experts``) that expert ``e``'s
    ``proj`` (gate/up/down) fills; None when the model has no such stack."""
    if proj == "down":
        return Slot(f"{stack}.down_proj", e)
    gu = shapes.get(f"{stack}.gate_up_proj")
    if gu is None:
        return None
    I = gu[1] // 2
    return Slot(f"{stack}.gate_up_proj", e, (0, I) if proj == "gate" else (I, 2 * I))


class FamilyAdapter:
    """Base adapter: the defaults suit transformers-convention checkpoints (HF names, FP8 scales as
    ``<name>.weight_scale_inv``, MTP modules as extra decoder layers)."""

    name: str = ""  # the family tag reported (the ModelConfig.model_type it produces by default)
    model_types: tuple[str, ...] = ()  # config.json model_type values this adapter reads
    architectures: tuple[str, ...] = ()  # config.json architectures it reads; the first is written
    config_model_types: tuple[str, ...] = ()  # ModelConfig.model_type values it writes (default: name)
    layouts: tuple[str, ...] = ("transformers",)  # on-disk layouts it writes; the first is the default
    accounting_layout: str = "transformers"  # the layout whose names a load error reports as missing
    fp4: bool = False  # int8/uint8 tensors into float targets are packed FP4 (widemoe.hf.fp4)

    def owns(self, cfg: ModelConfig) -> bool:
        return cfg.model_type in (self.config_model_types or (self.name,))

    # --- config.json ------------------------------------------------------------------------------
    def config_from_hf(self, hf: dict[str, Any], *, source: str) -> tuple[ModelConfig, list[str]]:
        """ModelConfig of an HF config.json dict, and notices (ignored or adjusted fields)."""
        raise NotImplementedError

    def config_to_hf(
        self, cfg: ModelConfig, *, dtype: str | None = None, layout: str | None = None
    ) -> dict[str, Any]:
        """The config.json dict transformers builds the same model from (ConfigError when it cannot)."""
        raise NotImplementedError

    def config_file(self, cfg: ModelConfig, *, dtype: str | None, layout: str | None) -> dict[str, Any]:
        """What config.json holds: `config_to_hf` plus the legacy rope keys that transformers 4.x,
        vLLM and DeepSeek's own scripts read (``rope_theta`` / ``rope_scaling``)."""
        hf = self.config_to_hf(cfg, dtype=dtype, layout=layout)
        legacy = {
            "rope_theta": cfg.rope_theta,
            "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        }
        return {**hf, **legacy}

    # --- tensor names -----------------------------------------------------------------------------
    def source_slot(self, key: str, cfg: ModelConfig, shapes: Shapes) -> Slot | Redundant | None:
        """Where checkpoint tensor ``key`` goes (None: nowhere). The target may be absent from
        ``shapes``; the planner reports that as unexpected."""
        raise NotImplementedError

    def target_keys(
        self, target: str, shape: tuple[int, ...], cfg: ModelConfig, layout: str | None = None
    ) -> list[tuple[str, Slot]]:
        """The checkpoint keys (and the part of ``target`` each holds) ``target`` is written as."""
        raise NotImplementedError

    def redundant_keys(self, cfg: ModelConfig) -> list[tuple[str, str]]:
        """(checkpoint key, widemoe tensor) of copies written besides the targets; verified on load."""
        return []

    def scale_keys(self, key: str) -> tuple[str, ...]:
        """Where the scale of quantised weight ``key`` may sit (the first is named when missing)."""
        return (key + "_scale_inv",)

    def is_scale_key(self, key: str) -> bool:
        return key.endswith(".weight_scale_inv")

    # --- MTP modules ------------------------------------------------------------------------------
    def mtp_keys(self, keys: list[str], cfg: ModelConfig) -> list[str]:
        """Checkpoint keys of MTP modules: extra decoder layers ``model.layers.{L + k}.*``."""
        L = cfg.num_hidden_layers
        return [k for k in keys if (m := _LAYER_RE.match(k)) and int(m["n"]) >= L]

    def mtp_location(self, cfg: ModelConfig) -> str:
        return f"model.layers.{cfg.num_hidden_layers}+"

    def attention_summary(self, cfg: ModelConfig) -> str:
        """One phrase for `widemoe inspect`'s layer table (grouped-query attention by default)."""
        norm = f" qk-norm {cfg.qk_norm}" if cfg.qk_norm != "none" else ""
        return f"GQA {cfg.num_attention_heads}/{cfg.kv_heads}{norm}"


__all__ = ["FamilyAdapter", "Redundant", "Shapes", "Slot", "expert_slot", "stacked_expert_keys"]
