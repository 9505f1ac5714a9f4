"""The OpenAI protocol checks of `widemoe serve` (issue 13, Deliver items 2 and 4), without a server: each
bad request gives the status the `openai` client maps to its exception class, OpenAI's error body, and a
one-line message naming the parameter; good requests come back normalised with OpenAI's defaults."""

from __future__ import annotations

import json
import re

import pytest

from widemoe.serve.protocol import (
    MAX_BODY_BYTES,
    ApiError,
    ChatMessage,
    Sampling,
    parse_chat,
    parse_completion,
)

MODEL = "micro"
VOCAB = 100
CONTEXT = 64
LIMITS = {"model_name": MODEL, "vocab_size": VOCAB, "max_model_len": CONTEXT}


def count_words(text: str) -> int:
    """A stand-in tokenizer: one token per word."""
    return len(text.split())


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "hello there", **fields}


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}


# (id, body, status, param, message regex)
BAD_COMPLETIONS = [
    ("malformed_json", b'{"model": "micro", "prompt": ', 400, None, r"^body: not valid JSON"),
    ("not_utf8", b'\xff\xfe{"a"', 400, None, r"^body: not valid JSON"),
    ("not_an_object", b"[1, 2]", 400, None, r"^body: \[1, 2\] is not a JSON object"),
    ("nan_literal", b'{"model": "micro", "prompt": "a", "temperature": NaN}', 400, None, r"NaN"),
    ("too_large", b" " * (MAX_BODY_BYTES + 1), 413, None, r"^body: \d+ bytes is over the limit"),
    ("missing_prompt", {"model": MODEL}, 400, "prompt", r"^prompt: missing, required"),
    ("missing_model", {"prompt": "a"}, 400, "model", r"^model: missing, required"),
    ("unknown_model", completion(model="gpt-4"), 404, "model", r'^model: "gpt-4" does not exist'),
    ("prompt_wrong_type", completion(prompt=3), 400, "prompt", r"^prompt: 3 is not a string"),
    ("prompt_mixed", completion(prompt=["a", 3]), 400, "prompt", r"^prompt: \[\"a\", 3\] is not"),
    ("prompt_empty_list", completion(prompt=[]), 400, "prompt", r"^prompt: \[\] is empty"),
    ("prompt_empty_string", completion(prompt=""), 400, "prompt", r'^prompt: "" is empty'),
    ("prompt_empty_ids", completion(prompt=[[1], []]), 400, "prompt", r"^prompt: \[\] is empty"),
    ("prompt_bool_ids", completion(prompt=[[1, True]]), 400, "prompt", r"not a list of integer token ids"),
    ("token_id_high", completion(prompt=[5, VOCAB]), 400, "prompt",
     r"^prompt: token id 100 is outside .*\[0, 100\)"),
    ("token_id_negative", completion(prompt=[[-1]]), 400, "prompt", r"^prompt: token id -1 is outside"),
    ("max_tokens_negative", completion(max_tokens=-1), 400, "max_tokens", r"^max_tokens: -1 must be >= 0"),
    ("max_tokens_bool", completion(max_tokens=True), 400, "max_tokens",
     r"^max_tokens: true is not an integer"),
    ("max_tokens_float", completion(max_tokens=2.5), 400, "max_tokens",
     r"^max_tokens: 2.5 is not an integer"),
    ("max_tokens_zero", completion(max_tokens=0), 400, "max_tokens",
     r"^max_tokens: 0 is allowed only with echo"),
    ("ids_over_context", completion(prompt=[1] * 60, max_tokens=5), 400, "max_tokens",
     r"^max_tokens: 5 plus the prompt's 60 tokens = 65 is over the model's context length 64"),
    ("prompt_over_context", completion(prompt=[1] * 65, max_tokens=1), 400, "prompt",
     r"^prompt: 65 tokens is over the model's context length 64"),
    ("text_over_context", completion(prompt="w " * 60, max_tokens=10), 400, "max_tokens", r"60 tokens = 70"),
    ("temperature_high", completion(temperature=2.5), 400, "temperature",
     r"^temperature: 2.5 is outside \[0, 2\]"),
    ("temperature_negative", completion(temperature=-0.1), 400, "temperature", r"-0.1 is outside \[0, 2\]"),
    ("temperature_string", completion(temperature="hot"), 400, "temperature",
     r'^temperature: "hot" is not a number'),
    ("temperature_inf", completion(temperature=float("inf")), 400, "temperature",
     r"inf is not a finite number"),
    ("temperature_nan", completion(temperature=float("nan")), 400, "temperature",
     r"nan is not a finite number"),
    ("top_p_zero", completion(top_p=0), 400, "top_p", r"^top_p: 0 is outside \(0, 1\]"),
    ("top_p_high", completion(top_p=1.5), 400, "top_p", r"^top_p: 1.5 is outside \(0, 1\]"),
    ("seed_string", completion(seed="7"), 400, "seed", r'^seed: "7" is not an integer'),
    ("stop_empty", completion(stop=""), 400, "stop", r'^stop: "" contains an empty string'),
    ("stop_empty_in_list", completion(stop=["a", ""]), 400, "stop", r"contains an empty string"),
    ("stop_too_many", completion(stop=list("abcde")), 400, "stop", r"^stop: 5 stop strings given, at most 4"),
    ("stop_wrong_type", completion(stop=[1]), 400, "stop",
     r"^stop: \[1\] is not a string or a list of strings"),
    ("n_zero", completion(n=0), 400, "n", r"^n: 0 must be in \[1, 128\]"),
    ("n_greedy", completion(n=2, temperature=0), 400, "n", r"^n: 2 completions with temperature 0"),
    ("logprobs_high", completion(logprobs=21), 400, "logprobs", r"^logprobs: 21 must be in \[0, 20\]"),
    ("logprobs_bool", completion(logprobs=True), 400, "logprobs", r"^logprobs: true is not an integer"),
    ("echo_string", completion(echo="yes"), 400, "echo", r'^echo: "yes" is not a boolean'),
    ("stream_options_without_stream", completion(stream_options={"include_usage": True}), 400,
     "stream_options", r"^stream_options: .* given without stream=true"),
    ("stream_options_not_object", completion(stream=True, stream_options=1), 400, "stream_options",
     r"^stream_options: 1 is not an object"),
    ("include_usage_string", completion(stream=True, stream_options={"include_usage": "y"}), 400,
     "stream_options.include_usage", r'^stream_options\.include_usage: "y" is not a boolean'),
]

