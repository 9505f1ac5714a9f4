"""`widemoe serve`'s HTTP side driven by the official `openai` client (sync and async) against a real
uvicorn server on 127.0.0.1, with the real engine, on one micro model shared by the module.

The model is rigged so its greedy text is known: every block's output projections are zero, so the
last hidden state is the current token's embedding, and the embedding and LM head make a next-token
table cycling through the UTF-8 bytes of "é€" (C3 A9 E2 82 AC) with a logit margin of ~3, so greedy
decoding spells "é€é€…" from any prompt while temperature 1 still samples widely. The attention and
the MoE still run (on a cache), their outputs just do not reach the logits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import openai
import pytest
import tokenizers
import torch
from openai import AsyncOpenAI, OpenAI
from tokenizers import decoders, models, pre_tokenizers

from widemoe.data.tokenizer import ModelTokenizer
from widemoe.model.causal_lm import build_model
from widemoe.presets import get_preset
from widemoe.serve.app import ServerState
from widemoe.serve.responses import TokenStrings
from widemoe.serve.server import Server, serve_in_thread

torch.set_num_threads(1)

CYCLE = [0xC3, 0xA9, 0xE2, 0x82, 0xAC]  # "é€" in UTF-8: greedy decoding cycles through these bytes
NAME = "rigged-micro"
POISON = 0xFF  # a prompt holding this byte makes the model's forward raise
MAX_MODEL_LEN = 96
MAX_QUEUE = 8
# A template that refuses tool messages: the chat template file flag, and a template error -> 400
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool turns here') }}"
            "{% endif %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


def rigged_micro() -> torch.nn.Module:
    model = build_model(get_preset("micro"), seed=0).eval()
    hidden = model.config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "o_proj" in name or "down_proj" in name:
                p.zero_()  # blocks add nothing to the residual stream: the last hidden is the embedding
        model.model.norm.weight.fill_(1.0)
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed.zero_()
        head.zero_()
        other = len(CYCLE)  # every token outside the cycle shares one direction and leads to C3
        embed[:, other] = 1.0
        for i, t in enumerate(CYCLE):
            embed[t].zero_()
            embed[t, i] = 1.0
            head[CYCLE[(i + 1) % len(CYCLE)], i] = 0.4  # RMS-normed input is 8 * e_i: logit 3.2
        head[CYCLE[0], other] = 0.4
    assert hidden > len(CYCLE)

    def poison(module: torch.nn.Module, args: tuple) -> None:  # a failure inside the engine's forward
        if (args[0] == POISON).any():
            raise RuntimeError("poisoned token")

    model.model.embed_tokens.register_forward_pre_hook(poison)
    return model


@pytest.fixture(scope="module")
def template_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "template.jinja"
    path.write_text(TEMPLATE, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def url(template_file: Path) -> Iterator[str]:
    tokenizer = ModelTokenizer(None, 256, eos_id=0)
    with serve_in_thread((rigged_micro(), tokenizer), served_model_name=NAME, max_num_seqs=8,
                         max_queue=MAX_QUEUE, max_model_len=MAX_MODEL_LEN, chat_template=template_file) as u:
        yield u


@pytest.fixture(scope="module")
def client(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(url: str) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=url, timeout=60) as c:
        yield c


def until(condition, timeout_s: float = 10.0) -> None:  # noqa: ANN001
    """Poll `condition` until it holds, failing after the deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached before the deadline"


def metrics(http: httpx2.Client) -> dict:
    return http.get("/metrics").json()


# ---- the simple endpoints -----------------------------------------------------------------------------


def test_health_and_models(client: OpenAI, http: httpx2.Client) -> None:
    assert http.get("/health").status_code == 200
    models = client.models.list().data
    assert [m.id for m in models] == [NAME]
    assert models[0].owned_by == "widemoe"


