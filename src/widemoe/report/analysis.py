"""Routing statistics of a training run, read from `RUN/metrics.jsonl` (and `RUN/summary.json` if present).

What it measures, per MoE layer, from the latest eval record's `domain_expert_counts` (token-expert
assignments over the held-out set, per domain):

- **Mutual information** I(domain; expert) in bits, of the joint distribution over assignments
  p(d, e) = c[d, e] / sum(c). A router that ignores the domain (uniform or not) gives 0; a router that
  sends each domain to its own experts gives H(domain). The normalised MI = I / H(domain) is in [0, 1].
  The plug-in estimate is biased upwards by about (D-1)(E-1) / (2 N ln 2) bits (Miller-Madow), reported
  as `mi_noise_bits` so a reader can tell specialisation from sampling noise.
- **Top-3 share**: the fraction of a domain's assignments that land on its 3 most-used experts, against
  3/E for a uniform router.
- **Expert load** (summed over domains), **MaxVio_global** = max(load)/mean(load) - 1 (Wang et al.,
  "Auxiliary-Loss-Free Load Balancing", §4.1; `widemoe.model.balance.max_vio`) and dead experts (zero load).

The loader also folds resumed runs: when a step number repeats (a `--resume` continued from an older
checkpoint), the later records replace the earlier ones from that step on, so curves never go backwards.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from widemoe.train.metrics import read_metrics

TOP_N = 3  # experts per domain counted in the "top-3 share"


class ReportError(ValueError):
    """A run directory the report cannot be built from; the message names the file and what is missing.
    A failure (exit status 1), like every file or directory a command cannot use (issue 11)."""


# --------------------------------------------------------------------------------------------------
# Loading


@dataclass
class RunData:
    """The records of one run, in step order, with resumed segments folded in."""

    run_dir: Path
    start: dict[str, Any] | None
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    summary: dict[str, Any]  # RUN/summary.json, {} when absent
    stopped: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: list[int] = field(default_factory=list)  # metrics.jsonl lines that are not records

    @property
    def warnings(self) -> list[str]:
        if not self.bad_lines:
            return []
        lines = ", ".join(map(str, self.bad_lines[:10])) + (" ..." if len(self.bad_lines) > 10 else "")
        return [f"{self.run_dir / 'metrics.jsonl'}: {len(self.bad_lines)} line(s) are not JSON records and "
                f"were left out (line {lines}); the report lacks whatever they held"]

    @property
    def last_eval(self) -> dict[str, Any]:
        if not self.evals:
            path = self.run_dir / "metrics.jsonl"
            garbled = (f" that can be read (line {', '.join(map(str, self.bad_lines))} is not a JSON record)"
                       if self.bad_lines else "")
            raise ReportError(f"{path} has no 'eval' record{garbled}; training writes one every eval_every "
                              "steps and at the last step: train longer or lower --eval-every")
        return self.evals[-1]

    @property
    def domains(self) -> list[str]:
        return list(self.last_eval.get("domain_expert_counts", {}) or self.last_eval.get("heldout_loss", {}))


def _fold_resumed(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep step order: a record whose step is <= the last kept one drops the kept ones from that step on."""
    out: list[dict[str, Any]] = []
    for r in records:
        step = r.get("step", 0)
        while out and out[-1].get("step", 0) >= step:
            out.pop()
        out.append(r)
    return out


