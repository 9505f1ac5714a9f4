"""Training: `config` (TrainConfig), `build` (model, parallelize, optimizer, schedule, data), `loop`
(the Trainer), `step` (one optimizer step), `eval` (held-out eval), `checkpoint` (the Checkpointer
interface and HF-directory checkpoints), `bias_update` (aux-free balancing), `metrics` (metrics.jsonl,
MFU), `progress` (the live bar), `run` (corpus to trained run: what `widemoe train` calls)."""
