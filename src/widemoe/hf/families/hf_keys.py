"""Tensor names of transformers-convention decoders (DeepSeek-V2/V3, Qwen3-MoE, OLMoE; Mixtral after
its renames), shared by their adapters.

widemoe's names are the transformers-v5 in-memory names (docs/internals.md): stacked experts
``mlp.experts.gate_up_proj [E, 2I, D]`` (rows [0:I] gate, [I:2I] up) and ``mlp.experts.down_proj
[E, D, I]``. On disk they are per expert, ``mlp.experts.{e}.{gate,up,down}_proj.weight``; the fused v5
names are accepted on load (they equal the targets) and never written. A checkpoint of a model with
tied embeddings may carry ``lm_head.weight``: it is verified as a copy of the embedding.
"""

from __future__ import annotations

import re

from widemoe.config import ModelConfig
from widemoe.hf.families.base import Redundant, Shapes, Slot, expert_slot, stacked_expert_keys

_EXPERT_RE = re.compile(r"^(?P<stack>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")
_STACK_RE = re.compile(r"^(?P<stack>.*\.mlp\.experts)\.(?:gate_up_proj|down_proj)$")
PER_EXPERT_LEAVES = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")


def decoder_source_slot(key: str, cfg: ModelConfig, shapes: Shapes) -> Slot | Redundant | None:
    """Destination of a checkpoint key in transformers' names (per-expert keys into the stacks)."""
    m = _EXPERT_RE.match(key)
    if m:
        return expert_slot(m["stack"], int(m["e"]), m["proj"], shapes)
    if key == "lm_head.weight" and cfg.tie_word_embeddings and "lm_head.weight" not in shapes:
        return Redundant("model.embed_tokens.weight")
    return Slot(key)


def decoder_target_keys(target: str, name: str, shape: tuple[int, ...]) -> list[tuple[str, Slot]]:
    """The keys ``target`` is written as, ``name`` being its checkpoint name (stacks: per expert)."""
    m = _STACK_RE.match(name)
    if m:
        return stacked_expert_keys(m["stack"], target, shape, PER_EXPERT_LEAVES)
    return [(name, Slot(target))]


__all__ = ["PER_EXPERT_LEAVES", "decoder_source_slot", "decoder_target_keys"]
