"""The training loop: AdamW, warmup + cosine, clipping, accumulation, bf16 autocast, balancing, eval, saves.

One optimizer step = `grad_accum` micro-batches; the aux-loss-free bias update runs once per optimizer
step from the counts of all its micro-batches (DeepSeek-V3 §2.1.2; counts from eval forwards never
enter, the MoE blocks count only in training mode). Every `log_every` steps one JSON line goes to
`RUN/metrics.jsonl`; every `eval_every` steps the held-out loss per domain and the held-out MaxVio
(counts accumulated over the whole held-out set) are logged too. Checkpoints are crash-safe
(`widemoe.train.checkpoint`) and resuming continues exactly: the same losses and weights as a run
that never stopped (tests/test_train.py).

A non-finite loss or gradient norm stops training with a message and a checkpoint named after the
last good step, so nothing before it is lost.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from widemoe.config import ModelConfig, get_preset
from widemoe.model.balance import LoadTracker, dead_experts, max_vio
from widemoe.model.transformer import IGNORE_INDEX, WideMoeForCausalLM, build_model
from widemoe.train import checkpoint as ckpt
from widemoe.train.bias_update import update_expert_bias
from widemoe.train.metrics import MetricsWriter, measure_matmul_peak, train_flops_per_token

BALANCE_MODES = ("aux-free", "seq-aux", "switch-aux", "none")
# Coefficients used by the loss-based modes when the model config leaves them at 0.
DEFAULT_SEQ_AUX = 1e-3
DEFAULT_SWITCH_AUX = 1e-2


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (non-finite loss); the message says where the last good state is."""


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    preset: str = "tiny"
    config_file: str | None = None  # a widemoe config (JSON/TOML); overrides `preset`
    model_overrides: dict[str, Any] = field(default_factory=dict)
    vocab_size: int = 4096
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    steps: int = 300  # length of the schedule
    stop_at: int | None = None  # stop after this step (the schedule still spans `steps`); resume later
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    bf16: bool = False
    balance: str = "aux-free"
    bias_update_speed: float | None = None  # None: the model config's value
    eval_every: int = 50
    eval_batches: int = 4  # per domain
    log_every: int = 1
    save_every: int = 100
    keep_last: int = 2
    seed: int = 0
    resume: bool = False
    progress: bool = True
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.balance not in BALANCE_MODES:
            raise ValueError(f"balance={self.balance!r} must be one of {BALANCE_MODES}")
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_every", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.warmup_steps < 0 or self.lr <= 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0 and lr={self.lr} > 0")
        self.betas = tuple(self.betas)


def model_config_for(tc: TrainConfig) -> ModelConfig:
    base = ModelConfig.from_file(tc.config_file) if tc.config_file else get_preset(tc.preset)
    changes: dict[str, Any] = {"vocab_size": tc.vocab_size, **tc.model_overrides}
    if tc.balance == "aux-free":
        changes.update(aux_loss_alpha=0.0, router_aux_loss_coef=0.0)
        if tc.bias_update_speed is not None:
            changes["bias_update_speed"] = tc.bias_update_speed
    elif tc.balance == "seq-aux":
        changes.update(aux_loss_alpha=base.aux_loss_alpha or DEFAULT_SEQ_AUX, router_aux_loss_coef=0.0)
    elif tc.balance == "switch-aux":
        changes.update(
            router_aux_loss_coef=base.router_aux_loss_coef or DEFAULT_SWITCH_AUX, aux_loss_alpha=0.0
        )
    else:
        changes.update(aux_loss_alpha=0.0, router_aux_loss_coef=0.0)
    return base.replace(**changes)


def lr_lambda(tc: TrainConfig):
    def f(step: int) -> float:
        if step < tc.warmup_steps:
            return (step + 1) / (tc.warmup_steps + 1)
        span = max(1, tc.steps - tc.warmup_steps)
        progress = min(1.0, (step - tc.warmup_steps) / span)
        return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused AdamW is ~10x faster than the for-each version on CPU (shared/reference/cpu-performance.md).
    return torch.optim.AdamW(groups, lr=tc.lr, betas=tc.betas, fused=True)


