"""`widemoe eval`: lm-eval's local-completions against `widemoe serve` on the shipped tasks.

A fake training run holds a tiny random DeepSeek-V3-style model with a small BPE tokenizer (its checkpoint
built from seed 1, its metrics.jsonl start record saying seed 0, so "the model at initialisation" is a
different model). lm-eval's logged loglikelihoods must equal a direct forward pass of the same weights in
this process (sum of log_softmax over the continuation tokens, split as lm-eval splits context and
continuation), for the checkpoint served by the test (--url) and for `--init` served by the command.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

import widemoe.data as wdata
from widemoe.cli import main
from widemoe.data.corpora import MATH_HELDOUT_MOD, Document, prose_documents
from widemoe.data.tokenizer import ModelTokenizer
from widemoe.evals.tasks import DATA_DIR, known_tasks
from widemoe.hf import load_pretrained, save_pretrained
from widemoe.hf.resolve import MARKER
from widemoe.model.causal_lm import build_model
from widemoe.presets import get_preset
from widemoe.report.evals import load_eval_scores, scores_text
from widemoe.serve.server import serve_in_thread

TASKS = ("widemoe_arithmetic", "widemoe_austen_cloze", "widemoe_austen_word_order", "widemoe_code_next_line")
CHOICE_TASKS = TASKS[1:]  # multiple choice: loglikelihood requests
LIMIT = 2
TOL = 1e-4


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RUN/checkpoints/step-00000001/ (seed-1 weights, a 512-token BPE) + RUN/metrics.jsonl (seed 0)."""
    run = tmp_path_factory.mktemp("run")
    texts = [DATA_DIR.joinpath(f"{t}.jsonl").read_text(encoding="utf-8")[:40_000] for t in TASKS]
    corpus = wdata.Corpus(tuple(Document(f"t{i}", "prose", "train", t) for i, t in enumerate(texts)))
    tok = wdata.train_tokenizer(corpus, vocab_size=512, use_cache=False)
    config = dataclasses.replace(get_preset("micro"), vocab_size=512, max_position_embeddings=512)
    ckpt = run / "checkpoints" / "step-00000001"
    save_pretrained(build_model(config, seed=1), ckpt, tokenizer=tok.backend)
    (ckpt / MARKER).write_text("1\n")
    start = {"kind": "start", "config": config.to_dict(), "train": {"seed": 0}}
    (run / "metrics.jsonl").write_text(json.dumps(start) + "\n")
    return run


def samples_of(out: Path, task: str) -> list[dict]:
    (path,) = out.glob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def encode_pair(tok: ModelTokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's TemplateLM._encode_pair: trailing spaces move to the continuation; the continuation is
    what the whole text adds to the context's tokens."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx) :]


@torch.no_grad()
def direct_loglikelihood(model: torch.nn.Module, tok: ModelTokenizer, context: str, cont: str) -> tuple:
    ctx, cont_ids = encode_pair(tok, context, cont)
    ids = torch.tensor([ctx + cont_ids])
    logp = torch.log_softmax(model(ids[:, :-1]).logits.float(), dim=-1)[0, len(ctx) - 1 :]
    target = torch.tensor(cont_ids)
    picked = logp.gather(-1, target[:, None])[:, 0]
    return picked.sum().item(), bool((logp.argmax(-1) == target).all())


def check_loglikelihoods(out: Path, ckpt_or_model: torch.nn.Module, tok: ModelTokenizer, tasks) -> int:
    """Every logged (loglikelihood, is_greedy) of the multiple-choice tasks against a direct forward."""
    checked = 0
    for task in tasks:
        for sample in samples_of(out, task):
            for i, resp in enumerate(sample["resps"]):
                args = sample["arguments"][f"gen_args_{i}"]
                want, greedy = direct_loglikelihood(ckpt_or_model, tok, args["arg_0"], args["arg_1"])
                got, got_greedy = float(resp[0][0]), resp[0][1] == "True"
                assert abs(got - want) < TOL, (task, args, got, want)
                assert got_greedy == greedy
                assert float(sample["filtered_resps"][i][0]) == got
                checked += 1
    return checked


def test_lm_eval_loglikelihoods_equal_a_direct_forward(run_dir: Path, capsys) -> None:
    ckpt = run_dir / "checkpoints" / "step-00000001"
    with serve_in_thread(str(ckpt), served_model_name="ckpt") as url:
        assert main(["eval", str(run_dir), "--url", url, "--limit", str(LIMIT), "--tasks", "all"]) == 0
    out = run_dir / "eval" / "step-00000001"
    (results_file,) = out.glob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    assert sorted(results) == sorted(TASKS) == sorted(known_tasks())
    assert all(results[t]["sample_len"] == LIMIT for t in TASKS)
    model = load_pretrained(ckpt, dtype=torch.float32).eval()
    tok = ModelTokenizer.for_model(ckpt, 512, 0)
    n = check_loglikelihoods(out, model, tok, CHOICE_TASKS)
    assert n == len(CHOICE_TASKS) * LIMIT * 4
    gens = samples_of(out, "widemoe_arithmetic")
    assert len(gens) == LIMIT and all(isinstance(s["resps"][0][0], str) for s in gens)
    printed = capsys.readouterr().out
    assert "widemoe_austen_cloze" in printed and "step-00000001" in printed


def test_init_is_the_runs_seed_served_in_process(run_dir: Path) -> None:
    task = "widemoe_austen_cloze"
    argv = ["eval", str(run_dir), "--init", "--tasks", task, "--limit", "1", "--num-concurrent", "2"]
    assert main(argv) == 0
    config = dataclasses.replace(get_preset("micro"), vocab_size=512, max_position_embeddings=512)
    init = build_model(config, seed=0).eval()
    tok = ModelTokenizer.for_model(run_dir / "checkpoints" / "step-00000001", 512, 0)
    assert check_loglikelihoods(run_dir / "eval" / "init", init, tok, (task,)) == 4
    scores = load_eval_scores(run_dir)
    assert list(scores)[0] == "init" and set(scores["init"]) == {task}
    assert re.search(r"widemoe_austen_cloze\s+acc\s+1\s", scores_text(scores))


def test_unknown_task_names_are_a_usage_error_listing_the_tasks(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["eval", "micro", "--tasks", "widemoe_austen_cloze,hellaswag"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "'hellaswag'" in err and all(t in err for t in known_tasks())


def test_task_data_come_from_the_held_out_split() -> None:
    """Austen contexts are held-out text and appear in no training chapter; arithmetic problems fall in
    the corpus's held-out bucket; each jsonl stays small."""
    unwrap = {s: " ".join(" ".join(d.text for d in prose_documents() if d.split == s).split())
              for s in ("train", "heldout")}
    docs = [json.loads(x) for t in ("widemoe_austen_cloze", "widemoe_austen_word_order")
            for x in (DATA_DIR / f"{t}.jsonl").read_text().splitlines()]
    for d in docs:
        true = d["context"] + d["choices"][d["label"]]
        assert true in unwrap["heldout"] and d["context"] not in unwrap["train"]
    import hashlib

    for line in (DATA_DIR / "widemoe_arithmetic.jsonl").read_text().splitlines():
        d = json.loads(line)
        text = f"Q: {d['question']}\nA: {d['answer']}".encode()
        assert int.from_bytes(hashlib.sha256(text).digest()[:8], "big") % MATH_HELDOUT_MOD == 0
    for path in DATA_DIR.glob("*.jsonl"):
        assert path.stat().st_size < 200_000 and len(path.read_text().splitlines()) == 120
