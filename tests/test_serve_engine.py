"""The serving engine without HTTP: continuous batching gives each sequence what it would get alone.

Parity is against `widemoe.generate` on each prompt alone (itself checked against full forwards in
tests/test_generate.py), for an MLA family, a GQA family and DeepSeek-V4 (batched per sequence).
"""

from __future__ import annotations

import threading

import pytest
import torch

from serve_helpers import Collector, new_engine, run, tiny_model, wait_until
from widemoe.generate import generate
from widemoe.serve.engine import EngineClosed, QueueFull, SeqParams

torch.set_num_threads(2)

PROMPT_LENGTHS = [3, 40, 7, 19, 12, 33, 5, 26]  # 3-40 tokens, in no order, so rows join at many lengths


def prompts(n: int = 8, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 256, (PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)],), generator=g).tolist()
            for i in range(n)]


@pytest.fixture(scope="module", params=["deepseek_v3", "qwen3_moe", "deepseek_v4"])
def family(request):
    model = tiny_model(request.param)
    engine = new_engine(model, max_num_seqs=8)
    yield request.param, model, engine
    engine.shutdown()


def test_concurrent_greedy_requests_equal_generate_alone(family):
    _, model, engine = family
    ps = prompts()
    # 8 separate requests, submitted together: they are admitted together and decode in one batch
    sinks = [Collector(1) for _ in ps]
    for p, sink in zip(ps, sinks):
        engine.submit([SeqParams(p, max_tokens=12, temperature=0, ignore_eos=True)], sink)
    got = [s.wait().tokens(0) for s in sinks]
    alone = [generate(model, [p], max_new_tokens=12)[0] for p in ps]
    assert got == alone
    assert engine.stats().max_batch >= 2


def test_requests_joining_a_running_batch_equal_generate_alone(family):
    """Sequences admitted while others are mid-decode (different cache lengths) stay exact."""
    _, model, engine = family
    ps = prompts(6, seed=3)
    first = Collector(1)
    engine.submit([SeqParams(ps[0], max_tokens=40, temperature=0, ignore_eos=True)], first)
    wait_until(lambda: first.outputs[0] and len(first.outputs[0]) >= 3, what="first sequence decoding")
    rest = run(engine, [SeqParams(p, max_tokens=10, temperature=0, ignore_eos=True) for p in ps[1:]])
    first.wait()
    assert first.tokens(0) == generate(model, [ps[0]], max_new_tokens=40)[0]
    for i, p in enumerate(ps[1:]):
        assert rest.tokens(i) == generate(model, [p], max_new_tokens=10)[0]


def test_echo_prompt_logprobs_equal_a_full_forward(family):
    _, model, engine = family
    p = prompts(1, seed=5)[0]
    out = run(engine, [SeqParams(p, max_tokens=1, temperature=0, logprobs=5, prompt_logprobs=True)])
    first = out.outputs[0][0]  # max_tokens=1: the only output, prompt entries then the new token's
    entries = first.prompt_logprobs + first.logprobs
    assert len(entries) == len(p) + 1 and entries[0] is None
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([p])).logits[0].float(), -1)
    for t in range(1, len(p) + 1):
        e = entries[t]
        target = p[t] if t < len(p) else out.tokens(0)[0]
        assert e.token_id == target
        assert abs(e.logprob - float(ref[t - 1, target])) < 1e-4
        assert [i for i, _ in e.top] == ref[t - 1].topk(5).indices.tolist()
        assert max(abs(lp - float(ref[t - 1, i])) for i, lp in e.top) < 1e-4


def test_echo_with_zero_max_tokens_scores_the_prompt_only(family):
    _, _, engine = family
    p = prompts(1, seed=6)[0]
    out = run(engine, [SeqParams(p, max_tokens=0, temperature=0, logprobs=0, prompt_logprobs=True)])
    final = out.final(0)
    assert final.finish_reason == "length" and final.completion_tokens == 0 and out.tokens(0) == []
    assert len(final.prompt_logprobs) == len(p)


def test_same_seed_same_text_alone_and_under_load(family):
    _, _, engine = family
    ps = prompts(8, seed=7)
    sampled = SeqParams(ps[0], max_tokens=16, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True)
    alone = run(engine, [sampled]).tokens(0)
    others = [SeqParams(p, max_tokens=16, temperature=0.8, seed=i, ignore_eos=True) for i, p in enumerate(ps)]
    loaded = run(engine, others[:4] + [sampled] + others[4:])
    assert loaded.tokens(4) == alone
    assert run(engine, [SeqParams(ps[0], max_tokens=16, temperature=1.0, top_p=0.9, seed=43,
                                  ignore_eos=True)]).tokens(0) != alone


def test_stop_string_is_cut_and_finishes_with_stop(family):
    _, _, engine = family
    p = prompts(1, seed=8)[0]
    free = run(engine, [SeqParams(p, max_tokens=12, temperature=0, ignore_eos=True)])
    text = free.text(0)
    stop = text[4:6]  # appears in the greedy text; the first occurrence may be earlier
    assert stop and free.final(0).finish_reason == "length"
    cut = run(engine, [SeqParams(p, max_tokens=12, temperature=0, ignore_eos=True, stop=(stop,))])
    assert cut.final(0).finish_reason == "stop"
    assert cut.text(0) == text[: text.index(stop)]
    assert cut.final(0).completion_tokens < 12


