"""The server under load on loopback, driven by the official `openai` client (bounded in requests and time).

- 32 concurrent streaming clients with include_usage all finish with 32 tokens each, in batches of
  at least 8, and the engine is idle afterwards;
- overload (2 running, 2 waiting, 10 clients, client retries off): some requests get 429, the rest
  complete;
- a client that closes a long stream after 3 chunks frees its sequence within 2 s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import urllib.request

import openai
import pytest
import torch

from serve_helpers import byte_tokenizer, gqa_micro, tiny_model, wait_until
from widemoe.model.causal_lm import build_model
from widemoe.serve.server import serve_in_thread

torch.set_num_threads(2)


def engine_stats(url: str) -> dict:
    """GET /metrics as JSON: active, waiting, max_batch, tokens_generated, requests_finished."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen3_moe")


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


async def stream_one(c: openai.AsyncOpenAI, prompt: str, max_tokens: int) -> tuple[int, str, str | None]:
    """(completion tokens from usage, text, finish_reason) of one streamed completion."""
    stream = await c.completions.create(model="widemoe", prompt=prompt, max_tokens=max_tokens, stream=True,
                                        stream_options={"include_usage": True}, temperature=0,
                                        extra_body={"ignore_eos": True})
    text, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.choices:
            text.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    return usage, "".join(text), finish


def test_32_concurrent_streaming_clients_all_finish_in_large_batches(model):
    with serve_in_thread((model, byte_tokenizer(model)), max_num_seqs=32, max_queue=64) as url:
        async def main():
            c = client(url)
            return await asyncio.wait_for(
                asyncio.gather(*(stream_one(c, f"client {i} says", 32) for i in range(32))), timeout=240)

        results = asyncio.run(main())
        assert [r[0] for r in results] == [32] * 32
        assert all(r[2] == "length" for r in results)
        wait_until(lambda: engine_stats(url)["active"] == 0 and engine_stats(url)["waiting"] == 0,
                   what="the engine idle after the load")
        stats = engine_stats(url)
        assert stats["max_batch"] >= 8


def test_overload_answers_429_and_completes_the_rest(model):
    with serve_in_thread((model, byte_tokenizer(model)), max_num_seqs=2, max_queue=2) as url:
        async def one(c, i):
            try:
                r = await c.completions.create(model="widemoe", prompt=f"request {i}", max_tokens=24,
                                               temperature=0, extra_body={"ignore_eos": True})
                return r.usage.completion_tokens
            except openai.RateLimitError as e:
                assert e.response.headers.get("retry-after")
                return "429"

        async def main():
            c = client(url)
            return await asyncio.wait_for(asyncio.gather(*(one(c, i) for i in range(10))), timeout=120)

        results = asyncio.run(main())
        rejected = results.count("429")
        assert 0 < rejected < 10
        assert all(r == 24 for r in results if r != "429")
        wait_until(lambda: engine_stats(url)["active"] == 0 and engine_stats(url)["waiting"] == 0,
                   what="the engine idle after the overload")


def test_closing_a_stream_frees_its_sequence_within_2_s():
    # room for a stream far longer than the test: it cannot end on its own before the client leaves
    model = build_model(dataclasses.replace(gqa_micro(), max_position_embeddings=4096), seed=0).eval()
    with serve_in_thread((model, byte_tokenizer(model)), max_num_seqs=4) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        stream = c.completions.create(model="widemoe", prompt="a long story", max_tokens=4000, stream=True,
                                      temperature=0, extra_body={"ignore_eos": True})
        chunks = 0
        for _ in stream:
            chunks += 1
            if chunks == 3:
                break
        assert engine_stats(url)["active"] == 1  # the sequence is still running when the client leaves
        stream.close()
        closed = time.monotonic()
        wait_until(lambda: engine_stats(url)["active"] == 0, timeout=2.0, what="the sequence freed")
        assert time.monotonic() - closed < 2.0
        assert engine_stats(url)["tokens_generated"] < 4000
