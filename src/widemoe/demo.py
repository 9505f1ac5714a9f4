"""`make demo`: train a DeepSeek-style fine-grained MoE from scratch on prose, code and math, then report.

No downloads: the corpus is embedded (Austen's novels, the running Python's standard library, seeded
math problems; see widemoe.data). The `tiny` preset is DeepSeek-V3 in miniature: MLA attention,
32 routed experts with top-6 plus one shared expert, a sigmoid router balanced by the aux-loss-free
bias, one MTP module. It trains for a fixed token budget (0.74M tokens) sized to end within about
6 minutes on 2 cores, then writes `runs/demo/`: the checkpoints (Hugging Face directories with the
tokenizer), `metrics.jsonl`, `summary.json` (unigram baselines and sample generations), and
`report/report.html` with its figures; a one-screen summary is printed at the end.

    python -m widemoe.demo [--run-dir runs/demo] [--steps N] [--balance aux-free|none|...] [--fresh]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from widemoe import data as wdata
from widemoe.generate import GenerationConfig, generate
from widemoe.hf.resolve import latest_checkpoint
from widemoe.runtime import configure_cpu_runtime
from widemoe.train.build import prepare_train_data
from widemoe.train.config import BALANCE_MODES, TrainConfig
from widemoe.train.loop import Trainer

# One prompt per domain for the sample generations.
PROMPTS = {
    "prose": "It was a truth universally acknowledged that",
    "code": "def read_config(path):\n    ",
    "math": "Q: What is 17 + 25?\nA:",
}


def demo_config(run_dir: str, steps: int, balance: str, seed: int) -> TrainConfig:
    # 16 x 256 = 4096 tokens per step; 180 steps = 0.74M tokens, about 4.5 minutes of training on 2 cores.
    # fp32: on the 2-core CPU bf16 autocast measured within 10% of fp32 for this size (the expert matmuls
    # are too small to gain) and fp32 keeps resume bit-exact. The bias step u = 0.01 (paper: 1e-3 over
    # 14.3T tokens): with sign updates the bias moves at most u per step, and a short run needs a larger
    # step to reach balance.
    return TrainConfig(
        run_dir=run_dir,
        preset="tiny",
        vocab_size=4096,
        seq_len=256,
        batch_size=16,
        steps=steps,
        lr=3e-3,
        warmup_steps=max(1, steps // 10),
        eval_every=max(1, steps // 4),
        eval_batches=2,
        save_every=max(1, steps // 2),
        balance=balance,
        bias_update_speed=0.01 if balance == "aux-free" else None,  # the bias moves in aux-free only
        bf16=False,
        seed=seed,
    )


def sample_generations(trainer: Trainer, tokenizer: wdata.Tokenizer, max_new_tokens: int = 48) -> list[dict]:
    out = []
    for domain, prompt in PROMPTS.items():
        ids = tokenizer.encode(prompt)
        new = generate(
            trainer.model,
            [ids],
            GenerationConfig(
                max_new_tokens=max_new_tokens,
                temperature=0.8,
                top_p=0.9,
                seed=0,
                eos_token_id=tokenizer.eos_id,
            ),
        )
        out.append({"domain": domain, "prompt": prompt, "completion": tokenizer.decode(new[0])})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m widemoe.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--steps", type=int, default=180)
    parser.add_argument("--balance", choices=BALANCE_MODES, default="aux-free")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="delete the run directory first")
    args = parser.parse_args(argv)

    configure_cpu_runtime()
    run_dir = Path(args.run_dir)
    if args.fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    t_start = time.perf_counter()
    tc = demo_config(str(run_dir), args.steps, args.balance, args.seed)
    # An interrupted demo continues where it stopped (one that stopped before its first save starts
    # over); --fresh starts over.
    tc.resume = latest_checkpoint(run_dir) is not None
    tc.fresh = not tc.resume

    print("preparing data (corpus, tokenizer, token ids; cached after the first run) ...")
    td = prepare_train_data(tc)
    sizes = {d: td.tokens.num_tokens("train", d) for d in td.domains}
    print(
        "  train tokens: "
        + ", ".join(f"{d} {n / 1e6:.2f}M" for d, n in sizes.items())
        + f"  (vocab {td.tokenizer.vocab_size}, {time.perf_counter() - t_start:.1f} s)"
    )

    trainer = Trainer(tc, td, tokenizer=td.tokenizer)
    cfg = trainer.config
    print(
        f"training the tiny preset: {trainer.model.num_parameters() / 1e6:.1f}M parameters, "
        f"{cfg.n_routed_experts} routed experts (top-{cfg.num_experts_per_tok}) + "
        f"{cfg.n_shared_experts} shared, "
        f"{args.steps} steps x {tc.batch_size * tc.seq_len} tokens, balance={tc.balance}"
    )
    trainer.fit()

    summary = {
        "unigram_loss": wdata.unigram_losses(td.tokens),
        "samples": sample_generations(trainer, td.tokenizer),
        "wall_time_s": time.perf_counter() - t_start,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))

    from widemoe.report.html import build_report, summary_text

    paths = build_report(run_dir)
    print(summary_text(run_dir))
    print(f"\nreport: {paths.html if hasattr(paths, 'html') else paths}")
    print(f'continue text:  .venv/bin/widemoe generate {run_dir} "It was a truth"')
    return 0


if __name__ == "__main__":
    torch.set_num_threads(2)
    raise SystemExit(main())