def test_tokenize_detokenize_tokenizer_info(http: httpx2.Client) -> None:
    r = http.post("/tokenize", json={"prompt": "é!", "add_special_tokens": False}).json()
    assert r == {"count": 3, "max_model_len": MAX_MODEL_LEN, "tokens": [0xC3, 0xA9, 0x21], "token_strs": None}
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == list(b"[user] hi\n[assistant] ")
    assert http.post("/detokenize", json={"tokens": [0xE2, 0x82, 0xAC]}).json() == {"prompt": "€"}
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == "\x00" and info["model_max_length"] == MAX_MODEL_LEN
    assert info["chat_template"] == TEMPLATE
    # lm-eval finds the EOS id by tokenizing eos_token
    assert http.post("/tokenize", json={"prompt": info["eos_token"]}).json()["tokens"] == [0]


def test_metrics_json_and_prometheus(http: httpx2.Client) -> None:
    stats = metrics(http)
    assert set(stats) == {"active", "waiting", "max_batch", "tokens_generated", "requests_finished"}
    text = http.get("/metrics", params={"format": "prometheus"}).text
    assert "\nwidemoe_tokens_generated " in text and "\nwidemoe_requests_finished " in text
    assert "# TYPE widemoe_active gauge" in text


# ---- completions --------------------------------------------------------------------------------------


def test_completion_greedy_text_usage_and_log_line(client: OpenAI, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="widemoe.serve"):
        r = client.completions.create(model=NAME, prompt="x", max_tokens=10, temperature=0)
    assert r.choices[0].text == "é€é€" and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (1, 10, 11)
    lines = [rec.getMessage() for rec in caplog.records if r.id in rec.getMessage()]
    assert len(lines) == 1 and "1 prompt + 10 completion tokens" in lines[0] and "ttft" in lines[0], lines


