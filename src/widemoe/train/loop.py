"""The training loop: `Trainer` builds a run's parts (`widemoe.train.build`), then steps, logs, evaluates
and checkpoints until the schedule (or `stop_at`) ends.

AdamW, warmup + cosine, gradient clipping, accumulation, bf16 autocast on the run's device, balancing
(`widemoe.train.step`), held-out eval (`widemoe.train.eval`), saves through a `Checkpointer`
(`widemoe.train.checkpoint`). Every `log_every` steps one JSON line goes to `RUN/metrics.jsonl`; every
`eval_every` steps the held-out loss per domain and the held-out MaxVio are logged too. Resuming
continues exactly: the same losses and weights as a run that never stopped (tests/test_train.py).

A non-finite loss or gradient norm stops training with a message and a checkpoint named after the
last good step, so nothing before it is lost.

`fit()` holds the run directory's lock and refuses a directory holding another run unless asked to
resume or start over (`widemoe.train.run_dir`). Resuming takes the newest checkpoint that loads: damaged
newer ones are named in a notice and set aside (`step-XXXXXXXX.damaged`); changed hyperparameters are
stated or refused (`widemoe.train.resume`); "resumed from step N of RUN" is printed to stderr.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from widemoe.train.build import ParallelizeFn, TrainData, build_parts, parallelize
from widemoe.train.checkpoint import CheckpointDamaged, Checkpointer
from widemoe.train.config import TrainConfig, TrainingStopped
from widemoe.train.dcp import checkpointer_for
from widemoe.train.eval import evaluate_heldout
from widemoe.train.metrics import MetricsWriter, NullMetrics, measure_matmul_peak, train_flops_per_token
from widemoe.train.parallel import RunContext
from widemoe.train.progress import TrainProgress
from widemoe.train.resume import apply_changes, check_resume_steps, config_changes, describe_changes
from widemoe.train.run_dir import Notify, RunDirError, RunLock, notice, prepare_run_dir
from widemoe.train.step import accumulate_gradients, close_balancing_window, non_finite, routing_fields


class Trainer:
    """One training run: its parts (model, optimizer, schedule), data, step counters, metrics and
    checkpoints. `fit()` runs the loop; `train_step()` and `evaluate()` are one step and one eval."""

    def __init__(
        self,
        tc: TrainConfig,
        data: TrainData | Any,
        tokenizer: Any = None,
        *,
        device: str | torch.device = "cpu",
        mesh: Any = None,
        parallelize_fn: ParallelizeFn = parallelize,
        checkpointer: Checkpointer | None = None,
        notify: Notify = notice,
        ctx: RunContext | None = None,
    ):
        """`data` has `train` (a resumable PackedBatches), `heldout` ({domain: [batches]}) and `domains`.
        The model and every batch go to `device`; `parallelize_fn(model, mesh)` runs between building the
        model and the optimizer; `checkpointer` defaults to `checkpointer_for` the run (Hugging Face
        directories in one process, sharded DCP checkpoints on several or when the run already has them);
        `notify` receives the one-line statements of what training decided (default: stderr). `ctx`
        places the run on several ranks (`widemoe.train.parallel`; default: one process): rank 0 writes
        the metrics, shows progress and holds the lock, every rank saves its part of a checkpoint."""
        self.ctx = ctx if ctx is not None else RunContext()
        self.tc = tc
        self.data = data
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.run_dir = Path(tc.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(tc.seed)
        random.seed(tc.seed)
        parts = build_parts(tc, self.device, mesh, parallelize_fn)
        self.config, self.model = parts.config, parts.model
        self.optimizer, self.scheduler = parts.optimizer, parts.scheduler
        self.checkpointer: Checkpointer = checkpointer or checkpointer_for(self.run_dir, self.ctx.distributed)
        self.step = 0
        self.tokens_seen = 0
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl") if self.ctx.is_main else NullMetrics()
        self.flops_per_token = train_flops_per_token(self.config, tc.seq_len)
        self.peak_flops: float | None = None
        self.notify = notify
        if self.metrics.dropped_torn_tail:
            notify(f"{self.metrics.path}: dropped a torn last line ({self.metrics.dropped_torn_tail} bytes, "
                   "a record cut off by a crash)")
        self.resume_notes: dict[str, Any] = {}  # what the resume record says besides the step

    # --- state ---------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The host-side training state a checkpoint carries besides the model and optimizer."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "scheduler": self.scheduler.state_dict(),
            "data": json.dumps(self.data.train.state_dict()),
            "torch_rng": torch.get_rng_state(),
            "python_rng": json.dumps(random.getstate()),
            "train_config": json.dumps(asdict(self.tc)),
        }

    def save(self) -> Path:
        return self.checkpointer.save(
            self.run_dir,
            self.step,
            self.model,
            self.optimizer,
            self.state(),
            tokenizer=self.tokenizer,
            keep_last=self.tc.keep_last,
        )

    def try_resume(self) -> Path | None:
        """Restore the newest checkpoint of the run directory that loads; its path (None: there is none).
        Damaged newer ones are named in a notice and set aside; when none loads, `RunDirError` naming
        the newest damaged file."""
        damaged: list[tuple[Path, str]] = []
        for ckpt in reversed(self.checkpointer.checkpoints(self.run_dir)):
            try:
                self._restore(ckpt)
            except CheckpointDamaged as e:
                self.notify(f"checkpoint {ckpt.name} is damaged ({e}); trying the one before it")
                damaged.append((ckpt, str(e)))
                continue
            self.resume_notes["damaged"] = [self._set_aside(p) for p, _ in damaged]
            return ckpt
        if damaged:
            raise RunDirError(
                f"cannot resume {self.run_dir}: no committed checkpoint loads; the newest, "
                f"{damaged[0][0].name}, is damaged: {damaged[0][1]}; start over with --fresh"
            )
        return None

    def _restore(self, ckpt: Path) -> None:
        saved = self.checkpointer.read_state(ckpt)
        step = int(saved["step"])
        where = f"step {step} of {self.run_dir}"
        changes = config_changes(json.loads(saved.get("train_config", "{}")), self.tc, where)
        st = self.checkpointer.load(ckpt, self.model, self.optimizer)  # a damaged file shows here
        for line in st.get("load_notices", []):  # a sharded checkpoint resumed at another layout
            self.notify(line)
        complete = check_resume_steps(step, self.tc)  # about the checkpoint that loads, not a damaged one
        self.scheduler.load_state_dict(st["scheduler"])
        self.data.train.load_state_dict(json.loads(st["data"]))
        torch.set_rng_state(st["torch_rng"])
        state = json.loads(st["python_rng"])
        random.setstate((state[0], tuple(state[1]), state[2]))
        self.step, self.tokens_seen = int(st["step"]), int(st["tokens_seen"])
        apply_changes(self.optimizer, self.scheduler, self.tc, changes)
        done = [f"{complete}: nothing to train"] if complete else []
        self.notify("; ".join([f"resumed from {where}", *describe_changes(changes), *done]))
        self.resume_notes["changed"] = {k: [old, new] for k, old, new in changes}

    def _set_aside(self, ckpt: Path) -> str:
        """Rename a damaged checkpoint out of the run's view (kept for inspection, never deleted); rank 0
        renames, every rank waits for it."""
        target, n = ckpt.with_name(f"{ckpt.name}.damaged"), 1
        while target.exists():
            n += 1
            target = ckpt.with_name(f"{ckpt.name}.damaged-{n}")
        self.ctx.barrier()  # every rank has chosen the same name before rank 0 renames
        if self.ctx.is_main:
            ckpt.rename(target)
            self.notify(f"set the damaged checkpoint aside as {target}")
        self.ctx.barrier()
        return target.name

    # --- steps ---------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        """One optimizer step over `grad_accum` micro-batches; the `train` record of it."""
        tc, model = self.tc, self.model
        model.train()
        t0 = time.perf_counter()
        self.ctx.reset_comm(model)
        acc = accumulate_gradients(model, self.data.train, tc, len(self.data.domains), self.device, self.ctx)
        self.tokens_seen += acc.tokens
        grad_norm = self.ctx.clip_grad_norm(model, tc.clip_norm)
        problem = non_finite(acc.logs["loss"], grad_norm, self.step + 1)
        if problem is not None:
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingStopped(problem)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # Counts of every micro-batch of this step (of every rank: one all-reduce) drive the bias update,
        # once per optimizer step.
        self.ctx.reduce_expert_counts(model)
        counts = close_balancing_window(model, tc)
        dt = time.perf_counter() - t0
        self.step += 1
        tokens = tc.grad_accum * tc.batch_size * tc.seq_len
        rec: dict[str, Any] = {
            "kind": "train",
            "step": self.step,
            "tokens": self.tokens_seen,
            "lr": self.scheduler.get_last_lr()[0],
            **acc.logs,
            "grad_norm": grad_norm,
            "step_time": dt,
            "tokens_per_s": tokens / dt,
            "loss_by_domain": acc.loss_by_domain(self.data.domains),
            **routing_fields(model, counts),
            **self.ctx.comm(model),
        }
        if self.peak_flops:  # against the peak of every rank together
            rec["mfu"] = self.flops_per_token * tokens / dt / (self.peak_flops * self.ctx.world)
        return rec

    def evaluate(self) -> dict[str, Any]:
        """Held-out loss per domain, global MaxVio over the held-out set, domain x expert counts."""
        fields = evaluate_heldout(self.model, self.data.heldout, self.tc.bf16, self.device, self.ctx)
        return {"kind": "eval", "step": self.step, "tokens": self.tokens_seen, **fields}

    # --- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Holding the run directory's lock: check the directory (a used one needs `resume` or `fresh`),
        resume if asked, then train until `steps` (or `stop_at`); the last eval record and the step."""
        lock = RunLock(self.run_dir, self.notify)

        def take() -> None:  # on rank 0 only when there are several ranks; every rank trains
            lock.acquire()
            prepare_run_dir(self.run_dir, resume=self.tc.resume, fresh=self.tc.fresh, notify=self.notify)

        try:
            self.ctx.main_first(take)
            return self._fit()
        finally:
            lock.release()  # a no-op where the lock was not taken

    def _fit(self) -> dict[str, Any]:
        tc = self.tc
        resumed = self.try_resume() if tc.resume else None
        if self.peak_flops is None:
            dtype = torch.bfloat16 if tc.bf16 else torch.float32
            self.peak_flops = measure_matmul_peak(dtype, device=self.device)
        self._write_opening(resumed)
        last_eval: dict[str, Any] | None = None
        end = tc.steps if tc.stop_at is None else min(tc.steps, tc.stop_at)
        with TrainProgress(tc.progress and self.ctx.is_main, tc.steps, self.step) as bar:
            while self.step < end:
                rec = self._step_or_stop()
                if self.step % tc.log_every == 0 or self.step == end:
                    self.metrics.write(rec)
                if self.step % tc.eval_every == 0 or self.step == end:
                    last_eval = self.evaluate()
                    self.metrics.write(last_eval)
                if self.step % tc.save_every == 0 or self.step == end:
                    self.save()
                bar(self.step, rec)
        return {"final_eval": last_eval, "steps": self.step, "run_dir": str(self.run_dir)}

    def _step_or_stop(self) -> dict[str, Any]:
        """`train_step`, or on a non-finite step: save the last good state, log it, re-raise naming it."""
        try:
            return self.train_step()
        except TrainingStopped as e:
            path = self.save()
            self.metrics.write({"kind": "stopped", "step": self.step, "reason": str(e)})
            raise TrainingStopped(f"{e}; the last good state (step {self.step}) is saved in {path}") from None

    def _write_opening(self, resumed: Path | None) -> None:
        if resumed is not None:
            record = {"kind": "resume", "step": self.step, "from": str(resumed), **self.resume_notes}
            self.metrics.write(record)
            return
        self.metrics.write(
            {
                "kind": "start",
                "config": self.config.to_dict(),
                "train": asdict(self.tc),
                "params": self.model.num_parameters(),
                "peak_flops": self.peak_flops,
                "flops_per_token": self.flops_per_token,
            }
        )


__all__ = ["Trainer"]
