"""The pieces of one optimizer step, used by `widemoe.train.loop.Trainer.train_step`: autocast chosen from
the device, gradient accumulation over micro-batches, the non-finite guard, the once-per-step balancing
update and the routing fields of the `train` record.

One optimizer step = `grad_accum` micro-batches; the aux-loss-free bias update runs once per optimizer
step from the counts of all its micro-batches (DeepSeek-V3 §2.1.2; counts from eval forwards never
enter, the MoE blocks count only in training mode).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from widemoe.model.balance import dead_experts, max_vio
from widemoe.model.causal_lm import IGNORE_INDEX, WideMoeForCausalLM
from widemoe.train.bias_update import update_expert_bias
from widemoe.train.config import TrainConfig
from widemoe.train.parallel import RunContext


def autocast_for(device: torch.device, bf16: bool) -> AbstractContextManager:
    """bf16 autocast on the device's own backend (CPU, CUDA, ...); a no-op context when `bf16` is off."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def per_domain_loss(
    token_losses_BT: torch.Tensor, labels_BT: torch.Tensor, domains_BT: torch.Tensor, n_domains: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token losses and token counts per domain (for per-domain means across batches), from the
    model output's `token_losses`."""
    tok = token_losses_BT.detach().float().flatten()
    dom = domains_BT.flatten()
    valid = labels_BT.flatten() != IGNORE_INDEX
    sums = torch.zeros(n_domains, device=tok.device).index_add_(0, dom[valid], tok[valid])
    ones = torch.ones(int(valid.sum()), device=tok.device)
    counts = torch.zeros(n_domains, device=tok.device).index_add_(0, dom[valid], ones)
    return sums, counts


@dataclass
class Accumulated:
    """What the micro-batches of one optimizer step leave besides the gradients."""

    logs: dict[str, float] = field(default_factory=dict)  # loss terms, each averaged over micro-batches
    domain_loss_sums: torch.Tensor | None = None
    domain_token_counts: torch.Tensor | None = None
    tokens: int = 0

    def loss_by_domain(self, domains: tuple[str, ...]) -> dict[str, float]:
        sums, counts = self.domain_loss_sums, self.domain_token_counts
        return {dn: float(sums[i] / counts[i]) for i, dn in enumerate(domains) if counts[i] > 0}


def accumulate_gradients(
    model: WideMoeForCausalLM,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    tc: TrainConfig,
    n_domains: int,
    device: torch.device,
    ctx: RunContext | None = None,
) -> Accumulated:
    """Forward and backward `tc.grad_accum` micro-batches from `batches` (moved to `device`), the loss of
    each scaled by 1/grad_accum so the gradients are the mean over the step. On several ranks (`ctx`)
    each takes its rows of every global batch and scales its loss by n_local / n_global
    (`widemoe.train.parallel`); the logged terms and per-domain sums are then summed over ranks."""
    ctx = ctx if ctx is not None else RunContext()
    acc = Accumulated(
        domain_loss_sums=torch.zeros(n_domains, device=device),
        domain_token_counts=torch.zeros(n_domains, device=device),
    )
    for _ in range(tc.grad_accum):
        global_batch = next(batches)
        x, y, d = (ctx.local_rows(t).to(device) for t in global_batch)
        with autocast_for(device, tc.bf16):
            out = model(x, labels=y)
        scale = ctx.loss_scale(int((y != IGNORE_INDEX).sum()))
        loss = out.loss * scale if ctx.distributed else out.loss  # alone: the very same graph as before
        (loss / tc.grad_accum).backward()
        s, c = per_domain_loss(out.token_losses, y, d, n_domains)
        acc.domain_loss_sums += s
        acc.domain_token_counts += c
        terms = {"loss": out.loss, "lm_loss": out.lm_loss, "mtp_loss": out.mtp_loss}
        terms.update({f"aux/{name}": val for name, val in out.aux_losses.items()})
        for key, val in terms.items():
            if val is not None:
                acc.logs[key] = acc.logs.get(key, 0.0) + float(val.detach()) * scale / tc.grad_accum
        acc.tokens += global_batch[0].numel()
    if ctx.distributed:
        _sum_over_ranks(acc, ctx)
    return acc


def _sum_over_ranks(acc: Accumulated, ctx: RunContext) -> None:
    """One all-reduce for the logged terms and the per-domain sums of every rank."""
    keys = sorted(acc.logs)
    n = len(acc.domain_loss_sums)
    flat = torch.cat([torch.tensor([acc.logs[k] for k in keys], dtype=torch.float64),
                      acc.domain_loss_sums.double().cpu(), acc.domain_token_counts.double().cpu()])
    total = ctx.sum(flat)
    acc.logs = {k: float(v) for k, v in zip(keys, total[:len(keys)], strict=True)}
    acc.domain_loss_sums = total[len(keys):len(keys) + n].float()
    acc.domain_token_counts = total[len(keys) + n:].float()


def non_finite(loss: float, grad_norm: float, step: int) -> str | None:
    """Why step `step` must not be applied (a non-finite loss or gradient norm), or None."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return None
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    return f"non-finite {what} at step {step} (loss={loss}, grad_norm={grad_norm})"


def close_balancing_window(model: WideMoeForCausalLM, tc: TrainConfig) -> dict[int, torch.Tensor]:
    """After an optimizer step: the expert counts of all its micro-batches (per MoE layer), then the
    aux-free bias update from them (which zeroes them), or just the zeroing in the other modes."""
    counts = {m.layer_idx: m.tokens_per_expert.clone() for m in model.moe_blocks()}
    if tc.balance == "aux-free":
        update_expert_bias(model, tc.bias_update_speed)
    else:
        for m in model.moe_blocks():
            m.tokens_per_expert.zero_()
    return counts


def routing_fields(model: WideMoeForCausalLM, counts: dict[int, torch.Tensor]) -> dict[str, Any]:
    """MaxVio and dead experts per layer of one step's counts, their mean, and the range of the biases."""
    rec: dict[str, Any] = {
        "max_vio": {str(k): max_vio(v) for k, v in counts.items()},
        "dead_experts": {str(k): dead_experts(v) for k, v in counts.items()},
    }
    rec["max_vio_mean"] = sum(rec["max_vio"].values()) / max(1, len(rec["max_vio"]))
    gates = [m.gate for m in model.moe_blocks()]
    biases = [g.e_score_correction_bias for g in gates if g.e_score_correction_bias is not None]
    if biases:
        rec["bias_min"] = min(float(b.min()) for b in biases)
        rec["bias_max"] = max(float(b.max()) for b in biases)
    return rec


__all__ = [
    "Accumulated",
    "accumulate_gradients",
    "autocast_for",
    "close_balancing_window",
    "non_finite",
    "per_domain_loss",
    "routing_fields",
]
