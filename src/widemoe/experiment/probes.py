"""Evaluation-only probes of a trained MoE (`widemoe experiment probe MODEL`): no training, one checkpoint.

Two questions DeepSeekMoE (arXiv:2401.06066) asks of a model, answered with the held-out loss per domain:

- **Shared-expert knockout** (`knockout_shared`): every MoE block drops its shared expert's output and
  routes one more routed expert instead (top-(k+1)), so the active width stays about the same. A large
  loss increase says the routed experts cannot stand in for the shared one (DeepSeekMoE §4.5, analysis
  of expert specialisation: 1.808 -> 2.414 Pile loss at 2B).
- **Top-expert masking** (`mask_top_experts`): for ratio r, each token's m = round(r·E) best experts (by
  the selection score the router ranks: scores + correction bias) are excluded and the router picks its
  top-k among the rest; `Router.forward` then gathers and renormalises the combine weights from those ids
  as usual. DeepSeekMoE's redundancy test (same section): the less redundant the experts, the more the
  loss rises when the best ones are taken away.

Both are context managers that patch the live model (the gate's `select` on each instance, `top_k`, the
shared expert) and restore every attribute on exit, also on an exception. `run_probes` loads a training
run's newest checkpoint or a Hugging Face model directory with its tokenizer.json, evaluates the baseline,
the knockout and each ratio on the same held-out batches of the corpus (`widemoe.train.eval.
evaluate_heldout`), writes probes.json and returns a table.

Masking ignores group-limited routing: the remaining experts compete in a plain top-k (the seed-claims
suite routes without groups, n_group = 1; the table says so when the model has groups). DeepSeek-V4's
hash-routed layers choose experts by token id, not by score: masking leaves them as they are, and the
knockout adds the best-scoring expert outside the hashed ones.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from widemoe import data as wdata
from widemoe.hf.resolve import SpecError, load_model, resolve_model
from widemoe.model.causal_lm import WideMoeForCausalLM
from widemoe.train.eval import evaluate_heldout

BATCH_SIZE = 8
MAX_SEQ_LEN = 256
Log = Callable[[str], None]


class ProbeNotApplicable(ValueError):
    """The model lacks what a probe changes (no shared expert): `run_probes` reports it and goes on."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_ratios(text: str) -> list[float]:
    """'0.05,0.1,0.2' -> [0.05, 0.1, 0.2]; each a number in (0, 1), no repeats (ValueError naming it)."""
    out: list[float] = []
    for item in text.split(","):
        try:
            r = float(item)
        except ValueError:
            raise ValueError(f"--ratios: {item.strip()!r} is not a number (e.g. 0.05,0.1,0.2)") from None
        if not 0 < r < 1 or not math.isfinite(r):
            raise ValueError(f"--ratios: {item.strip()} must be a fraction strictly between 0 and 1")
        if r in out:
            raise ValueError(f"--ratios: {item.strip()} is given twice")
        out.append(r)
    return out


def masked_count(ratio: float, n_experts: int, top_k: int) -> int:
    """m = round(ratio · E), halves rounded up; ValueError unless 1 <= m and k experts remain."""
    m = math.floor(ratio * n_experts + 0.5)
    if m < 1:
        raise ValueError(f"ratio {ratio} masks round({ratio} x E={n_experts}) = {m} experts per token: "
                         f"needs at least 1 (use a ratio >= {0.5 / n_experts:.3g})")
    if n_experts - m < top_k:
        raise ValueError(f"ratio {ratio} masks {m} of E={n_experts} experts per token, leaving "
                         f"{n_experts - m} < top_k={top_k} to choose from "
                         f"(use a ratio <= {(n_experts - top_k) / n_experts:.3g})")
    return m


# --- patching the routers --------------------------------------------------------------------------


def _selection(gate: nn.Module, scores_NE: torch.Tensor) -> torch.Tensor:
    """What `Router.select` ranks: the scores plus the correction bias when the gate has one."""
    bias = getattr(gate, "e_score_correction_bias", None)
    return scores_NE if bias is None else scores_NE + bias


@contextmanager
def _patched(obj: nn.Module, **values: Any) -> Iterator[None]:
    """Set attributes (instance attributes, submodules) and restore them exactly on exit: an attribute
    that lived only on the class (e.g. the `select` method) is deleted again rather than pinned."""
    saved = {k: (k in obj.__dict__ or k in obj._modules, getattr(obj, k)) for k in values}
    try:
        for k, v in values.items():
            setattr(obj, k, v)
        yield
    finally:
        for k, (own, old) in saved.items():
            if own:
                setattr(obj, k, old)
            else:
                delattr(obj, k)


def _hash_routed(gate: nn.Module) -> bool:
    return bool(getattr(gate, "hash_layer", False))


