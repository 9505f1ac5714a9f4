"""Generation: batched prompts of different lengths, sampling controls, EOS, errors."""

import pytest
import torch

from widemoe.generate import GenerationConfig, filter_logits, generate
from widemoe.model.causal_lm import build_model
from widemoe.presets import get_preset

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("micro"), seed=0).eval()


def test_batched_prompts_equal_single_runs(model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [200, 100, 50, 25]]
    batched = generate(model, prompts, max_new_tokens=12)
    alone = [generate(model, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == alone
    assert all(len(o) == 12 for o in batched)


def test_greedy_equals_full_forward_argmax(model):
    prompt = [1, 2, 3, 4]
    out = generate(model, [prompt], max_new_tokens=6)[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert out == seq[len(prompt) :]


def test_seeded_sampling_is_reproducible_and_seed_dependent(model):
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.95)
    a = generate(model, [[1, 2, 3]], seed=7, **kw)
    b = generate(model, [[1, 2, 3]], seed=7, **kw)
    c = generate(model, [[1, 2, 3]], seed=8, **kw)
    assert a == b and a != c


def test_top_k_one_is_greedy(model):
    greedy = generate(model, [[9, 8, 7]], max_new_tokens=8)
    sampled = generate(model, [[9, 8, 7]], max_new_tokens=8, temperature=1.5, top_k=1, seed=3)
    assert greedy == sampled


def test_stops_at_eos(model):
    first = generate(model, [[4, 5, 6]], max_new_tokens=1)[0][0]
    out = generate(model, [[4, 5, 6], [7, 8]], max_new_tokens=10, eos_token_id=first)
    assert out[0] == [first]
    assert len(out[1]) == 10 or out[1][-1] == first


def test_filter_logits_top_p_keeps_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, None, 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, 3, 0.99))
    assert kept.tolist() == [[True, True, True, False]]


def test_bad_inputs_are_clear_errors(model):
    with pytest.raises(ValueError, match="outside \\[0, vocab_size=256\\)"):
        generate(model, [[1, 999]], max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p=1.5"):
        GenerationConfig(top_p=1.5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": float("nan")}, r"temperature=nan must be a finite number >= 0"),
        ({"temperature": float("inf")}, r"temperature=inf must be a finite number >= 0"),
        ({"temperature": -0.5}, r"temperature=-0.5 must be a finite number >= 0"),
        ({"temperature": "hot"}, r"temperature='hot' must be a finite number >= 0"),
        ({"top_p": float("nan")}, r"top_p=nan must be in \(0, 1\]"),
        ({"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p=1.5 must be in \(0, 1\]"),
        ({"top_k": -1}, r"top_k=-1 must be an integer >= 1"),
        ({"top_k": 0}, r"top_k=0 must be an integer >= 1"),
        ({"top_k": 2.5}, r"top_k=2.5 must be an integer >= 1"),
        ({"max_new_tokens": 0}, r"max_new_tokens=0 must be an integer >= 1"),
        ({"max_new_tokens": -3}, r"max_new_tokens=-3 must be an integer >= 1"),
        ({"max_new_tokens": 2.0}, r"max_new_tokens=2.0 must be an integer >= 1"),
        ({"max_new_tokens": True}, r"max_new_tokens=True must be an integer >= 1"),
        ({"seed": 1.5}, r"seed=1.5 must be an integer"),
        ({"seed": "3"}, r"seed='3' must be an integer"),
        ({"eos_token_id": -1}, r"eos_token_id=-1 must be an integer >= 0"),
    ],
)
def test_bad_sampling_parameters_name_the_parameter_value_and_rule(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerationConfig(**kwargs)


def test_stream_yields_each_step_as_it_is_produced(model):
    from widemoe.generate import stream

    prompts = [[5, 6, 7, 8], [3, 4]]
    steps = list(stream(model, prompts, GenerationConfig(max_new_tokens=5)))
    assert len(steps) == 5 and all(len(s) == 2 for s in steps)
    assert [[s[b] for s in steps] for b in range(2)] == generate(model, prompts, max_new_tokens=5)


def test_generation_stops_at_the_position_limit():
    from dataclasses import replace

    from widemoe.generate import position_budget

    small = build_model(replace(get_preset("micro"), max_position_embeddings=16), seed=0).eval()
    prompts = [list(range(1, 11)), [3, 4]]  # the longest prompt holds 10 of the 16 positions
    gen = GenerationConfig(max_new_tokens=10**9)  # would otherwise run "forever"
    assert position_budget(small, prompts, gen) == (6, True)
    assert position_budget(small, prompts, GenerationConfig(max_new_tokens=3)) == (3, False)
    out = generate(small, prompts, gen)
    assert [len(o) for o in out] == [6, 6]
    with pytest.raises(ValueError, match="prompt 0 has 17 tokens; the model has 16 positions"):
        generate(small, [list(range(17))], max_new_tokens=1)
