"""The evaluation-only probes (`widemoe.experiment.probes`): the shared-expert knockout routes k+1 experts
without the shared one and restores the model exactly; masking never picks a token's top-m experts, picks
exactly k and restores; bad ratios are precise errors; `run_probes` on a tiny saved run evaluates the same
batches as `evaluate_heldout` and writes probes.json. Micro models (E=8, k=2, one shared expert)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

import widemoe.data as wdata
from widemoe.experiment.probes import (
    ProbeNotApplicable,
    knockout_shared,
    mask_top_experts,
    masked_count,
    parse_ratios,
    run_probes,
)
from widemoe.hf import load_pretrained, save_pretrained
from widemoe.hf.resolve import MARKER
from widemoe.model.causal_lm import build_model
from widemoe.presets import get_preset
from widemoe.train.eval import evaluate_heldout

MICRO = dataclasses.replace(get_preset("micro"), vocab_size=512)  # E=8, k=2, 1 shared, 4 groups (2 kept)


@pytest.fixture(scope="module")
def model():
    return build_model(MICRO, seed=0).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, MICRO.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))


def forward(model, ids):
    with torch.no_grad():
        return model(ids, return_logits=True)


def test_knockout_drops_the_shared_expert_routes_k_plus_one_and_restores(model, ids) -> None:
    k = MICRO.num_experts_per_tok
    before = forward(model, ids)
    shared = [b.shared_experts for b in model.moe_blocks()]
    with knockout_shared(model):
        assert all(b.shared_experts is None for b in model.moe_blocks())
        inside = forward(model, ids)
    assert all(info.topk_ids.shape[1] == k + 1 for info in inside.routing)
    assert all(len(set(row.tolist())) == k + 1 for info in inside.routing for row in info.topk_ids)
    assert not torch.allclose(inside.logits, before.logits)
    after = forward(model, ids)
    assert [b.shared_experts for b in model.moe_blocks()] == shared
    blocks = model.moe_blocks()
    assert all(b.top_k == k and b.gate.top_k == k and "select" not in vars(b.gate) for b in blocks)
    assert torch.equal(after.logits, before.logits)


def test_knockout_without_shared_expert_names_the_model() -> None:
    plain = build_model(dataclasses.replace(MICRO, n_shared_experts=0), seed=0)
    with pytest.raises(ProbeNotApplicable, match=r"RUN-X has no shared expert \(n_shared_experts = 0\)"):
        with knockout_shared(plain, "RUN-X"):
            pass


def test_knockout_restores_on_an_exception(model, ids) -> None:
    before = forward(model, ids)
    with pytest.raises(RuntimeError, match="boom"):
        with knockout_shared(model):
            raise RuntimeError("boom")
    assert torch.equal(forward(model, ids).logits, before.logits)


@pytest.mark.parametrize("ratio, m", [(0.25, 2), (0.5, 4), (0.75, 6)])
def test_masking_never_selects_a_tokens_top_m_experts(model, ratio: float, m: int) -> None:
    k = MICRO.num_experts_per_tok
    gen = torch.Generator().manual_seed(1)
    x_ND = torch.randn(64, MICRO.hidden_size, generator=gen)
    for block in model.moe_blocks():
        gate = block.gate
        gate.e_score_correction_bias.copy_(torch.randn(MICRO.n_routed_experts, generator=gen) * 0.1)
        plain = gate(x_ND)
        sel_NE = plain.scores + gate.e_score_correction_bias  # what Router.select ranks
        with mask_top_experts(model, ratio) as masked:
            r = gate(x_ND)
        assert masked == m
        assert r.topk_ids.shape == (64, k)
        top_m = sel_NE.topk(m, dim=-1).indices
        assert not (r.topk_ids.unsqueeze(-1) == top_m.unsqueeze(1)).any()
        # exactly the best k of the rest, in plain top-k order (the group limit is not applied)
        expected = sel_NE.sort(dim=-1, descending=True).indices[:, m:m + k]
        assert torch.equal(r.topk_ids.sort(dim=-1).values, expected.sort(dim=-1).values)
        # weights are Router.forward's usual gather + renormalisation over the chosen ids
        w = r.scores.gather(1, r.topk_ids)
        assert torch.allclose(r.topk_weights, w / w.sum(-1, keepdim=True) * gate.routed_scaling_factor)
        assert "select" not in vars(gate)
        assert torch.equal(gate(x_ND).topk_ids, plain.topk_ids)
        gate.e_score_correction_bias.zero_()


def test_ratio_masking_too_many_or_no_experts_is_a_precise_error(model) -> None:
    with pytest.raises(ValueError, match=r"ratio 0\.9 masks 7 of E=8 experts per token, leaving 1 < top_k=2"):
        with mask_top_experts(model, 0.9):
            pass
    with pytest.raises(ValueError, match=r"ratio 0\.05 masks round\(0\.05 x E=8\) = 0 experts"):
        masked_count(0.05, 8, 2)
    assert all("select" not in vars(b.gate) for b in model.moe_blocks())


@pytest.mark.parametrize("text, message", [
    ("0.1,x", r"'x' is not a number"), ("0.1,1.5", r"1\.5 must be a fraction strictly between 0 and 1"),
    ("0", r"0 must be a fraction"), ("0.1,0.1", r"0\.1 is given twice"), ("nan", r"nan must be a fraction"),
])
def test_parse_ratios_names_the_bad_value(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_ratios(text)


def test_parse_ratios_reads_a_list() -> None:
    assert parse_ratios("0.05, 0.1,0.2") == [0.05, 0.1, 0.2]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, corpus, cache_dir) -> Path:
    """RUN/checkpoints/step-00000003/ with a seed-2 micro model and a 512-token BPE of the test corpus."""
    run = tmp_path_factory.mktemp("run")
    tok = wdata.train_tokenizer(corpus, vocab_size=512, cache_dir=cache_dir)
    ckpt = run / "checkpoints" / "step-00000003"
    save_pretrained(build_model(MICRO, seed=2), ckpt, tokenizer=tok.backend)
    (ckpt / MARKER).write_text("3\n")
    return run


def test_run_probes_table_json_and_baseline_equal_evaluate_heldout(run: Path, corpus, cache_dir) -> None:
    lines: list[str] = []
    text = run_probes(run, [0.25, 0.5], batches=1, corpus=corpus, cache_dir=cache_dir, log=lines.append)
    rec = json.loads((run / "probes.json").read_text())
    assert f"wrote {run / 'probes.json'}" in text
    rows = ("baseline", "shared-expert knockout (k+1)", "mask top 0.25 (2 of 8)", "mask top 0.5 (4 of 8)")
    assert all(row in text for row in rows)
    assert len(lines) == 4 and all(line.startswith("probe ") for line in lines)
    assert "without the group limit" in text  # micro routes within groups: the note says masking does not

    ckpt = run / "checkpoints" / "step-00000003"
    tokens = wdata.tokenize_corpus(corpus, wdata.Tokenizer.load(ckpt), cache_dir=cache_dir)
    seq_len = min(256, MICRO.max_position_embeddings)
    heldout = wdata.heldout_batches(tokens, 8, seq_len, max_batches=1)
    direct = evaluate_heldout(load_pretrained(ckpt), heldout, bf16=False, device=torch.device("cpu"))
    assert rec["baseline"]["by_domain"] == pytest.approx(direct["heldout_loss"], abs=1e-6)
    assert rec["seq_len"] == seq_len and rec["batches_per_domain"] == {d: 1 for d in heldout}

    probes = [rec["knockout"], *rec["masking"]]
    assert [m["masked_experts"] for m in rec["masking"]] == [2, 4]
    for p in probes:
        inc = p["increase"]
        values = [p["mean"], inc["mean"], *p["by_domain"].values(), *inc["by_domain"].values()]
        assert all(math.isfinite(v) for v in values)
        assert p["increase"]["mean"] == pytest.approx(p["mean"] - rec["baseline"]["mean"])
        assert p["mean"] != rec["baseline"]["mean"]  # the probe changed the routing


def test_run_probes_reports_the_knockout_as_not_applicable(tmp_path: Path, corpus, cache_dir) -> None:
    tok = wdata.train_tokenizer(corpus, vocab_size=512, cache_dir=cache_dir)
    model_dir = tmp_path / "plain"
    save_pretrained(build_model(dataclasses.replace(MICRO, n_shared_experts=0), seed=0), model_dir,
                    tokenizer=tok.backend)
    text = run_probes(model_dir, [0.5], batches=1, corpus=corpus, cache_dir=cache_dir, log=lambda s: None)
    rec = json.loads((tmp_path / "plain.probes.json").read_text())
    assert "has no shared expert" in rec["knockout"]["not_applicable"]
    assert "not applicable" in text and "mask top 0.5 (4 of 8)" in text
