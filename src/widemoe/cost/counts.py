"""Parameter and FLOP counts of a ModelConfig, through the formulas of its family.

*Forward FLOPs per token* = 2 x the matmul parameters a token multiplies by (active params minus
the input embedding, a lookup, and minus the norms) + the attention term: scores `2·H·d_qk·ctx`
and values `2·H·d_v·ctx` per layer, where `ctx` is the number of keys a query sees. Under a causal
kernel the mean over a sequence of T tokens is (T+1)/2 (`causal=True`, used for cost); a
dense-mask implementation computes all T (`causal=False`). Elementwise work is not counted.
*Training FLOPs per token* = 3 x forward: the 6·N rule for the matmul part plus 3 x the attention
term, plus the MTP modules when the model has them (they run during training). The forward figure
agrees with `torch.utils.flop_counter.FlopCounterMode` on tiny configs (tests/test_cost.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from widemoe.config import ModelConfig
from widemoe.cost.families import formulas_for
from widemoe.cost.formulas import ParamCount
from widemoe.cost.units import CostError


def count_params(c: ModelConfig) -> ParamCount:
    """Closed-form parameter counts of `WideMoeForCausalLM(c)` (names in docs/internals.md)."""
    return formulas_for(c).count_params(c)


# Real DeepSeek-V3/R1 checkpoints store, per MTP layer, copies of embed_tokens and shared_head.head
# (README_WEIGHTS: 671B main + 14B MTP = 685B on disk). widemoe shares them instead.
def mtp_redundant_copies(c: ModelConfig) -> int:
    return c.num_nextn_predict_layers * 2 * c.vocab_size * c.hidden_size


def attention_flops_per_token(c: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Forward attention FLOPs (scores + values) per token, all layers, for sequences of `seq_len` tokens."""
    if seq_len < 0:
        raise CostError(f"seq_len={seq_len} must be >= 0")
    ctx = (seq_len + 1) / 2 if causal else seq_len
    return formulas_for(c).attention_flops_at(c, ctx)


@dataclass(frozen=True)
class Flops:
    """FLOPs per token at a sequence length: forward and training, with the attention term apart."""

    seq_len: int
    forward_matmul: float  # 2·N_matmul
    forward_attention: float
    train_matmul: float  # 6·N_matmul
    train_attention: float  # 3 x forward attention
    train_mtp: float  # 3 x MTP forward (matmuls + attention), 0 without MTP

    @property
    def forward(self) -> float:
        return self.forward_matmul + self.forward_attention

    @property
    def train(self) -> float:
        return self.train_matmul + self.train_attention + self.train_mtp


def flops_per_token(c: ModelConfig, seq_len: int, causal: bool = True) -> Flops:
    p = count_params(c)
    attn = attention_flops_per_token(c, seq_len, causal)
    mtp_attn = attn / c.num_hidden_layers * c.num_nextn_predict_layers
    mtp_fwd = 2 * p.mtp_matmul_active + mtp_attn if c.num_nextn_predict_layers else 0.0
    return Flops(seq_len=seq_len, forward_matmul=2 * p.matmul_active, forward_attention=attn,
                 train_matmul=6 * p.matmul_active, train_attention=3 * attn, train_mtp=3 * mtp_fwd)


def training_flops(c: ModelConfig, tokens: float, seq_len: int) -> float:
    return flops_per_token(c, seq_len).train * tokens


__all__ = ["Flops", "attention_flops_per_token", "count_params", "flops_per_token", "mtp_redundant_copies",
           "training_flops"]
