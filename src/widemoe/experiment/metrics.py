"""The numbers a suite records per run, from its metrics.jsonl and the final full held-out evaluation.

- heldout_loss: the mean over domains of the full held-out loss (each domain weighs the same);
  heldout_loss_by_domain keeps each.
- maxvio_batch: MaxVio of each training step's batch (mean over MoE layers), averaged over the second
  half of training, once the router has settled (Wang et al. 2024's MaxVio_batch).
- maxvio_global: MaxVio of the expert counts summed over the whole held-out set (MaxVio_global).
- dead_experts: experts (all MoE layers together) that no held-out token was routed to.
- mi_bits: I(domain; expert) of the held-out routing, in bits, mean over MoE layers.
- tokens_per_s: median training throughput over the steps after the first two (warm-up of the allocator).
- train_seconds: the summed step times (training only: no evaluation or saving), for loss against
  wall-clock.

Dense runs have no routing: their routing metrics are None.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

from widemoe.report.analysis import mutual_information_bits

ROUTING_METRICS = ("maxvio_batch", "maxvio_global", "dead_experts", "mi_bits")


def run_metrics(records: list[dict[str, Any]], final: dict[str, Any], steps: int) -> dict[str, Any]:
    """`metrics` (the comparable numbers), `curves` (per eval and per step) and the routing tables."""
    records = _redone_dropped(records)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    losses = final["heldout_loss"]
    routed = bool(final["heldout_max_vio"])
    late = [r["max_vio_mean"] for r in train if r["step"] > steps // 2 and "max_vio_mean" in r]
    throughput = [r["tokens_per_s"] for r in train[2:]] or [r["tokens_per_s"] for r in train]
    counts = final["domain_expert_counts"]
    metrics = {
        "heldout_loss": sum(losses.values()) / len(losses),
        "heldout_loss_by_domain": dict(losses),
        "maxvio_batch": sum(late) / len(late) if routed and late else None,
        "maxvio_global": final["heldout_max_vio_mean"] if routed else None,
        "dead_experts": sum(final["heldout_dead_experts"].values()) if routed else None,
        "mi_bits": _mean_mi(counts) if routed else None,
        "tokens_per_s": statistics.median(throughput) if throughput else None,
        "train_seconds": sum(r["step_time"] for r in train),
    }
    elapsed = _elapsed_at(train)
    curves = {
        "eval": [{"step": r["step"], "tokens": r["tokens"], "train_seconds": elapsed.get(r["step"]),
                  "heldout_loss": sum(r["heldout_loss"].values()) / len(r["heldout_loss"])} for r in evals],
        "train": [{"step": r["step"], "loss": r.get("loss"), "max_vio": r.get("max_vio_mean"),
                   "step_time": r["step_time"]} for r in train],
    }
    return {"metrics": metrics, "curves": curves, "heldout_max_vio": final["heldout_max_vio"],
            "domain_expert_counts": counts}


def _redone_dropped(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A resumed run redoes the steps after its checkpoint: drop the train and eval records that the
    interrupted part wrote after the `resume` record's step, so each step counts once."""
    out: list[dict[str, Any]] = []
    for r in records:
        if r.get("kind") == "resume":
            out = [x for x in out if x.get("kind") not in ("train", "eval") or x["step"] <= r["step"]]
        out.append(r)
    return out


def _elapsed_at(train: list[dict[str, Any]]) -> dict[int, float]:
    total, out = 0.0, {}
    for r in train:
        total += r["step_time"]
        out[r["step"]] = total
    return out


def _mean_mi(counts: dict[str, dict[str, list[float]]]) -> float:
    """I(domain; expert) per MoE layer from {domain: {layer: counts}}, averaged over the layers."""
    domains = sorted(counts)
    layers = sorted({k for d in domains for k in counts[d]}, key=int)
    mis = [mutual_information_bits(np.array([counts[d][k] for d in domains])) for k in layers]
    return float(np.mean(mis)) if mis else 0.0


__all__ = ["ROUTING_METRICS", "run_metrics"]
