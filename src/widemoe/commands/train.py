"""`widemoe train`: train a model on the embedded prose/code/math corpus (see widemoe.train.loop)."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from widemoe.train.config import BALANCE_MODES, TrainConfig

    d = TrainConfig()
    p = subparsers.add_parser("train", help="train a model on the embedded corpus", description=__doc__)
    p.add_argument("--run-dir", default=d.run_dir, help="where checkpoints, metrics and the report go")
    p.add_argument(
        "--preset",
        default=d.preset,
        help="model preset (default: %(default)s), or any model spec: config file, HF model or run "
        "directory (its architecture; training starts from scratch)",
    )
    p.add_argument("--config", dest="config_file", default=None, help="widemoe model config (JSON or TOML)")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="vocabulary of the tokenizer trained on the corpus and of the model (default: the model's "
        "vocab_size, from --config or the preset); given, it replaces the model's (a note says so)",
    )
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="sequences per optimizer micro-step, the GLOBAL batch: under torchrun each of W processes "
        "takes batch-size / W of them (default: %(default)s)",
    )
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="stop after this step; the schedule still spans --steps (continue with --resume)",
    )
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument(
        "--warmup-steps", type=int, default=None, help="linear warmup steps (default: a tenth of --steps)"
    )
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument(
        "--grad-clip",
        type=float,
        default=d.grad_clip,
        help="clip the global gradient norm to this (default: %(default)s); 0 turns clipping off",
    )
    p.add_argument(
        "--bf16", action="store_true", help="bf16 autocast (about 2.5x faster matmuls on AVX512-BF16)"
    )
    p.add_argument("--balance", choices=BALANCE_MODES, default=d.balance)
    p.add_argument("--bias-update-speed", type=float, default=None)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-batches", type=int, default=d.eval_batches, help="held-out batches per domain")
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--keep-last", type=int, default=d.keep_last)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--ep",
        type=int,
        default=d.ep,
        help="expert-parallel degree under torchrun: each expert lives on one of EP ranks, tokens travel "
        "to it by all-to-all (must divide the number of processes and n_routed_experts; default 1)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the newest committed checkpoint")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="start over in a used --run-dir (deletes its checkpoints and metrics)",
    )
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress display (default: a live bar on a terminal, else a plain line every "
        "$WIDEMOE_PROGRESS_INTERVAL seconds, 10 when unset)",
    )
    p.set_defaults(func=run)


def _run_context(tc):  # noqa: ANN001, ANN202 - a TrainConfig -> a widemoe.train.parallel.RunContext
    from widemoe.distributed.dims import ParallelDims
    from widemoe.distributed.env import init_distributed
    from widemoe.distributed.parallelize import Layout
    from widemoe.train.parallel import RunContext

    env = init_distributed()
    dims = ParallelDims(env.world_size, tc.ep)  # --ep must divide the number of processes
    return RunContext(env, Layout.build(dims, env.device.type) if env.distributed else None)


def _shutdown(ctx) -> None:  # noqa: ANN001 - a RunContext
    if ctx.distributed:
        from widemoe.distributed.env import shutdown

        shutdown()


def run(args: argparse.Namespace) -> int:
    """Train; a bad option (`TrainConfigError`) or a model that cannot fit propagates to `widemoe.cli`,
    which prints it as one `error:` line."""
    from widemoe.commands.errors import EXIT_STOPPED
    from widemoe.runtime import configure_cpu_runtime
    from widemoe.train.config import TrainConfig, TrainingStopped
    from widemoe.train.run import run_training

    fields = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    tc = TrainConfig(**fields)  # every option checked before anything runs
    ctx = _run_context(tc)  # under torchrun: joins the process group (gloo on CPU, nccl on GPUs)
    configure_cpu_runtime()
    try:
        result = run_training(tc, ctx=ctx)
    except TrainingStopped as e:  # every rank stops at the same step (the loss and norm are global)
        print(f"training stopped: {e}", file=sys.stderr)
        _shutdown(ctx)
        return EXIT_STOPPED
    # On any other error no barrier: the peers may be inside a collective; this process exits non-zero
    # and torchrun ends the others.
    _shutdown(ctx)
    if not ctx.is_main:
        return 0
    ev = result["final_eval"] or {}
    print(
        f"trained {result['steps']} steps into {result['run_dir']}; held-out loss per domain: "
        + ", ".join(f"{k} {v:.3f}" for k, v in ev.get("heldout_loss", {}).items())
    )
    return 0