@contextmanager
def knockout_shared(model: WideMoeForCausalLM, name: str = "the model") -> Iterator[None]:
    """Inside: every MoE block with a shared expert drops its output and routes top_k + 1 experts.
    ValueError (naming `name`) when no block has a shared expert."""
    blocks = [b for b in model.moe_blocks() if b.shared_experts is not None]
    if not blocks:
        raise ProbeNotApplicable(f"{name} has no shared expert (n_shared_experts = "
                         f"{model.config.n_shared_experts}): the shared-expert knockout does not apply")
    for b in blocks:
        if b.top_k + 1 > b.num_experts:
            raise ProbeNotApplicable(f"{name}: layer {b.layer_idx} already routes all E={b.num_experts} "
                                     f"experts (top_k={b.top_k}); the knockout cannot route one more")
    with ExitStack() as stack:
        for b in blocks:
            stack.enter_context(_patched(b, shared_experts=None, top_k=b.top_k + 1))
            stack.enter_context(_patched(b.gate, top_k=b.gate.top_k + 1, select=_plus_one(b.gate)))
        yield


def _plus_one(gate: nn.Module) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """The gate's own rule at top_k + 1 (group limits included); a hash-routed layer, whose rule returns
    its fixed k experts, gets the best-scoring expert outside them as the extra one."""
    select = gate.select  # the rule in force before the patch; it reads the patched top_k

    def wrapped(scores_NE: torch.Tensor, token_ids_N: torch.Tensor | None) -> torch.Tensor:
        ids_NK = select(scores_NE, token_ids_N)
        missing = gate.top_k - ids_NK.shape[1]
        if missing > 0:
            sel_NE = _selection(gate, scores_NE).scatter(1, ids_NK, float("-inf"))
            ids_NK = torch.cat([ids_NK, sel_NE.topk(missing, dim=-1).indices], dim=1)
        return ids_NK

    return wrapped


@contextmanager
def mask_top_experts(model: WideMoeForCausalLM, ratio: float) -> Iterator[int]:
    """Inside: each token's m = round(ratio · E) best experts (scores + bias) are excluded in every
    score-routed MoE block and the top-k of the rest are chosen. Yields m."""
    blocks = [b for b in model.moe_blocks() if not _hash_routed(b.gate)]
    if not blocks:
        raise ValueError("the model has no score-routed MoE block to mask")
    ms = {masked_count(ratio, b.gate.num_experts, b.gate.top_k) for b in blocks}
    with ExitStack() as stack:
        for b in blocks:
            m = masked_count(ratio, b.gate.num_experts, b.gate.top_k)
            stack.enter_context(_patched(b.gate, select=_masked(b.gate, m)))
        yield max(ms)


def _masked(gate: nn.Module, m: int) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    def wrapped(scores_NE: torch.Tensor, token_ids_N: torch.Tensor | None) -> torch.Tensor:
        del token_ids_N  # score-routed layers only
        sel_NE = _selection(gate, scores_NE)
        # -inf, not 0: selection scores (with the bias) can be negative
        sel_NE = sel_NE.scatter(1, sel_NE.topk(m, dim=-1).indices, float("-inf"))
        return sel_NE.topk(gate.top_k, dim=-1, sorted=False).indices

    return wrapped


# --- running the probes ----------------------------------------------------------------------------


def _losses(result: dict[str, Any]) -> dict[str, Any]:
    by_domain = dict(result["heldout_loss"])
    return {"mean": sum(by_domain.values()) / len(by_domain), "by_domain": by_domain}