BAD_CHATS = [
    ("malformed_json", b"{not json", 400, None, r"^body: not valid JSON"),
    ("too_large", b"{" + b" " * MAX_BODY_BYTES + b"}", 413, None, r"over the limit of 8388608 bytes"),
    ("missing_messages", {"model": MODEL}, 400, "messages", r"^messages: missing, required"),
    ("empty_messages", chat(messages=[]), 400, "messages", r"^messages: \[\] is not a non-empty list"),
    ("unknown_model", chat(model="other"), 404, "model", r'^model: "other" does not exist'),
    ("unknown_role", chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0].role",
     r'^messages\[0\]\.role: "wizard" is not a known role \(one of system, user, assistant, tool, developer'),
    ("message_not_object", chat(messages=["hi"]), 400, "messages[0]",
     r'^messages\[0\]: "hi" is not an object'),
    ("missing_content", chat(messages=[{"role": "user"}]), 400, "messages[0].content", r"missing, required"),
    ("content_wrong_type", chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content",
     r"5 is not a string or a list of content parts"),
    ("image_part", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     400, "messages[0].content[0]", r"is not a text part"),
    ("max_completion_tokens_zero", chat(max_completion_tokens=0), 400, "max_completion_tokens",
     r"^max_completion_tokens: 0 must be >= 1"),
    ("max_tokens_bool", chat(max_tokens=True), 400, "max_tokens", r"^max_tokens: true is not an integer"),
    ("max_tokens_fills_context", chat(max_tokens=CONTEXT), 400, "max_tokens", r"leaves no room for a prompt"),
    ("top_logprobs_without_logprobs", chat(top_logprobs=3), 400, "top_logprobs",
     r"^top_logprobs: 3 given without logprobs=true"),
    ("top_logprobs_high", chat(logprobs=True, top_logprobs=21), 400, "top_logprobs",
     r"21 must be in \[0, 20\]"),
    ("logprobs_int", chat(logprobs=5), 400, "logprobs", r"^logprobs: 5 is not a boolean"),
    ("temperature_string", chat(temperature="hot"), 400, "temperature", r'"hot" is not a number'),
    ("top_p_zero", chat(top_p=0.0), 400, "top_p", r"outside \(0, 1\]"),
    ("stop_empty", chat(stop=[""]), 400, "stop", r"contains an empty string"),
    ("n_greedy", chat(n=3, temperature=0.0), 400, "n", r"temperature 0"),
    ("stream_options_without_stream", chat(stream_options={"include_usage": True}), 400, "stream_options",
     r"without stream=true"),
]


def _check_error(err: ApiError, status: int, param: str | None, pattern: str) -> None:
    assert err.status == status
    assert err.param == param
    assert re.search(pattern, err.message), err.message
    assert "\n" not in err.message and len(err.message) < 300
    body = err.body()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] == err.message and body["error"]["param"] == param
    json.dumps(body)  # the HTTP layer sends it as is


@pytest.mark.parametrize(("body", "status", "param", "pattern"), [r[1:] for r in BAD_COMPLETIONS],
                         ids=[r[0] for r in BAD_COMPLETIONS])
