"""Training-step speed of widemoe vs transformers' DeepseekV3ForCausalLM: same config, weights and batch.

Both models are built from the `tiny` preset (MTP off, because transformers does not train MTP),
with identical weights (widemoe saves a Hugging Face directory, transformers loads it), the same
batch, the same fused AdamW, in fp32 and with bf16 autocast. Steps are timed round-robin (A B A B ...)
so both see the same machine state; the median step time gives tokens/s, and MFU is model FLOPs
(widemoe.cost: 6·N_active plus attention) over the matmul peak measured in the same run.

    .venv/bin/python benchmarks/train_step.py [--steps 6] [--batch 16] [--seq 256] [--quick]

Prints a table and writes benchmarks/results/train_step.json. Target: widemoe >= 1.5x transformers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from widemoe.hf import save_pretrained
from widemoe.model.causal_lm import build_model
from widemoe.presets import get_preset
from widemoe.runtime import configure_cpu_runtime
from widemoe.train.metrics import measure_matmul_peak, train_flops_per_token


def make_hf(path: Path, impl: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation=impl)
    model.train()
    return model


def step_fn(model, optimizer, x, y, bf16: bool, hf: bool):
    def step() -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if hf:
                # transformers shifts labels itself: labels=x trains position i on x[i+1] = y[i].
                loss = model(input_ids=x, labels=x).loss
            else:
                loss = model(x, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per implementation and dtype")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="2 timed steps, fp32 and bf16")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step.json"))
    args = ap.parse_args()
    configure_cpu_runtime(2)
    steps = 2 if args.quick else args.steps

    cfg = get_preset("tiny", num_nextn_predict_layers=0)
    torch.manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    tokens = x.numel()
    flops = train_flops_per_token(cfg, args.seq) * tokens
    results = {"config": "tiny (MTP off)", "batch": args.batch, "seq": args.seq, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        wm = build_model(cfg, seed=0)
        save_pretrained(wm, tmp)
        for dtype_name, bf16 in (("fp32", False), ("bf16", True)):
            peak = measure_matmul_peak(torch.bfloat16 if bf16 else torch.float32)
            impls = {"widemoe": (build_model(cfg, seed=0), False)}
            for impl in ("grouped_mm", "eager"):
                impls[f"transformers/{impl}"] = (make_hf(Path(tmp), impl), True)
            steppers = {}
            for name, (model, hf) in impls.items():
                model.train()
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
                steppers[name] = step_fn(model, opt, x, y, bf16, hf)
                steppers[name]()  # warm-up (allocations, first optimizer step)
            times = {name: [] for name in steppers}
            for _ in range(steps):
                for name, fn in steppers.items():
                    times[name].append(fn())
            best_peer = min(statistics.median(times[n]) for n in times if n.startswith("transformers"))
            for name, ts in times.items():
                med = statistics.median(ts)
                results["rows"].append(
                    {
                        "dtype": dtype_name,
                        "impl": name,
                        "step_s": med,
                        "tokens_per_s": tokens / med,
                        "mfu": flops / med / peak,
                        "speedup_vs_best_transformers": best_peer / med,
                    }
                )
                print(
                    f"{dtype_name:5s} {name:24s} {med * 1e3:9.1f} ms/step  {tokens / med:9.0f} tok/s  "
                    f"MFU {flops / med / peak:6.1%}  x{best_peer / med:5.2f} vs fastest transformers",
                    flush=True,
                )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