def _increase(probe: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    return {"mean": probe["mean"] - base["mean"],
            "by_domain": {d: v - base["by_domain"][d] for d, v in probe["by_domain"].items()}}


def _load(spec: str) -> tuple[WideMoeForCausalLM, wdata.Tokenizer, Path, Path]:
    """Model, its corpus tokenizer, the checkpoint directory and where probes.json goes."""
    resolved = resolve_model(spec)
    if resolved.weights is None:
        raise SpecError(f"{spec}: the probes need trained weights (a training run directory or a model "
                        "directory), not a preset or config file")
    if resolved.tokenizer is None:
        raise SpecError(f"{resolved.weights}: no tokenizer.json; the probes evaluate the corpus's held-out "
                        "split with the model's own tokenizer")
    model, _ = load_model(resolved)
    tok = wdata.Tokenizer.load(resolved.tokenizer)
    if tok.vocab_size > model.config.vocab_size:
        raise SpecError(f"{resolved.tokenizer}: tokenizer has {tok.vocab_size} tokens, more than the model's "
                        f"vocab_size {model.config.vocab_size}")
    if not model.moe_blocks():
        raise SpecError(f"{spec} has no MoE layer: nothing to probe")
    weights = Path(resolved.weights)
    run = resolved.kind == "run"
    out = Path(spec) / "probes.json" if run else weights.parent / f"{weights.name}.probes.json"
    return model, tok, weights, out


def run_probes(
    spec: str | Path, ratios: list[float], batches: int | None = None, *,
    corpus: wdata.Corpus | None = None, cache_dir: str | Path | None = None, log: Log = _stderr,
) -> str:
    """Baseline, shared-expert knockout and top-r% masking on the held-out batches of `corpus` (default:
    the demo corpus): writes probes.json (RUN/probes.json, or MODEL_DIR.probes.json beside a model
    directory) and returns the table. A model without a shared expert reports the knockout as not
    applicable."""
    spec = str(spec)
    model, tok, weights, out_path = _load(spec)
    c = model.config
    for r in ratios:  # fail before the first (slow) evaluation
        masked_count(r, c.n_routed_experts, c.num_experts_per_tok)
    seq_len = min(MAX_SEQ_LEN, c.max_position_embeddings)
    tokens = wdata.tokenize_corpus(corpus if corpus is not None else wdata.build_corpus(), tok,
                                   cache_dir=cache_dir)
    heldout = wdata.heldout_batches(tokens, BATCH_SIZE, seq_len, max_batches=batches)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)

    def evaluate(label: str, patch: AbstractContextManager[Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        with patch:
            res = _losses(evaluate_heldout(model, heldout, bf16=False, device=device))
        log(f"probe {label}: mean held-out loss {res['mean']:.4f} ({time.perf_counter() - t0:.1f} s)")
        return res

    base = evaluate("baseline", nullcontext())
    try:
        ko: dict[str, Any] = evaluate("shared-expert knockout", knockout_shared(model, spec))
        ko["increase"] = _increase(ko, base)
    except ProbeNotApplicable as e:
        ko = {"not_applicable": str(e)}
        log(f"probe shared-expert knockout: not applicable ({e})")
    masks = []
    for r in ratios:
        m = masked_count(r, c.n_routed_experts, c.num_experts_per_tok)
        res = evaluate(f"mask top {r:g} ({m} of {c.n_routed_experts} experts)", mask_top_experts(model, r))
        masks.append({"ratio": r, "masked_experts": m, **res, "increase": _increase(res, base)})
    notes = _notes(model)
    record = {
        "model": spec, "checkpoint": str(weights), "n_routed_experts": c.n_routed_experts,
        "top_k": c.num_experts_per_tok, "n_shared_experts": c.n_shared_experts, "seq_len": seq_len,
        "batch_size": BATCH_SIZE, "batches_per_domain": {d: len(b) for d, b in heldout.items()},
        "baseline": base, "knockout": ko, "masking": masks, "notes": notes,
    }
    out_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return _table(record, out_path)


def _notes(model: WideMoeForCausalLM) -> list[str]:
    c, notes = model.config, []
    if c.n_group > 1 and c.topk_method != "greedy":
        notes.append(f"the model routes within groups ({c.topk_group} of {c.n_group}); masking chooses a "
                     "plain top-k over the remaining experts, without the group limit")
    hashed = [b.layer_idx for b in model.moe_blocks() if _hash_routed(b.gate)]
    if hashed:
        notes.append(f"hash-routed layers {hashed} choose by token id: masking leaves them unchanged")
    return notes


def _table(rec: dict[str, Any], out_path: Path) -> str:
    domains = list(rec["baseline"]["by_domain"])
    n = rec["batches_per_domain"]
    lines = [
        f"probes of {rec['model']} (checkpoint {rec['checkpoint']}): E={rec['n_routed_experts']}, "
        f"k={rec['top_k']}, shared={rec['n_shared_experts']}",
        f"held-out: {', '.join(f'{d} {n[d]}' for d in domains)} batches of {rec['batch_size']} x "
        f"{rec['seq_len']} tokens; loss in nats/token, (+increase over the baseline)",
        "",
    ]
    header = (f"{'probe':<34} {'mean':<18}" + "".join(f" {d:<18}" for d in domains)).rstrip()
    lines += [header, "-" * len(header)]

    def row(label: str, res: dict[str, Any]) -> str:
        inc = res.get("increase")

        def cell(v: float, d: float | None) -> str:
            return f"{v:.4f}" + (f" ({d:+.4f})" if d is not None else "")

        text = f"{label:<34} {cell(res['mean'], inc and inc['mean']):<18}"
        by = res["by_domain"]
        return (text + "".join(f" {cell(by[d], inc and inc['by_domain'][d]):<18}" for d in domains)).rstrip()

    lines.append(row("baseline", rec["baseline"]))
    ko = rec["knockout"]
    if "not_applicable" in ko:
        lines.append(f"{'shared-expert knockout':<34} not applicable: {ko['not_applicable']}")
    else:
        lines.append(row("shared-expert knockout (k+1)", ko))
    for m in rec["masking"]:
        lines.append(row(f"mask top {m['ratio']:g} ({m['masked_experts']} of {rec['n_routed_experts']})", m))
    lines += [f"note: {t}" for t in rec["notes"]]
    lines.append(f"wrote {out_path}")
    return "\n".join(lines)


__all__ = ["ProbeNotApplicable", "knockout_shared", "mask_top_experts", "masked_count", "parse_ratios",
           "run_probes"]
