"""`widemoe eval`'s work: serve a model (or take a server's URL), run lm-evaluation-harness's
`local-completions` model against it on widemoe's shipped tasks, offline, and write lm-eval's results JSON.

lm-eval runs in-process through its Python API (`simple_evaluate` with a `TaskManager` over a temporary
include dir holding the task YAML with absolute data paths, see `widemoe.evals.tasks`). It talks to the
server as to vLLM: token-id prompts to `/v1/completions` (`echo` + `logprobs` for loglikelihoods), the
server's own tokenizer through `/tokenize`, `/detokenize` and `/tokenizer_info` (`tokenizer_backend=
remote`), `max_length` the served model's context (lm-eval's default, 2048, would cut contexts silently).
Its output is what `lm_eval --output_path DIR/results.json --log_samples` writes: `DIR/results_<date>.json`
and `DIR/samples_<task>_<date>.jsonl` (every request's loglikelihood or generation); older files of that
kind in DIR are removed once the new ones are written, so DIR holds one evaluation.

"The same model at initialisation" (`init=True`) is the model a run's trainer started from: the config and
seed of its `metrics.jsonl` start record, built by `build_model(config, seed=seed)` exactly as
`widemoe.train.build.build_parts` builds it, with the run's tokenizer, written to a temporary HF directory
and served like a checkpoint. For a model directory or preset it is its config with `seed`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from widemoe.evals.tasks import write_task_dir

INIT_LABEL = "init"  # RUN/eval/init/: the run's model at initialisation
DEFAULT_OUTPUT = Path("eval_results")  # for a MODEL that is not a run directory
DEFAULT_MAX_LENGTH = 2048  # lm-eval's own default, used only when nothing says the model's context
NEEDED_MODULES = ("lm_eval", "aiohttp", "tenacity", "requests")  # lm-eval[api]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


class EvalError(ValueError):
    """An evaluation that cannot run as asked; the message names the file or flag and why."""


@dataclass
class EvalSpec:
    model: str  # anything `resolve_model` takes
    tasks: list[str]
    url: str | None = None  # a running server (base URL, e.g. http://127.0.0.1:8000); None: serve here
    limit: int | None = None  # examples per task
    dtype: str = "fp32"
    output: Path | None = None
    num_concurrent: int = 8
    init: bool = False
    seed: int = 0  # the init seed for a directory or preset (a run's own seed wins)
    verbose: bool = False


@dataclass
class EvalOutcome:
    label: str  # "step-00000180", "init", a directory or preset name
    output: Path
    results_file: Path
    results: dict  # lm-eval's results (without the samples)


# --- what is evaluated, and where the results go --------------------------------------------------------


def label_and_output(spec: EvalSpec) -> tuple[str, Path]:
    """The evaluated checkpoint's name and the output directory (default RUN/eval/<label>/)."""
    from widemoe.hf.resolve import checkpoint_dir_of, is_run_directory

    path = Path(spec.model)
    run = path.is_dir() and is_run_directory(path)
    if spec.init:
        label = INIT_LABEL
    elif path.is_dir():
        label = checkpoint_dir_of(path).name if run else path.resolve().name
    else:
        label = path.stem if path.suffix else spec.model
    if spec.output is not None:
        return label, Path(spec.output)
    return label, (path / "eval" / label if run else DEFAULT_OUTPUT / label)


def start_record(run_dir: Path) -> dict:
    """The `{"kind": "start", ...}` record of a run's metrics.jsonl (its model config and train config)."""
    path = run_dir / "metrics.jsonl"
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line) if line.strip() else {}
                if record.get("kind") == "start":
                    return record
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not JSON lines ({e})") from None
    raise EvalError(f"{path}: no start record; --init needs the run's config and seed from it")


def write_init_model(spec: EvalSpec, dest: Path) -> Path:
    """The model `spec.model` started from, as an HF directory in `dest` (with the tokenizer)."""
    import torch

    from widemoe.config import ModelConfig
    from widemoe.hf import save_pretrained
    from widemoe.hf.resolve import checkpoint_dir_of, is_run_directory, resolve_model
    from widemoe.model.causal_lm import build_model

    path = Path(spec.model)
    if path.is_dir() and is_run_directory(path):
        record = start_record(path)
        config = ModelConfig.from_dict(record["config"], source=f"{path / 'metrics.jsonl'} start record")
        seed = int(record["train"]["seed"])
        ckpt = checkpoint_dir_of(path)
        tokenizer = ckpt if (ckpt / "tokenizer.json").is_file() else None
    else:
        resolved = resolve_model(spec.model)
        config, seed, tokenizer = resolved.config, spec.seed, resolved.tokenizer
    model = build_model(config, seed=seed, dtype=torch.float32)
    return save_pretrained(model, dest, tokenizer=tokenizer)