def test_eos_ends_with_stop_and_its_text_is_not_emitted(family):
    _, model, engine = family
    p = prompts(1, seed=9)[0]
    greedy = generate(model, [p], max_new_tokens=6)[0]
    eos = greedy[3]
    with_eos = new_engine(model, eos_ids=[eos], max_num_seqs=2)
    try:
        out = run(with_eos, [SeqParams(p, max_tokens=6, temperature=0)])
    finally:
        with_eos.shutdown()
    upto = greedy[: greedy.index(eos) + 1]
    assert out.tokens(0) == upto and out.final(0).finish_reason == "stop"
    assert out.final(0).completion_tokens == len(upto)
    assert out.text(0) == engine.tokenizer.decode(upto[:-1])


class Scripted(torch.nn.Module):
    """A real model (caches, masks and all) whose next token is forced to follow a byte script."""

    def __init__(self, inner: torch.nn.Module, prompt_len: int, script: bytes) -> None:
        super().__init__()
        self.inner, self.config, self.prompt_len, self.script = inner, inner.config, prompt_len, script

    def new_cache(self):
        return self.inner.new_cache()

    def forward(self, ids, attention_mask=None, cache=None, logits_to_keep=0):
        out = self.inner(ids, attention_mask=attention_mask, cache=cache, logits_to_keep=logits_to_keep)
        B, T = ids.shape
        seen = attention_mask.sum(-1) if attention_mask is not None else torch.full((B,), cache.seq_len)
        forced = torch.full_like(out.logits, -30.0)
        for b, n in enumerate(seen.tolist()):
            forced[b, -1, self.script[(n - self.prompt_len) % len(self.script)]] = 30.0
        out.logits = forced
        return out


def test_multibyte_characters_arrive_whole():
    text = "é€😀"  # 2, 3 and 4 UTF-8 bytes: each takes several byte tokens
    p = list(b"caf")
    engine = new_engine(Scripted(tiny_model("qwen3_moe"), len(p), text.encode()), max_num_seqs=2)
    try:
        out = run(engine, [SeqParams(p, max_tokens=27, temperature=0, ignore_eos=True)])
    finally:
        engine.shutdown()
    pieces = [o.text for o in out.outputs[0] if o.text]
    assert "".join(pieces) == text * 3
    assert all("\ufffd" not in piece for piece in pieces)
    assert len(pieces) == 9  # one piece per character, sent when its last byte arrives


def test_queue_bound_and_cancel():
    model = tiny_model("qwen3_moe")
    engine = new_engine(model, max_num_seqs=1, max_queue=2)
    try:
        long = Collector(1)
        handle = engine.submit([SeqParams([5, 6, 7], max_tokens=120, temperature=0, ignore_eos=True)], long)
        wait_until(lambda: engine.stats().active == 1, what="the long sequence running")
        waiting = Collector(2)
        engine.submit([SeqParams([8, 9], max_tokens=2, temperature=0)] * 2, waiting)
        with pytest.raises(QueueFull):
            engine.submit([SeqParams([8, 9], max_tokens=2, temperature=0)], Collector(1))
        handle.cancel()
        long.wait(10)
        assert long.final(0).finish_reason == "abort" and long.final(0).completion_tokens < 120
        waiting.wait(10)
        assert [waiting.final(i).finish_reason for i in range(2)] == ["length", "length"]
        wait_until(lambda: engine.stats().active == 0 and engine.stats().waiting == 0, what="engine idle")
    finally:
        engine.shutdown()
    with pytest.raises(EngineClosed):
        engine.submit([SeqParams([1, 2], max_tokens=1)], Collector(1))


def test_a_failing_step_ends_its_sequences_with_error_and_the_engine_goes_on():
    model = tiny_model("qwen3_moe")
    engine = new_engine(model, max_num_seqs=4)
    try:
        bad = run(engine, [SeqParams([5, 300], max_tokens=3, temperature=0)])  # id outside the vocabulary
        assert bad.final(0).finish_reason == "error" and bad.final(0).error
        good = run(engine, [SeqParams([5, 6], max_tokens=3, temperature=0, ignore_eos=True)])
        assert good.tokens(0) == generate(model, [[5, 6]], max_new_tokens=3)[0]
    finally:
        engine.shutdown()


def test_sink_runs_on_the_engine_thread():
    model = tiny_model("qwen3_moe")
    engine = new_engine(model)
    names = []
    try:
        sink = Collector(1)

        def record(i, out):
            names.append(threading.current_thread().name)
            sink(i, out)

        engine.submit([SeqParams([5, 6], max_tokens=2, temperature=0)], record)
        sink.wait()
        assert set(names) == {"widemoe-engine"}
    finally:
        engine.shutdown()