def test_completion_prompt_shapes_and_choice_order(client: OpenAI) -> None:
    """Strings, ids and lists of ids; with n=2 choice k is prompt k // 2 sampled with seed + k % 2."""
    prompts = ["ab", "c"]
    r = client.completions.create(model=NAME, prompt=prompts, max_tokens=6, temperature=1, seed=7, n=2,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for k, c in enumerate(r.choices):
        alone = client.completions.create(model=NAME, prompt=prompts[k // 2], max_tokens=6, temperature=1,
                                          seed=7 + k % 2)
        assert c.text == alone.choices[0].text
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 4 * 6
    by_ids = client.completions.create(model=NAME, prompt=[[97, 98], [99]], max_tokens=6, temperature=1,
                                       seed=7)
    assert [c.text for c in by_ids.choices] == [r.choices[0].text, r.choices[2].text]
    one_ids = client.completions.create(model=NAME, prompt=[97, 98], max_tokens=6, temperature=1, seed=7)
    assert one_ids.choices[0].text == r.choices[0].text


def test_completion_seeds_differ(client: OpenAI) -> None:
    texts = {client.completions.create(model=NAME, prompt="q", max_tokens=12, temperature=1, seed=s)
             .choices[0].text for s in range(4)}
    assert len(texts) > 1


def test_echo_logprobs(client: OpenAI) -> None:
    r = client.completions.create(model=NAME, prompt="ab", max_tokens=1, temperature=0, logprobs=3, echo=True)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "ab\ufffd"  # one byte of "é" alone: an incomplete character
    assert lp.tokens[:2] == ["a", "b"] and lp.tokens[2] == "bytes:\\xc3"
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.token_logprobs) == 3 and all(isinstance(v, float) for v in lp.token_logprobs[1:])
    assert lp.text_offset[:2] == [0, 1]
    greedy = lp.top_logprobs[2]
    assert max(greedy.values()) == lp.token_logprobs[2] and len(greedy) == 3  # chosen is the best
    assert lp.token_logprobs[2] > -3 > lp.token_logprobs[1]  # the rigged table's C3, a non-greedy "b"


def test_echo_without_new_tokens(client: OpenAI) -> None:
    r = client.completions.create(model=NAME, prompt=[[97, 98, 99]], max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "abc" and len(lp.token_logprobs) == 3 and lp.token_logprobs[0] is None
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == 3
    plain = client.completions.create(model=NAME, prompt="hi", max_tokens=0, echo=True)
    assert plain.choices[0].text == "hi" and plain.choices[0].logprobs is None


def test_stop_string_is_cut(client: OpenAI) -> None:
    r = client.completions.create(model=NAME, prompt="x", max_tokens=20, temperature=0, stop=["€"])
    assert r.choices[0].text == "é" and r.choices[0].finish_reason == "stop"


def test_streamed_completion_joins_to_the_whole(client: OpenAI) -> None:
    args = dict(model=NAME, prompt=["x", "yz"], max_tokens=16, temperature=1, seed=3, n=2)
    whole = client.completions.create(**args)
    pieces: dict[int, list[str]] = {}
    finish: dict[int, str] = {}
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    for ch in chunks[:-1]:
        for c in ch.choices:
            pieces.setdefault(c.index, []).append(c.text)
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert {i: "".join(p) for i, p in pieces.items()} == {c.index: c.text for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == 3


def test_streamed_multibyte_characters_arrive_whole(client: OpenAI) -> None:
    stream = client.completions.create(model=NAME, prompt="x", max_tokens=10, temperature=0, stream=True)
    texts = [c.choices[0].text for c in stream]
    assert "".join(texts) == "é€é€"
    assert all("\ufffd" not in t for t in texts) and {"é", "€"} <= set(texts)


def test_ignore_eos_reaches_the_engine(client: OpenAI) -> None:
    """EOS (id 0) as a stop would end at once on a prompt that asks for it; ignore_eos goes on."""
    r = client.completions.create(model=NAME, prompt="x", max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="ignore_eos"):
        client.completions.create(model=NAME, prompt="x", max_tokens=4, extra_body={"ignore_eos": "yes"})


# ---- chat ---------------------------------------------------------------------------------------------


def test_chat_fills_the_context_and_reports_logprobs(client: OpenAI, http: httpx2.Client) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    prompt = http.post("/tokenize", json={"messages": messages}).json()["count"]
    r = client.chat.completions.create(model=NAME, messages=messages, temperature=0, logprobs=True,
                                       top_logprobs=2)
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content.startswith("é€é€")
    assert c.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt, MAX_MODEL_LEN - prompt)
    first = c.logprobs.content[0]
    assert (first.token, first.bytes) == ("bytes:\\xc3", [0xC3])
    assert [t.bytes for t in first.top_logprobs][0] == [0xC3] and len(first.top_logprobs) == 2


def test_chat_stream_role_first_finish_last(client: OpenAI) -> None:
    args = dict(model=NAME, messages=[{"role": "user", "content": "hey"}], max_completion_tokens=7,
                temperature=1, seed=11)
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    content = [ch for ch in chunks[1:] if ch.choices]
    assert all(ch.choices[0].finish_reason is None for ch in content[:-1])
    assert content[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    assert "".join(ch.choices[0].delta.content or "" for ch in content) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7


def test_async_client_concurrent_streams(url: str) -> None:
    async def main() -> list[str]:
        aclient = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)

        async def one(seed: int) -> str:
            stream = await aclient.completions.create(model=NAME, prompt="p", max_tokens=8, temperature=1,
                                                      seed=seed, stream=True)
            return "".join([c.choices[0].text async for c in stream])

        alone = [await one(s) for s in range(3)]
        together = await asyncio.gather(*(one(s) for s in range(3)))
        r = await aclient.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "a"}],
                                                  max_tokens=5, temperature=0)
        await aclient.close()
        assert list(together) == alone
        return [r.choices[0].message.content]

    assert asyncio.run(main()) == ["é€"]  # the prompt ends in " ": C3 A9 E2 82 AC