def per_domain_loss(
    token_losses_BT: torch.Tensor, labels_BT: torch.Tensor, domains_BT: torch.Tensor, n_domains: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token losses and token counts per domain (for per-domain means across batches), from the
    model output's `token_losses`."""
    tok = token_losses_BT.detach().float().flatten()
    dom = domains_BT.flatten()
    valid = labels_BT.flatten() != IGNORE_INDEX
    sums = torch.zeros(n_domains).index_add_(0, dom[valid], tok[valid])
    counts = torch.zeros(n_domains).index_add_(0, dom[valid], torch.ones(int(valid.sum())))
    return sums, counts


class Trainer:
    def __init__(self, tc: TrainConfig, data: Any, tokenizer: Any = None):
        """`data` has `train` (a resumable PackedBatches), `heldout` ({domain: [batches]}) and `domains`."""
        self.tc = tc
        self.data = data
        self.tokenizer = tokenizer
        self.run_dir = Path(tc.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(tc.seed)
        random.seed(tc.seed)
        self.config = model_config_for(tc)
        self.model: WideMoeForCausalLM = build_model(self.config, seed=tc.seed)
        self.optimizer = build_optimizer(self.model, tc)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(tc))
        self.step = 0
        self.tokens_seen = 0
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl")
        self.flops_per_token = train_flops_per_token(self.config, tc.seq_len)
        self.peak_flops: float | None = None

    # --- state ---------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": json.dumps(self.data.train.state_dict()),
            "torch_rng": torch.get_rng_state(),
            "python_rng": json.dumps(random.getstate()),
            "train_config": json.dumps(asdict(self.tc)),
        }

    def save(self) -> Path:
        from widemoe.hf import save_pretrained

        def write_model(d: Path) -> None:
            save_pretrained(self.model, d)
            if self.tokenizer is not None:
                self.tokenizer.save(d)  # tokenizer.json + tokenizer_config.json with the special tokens

        return ckpt.save_checkpoint(
            self.run_dir, self.step, write_model, self.state(), keep_last=self.tc.keep_last
        )

    def try_resume(self) -> Path | None:
        latest = ckpt.latest_checkpoint(self.run_dir)
        if latest is None:
            return None
        from widemoe.hf import load_into

        load_into(self.model, latest, self.model.config)  # strict, straight into the live parameters
        st = ckpt.load_training_state(latest)
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.data.train.load_state_dict(json.loads(st["data"]))
        torch.set_rng_state(st["torch_rng"])
        state = json.loads(st["python_rng"])
        random.setstate((state[0], tuple(state[1]), state[2]))
        self.step, self.tokens_seen = int(st["step"]), int(st["tokens_seen"])
        return latest

    # --- loop ----------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        tc, model = self.tc, self.model
        model.train()
        n_dom = len(self.data.domains)
        dom_sums, dom_counts = torch.zeros(n_dom), torch.zeros(n_dom)
        logs: dict[str, float] = {}
        t0 = time.perf_counter()
        for _ in range(tc.grad_accum):
            x, y, d = next(self.data.train)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=tc.bf16):
                out = model(x, labels=y)
            (out.loss / tc.grad_accum).backward()
            s, c = per_domain_loss(out.token_losses, y, d, n_dom)
            dom_sums += s
            dom_counts += c
            for key, val in (("loss", out.loss), ("lm_loss", out.lm_loss), ("mtp_loss", out.mtp_loss)):
                if val is not None:
                    logs[key] = logs.get(key, 0.0) + float(val.detach()) / tc.grad_accum
            for name, val in out.aux_losses.items():
                logs[f"aux/{name}"] = logs.get(f"aux/{name}", 0.0) + float(val.detach()) / tc.grad_accum
            self.tokens_seen += x.numel()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
        if not (math.isfinite(logs["loss"]) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingStopped(
                f"non-finite {'loss' if not math.isfinite(logs['loss']) else 'gradient norm'} "
                f"at step {self.step + 1} (loss={logs['loss']}, grad_norm={grad_norm})"
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # Counts of every micro-batch of this step drive the bias update (once per optimizer step).
        counts = {m.layer_idx: m.tokens_per_expert.clone() for m in model.moe_blocks()}
        if tc.balance == "aux-free":
            update_expert_bias(model, tc.bias_update_speed)
        else:
            for m in model.moe_blocks():
                m.tokens_per_expert.zero_()
        dt = time.perf_counter() - t0
        self.step += 1
        tokens = tc.grad_accum * tc.batch_size * tc.seq_len
        biases = [
            m.gate.e_score_correction_bias
            for m in model.moe_blocks()
            if m.gate.e_score_correction_bias is not None
        ]
        rec: dict[str, Any] = {
            "kind": "train",
            "step": self.step,
            "tokens": self.tokens_seen,
            "lr": self.scheduler.get_last_lr()[0],
            **logs,
            "grad_norm": grad_norm,
            "step_time": dt,
            "tokens_per_s": tokens / dt,
            "loss_by_domain": {
                dn: float(dom_sums[i] / dom_counts[i])
                for i, dn in enumerate(self.data.domains)
                if dom_counts[i] > 0
            },
            "max_vio": {str(k): max_vio(v) for k, v in counts.items()},
            "dead_experts": {str(k): dead_experts(v) for k, v in counts.items()},
        }
        rec["max_vio_mean"] = sum(rec["max_vio"].values()) / max(1, len(rec["max_vio"]))
        if biases:
            rec["bias_min"] = min(float(b.min()) for b in biases)
            rec["bias_max"] = max(float(b.max()) for b in biases)
        if self.peak_flops:
            rec["mfu"] = self.flops_per_token * tokens / dt / self.peak_flops
        return rec

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Held-out loss per domain, global MaxVio over the held-out set, domain x expert counts."""
        model = self.model
        model.eval()
        tracker = LoadTracker()
        losses: dict[str, float] = {}
        domain_expert: dict[str, dict[str, list[float]]] = {}
        for domain, batches in self.data.heldout.items():
            total, count = 0.0, 0
            per_layer: dict[int, torch.Tensor] = {}
            for x, y, _ in batches:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.tc.bf16):
                    out = model(x, labels=y)
                n = int((y != IGNORE_INDEX).sum())
                total += float(out.lm_loss) * n
                count += n
                tracker.update(out.routing[: len(self.config.moe_layer_indices)])
                for info in out.routing[: len(self.config.moe_layer_indices)]:
                    per_layer[info.layer_idx] = per_layer.get(info.layer_idx, 0) + info.counts
            losses[domain] = total / max(1, count)
            domain_expert[domain] = {str(k): v.tolist() for k, v in per_layer.items()}
        mv = tracker.max_vio()
        return {
            "kind": "eval",
            "step": self.step,
            "tokens": self.tokens_seen,
            "heldout_loss": losses,
            "heldout_max_vio": {str(k): v for k, v in mv.items()},
            "heldout_max_vio_mean": sum(mv.values()) / max(1, len(mv)),
            "heldout_dead_experts": {str(k): v for k, v in tracker.dead_experts().items()},
            "domain_expert_counts": domain_expert,
        }

    def fit(self) -> dict[str, Any]:
        tc = self.tc
        resumed = self.try_resume() if tc.resume else None
        if self.peak_flops is None:
            self.peak_flops = measure_matmul_peak(torch.bfloat16 if tc.bf16 else torch.float32)
        if resumed is None:
            self.metrics.write(
                {
                    "kind": "start",
                    "config": self.config.to_dict(),
                    "train": asdict(tc),
                    "params": self.model.num_parameters(),
                    "peak_flops": self.peak_flops,
                    "flops_per_token": self.flops_per_token,
                }
            )
        else:
            self.metrics.write({"kind": "resume", "step": self.step, "from": str(resumed)})
        last_eval: dict[str, Any] | None = None
        with _progress(tc.progress, tc.steps, self.step) as bar:
            end = tc.steps if tc.stop_at is None else min(tc.steps, tc.stop_at)
            while self.step < end:
                try:
                    rec = self.train_step()
                except TrainingStopped as e:
                    path = self.save()
                    self.metrics.write({"kind": "stopped", "step": self.step, "reason": str(e)})
                    raise TrainingStopped(
                        f"{e}; the last good state (step {self.step}) is saved in {path}"
                    ) from None
                if self.step % tc.log_every == 0 or self.step == end:
                    self.metrics.write(rec)
                if self.step % tc.eval_every == 0 or self.step == end:
                    last_eval = self.evaluate()
                    self.metrics.write(last_eval)
                if self.step % tc.save_every == 0 or self.step == end:
                    self.save()
                bar(self.step, rec)
        return {"final_eval": last_eval, "steps": self.step, "run_dir": str(self.run_dir)}


class _progress:
    """A rich progress bar with ETA, live loss and MaxVio; a no-op when disabled."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.enabled, self.total, self.start = enabled, total, start

    def __enter__(self):
        if not self.enabled:
            return lambda step, rec: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._p = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        )
        self._p.__enter__()
        self._task = self._p.add_task("train", total=self.total, completed=self.start, info="")

        def update(step: int, rec: dict[str, Any]) -> None:
            info = (
                f"loss {rec['loss']:.3f}  MaxVio {rec['max_vio_mean']:.2f}  {rec['tokens_per_s']:.0f} tok/s"
            )
            self._p.update(self._task, completed=step, info=info)

        return update

    def __exit__(self, *exc):
        if self.enabled:
            self._p.__exit__(*exc)
        return False


__all__ = ["BALANCE_MODES", "TrainConfig", "Trainer", "TrainingStopped", "lr_lambda", "model_config_for"]
