"""The load generator of the serving benchmark (`benchmarks/serve.py`): one async streaming client used
unchanged against every server, so differences come from the servers.

Each request is `POST /v1/completions` with `stream: true`, `stream_options.include_usage`, one of the
fixed `PROMPTS` (request i gets prompt i mod 8, the same for every server), `max_tokens` 64,
`temperature` 0, plus the server's extra fields (`ignore_eos: true` where the server accepts it, so every
request decodes exactly 64 tokens). A level of C concurrent clients sends N requests through C workers
(each worker sends its next request as soon as its previous one ends) and reports:

- completion tokens/s = sum of completion tokens / wall time of the level (first send to last end);
  completion tokens are what the final `usage` chunk says, else the number of content chunks;
- TTFT p50: send -> first SSE chunk with non-empty text;
- inter-token latency p50/p95: the gaps between consecutive content chunks, over all requests;
- requests ok / failed (an HTTP error, a mid-stream `error` event, or a stream that ends with neither
  `[DONE]` nor a `finish_reason` is a failure; the first few error messages are kept); how many ok
  streams lacked `data: [DONE]` (transformers serve's completions stream never sends it).

Percentiles are nearest-rank over the pooled samples.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

MAX_TOKENS = 64
# Fixed prompts of different lengths (about 5 to 60 tokens with the benchmark's 4096-token BPE).
PROMPTS = (
    "It is a truth universally acknowledged,",
    "Mr. Darcy looked at her, and",
    "The weather was fine and the roads were dry, so Elizabeth walked the three miles to Netherfield, "
    "jumping over stiles and springing over puddles,",
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, seemed to "
    "unite some of the best blessings of existence; and had lived nearly twenty-one years in the world "
    "with very little to distress or vex her.",
    "def fibonacci(n):\n    ",
    "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who,",
    "She had been forced into prudence in her youth, she learned romance as she grew older:",
    "No one who had ever seen Catherine Morland in her infancy would have supposed her born to be an "
    "heroine. Her situation in life, the character of her father and mother, her own person and "
    "disposition, were all equally against her.",
)


@dataclass
class RequestResult:
    ok: bool
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    error: str | None = None
    done_marker: bool = False  # the stream ended with `data: [DONE]` (transformers serve omits it)


def percentile(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no samples."""
    if not xs:
        return None
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))]


def request_body(model: str, prompt: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0, "stream": True,
        "stream_options": {"include_usage": True}, **extra,
    }


def _chunk_text(event: dict[str, Any]) -> str:
    choices = event.get("choices") or []
    return "".join(str(c.get("text") or "") for c in choices)


async def one_request(client: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> RequestResult:
    """Send one streaming completion and time its chunks."""
    t0 = time.perf_counter()
    last: float | None = None
    res = RequestResult(ok=False)
    chunks, usage_tokens, done, finished = 0, None, False, False
    try:
        async with client.post(url, json=body) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.read())[:300]!r}"
                return res
            async for raw in resp.content:  # one SSE line at a time
                line = raw.decode("utf-8", errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    res.error = f"stream error: {str(event['error'])[:300]}"
                    return res
                finished |= any(c.get("finish_reason") for c in event.get("choices") or [])
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
                if _chunk_text(event):
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.gaps.append(now - last)
                    last = now
                    chunks += 1
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"[:300]
        return res
    if not (done or finished):
        res.error = "stream ended without [DONE] or a finish_reason"
        return res
    res.done_marker = done
    res.ok = True
    res.completion_tokens = int(usage_tokens) if usage_tokens is not None else chunks
    return res


async def run_level(url: str, model: str, concurrency: int, n_requests: int, extra: dict[str, Any],
                    timeout: float = 600.0) -> dict[str, Any]:
    """N requests through ``concurrency`` workers; the level's summary (see the module docstring)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(i)
    results: list[RequestResult] = []
    conn = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as client:

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                results.append(await one_request(client, url, request_body(model, PROMPTS[i % len(PROMPTS)],
                                                                            extra)))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    gaps = [g for r in ok for g in r.gaps]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    return {
        "concurrency": concurrency, "requests": n_requests, "ok": len(ok), "failed": len(results) - len(ok),
        "wall_s": wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall if wall > 0 else None,
        "ttft_p50_s": percentile(ttfts, 50), "itl_p50_s": percentile(gaps, 50),
        "itl_p95_s": percentile(gaps, 95),
        "tokens_per_request": sorted({r.completion_tokens for r in ok}),
        "errors": [r.error for r in results if not r.ok][:3],
        "ok_without_done_marker": sum(not r.done_marker for r in ok),
    }


def warm_up(url: str, model: str, extra: dict[str, Any]) -> dict[str, Any]:
    """One request, not measured (first-call allocations, lazy compilation); its summary."""
    return asyncio.run(run_level(url, model, 1, 1, extra))


def measure(url: str, model: str, concurrency: int, n_requests: int, extra: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(run_level(url, model, concurrency, n_requests, extra))