def test_bad_completion_is_refused(body, status: int, param: str | None, pattern: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_completion(body, **LIMITS, count_tokens=count_words)
    _check_error(info.value, status, param, pattern)


@pytest.mark.parametrize(("body", "status", "param", "pattern"), [r[1:] for r in BAD_CHATS],
                         ids=[r[0] for r in BAD_CHATS])
def test_bad_chat_is_refused(body, status: int, param: str | None, pattern: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_chat(body, **LIMITS, count_tokens=count_words)
    _check_error(info.value, status, param, pattern)


def test_error_types_follow_the_status() -> None:
    """invalid_request_error for 400s; the 404 carries code model_not_found as OpenAI's does."""
    with pytest.raises(ApiError) as bad:
        parse_completion(completion(top_p=2), **LIMITS)
    assert bad.value.body()["error"]["type"] == "invalid_request_error"
    assert bad.value.body()["error"]["code"] is None
    with pytest.raises(ApiError) as missing:
        parse_completion(completion(model="x"), **LIMITS)
    assert missing.value.body()["error"] == {
        "message": missing.value.message,
        "type": "not_found_error",
        "param": "model",
        "code": "model_not_found",
    }
    assert ApiError(429, "queue full").body()["error"]["type"] == "rate_limit_error"
    assert isinstance(ApiError(400, "x"), ValueError)


def test_completion_defaults() -> None:
    req = parse_completion(json.dumps(completion()).encode(), **LIMITS)
    assert req.model == MODEL and req.prompts == ["hello there"]
    assert (req.max_tokens, req.logprobs, req.echo) == (16, None, False)
    assert req.sampling == Sampling(temperature=1.0, top_p=1.0, seed=None, stop=[], n=1, stream=False,
                                    include_usage=False)


def test_json_nulls_mean_the_defaults() -> None:
    nulls = dict.fromkeys(["max_tokens", "temperature", "top_p", "seed", "stop", "n", "logprobs", "echo",
                           "stream", "stream_options"])
    req = parse_completion(completion(**nulls), **LIMITS)
    assert req.max_tokens == 16 and req.sampling == Sampling()


@pytest.mark.parametrize(("prompt", "prompts"), [
    ("abc", ["abc"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1], [2, 99]], [[1], [2, 99]]),
    ([0], [[0]]),
], ids=["string", "strings", "ids", "lists_of_ids", "id_zero"])
def test_prompt_shapes_are_normalised(prompt, prompts) -> None:
    assert parse_completion(completion(prompt=prompt), **LIMITS).prompts == prompts


def test_completion_fields_pass_through() -> None:
    req = parse_completion(completion(
        prompt=[1] * 48, max_tokens=16, temperature=0, top_p=0.5, seed=7, stop="\n", logprobs=5, echo=True,
        stream=True, stream_options={"include_usage": True}, user="ignored",
    ), **LIMITS)
    assert (req.max_tokens, req.logprobs, req.echo) == (16, 5, True)
    assert req.sampling == Sampling(temperature=0.0, top_p=0.5, seed=7, stop=["\n"], n=1, stream=True,
                                    include_usage=True)


def test_completion_edges_that_are_allowed() -> None:
    assert parse_completion(completion(max_tokens=0, echo=True), **LIMITS).max_tokens == 0
    edges = parse_completion(completion(temperature=2, top_p=1, logprobs=0), **LIMITS)
    assert (edges.sampling.temperature, edges.sampling.top_p, edges.logprobs) == (2.0, 1.0, 0)
    assert parse_completion(completion(n=4, stop=list("abcd")), **LIMITS).sampling.stop == list("abcd")
    # Exactly the context is fine; string prompts are only checked when a tokenizer is given.
    assert parse_completion(completion(prompt=[1] * 48, max_tokens=16), **LIMITS).max_tokens == 16
    assert parse_completion(completion(prompt="w " * 60, max_tokens=10), **LIMITS).max_tokens == 10
    assert parse_completion(completion(stream=False, stream_options=None), **LIMITS).sampling.stream is False


def test_chat_defaults_and_content_parts() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "developer", "content": "x"},
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
        {"role": "assistant", "content": None},
        {"role": "tool", "content": "42", "name": "calc"},
    ]
    req = parse_chat(json.dumps(chat(messages=messages)).encode(), **LIMITS)
    assert req.messages == [
        ChatMessage("system", "be brief"), ChatMessage("developer", "x"), ChatMessage("user", "one\ntwo"),
        ChatMessage("assistant", ""), ChatMessage("tool", "42", "calc"),
    ]
    assert (req.max_tokens, req.logprobs, req.top_logprobs) == (None, False, None)
    assert req.sampling == Sampling()


def test_chat_token_limits_and_logprobs() -> None:
    assert parse_chat(chat(max_tokens=8), **LIMITS).max_tokens == 8
    assert parse_chat(chat(max_completion_tokens=9, max_tokens=8), **LIMITS).max_tokens == 9
    req = parse_chat(chat(logprobs=True, top_logprobs=20, n=2, seed=1, stream=True,
                          stream_options={"include_usage": False}), **LIMITS)
    assert (req.logprobs, req.top_logprobs) == (True, 20)
    sampling = req.sampling
    assert (sampling.n, sampling.seed, sampling.stream, sampling.include_usage) == (2, 1, True, False)
