"""The vocabulary of the cost calculator: parameter components, `ParamCount`, and `FamilyFormulas`,
the four closed-form formulas a model family supplies (parameters, attention FLOPs, KV cache).

The standard decoder (MLA or GQA attention, SwiGLU FFNs, routed + shared experts) implements them in
`widemoe.cost.standard`; a family with blocks of its own (DeepSeek-V4: hyper-connections, compressed
attention) implements them in its own module, and `widemoe.cost.families` picks one by `model_type`.

Conventions (docs/cost.md): *total* counts every parameter once (tied embeddings once); MTP modules
are reported apart and share the main model's embedding and head. Persistent fp32 buffers (the
router's `e_score_correction_bias`) are counted apart, never in the parameter total. *Active per
token* counts what one token touches in the main model: K of the E routed experts, the whole router.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from widemoe.config import ModelConfig

COMPONENTS = ("embedding", "attention", "dense_ffn", "routed_experts", "shared_experts", "router",
              "norms", "head")
# Components whose weights are linear layers that FP8/FP4 checkpoints quantise (DeepSeek-V3's FP8
# checkpoint keeps the embedding, head, norms and router in bf16).
QUANTISED = ("attention", "dense_ffn", "routed_experts", "shared_experts", "eh_proj")


def swiglu(d: int, width: int) -> int:
    """Weights of one SwiGLU: gate_proj, up_proj [width, d], down_proj [d, width]."""
    return 3 * d * width


def add_counts(a: dict[str, int], b: dict[str, int]) -> None:
    """a += b, component by component."""
    for k, v in b.items():
        a[k] = a.get(k, 0) + v


def zero_counts(mtp: bool = False) -> dict[str, int]:
    """Every component at 0 (MTP counts have an `eh_proj` component too)."""
    return dict.fromkeys((*COMPONENTS, "eh_proj") if mtp else COMPONENTS, 0)


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts by component: `total`/`active` for the main model, `mtp_*` per all MTP modules."""

    total: dict[str, int]
    active: dict[str, int]
    mtp_total: dict[str, int]  # COMPONENTS + "eh_proj"; embedding/head are shared, so 0 there
    mtp_active: dict[str, int]
    buffers: int  # persistent fp32 e_score_correction_bias elements (main + MTP)
    tied: bool
    mtp_modules: int
    biases: int = 0  # attention biases in the main model (added, not multiplied: no matmul FLOPs)
    mtp_biases: int = 0

    @property
    def main_total(self) -> int:
        return sum(self.total.values())

    @property
    def mtp(self) -> int:
        return sum(self.mtp_total.values())

    @property
    def total_with_mtp(self) -> int:
        """What `sum(p.numel() for p in model.parameters())` gives for WideMoeForCausalLM."""
        return self.main_total + self.mtp

    @property
    def active_with_embedding(self) -> int:
        return sum(self.active.values())

    @property
    def active_without_embedding(self) -> int:
        """Active minus the input embedding (a lookup); tied weights stay, since the head uses them."""
        return self.active_with_embedding - (0 if self.tied else self.active["embedding"])

    @property
    def matmul_active(self) -> int:
        """Weights a token is multiplied by (the FLOPs base): no embedding lookup, no norms, head counted."""
        head = self.total["embedding"] if self.tied else self.active["head"]
        a = self.active
        return self.active_with_embedding - a["embedding"] - a["norms"] - a["head"] + head - self.biases

    @property
    def mtp_matmul_active(self) -> int:
        """Per all MTP modules: eh_proj, the block's matmuls and one pass through the shared head each."""
        n = self.mtp_active
        head = self.total["embedding" if self.tied else "head"]
        return sum(n.values()) - n["norms"] - self.mtp_biases + self.mtp_modules * head


@dataclass(frozen=True)
class FamilyFormulas:
    """The closed forms a family supplies; everything else in `widemoe.cost` is derived from them.

    `attention_flops_at(c, ctx)`: forward attention FLOPs of one query that sees `ctx` keys, all
    layers. `kv_elements(c, tokens)`: cached elements of one sequence of `tokens` positions, all
    layers. `kv_elements_per_token_layer(c)`: the growth per token per layer (for caches that are not
    linear in the context, the mean growth once the fixed parts are full). `kv_contrast_preset`: a
    preset whose cache the report prints beside this family's, for contrast (None: no such row).
    """

    count_params: Callable[[ModelConfig], ParamCount]
    attention_flops_at: Callable[[ModelConfig, float], float]
    kv_elements: Callable[[ModelConfig, int], float]
    kv_elements_per_token_layer: Callable[[ModelConfig], float]
    kv_contrast_preset: str | None = None


__all__ = ["COMPONENTS", "QUANTISED", "FamilyFormulas", "ParamCount", "add_counts", "swiglu", "zero_counts"]
