"""Hugging Face on-disk tensor names <-> widemoe state_dict names, per family.

widemoe's names are the transformers-v5 in-memory DeepSeek-V3 names (docs/internals.md): stacked
experts ``mlp.experts.gate_up_proj [E, 2I, D]`` (rows [0:I] gate, [I:2I] up) and
``mlp.experts.down_proj [E, D, I]``, MTP at ``model.mtp.{k}.*``. On disk (what transformers 5.24's
``save_pretrained`` and the original releases write, shared/reference/ecosystem.md section 3):

- per-expert ``mlp.experts.{e}.{gate,up,down}_proj.weight`` (DeepSeek, Qwen3-MoE, OLMoE), or the fused
  v5 ``mlp.experts.gate_up_proj`` / ``down_proj`` (accepted on load, never written);
- Mixtral: ``block_sparse_moe.gate.weight`` and ``block_sparse_moe.experts.{e}.w1|w3|w2.weight``
  (w1 gate, w3 up, w2 down);
- DeepSeek MTP module k at ``model.layers.{num_hidden_layers + k}.*``: ``enorm``, ``hnorm``, ``eh_proj``,
  ``shared_head.norm``, the decoder block keys, and redundant copies ``embed_tokens.weight`` and
  ``shared_head.head.weight`` of the main embedding / head (verified on load, written on save).

A destination is a :class:`Slot`: a target tensor, optionally one expert ``e`` and a row range.
Loading maps each source key to a Slot (or a :class:`Redundant` copy to verify); saving maps each
target tensor to the list of (HF key, Slot) it is written as. Both directions live here so that the
loader can name the exact HF keys that are missing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from widemoe.config import ModelConfig
from widemoe.hf.config_map import export_family

_EXPERT_RE = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
)
_MIXTRAL_EXPERT_RE = re.compile(
    r"^(?P<prefix>.*)\.block_sparse_moe\.experts\.(?P<e>\d+)\.(?P<w>w1|w2|w3)\.weight$"
)
_LAYER_RE = re.compile(r"^model\.layers\.(?P<n>\d+)\.(?P<rest>.+)$")
_MIXTRAL_W = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_MIXTRAL_W_INV = {v: k for k, v in _MIXTRAL_W.items()}
SCALE_SUFFIX = "_scale_inv"  # FP8: <name>.weight_scale_inv belongs to <name>.weight


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


def _expert_slot(prefix: str, e: int, proj: str, shapes: dict[str, tuple[int, ...]]) -> Slot | None:
    if proj == "down_proj":
        return Slot(f"{prefix}.down_proj", e)
    gu = shapes.get(f"{prefix}.gate_up_proj")
    if gu is None:
        return None
    I = gu[1] // 2
    return Slot(f"{prefix}.gate_up_proj", e, (0, I) if proj == "gate_proj" else (I, 2 * I))


def _block_slot(rest: str, prefix: str, shapes: dict[str, tuple[int, ...]]) -> Slot | None:
    """Map a decoder-block-relative key (``mlp.experts.3.up_proj.weight``) under ``prefix``."""
    m = _MIXTRAL_EXPERT_RE.match(f"{prefix}.{rest}")
    if m:
        return _expert_slot(f"{m['prefix']}.mlp.experts", int(m["e"]), _MIXTRAL_W[m["w"]], shapes)
    rest = rest.replace("block_sparse_moe.", "mlp.", 1) if rest.startswith("block_sparse_moe.") else rest
    m = _EXPERT_RE.match(f"{prefix}.{rest}")
    if m:
        return _expert_slot(m["prefix"], int(m["e"]), m["proj"], shapes)
    return Slot(f"{prefix}.{rest}")


def hf_to_slot(key: str, cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> Slot | Redundant | None:
    """Where HF tensor ``key`` goes in widemoe (None: nowhere, i.e. unexpected).

    ``shapes`` is the target state_dict's name -> shape (used to find the expert width I).
    The result's target may still be absent from ``shapes``; the loader reports that as unexpected.
    """
    L = cfg.num_hidden_layers
    m = _LAYER_RE.match(key)
    if m and int(m["n"]) >= L:
        k, rest = int(m["n"]) - L, m["rest"]
        if k >= cfg.num_nextn_predict_layers:
            return None
        base = f"model.mtp.{k}"
        if rest in ("enorm.weight", "hnorm.weight", "eh_proj.weight"):
            return Slot(f"{base}.{rest}")
        if rest == "shared_head.norm.weight":
            return Slot(f"{base}.shared_head_norm.weight")
        if rest == "embed_tokens.weight":
            return Redundant("model.embed_tokens.weight")
        if rest == "shared_head.head.weight":
            return Redundant("model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight")
        return _block_slot(rest, f"{base}.block", shapes)
    if m:
        return _block_slot(m["rest"], f"model.layers.{m['n']}", shapes)
    if key == "lm_head.weight" and cfg.tie_word_embeddings and "lm_head.weight" not in shapes:
        return Redundant("model.embed_tokens.weight")
    return Slot(key)


def slot_to_hf(target: str, shape: tuple[int, ...], cfg: ModelConfig) -> list[tuple[str, Slot]]:
    """The HF on-disk keys (and the part of ``target`` each holds) that ``target`` is written as."""
    fam = export_family(cfg)
    mixtral = fam == "mixtral"
    L = cfg.num_hidden_layers
    name = target
    mt = re.match(r"^model\.mtp\.(?P<k>\d+)\.(?P<rest>.+)$", target)
    if mt:
        base = f"model.layers.{L + int(mt['k'])}"
        rest = mt["rest"]
        if rest == "shared_head_norm.weight":
            return [(f"{base}.shared_head.norm.weight", Slot(target))]
        name = f"{base}.{rest[len('block.') :]}" if rest.startswith("block.") else f"{base}.{rest}"
    out: list[tuple[str, Slot]] = []
    ex = re.match(r"^(?P<prefix>.*)\.mlp\.experts\.(?P<p>gate_up_proj|down_proj)$", name)
    if ex:
        E = shape[0]
        pre = f"{ex['prefix']}.block_sparse_moe.experts" if mixtral else f"{ex['prefix']}.mlp.experts"
        for e in range(E):
            if ex["p"] == "down_proj":
                projs = [("down_proj", None)]
            else:
                I = shape[1] // 2
                projs = [("gate_proj", (0, I)), ("up_proj", (I, 2 * I))]
            for proj, rows in projs:
                leaf = _MIXTRAL_W_INV[proj] if mixtral else proj
                out.append((f"{pre}.{e}.{leaf}.weight", Slot(target, e, rows)))
        return out
    if mixtral:
        name = re.sub(r"\.mlp\.gate\.weight$", ".block_sparse_moe.gate.weight", name)
    return [(name, Slot(target))]


def redundant_hf_keys(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(HF key, widemoe source name) of the copies DeepSeek tooling expects in each MTP layer."""
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    out = []
    for k in range(cfg.num_nextn_predict_layers):
        base = f"model.layers.{cfg.num_hidden_layers + k}"
        out += [
            (f"{base}.embed_tokens.weight", "model.embed_tokens.weight"),
            (f"{base}.shared_head.head.weight", head),
        ]
    return out


__all__ = ["Redundant", "SCALE_SUFFIX", "Slot", "hf_to_slot", "redundant_hf_keys", "slot_to_hf"]
