"""Which closed forms cost a model: one table from `model_type` to the family's `FamilyFormulas`.

Families whose differences are config fields (DeepSeek-V3, Kimi K2, DeepSeek-V2, Qwen3-MoE, Mixtral,
OLMoE) are costed by `widemoe.cost.standard` and need no entry. A family with blocks of its own
adds a module next to this one (as `deepseek_v4.py` does) and one line to `FAMILIES`; the rest of
the calculator (`counts`, `memory`, `summary`) asks `formulas_for(c)` and never names a family.
"""

from __future__ import annotations

from widemoe.config import ModelConfig
from widemoe.cost import deepseek_v4, standard
from widemoe.cost.formulas import FamilyFormulas

FAMILIES: dict[str, FamilyFormulas] = {
    "deepseek_v4": deepseek_v4.FORMULAS,
}


def formulas_for(c: ModelConfig) -> FamilyFormulas:
    """The closed forms of `c`'s family (the standard decoder's unless the table names it)."""
    return FAMILIES.get(c.model_type, standard.FORMULAS)


__all__ = ["FAMILIES", "formulas_for"]