def load_run(run_dir: str | Path) -> RunData:
    """Read RUN/metrics.jsonl (torn last line tolerated) and the optional RUN/summary.json."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        state = "is not a directory" if run_dir.exists() else "does not exist"
        raise ReportError(f"run directory {run_dir} {state}")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{path} not found: a run directory needs the metrics.jsonl that "
                          f"`widemoe train --run-dir {run_dir}` writes")
    bad_lines: list[int] = []
    records = read_metrics(path, bad_lines)
    starts = [r for r in records if r.get("kind") == "start"]
    summary: dict[str, Any] = {}
    spath = run_dir / "summary.json"
    if spath.is_file():
        try:
            summary = json.loads(spath.read_text())
        except json.JSONDecodeError as e:
            raise ReportError(f"{spath} is not valid JSON ({e})") from None
        if not isinstance(summary, dict):
            raise ReportError(f"{spath} must hold a JSON object, got {type(summary).__name__}")
    return RunData(
        run_dir=run_dir,
        start=starts[0] if starts else None,
        train=_fold_resumed([r for r in records if r.get("kind") == "train"]),
        evals=_fold_resumed([r for r in records if r.get("kind") == "eval"]),
        summary=summary,
        stopped=[r for r in records if r.get("kind") == "stopped"],
        bad_lines=bad_lines,
    )


def layer_label(layer: int, num_hidden_layers: int | None) -> str:
    """'layer i', or 'MTP k' for the MoE of MTP module k (its block's layer_idx is num_hidden_layers + k)."""
    if num_hidden_layers is not None and layer >= num_hidden_layers:
        return f"MTP {layer - num_hidden_layers}"
    return f"layer {layer}"


# --------------------------------------------------------------------------------------------------
# Information measures


def entropy_bits(p: np.ndarray) -> float:
    """Shannon entropy in bits of a probability vector (zeros contribute nothing)."""
    p = np.asarray(p, dtype=np.float64).ravel()
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def mutual_information_bits(counts_DE: np.ndarray) -> float:
    """I(D; E) in bits of the joint distribution proportional to `counts_DE` (rows domains, columns experts).

    Computed as H(D) + H(E) - H(D, E), clipped at 0 against round-off; 0 for an empty table.
    """
    c = np.asarray(counts_DE, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"counts_DE must be 2-D [domains, experts], got shape {c.shape}")
    if (c < 0).any():
        raise ValueError("counts_DE has negative entries; counts of assignments must be >= 0")
    total = c.sum()
    if total <= 0:
        return 0.0
    p = c / total
    mi = entropy_bits(p.sum(1)) + entropy_bits(p.sum(0)) - entropy_bits(p)
    return max(0.0, mi)


def top_n_share(counts_E: np.ndarray, n: int = TOP_N) -> float:
    """Fraction of the assignments in `counts_E` that go to its `n` most-used experts (0 when empty)."""
    c = np.sort(np.asarray(counts_E, dtype=np.float64))[::-1]
    total = c.sum()
    return float(c[:n].sum() / total) if total > 0 else 0.0


def max_vio(load_E: np.ndarray) -> float:
    """max(load) / mean(load) - 1, as `widemoe.model.balance.max_vio` (0 when nothing was routed)."""
    load = np.asarray(load_E, dtype=np.float64)
    mean = load.mean() if load.size else 0.0
    return float(load.max() / mean - 1) if mean > 0 else 0.0


# --------------------------------------------------------------------------------------------------
# Per-layer routing analysis


@dataclass
class LayerRouting:
    """Routing statistics of one MoE layer over the held-out set (see the module docstring)."""

    layer: int
    domains: list[str]
    counts_DE: np.ndarray  # token-expert assignments per domain and expert
    mi_bits: float
    h_domain_bits: float
    mi_noise_bits: float  # expected plug-in MI of a domain-blind router with this many assignments
    top_share: dict[str, float]  # per domain: share of its assignments on its TOP_N experts
    uniform_top_share: float  # TOP_N / E
    load_E: np.ndarray
    max_vio: float
    dead_experts: int

    @property
    def mi_normalised(self) -> float:
        return self.mi_bits / self.h_domain_bits if self.h_domain_bits > 0 else 0.0

    @property
    def n_experts(self) -> int:
        return int(self.counts_DE.shape[1])

    @property
    def share_DE(self) -> np.ndarray:
        """Each domain's assignments as shares over experts (rows sum to 1; empty rows stay 0)."""
        rows = self.counts_DE.sum(1, keepdims=True)
        return np.divide(self.counts_DE, rows, out=np.zeros_like(self.counts_DE), where=rows > 0)


def analyse_layer(layer: int, counts: dict[str, list[float]], top: int = TOP_N) -> LayerRouting:
    """Statistics of one layer from {domain: [count per expert]}."""
    domains = list(counts)
    widths = {len(v) for v in counts.values()}
    if len(widths) != 1:
        raise ReportError(f"domain_expert_counts of layer {layer}: domains have different expert counts "
                          f"{sorted(widths)}; every domain must list one count per routed expert")
    c = np.array([counts[d] for d in domains], dtype=np.float64)
    n_dom, n_exp = c.shape
    load = c.sum(0)
    n = c.sum()
    noise = (n_dom - 1) * (n_exp - 1) / (2 * n * math.log(2)) if n > 0 else 0.0
    return LayerRouting(
        layer=layer, domains=domains, counts_DE=c, mi_bits=mutual_information_bits(c),
        h_domain_bits=entropy_bits(c.sum(1) / n) if n > 0 else 0.0, mi_noise_bits=noise,
        top_share={d: top_n_share(c[i], top) for i, d in enumerate(domains)},
        uniform_top_share=min(top, n_exp) / n_exp, load_E=load, max_vio=max_vio(load),
        dead_experts=int((load == 0).sum()),
    )


def analyse_routing(domain_expert_counts: dict[str, dict[str, list[float]]],
                    top: int = TOP_N) -> list[LayerRouting]:
    """Per-layer statistics from an eval record's {domain: {layer: [count per expert]}}, sorted by layer.

    A domain that has no entry for a layer counts as zero assignments there.
    """
    layers = sorted({int(k) for per in domain_expert_counts.values() for k in per})
    out = []
    for layer in layers:
        per_dom = {d: per.get(str(layer)) for d, per in domain_expert_counts.items()}
        width = max(len(v) for v in per_dom.values() if v is not None)
        filled = {d: v if v is not None else [0.0] * width for d, v in per_dom.items()}
        out.append(analyse_layer(layer, filled, top))
    return out


# --------------------------------------------------------------------------------------------------
# Headline numbers


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _active_params(config: dict[str, Any]) -> int | None:
    """Active parameters per token of the run's model (widemoe.cost), None if the config cannot be rebuilt."""
    try:
        from widemoe.config import ModelConfig
        from widemoe.cost import count_params

        return count_params(ModelConfig.from_dict(config)).active_with_embedding
    except Exception:  # a report of an old or foreign run must not fail over a headline number
        return None


@dataclass
class RunSummary:
    """The numbers of the summary table and of `summary_text`."""

    run_dir: Path
    params: int | None
    active_params: int | None
    config: dict[str, Any]
    steps: int
    tokens: int
    tokens_per_s: float | None  # median over steps, the first (warm-up) step left out
    mfu: float | None  # median, same steps
    peak_flops: float | None  # the matmul FLOP/s MFU is measured against (measured once, at start-up)
    final_train_loss: float | None  # LM loss of the last step's batch (the total adds MTP and aux losses)
    eval_step: int
    heldout_loss: dict[str, float]
    unigram_loss: dict[str, float]
    heldout_max_vio: dict[str, float]
    heldout_max_vio_mean: float
    dead_experts: int
    layers: list[LayerRouting]
    stopped: str | None


def summarise(run: RunData) -> RunSummary:
    ev = run.last_eval
    dec = ev.get("domain_expert_counts")
    if not dec:
        path = run.run_dir / "metrics.jsonl"
        raise ReportError(f"the last eval record (step {ev.get('step')}) of {path} has "
                          f"no domain_expert_counts; the model has no MoE layer or the trainer is too old")
    layers = analyse_routing(dec)
    steady = run.train[1:] if len(run.train) > 1 else run.train
    config = (run.start or {}).get("config", {})
    mv = ev.get("heldout_max_vio") or {str(lr.layer): lr.max_vio for lr in layers}
    last_train = run.train[-1] if run.train else {}
    return RunSummary(
        run_dir=run.run_dir,
        params=(run.start or {}).get("params"),
        active_params=_active_params(config) if config else None,
        config=config,
        steps=int(last_train.get("step", ev.get("step", 0))),
        tokens=int(last_train.get("tokens", ev.get("tokens", 0))),
        tokens_per_s=_median([r["tokens_per_s"] for r in steady if "tokens_per_s" in r]),
        mfu=_median([r["mfu"] for r in steady if "mfu" in r]),
        peak_flops=(run.start or {}).get("peak_flops"),
        final_train_loss=last_train.get("lm_loss", last_train.get("loss")),
        eval_step=int(ev.get("step", 0)),
        heldout_loss=dict(ev.get("heldout_loss", {})),
        unigram_loss=dict(run.summary.get("unigram_loss", {}) or {}),
        heldout_max_vio={str(k): float(v) for k, v in mv.items()},
        heldout_max_vio_mean=float(ev.get("heldout_max_vio_mean", sum(mv.values()) / max(1, len(mv)))),
        dead_experts=sum(lr.dead_experts for lr in layers),
        layers=layers,
        # A stop that a later --resume continued past is history, not the run's state.
        stopped=(run.stopped[-1].get("reason") if run.stopped and run.stopped[-1].get("step", 0)
                 >= int(last_train.get("step", 0)) else None),
    )
