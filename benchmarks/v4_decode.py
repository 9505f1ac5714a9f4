"""DeepSeek-V4 decode benchmark: widemoe vs transformers 5.24 on the same `v4-tiny` weights.

Not a test. For each context length (default 1k, 4k, 16k tokens) both implementations prefill the same
random prompt in chunks of 512 tokens through their caches, then decode greedily; decode steps are
timed round-robin (widemoe step, transformers step, ...) so the ratio is measured at the same moment
on a shared, noisy machine (method of shared/reference/cpu-performance-detail.md §1), and the median
step time gives tokens/s. Also reported per context: the KV bytes per token each cache holds (keys only;
transformers' K and V are one aliased tensor, counted once) next to the formula of
`widemoe.cost.kv_bytes`, and the largest logit difference between the two on the decoded tokens.

The weights are widemoe's random init with every constant-initialised V4 tensor (sinks, position
biases, mHC bases) randomised, copied into `DeepseekV4ForCausalLM` by name. fp32, batch 1.

Usage: python benchmarks/v4_decode.py [--contexts 1024,4096,16384] [--steps 16] [--threads N]
Writes benchmarks/results/v4_decode.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from widemoe.config import ModelConfig
from widemoe.cost import kv_bytes
from widemoe.model.causal_lm import WideMoeForCausalLM, build_model
from widemoe.presets import get_preset

RESULTS = Path(__file__).resolve().parent / "results" / "v4_decode.json"
CHUNK = 512


def hf_model(c: ModelConfig, wm: WideMoeForCausalLM):  # noqa: ANN201 - transformers type, imported lazily
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    rs = c.rope_scaling or {}
    types = list(c.v4_layer_types)
    cfg = DeepseekV4Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, moe_intermediate_size=c.moe_intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=1, head_dim=c.head_dim, q_lora_rank=c.q_lora_rank,
        partial_rotary_factor=c.qk_rope_head_dim / c.head_dim, n_routed_experts=c.n_routed_experts,
        num_experts_per_tok=c.num_experts_per_tok, n_shared_experts=1,
        routed_scaling_factor=c.routed_scaling_factor, max_position_embeddings=c.max_position_embeddings,
        rope_theta=c.rope_theta, compress_rope_theta=c.compress_rope_theta,
        rope_parameters={"rope_type": "yarn", **{k: v for k, v in rs.items() if k != "type"}},
        layer_types=types, compress_rates={"compressed_sparse_attention": c.compress_rate_csa,
                                           "heavily_compressed_attention": c.compress_rate_hca},
        mlp_layer_types=["hash_moe" if i < c.num_hash_layers else "moe" for i in range(len(types))],
        hc_mult=c.hc_mult, hc_sinkhorn_iters=c.hc_sinkhorn_iters, sliding_window=c.sliding_window,
        o_groups=c.o_groups, o_lora_rank=c.o_lora_rank, index_n_heads=c.index_n_heads,
        index_head_dim=c.index_head_dim, index_topk=c.index_topk, swiglu_limit=c.swiglu_limit,
        num_nextn_predict_layers=0, rms_norm_eps=c.rms_norm_eps)
    hf = DeepseekV4ForCausalLM(cfg).eval()
    sd = {k: v for k, v in wm.state_dict().items() if ".mtp." not in f".{k}"}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    bad = [k for k in missing if "rotary_emb" not in k]
    if bad or unexpected:
        raise RuntimeError(f"weight copy failed: missing {bad[:5]}, unexpected {unexpected[:5]}")
    return hf


@torch.no_grad()
def randomise(m: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for name, p in m.named_parameters():
        if name.rsplit(".", 1)[-1] in ("sinks", "position_bias", "base", "hc_base"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def hf_kv_bytes(cache) -> int:  # noqa: ANN001
    n = 0
    for layer in cache.layers:
        n += layer.keys.numel() * layer.keys.element_size()  # values alias keys
        for t in getattr(layer, "compressed_kv", {}).values():
            if t is not None:
                n += t.numel() * t.element_size()
    return n


@torch.no_grad()
def run_context(c: ModelConfig, wm: WideMoeForCausalLM, hf, ctx: int, steps: int) -> dict:  # noqa: ANN001
    ids = torch.randint(2, c.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(ctx))
    wc, hc = wm.new_cache(), None
    t0 = time.perf_counter()
    for s in range(0, ctx, CHUNK):
        w_logits = wm(ids[:, s:s + CHUNK], cache=wc, logits_to_keep=1).logits
    t_w_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in range(0, ctx, CHUNK):
        r = hf(input_ids=ids[:, s:s + CHUNK], cache=hc, use_cache=True, logits_to_keep=1)
        hc = r.cache
    t_h_prefill = time.perf_counter() - t0
    h_logits = r.logits
    diffs = [(w_logits[:, -1] - h_logits[:, -1]).abs().max().item()]
    tok = w_logits[:, -1].argmax(-1, keepdim=True)
    tw, th = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        w_logits = wm(tok, cache=wc).logits
        tw.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        h_logits = hf(input_ids=tok, cache=hc, use_cache=True).logits
        th.append(time.perf_counter() - t0)
        diffs.append((w_logits[:, -1] - h_logits[:, -1]).abs().max().item())
        tok = w_logits[:, -1].argmax(-1, keepdim=True)
    S = ctx + steps
    w_tps, h_tps = 1 / statistics.median(tw), 1 / statistics.median(th)
    return {
        "context": ctx, "decode_steps": steps,
        "widemoe_tokens_per_s": w_tps, "transformers_tokens_per_s": h_tps, "speedup": w_tps / h_tps,
        "widemoe_prefill_s": t_w_prefill, "transformers_prefill_s": t_h_prefill,
        "widemoe_kv_bytes_per_token": wc.nbytes() / S, "transformers_kv_bytes_per_token": hf_kv_bytes(hc) / S,
        "formula_kv_bytes_per_token": kv_bytes(c, S, 1, "fp32") / S,
        "widemoe_kv_equals_formula": wc.nbytes() == kv_bytes(c, S, 1, "fp32"),
        "max_logit_diff": max(diffs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="1024,4096,16384")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave the default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    c = get_preset("v4-tiny")
    wm = build_model(c, seed=0).eval()
    randomise(wm)
    hf = hf_model(c, wm)
    rows = []
    print(f"{'context':>8} {'widemoe tok/s':>14} {'HF tok/s':>9} {'speedup':>8} {'KV B/tok wm':>12} "
          f"{'KV B/tok HF':>12} {'formula':>9} {'max |dlogit|':>12}")
    for ctx in (int(x) for x in a.contexts.split(",")):
        r = run_context(c, wm, hf, ctx, a.steps)
        rows.append(r)
        print(f"{ctx:>8} {r['widemoe_tokens_per_s']:>14.1f} {r['transformers_tokens_per_s']:>9.1f} "
              f"{r['speedup']:>7.2f}x {r['widemoe_kv_bytes_per_token']:>12.1f} "
              f"{r['transformers_kv_bytes_per_token']:>12.1f} {r['formula_kv_bytes_per_token']:>9.1f} "
              f"{r['max_logit_diff']:>12.2e}", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"preset": "v4-tiny", "torch": torch.__version__,
                                   "threads": torch.get_num_threads(), "machine": platform.machine(),
                                   "results": rows}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