# ---- bad requests -------------------------------------------------------------------------------------

BAD = [
    ("/completions", {"model": NAME}, openai.BadRequestError, "prompt: missing"),
    ("/chat/completions", {"model": NAME}, openai.BadRequestError, "messages: missing"),
    ("/completions", {"model": "gpt-4", "prompt": "x"}, openai.NotFoundError, "does not exist"),
    ("/completions", {"model": NAME, "prompt": "x", "max_tokens": -1}, openai.BadRequestError, "max_tokens"),
    ("/completions", {"model": NAME, "prompt": "x", "temperature": 2.5}, openai.BadRequestError,
     "temperature"),
    ("/completions", {"model": NAME, "prompt": "x", "top_p": 0}, openai.BadRequestError, "top_p"),
    ("/completions", {"model": NAME, "prompt": "x", "top_p": 1.5}, openai.BadRequestError, "top_p"),
    ("/completions", {"model": NAME, "prompt": "x", "n": 2, "temperature": 0}, openai.BadRequestError, "n:"),
    ("/completions", {"model": NAME, "prompt": [1, 300]}, openai.BadRequestError, "token id 300"),
    ("/completions", {"model": NAME, "prompt": "x" * 90, "max_tokens": 10}, openai.BadRequestError,
     "context length 96"),
    ("/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     openai.BadRequestError, "top_logprobs"),
    ("/completions", {"model": NAME, "prompt": "x", "stream_options": {"include_usage": True}},
     openai.BadRequestError, "stream_options"),
    ("/completions", {"model": NAME, "prompt": "x", "stop": [""]}, openai.BadRequestError, "stop"),
    ("/chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": "x"}]},
     openai.BadRequestError, "role"),
    ("/chat/completions", {"model": NAME, "messages": [{"role": "tool", "content": "x"}]},
     openai.BadRequestError, "no tool turns here"),
    ("/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x" * 90}]},
     openai.BadRequestError, "no room for a completion"),
    ("/completions", {"model": NAME, "prompt": "x", "n": MAX_QUEUE + 1}, openai.RateLimitError, "busy"),
]


@pytest.mark.parametrize("path,body,error,message", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_request_raises_the_clients_class(client: OpenAI, path: str, body: dict, error: type,
                                                message: str) -> None:
    with pytest.raises(error) as info:
        client.post(path, body=body, cast_to=object)
    err = info.value.body
    assert set(err) == {"message", "type", "param", "code"} and message in err["message"], err


def test_http_level_errors(http: httpx2.Client) -> None:
    r = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = http.get("/v1/nowhere")
    assert r.status_code == 404 and "no such endpoint" in r.json()["error"]["message"]
    r = http.get("/v1/completions")
    assert r.status_code == 405 and "POST" in r.json()["error"]["message"] and r.headers["allow"] == "POST"
    r = http.post("/v1/completions", content=b"x" * (8 * 1024 * 1024 + 1))
    assert r.status_code == 413 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    too_many = {"model": NAME, "prompt": "x", "n": MAX_QUEUE + 1, "temperature": 1}
    r = http.post("/v1/completions", json=too_many)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"


def test_chunked_body_over_the_limit_is_413(http: httpx2.Client) -> None:
    def body() -> Iterator[bytes]:
        for _ in range(9):
            yield b" " * (1024 * 1024)

    r = http.post("/v1/completions", content=body())
    assert r.status_code == 413


def test_errors_leave_the_engine_serving(client: OpenAI, http: httpx2.Client) -> None:
    for _ in range(3):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=NAME, prompt=[999], max_tokens=2)
    r = client.completions.create(model=NAME, prompt="x", max_tokens=2, temperature=0)
    assert r.choices[0].text == "é"
    until(lambda: metrics(http)["active"] == 0 and metrics(http)["waiting"] == 0)


