"""DeepSeek-V4 cache: full pass vs prefix vs chunked prefill vs token-by-token decode, KV bytes, generate."""

from __future__ import annotations

import pytest
import torch

from test_v4_parity import hf_pair, make_ids, tiny_v4_config
from widemoe.generate import generate
from widemoe.model.v4_cache import V4Cache


@pytest.fixture(scope="module")
def pair():  # noqa: ANN201
    # index_topk >= entries: the indexer selects every visible entry (no ties to break).
    return hf_pair(tiny_v4_config(index_topk=64))


def _incremental(wm, ids: torch.Tensor, cuts: list[int]) -> tuple[torch.Tensor, V4Cache]:  # noqa: ANN001
    cache = wm.new_cache()
    outs, start = [], 0
    for end in [*cuts, ids.shape[1]]:
        outs.append(wm(ids[:, start:end], cache=cache).logits)
        start = end
    return torch.cat(outs, dim=1), cache


def test_prefix_chunked_and_decode_match_full_pass(pair) -> None:  # noqa: ANN001
    _, wm = pair
    c = wm.config
    ids = make_ids(c, 2, 47)
    with torch.no_grad():
        full = wm(ids).logits
        prefix = wm(ids[:, :21]).logits
        chunked, _ = _incremental(wm, ids, [13, 30])  # chunk ends mid-window for CSA (4) and HCA (8)
        # single tokens at the start, then token by token across 2 HCA and 4 CSA window ends
        decode, cache = _incremental(wm, ids, [1, 2, 3, 5, 29, *range(30, 47)])
    assert (prefix - full[:, :21]).abs().max().item() < 1e-5
    assert (chunked - full).abs().max().item() < 1e-5
    assert (decode - full).abs().max().item() < 1e-5
    assert cache.seq_len == 47


def test_decode_matches_transformers_cache(pair) -> None:  # noqa: ANN001
    hf, wm = pair
    c = wm.config
    ids = make_ids(c, 1, 30)
    with torch.no_grad():
        ref = hf(input_ids=ids[:, :20], use_cache=True)
        steps = [ref.logits]
        past = ref.cache
        for t in range(20, 30):
            r = hf(input_ids=ids[:, t:t + 1], cache=past, use_cache=True)
            past = r.cache
            steps.append(r.logits)
        ours, _ = _incremental(wm, ids, [20, *range(21, 30)])
    assert (torch.cat(steps, 1) - ours).abs().max().item() < 1e-5


def kv_elements_per_row(c, S: int) -> int:  # noqa: ANN001
    """The KV formula: window min(S, W-1)·d per layer, + ⌊S/m⌋(d + ci) per CSA layer, + ⌊S/m'⌋·d per HCA."""
    d, total = c.head_dim, 0
    for t in c.v4_layer_types:
        total += min(S, c.sliding_window - 1) * d
        if t == "compressed_sparse_attention":
            total += (S // c.compress_rate_csa) * (d + c.index_head_dim)
        elif t == "heavily_compressed_attention":
            total += (S // c.compress_rate_hca) * d
    return total


def test_kv_bytes_match_formula(pair) -> None:  # noqa: ANN001
    _, wm = pair
    c = wm.config
    for S in (3, 8, 45):
        ids = make_ids(c, 2, S)
        with torch.no_grad():
            _, cache = _incremental(wm, ids, [S // 2] if S > 1 else [])
        assert cache.nbytes() == 2 * 4 * kv_elements_per_row(c, S)
        # open-window buffers and the overlap state stay bounded (a few windows per layer)
        assert cache.state_nbytes() <= 2 * 4 * c.num_hidden_layers * 4 * c.compress_rate_hca * 2 * c.head_dim


def test_greedy_generate_equals_argmax_of_full_pass(pair) -> None:  # noqa: ANN001
    _, wm = pair
    c = wm.config
    prompt = make_ids(c, 1, 11)[0].tolist()
    new = generate(wm, [prompt], max_new_tokens=10)[0]
    seq = torch.tensor([prompt + new])
    with torch.no_grad():
        logits = wm(seq).logits[0]
    assert new == logits[len(prompt) - 1:-1].argmax(-1).tolist()


def test_cache_select_keeps_rows(pair) -> None:  # noqa: ANN001
    _, wm = pair
    c = wm.config
    ids = make_ids(c, 2, 23)
    with torch.no_grad():
        cache = wm.new_cache()
        wm(ids[:, :20], cache=cache)
        cache.select(torch.tensor([1]))
        step = wm(ids[1:, 20:23], cache=cache).logits
        ref = wm(ids[1:]).logits[:, 20:]
    assert (step - ref).abs().max().item() < 1e-5


def test_batched_generate_longest_row_equals_solo(pair) -> None:  # noqa: ANN001
    # Left padding: the longest prompt's row has no padding, so it must match its solo run. (Shorter
    # rows pool pad tokens into their compressed entries, as transformers does: see the report.)
    _, wm = pair
    long, short = make_ids(wm.config, 1, 13)[0].tolist(), make_ids(wm.config, 1, 5, seed=2)[0].tolist()
    both = generate(wm, [long, short], max_new_tokens=6)
    assert both[0] == generate(wm, [long], max_new_tokens=6)[0]
    assert len(both[1]) == 6