# --- the server -------------------------------------------------------------------------------------------


def served_model(url: str) -> tuple[str, int | None]:
    """(the first model id, its max_model_len or None) from a server's GET /v1/models."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/v1/models", timeout=30) as r:
            card = json.loads(r.read())["data"][0]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise EvalError(f"--url {url}: GET /v1/models did not list a model ({e})") from None
    return str(card["id"]), card.get("max_model_len")


@contextmanager
def server_for(spec: EvalSpec, label: str) -> Iterator[str]:
    """The base URL to evaluate: `spec.url`, or a server started here on the model (or its init)."""
    if spec.url is not None:
        yield spec.url.rstrip("/")
        return
    from widemoe.serve.server import serve_in_thread

    with tempfile.TemporaryDirectory(prefix="widemoe-eval-") as tmp:
        model = str(write_init_model(spec, Path(tmp) / "model")) if spec.init else spec.model
        with serve_in_thread(model, served_model_name=label, dtype=spec.dtype) as url:
            yield url.rstrip("/")


def max_length_of(spec: EvalSpec, url_max: int | None) -> int:
    """The context lm-eval may use: the server's max_model_len, else the model's positions."""
    if url_max:
        return int(url_max)
    try:
        from widemoe.hf.resolve import resolve_model

        return int(resolve_model(spec.model).config.max_position_embeddings)
    except (ValueError, OSError):
        return DEFAULT_MAX_LENGTH


# --- lm-eval ----------------------------------------------------------------------------------------------


def evaluate(spec: EvalSpec) -> EvalOutcome:
    """Serve (or reach) the model, run lm-eval's local-completions on `spec.tasks`, write its results."""
    # before a model is loaded and served; lm-eval's API models need its `api` extra (aiohttp, tenacity)
    missing = [m for m in NEEDED_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise EvalError(f"widemoe eval needs lm-evaluation-harness with its API extra ({', '.join(missing)} "
                        "missing): pip install 'lm-eval[api]>=0.4.5,<0.5'")
    label, out = label_and_output(spec)
    with server_for(spec, label) as url:
        name, url_max = served_model(url)
        results, tracker = run_lm_eval(url, name, spec, max_length_of(spec, url_max), out)
    results_file = out / f"results_{tracker.date_id}.json"
    if not results_file.is_file():  # the tracker only logs a warning when it cannot write
        raise EvalError(f"{out}: lm-eval did not write {results_file.name} (see its log above)")
    remove_older(out, tracker.date_id)
    return EvalOutcome(label, out, results_file, results)


def run_lm_eval(url: str, name: str, spec: EvalSpec, max_length: int, out: Path) -> tuple[dict, object]:
    """lm-eval's `simple_evaluate` with local-completions at `url`; results and samples saved into `out`
    as its CLI saves them with --log_samples. Returns the results (samples popped) and the tracker."""
    os.environ.update(OFFLINE_ENV)  # before lm-eval imports datasets and huggingface_hub: no downloads
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.INFO if spec.verbose else logging.WARNING)
    out.mkdir(parents=True, exist_ok=True)
    tracker = EvaluationTracker(output_path=str(out / "results.json"))
    model_args = {
        "model": name,
        "base_url": f"{url}/v1/completions",
        "tokenizer_backend": "remote",  # the server's /tokenize: the model's own tokenizer, no download
        "tokenized_requests": True,
        "num_concurrent": spec.num_concurrent,
        "max_length": max_length,
    }
    with tempfile.TemporaryDirectory(prefix="widemoe-tasks-") as tmp:
        manager = TaskManager(include_path=str(write_task_dir(tmp, spec.tasks)), include_defaults=False)
        results = simple_evaluate(
            model="local-completions",
            model_args=model_args,
            tasks=spec.tasks,
            task_manager=manager,
            limit=spec.limit,
            batch_size=1,
            log_samples=True,
            evaluation_tracker=tracker,
        )
    if results is None:
        raise EvalError("lm-eval returned no results")
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples)
    for task in results["configs"]:
        tracker.save_results_samples(task_name=task, samples=samples[task])
    return results, tracker


def remove_older(out: Path, date_id: str) -> None:
    """Delete lm-eval outputs of earlier evaluations in `out` (results_*.json, samples_*.jsonl)."""
    for p in [*out.glob("results_*.json"), *out.glob("samples_*.jsonl")]:
        if not p.stem.endswith(date_id):
            p.unlink()


__all__ = [
    "DEFAULT_OUTPUT", "INIT_LABEL", "EvalError", "EvalOutcome", "EvalSpec", "evaluate", "label_and_output",
    "served_model", "start_record", "write_init_model",
]
