"""Greedy decoding benchmark: `widemoe.generate` vs transformers' `generate` on the same HF directory.

Not a test. The model is the `tiny` preset (DeepSeek-V3 in miniature: MLA, fine-grained routed experts,
a shared expert, group-limited sigmoid routing) with seeded random weights, saved as a Hugging Face
directory with `widemoe.hf.save_pretrained` (speed does not depend on trained weights), or a given
checkpoint directory (`--checkpoint DIR`). The same directory is loaded into transformers
(`AutoModelForCausalLM`, DeepseekV3, its default experts backend, recorded) and into widemoe
(`widemoe.hf.load_pretrained`), both in `--dtype`.

Per (dtype, batch): the same seeded prompts (equal lengths, so neither side pads) are continued greedily
for `--new-tokens` tokens with EOS disabled, and for 1 token (prefill plus one step), by each
implementation in turn, round-robin (widemoe, transformers, widemoe, ...) so the ratio is measured at the
same moment on a shared, noisy machine (shared/reference/cpu-performance-detail.md §1); medians of
`--reps` repetitions after a warm-up. Reported: tokens/s of the whole call (new tokens of all rows / time),
the decode step time ((t(N) - t(1)) / (N - 1), the KV-cached T=1 forward plus sampling) and both ratios
(of medians, and of the fastest repetitions: other processes' load only adds time), and whether the two
produced the same greedy tokens (else the first mismatching step per row: random weights give near-tied
logits, where bf16 rounding in a different order may pick another token).

Usage: python benchmarks/decode.py [--dtype fp32,bf16] [--batch 1,8] [--new-tokens 64] [--reps 5]
       [--prompt-len 32] [--threads 1] [--checkpoint DIR] [--out PATH]
Writes benchmarks/results/decode.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from widemoe.generate import generate
from widemoe.hf import load_pretrained
from widemoe.hf.saver import save_pretrained
from widemoe.model.causal_lm import build_model
from widemoe.presets import get_preset
from widemoe.runtime import configure_cpu_runtime

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_layer import code_version, time_round_robin  # noqa: E402  (benchmarks/ is not a package)

RESULTS = Path(__file__).resolve().parent / "results" / "decode.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def save_tiny(path: Path, seed: int) -> Path:
    """The `tiny` preset with seeded random weights, written as an HF directory. The selection bias is
    randomised too (it is zero at init), so group-limited routing is exercised as in a trained model."""
    model = build_model(get_preset("tiny"), seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.moe_blocks():
            bias = m.gate.e_score_correction_bias
            if bias is not None:
                bias.copy_(torch.randn(bias.shape, generator=g) * 0.02)
    return save_pretrained(model, path)


def load_both(path: Path, dtype: torch.dtype):  # noqa: ANN201 - transformers type, imported lazily
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()  # the MTP layer's weights are "unexpected" to transformers (it has no MTP)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    wm = load_pretrained(path, dtype=dtype).eval()
    return wm, hf


def hf_experts_backend(hf) -> str:  # noqa: ANN001
    return str(getattr(hf.config, "_experts_implementation", None) or "eager")


def prompts_for(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=g)


def make_runs(wm, hf, ids: torch.Tensor, n: int) -> dict[str, Callable[[], list[list[int]]]]:  # noqa: ANN001
    prompts = ids.tolist()
    mask = torch.ones_like(ids)

    def run_wm() -> list[list[int]]:
        return generate(wm, prompts, max_new_tokens=n, eos_token_id=None)

    @torch.no_grad()
    def run_hf() -> list[list[int]]:
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[:, ids.shape[1]:].tolist()

    return {"widemoe": run_wm, "transformers": run_hf}


def first_mismatch(a: list[list[int]], b: list[list[int]]) -> list[int | None]:
    """Per row, the first step where the two continuations differ (None: identical)."""
    return [next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), None if len(ra) == len(rb)
                 else min(len(ra), len(rb))) for ra, rb in zip(a, b)]


def bench(wm, hf, batch: int, args: argparse.Namespace, vocab: int) -> dict:  # noqa: ANN001
    ids = prompts_for(batch, args.prompt_len, vocab, seed=batch)
    full, one = make_runs(wm, hf, ids, args.new_tokens), make_runs(wm, hf, ids, 1)
    tokens = {name: f() for name, f in full.items()}
    mism = first_mismatch(tokens["widemoe"], tokens["transformers"])
    fns = {f"{name}/{n}": f for n, runs in (("N", full), ("1", one)) for name, f in runs.items()}
    times = time_round_robin(fns, args.reps, warmup=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    res: dict = {"batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    for name in full:
        res[name] = {"tokens_per_s": batch * args.new_tokens / med[f"{name}/N"],
                     "call_ms": 1e3 * med[f"{name}/N"], "prefill_plus_one_ms": 1e3 * med[f"{name}/1"],
                     "decode_step_ms": 1e3 * (med[f"{name}/N"] - med[f"{name}/1"]) / (args.new_tokens - 1),
                     "call_spread": [min(times[f"{name}/N"]) / med[f"{name}/N"],
                                     max(times[f"{name}/N"]) / med[f"{name}/N"]]}
    res["speedup_call"] = res["widemoe"]["tokens_per_s"] / res["transformers"]["tokens_per_s"]
    res["speedup_decode_step"] = res["transformers"]["decode_step_ms"] / res["widemoe"]["decode_step_ms"]
    # the fastest repetitions: the closest to a quiet machine (load from other processes only adds time)
    fast = {k: min(v) for k, v in times.items()}
    res["speedup_call_fastest"] = fast["transformers/N"] / fast["widemoe/N"]
    res["speedup_decode_step_fastest"] = ((fast["transformers/N"] - fast["transformers/1"])
                                          / (fast["widemoe/N"] - fast["widemoe/1"]))
    res["same_tokens"] = all(m is None for m in mism)
    res["first_mismatch_step_per_row"] = mism
    return res


def print_row(r: dict) -> None:
    w, h = r["widemoe"], r["transformers"]
    same = "yes" if r["same_tokens"] else f"no (first mismatch per row {r['first_mismatch_step_per_row']})"
    print(f"{r['dtype']:<5} B={r['batch']:<3} widemoe {w['tokens_per_s']:7.1f} tok/s (step "
          f"{w['decode_step_ms']:6.2f} ms)  transformers[{r['transformers_experts']}] "
          f"{h['tokens_per_s']:7.1f} tok/s (step {h['decode_step_ms']:6.2f} ms)  "
          f"call {r['speedup_call']:.2f}x  step "
          f"{r['speedup_decode_step']:.2f}x (fastest reps {r['speedup_decode_step_fastest']:.2f}x)  "
          f"same tokens: {same}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=None, help="HF directory to time (default: tiny)")
    ap.add_argument("--dtype", default="fp32,bf16", help="comma-separated subset of fp32,bf16")
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5, help="timed round-robin repetitions (median)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads for both (default 1: on the shared 2-core machine, "
                         "2-thread OpenMP ops wait at barriers for descheduled partners: "
                         "both sides 5-10x slower)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        ap.error(f"--dtype: unknown {bad}; choose from {sorted(DTYPES)}")
    if args.new_tokens < 2:
        ap.error(f"--new-tokens={args.new_tokens} must be >= 2 (the decode step is t(N) - t(1))")
    batches = [int(b) for b in args.batch.split(",")]

    version = code_version()  # now: src/ may change while the benchmark runs, the imported code does not
    runtime = configure_cpu_runtime(num_threads=args.threads)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {runtime}, reps={args.reps}",
          flush=True)
    rows, t_start = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or save_tiny(Path(tmp) / "tiny", args.seed)
        for dt in dtypes:
            wm, hf = load_both(path, DTYPES[dt])
            backend = hf_experts_backend(hf)
            for b in batches:
                r = bench(wm, hf, b, args, wm.config.vocab_size)
                r.update(dtype=dt, transformers_experts=backend)
                rows.append(r)
                print_row(r)
    out = {"commit": version, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "model": str(args.checkpoint) if args.checkpoint else f"tiny preset, random seed {args.seed}",
           "torch": torch.__version__, "transformers": transformers.__version__, "runtime": runtime,
           "machine": platform.machine(), "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg(),
           "reps": args.reps, "seconds": time.perf_counter() - t_start,
           "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