def test_engine_failure_is_500_or_a_stream_error_and_the_engine_goes_on(client: OpenAI) -> None:
    with pytest.raises(openai.InternalServerError, match="poisoned token"):
        client.completions.create(model=NAME, prompt=[65, POISON], max_tokens=3)
    stream = client.completions.create(model=NAME, prompt=[POISON], max_tokens=3, stream=True)
    with pytest.raises(openai.APIError, match="poisoned token"):
        list(stream)
    after = client.completions.create(model=NAME, prompt="x", max_tokens=2, temperature=0)
    assert after.choices[0].text == "é"


# ---- clients that leave -------------------------------------------------------------------------------


def test_closed_stream_cancels_its_sequence(client: OpenAI, http: httpx2.Client) -> None:
    before = metrics(http)
    stream = client.completions.create(model=NAME, prompt="x", max_tokens=90, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    done = before["requests_finished"]
    until(lambda: metrics(http)["active"] == 0 and metrics(http)["requests_finished"] > done, 5)
    assert metrics(http)["tokens_generated"] - before["tokens_generated"] < 90


def test_non_streamed_client_gone_cancels(url: str, http: httpx2.Client) -> None:
    before = metrics(http)
    body = {"model": NAME, "prompt": "x", "max_tokens": 90, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx2.TimeoutException):
        httpx2.post(f"{url}/v1/completions", json=body, timeout=0.25)
    done = before["requests_finished"]
    until(lambda: metrics(http)["active"] == 0 and metrics(http)["requests_finished"] > done, 5)
    assert metrics(http)["tokens_generated"] - before["tokens_generated"] < 90


# ---- not ready, and the command -----------------------------------------------------------------------


def test_not_ready_is_503_everywhere() -> None:
    server = Server(ServerState("loading-model"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        until(lambda: server.uvicorn.started)
        with httpx2.Client(base_url=server.url) as http:
            for method, path in [("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/completions"),
                                 ("POST", "/tokenize"), ("GET", "/metrics")]:
                r = http.request(method, path, json={})
                assert r.status_code == 503 and "still loading" in r.json()["error"]["message"], path
        with pytest.raises(openai.InternalServerError):
            OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0).models.list()
    finally:
        server.stop()
        thread.join(10)


def test_serve_command_starts_answers_and_stops_on_ctrl_c() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "widemoe.cli", "serve", "micro", "--port", "0",
                             "--max-model-len", "32"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        for line in proc.stderr:
            if "listening at" in line:
                url = line.split("listening at ")[1].split()[0]
            if "serving micro" in line:
                break
        assert url is not None
        assert httpx2.get(f"{url}/health").status_code == 200
        models = httpx2.get(f"{url}/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["micro"] and models[0]["max_model_len"] == 32
        r = httpx2.post(f"{url}/v1/completions", json={"model": "micro", "prompt": "a", "max_tokens": 3})
        assert r.json()["usage"]["completion_tokens"] <= 3
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
    finally:
        proc.kill()
        proc.wait()


def test_json_body_must_be_an_object(http: httpx2.Client) -> None:
    r = http.post("/v1/chat/completions", content=json.dumps([1, 2]))
    assert r.status_code == 400 and "not a JSON object" in r.json()["error"]["message"]


def test_token_strings_of_a_byte_level_bpe() -> None:
    """Logprob token strings are the token's exact bytes: a space piece is " ", half a character is
    written as OpenAI writes it, a special token is its content."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>"])
    strings = TokenStrings(ModelTokenizer(backend, backend.get_vocab_size()))
    space, half, eos = (backend.encode(" ").ids[0], backend.encode("é").ids[0],
                        backend.token_to_id("<|endoftext|>"))
    assert (strings.bytes(space), strings.text(space)) == (b" ", " ")
    assert (strings.bytes(half), strings.text(half)) == (b"\xc3", "bytes:\\xc3")
    assert (strings.bytes(eos), strings.text(eos)) == (b"<|endoftext|>", "<|endoftext|>")
