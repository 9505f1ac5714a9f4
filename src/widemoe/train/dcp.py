"""Sharded training checkpoints with PyTorch Distributed Checkpoint (DCP), `DCPCheckpointer`, and
`export_checkpoint`, which turns one into a full Hugging Face directory in a single process.

Layout of one checkpoint, `RUN/checkpoints/step-00000100/`:

    .metadata, __<rank>_<i>.distcp   DCP: the model under its own parameter names ("model.<name>"), the
                                     optimizer state by parameter name ("optim.state.<name>.exp_avg",
                                     "optim.param_groups.<i>.lr", ...); each rank writes its own shards
    trainer_state.pt                 rank 0: the host state (step, tokens_seen, scheduler, data cursor,
                                     python RNG, ...) but the per-rank torch RNG, plus "format": "dcp" and
                                     the "layout" it was saved at ({"world_size", "ep"})
    rng-rank00000.pt, ...            each rank's torch RNG state
    config.json (+ generation_config.json, tokenizer files)   as `widemoe.hf.save_pretrained` writes them
    COMMITTED                        written last by rank 0, after every rank wrote and fsynced its files

The experts are DTensors ``Shard(0)`` on the "ep" mesh and FSDP2 shards every parameter, so DCP's
metadata records where every slice of every global tensor lives: a checkpoint saved at one layout loads
at any other (any world size, any EP that divides the expert count), also in a plain process without a
process group (a world of one: DCP then reads and writes alone).

Crash safety (as `widemoe.train.checkpoint`): every rank writes into ``step-XXXXXXXX.tmp-dcp`` (one name,
created by rank 0 before a barrier), fsyncs its own files and meets the others at a barrier; only then
does rank 0 rename the directory, write `COMMITTED` and apply retention (an old checkpoint loses its
marker first), and a last barrier releases everyone. A rank killed at any moment leaves the previous
checkpoint the newest committed one. The run directory must be on a file system every rank sees.

RNG: a rank that existed at save time gets its own torch RNG state back, a new rank rank 0's (a
deterministic choice that `load` reports in the state's "load_notices", beside "saved_layout").

Nothing pickled runs on load: `.pt` files are read with ``torch.load(weights_only=True)``, DCP's own
`.metadata` pickle through an unpickler that admits only DCP's metadata classes, and DCP's non-tensor
items (optimizer hyper-parameters) with ``weights_only=True`` as well.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from widemoe.hf.resolve import MARKER, checkpoint_dir_of, committed_checkpoints, latest_checkpoint
from widemoe.hf.saver import TOKENIZER_FILES, model_config_file, write_metadata
from widemoe.train.checkpoint import (
    STATE_FILE,
    CheckpointDamaged,
    _apply_retention,
    _fsync_path,
    checkpoint_dir,
    remove_checkpoint,
)

FORMAT = "dcp"
METADATA_FILE = ".metadata"
TMP_SUFFIX = ".tmp-dcp"
MODEL_KEY, OPTIM_KEY = "model", "optim"
HOST_KEYS = ("step", "tokens_seen", "scheduler", "data", "python_rng")
_PER_RANK = re.compile(r"^(?:__(\d+)_\d+\.distcp|rng-rank(\d+)\.pt)$")


class CheckpointMismatch(ValueError):
    """A sound checkpoint of a different model: tensors missing or of another shape (named)."""


class CheckpointFormatError(ValueError):
    """A sound checkpoint of the other format (Hugging Face directory vs DCP shards): not damage, it must
    never be set aside as damaged; `checkpointer_for` picks the checkpointer that reads a run."""


def is_dcp_checkpoint(ckpt: Path) -> bool:
    return (Path(ckpt) / METADATA_FILE).is_file()


def checkpointer_for(run_dir: Path, distributed: bool) -> Any:
    """The checkpointer that continues `run_dir`: DCP when its newest checkpoint is one (also in one process:
    a run saved on W ranks resumes on 1) or when several processes run; else Hugging Face directories."""
    from widemoe.train.checkpoint import HFCheckpointer

    newest = latest_checkpoint(run_dir)
    if newest is not None:
        return DCPCheckpointer() if is_dcp_checkpoint(newest) else HFCheckpointer()
    return DCPCheckpointer() if distributed else HFCheckpointer()


def rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.pt"


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def _alone_quietly(alone: bool) -> Iterator[None]:
    """DCP warns that it "assumes" a single process when there is no process group: here that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore" if alone else "default", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def model_layout(model: nn.Module) -> dict[str, int]:
    """{"world_size", "ep"} of a (parallelized) model: EP is the size of the "ep" mesh its experts are
    DTensors on (1 when they are not)."""
    ep = 1
    for p in model.parameters():
        mesh = getattr(p, "device_mesh", None)
        names = getattr(mesh, "mesh_dim_names", None) or ()
        if "ep" in names:
            ep = mesh["ep"].size()
            break
    return {"world_size": _rank_world()[1], "ep": ep}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _load_pt(path: Path) -> Any:
    """A `.pt` file of a committed checkpoint, plain data only; `CheckpointDamaged` naming it."""
    if not path.is_file():
        raise CheckpointDamaged(f"{path}: missing (the checkpoint is marked {MARKER} but lacks it)")
    try:
        return torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        raise CheckpointDamaged(f"{path}: unreadable, truncated or corrupt ({_first_line(e)})") from None


# --- reading DCP's files without running pickled code ------------------------------------------------


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle: admit only the classes DCP's metadata is made of."""

    ALLOWED = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
               ("torch.serialization", "_get_layout"),  # a layout name back to torch.strided & co.
               ("collections", "OrderedDict")}
    PATHS = ("Path", "PosixPath", "WindowsPath")  # the checkpoint_id DCP records (pathlib._local: 3.13+)

    def find_class(self, module: str, name: str) -> Any:
        if (module == "torch.distributed.checkpoint.metadata" or (module, name) in self.ALLOWED
                or (module in ("pathlib", "pathlib._local") and name in self.PATHS)):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}: not part of DCP's checkpoint metadata")


def read_dcp_metadata(ckpt: Path) -> Any:
    """The DCP `Metadata` of a checkpoint directory (`CheckpointDamaged` naming `.metadata`)."""
    path = Path(ckpt) / METADATA_FILE
    if not path.is_file():
        raise CheckpointDamaged(f"{path}: missing (not a DCP checkpoint, or one cut short)")
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except (EOFError, OSError, ValueError, AttributeError, pickle.UnpicklingError) as e:
        raise CheckpointDamaged(f"{path}: unreadable, truncated or corrupt ({_first_line(e)})") from None


def check_dcp_files(ckpt: Path, metadata: Any) -> None:
    """Every shard file the metadata points into exists and is long enough (else `CheckpointDamaged`
    naming it): a damaged checkpoint is refused before any tensor is read, on every rank alike."""
    need: dict[str, int] = {}
    for info in metadata.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, size in sorted(need.items()):
        p = Path(ckpt) / rel
        if not p.is_file():
            raise CheckpointDamaged(f"{p}: missing (the checkpoint's {METADATA_FILE} refers to it)")
        if (have := p.stat().st_size) < size:
            raise CheckpointDamaged(f"{p}: truncated ({have} bytes; {METADATA_FILE} needs {size})")


def _reader(ckpt: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            md = read_dcp_metadata(ckpt)
            if getattr(md, "storage_meta", None) is not None:
                md.storage_meta.load_id = self.load_id
            return md

    return SafeReader(str(ckpt))


def _planner() -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)  # plain data only (hyper-parameters, FQN lists)
            buf = io.BytesIO()
            torch.save(obj, buf)  # DefaultLoadPlanner then unpickles these bytes of ours, not the file's
            buf.seek(0)
            super().load_bytes(read_item, buf)

    return SafePlanner()


def check_model_matches(ckpt: Path, metadata: Any, model_sd: dict[str, Any]) -> None:
    """`CheckpointMismatch` naming the tensors the checkpoint lacks or has in another shape."""
    saved = {k[len(MODEL_KEY) + 1:]: v for k, v in metadata.state_dict_metadata.items()
             if k.startswith(MODEL_KEY + ".")}
    missing = [n for n in model_sd if n not in saved]
    shapes = [f"{n} {tuple(saved[n].size)} vs {tuple(t.shape)}" for n, t in model_sd.items()
              if n in saved and tuple(getattr(saved[n], "size", t.shape)) != tuple(t.shape)]
    what = ([f"lacks {', '.join(missing[:5])}"] if missing else []) + (
        [f"shapes differ (saved vs model): {', '.join(shapes[:5])}"] if shapes else [])
    if what:
        raise CheckpointMismatch(f"{ckpt}: not a checkpoint of this model: {'; '.join(what)}")


def keep_saved_optimizer_state(metadata: Any, optim_sd: dict[str, Any]) -> None:
    """Ask only for the optimizer state the checkpoint has. `get_state_dict` gives a fresh optimizer state
    for every parameter, but a parameter that never had a gradient before the save (a DeepSeek-V4
    compressor unused at short sequences) has none saved: it stays without state, as in the saving run."""
    saved, prefix = metadata.state_dict_metadata, f"{OPTIM_KEY}.state"
    optim_sd["state"] = {name: kept for name, st in optim_sd["state"].items()
                         if (kept := {k: v for k, v in st.items() if f"{prefix}.{name}.{k}" in saved})}


def _dcp_load(ckpt: Path, state_dict: dict[str, Any], *, alone: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _alone_quietly(alone):
            dcp.load(state_dict, storage_reader=_reader(ckpt), planner=_planner(), no_dist=alone)
    except CheckpointException as e:
        raise CheckpointDamaged(f"{ckpt}: a shard file is unreadable or corrupt ({_first_line(e)})") from None


# --- writing ---------------------------------------------------------------------------------------


def write_model_config(model: nn.Module, directory: Path) -> None:
    """config.json + generation_config.json as `widemoe.hf.save_pretrained` writes them."""
    write_metadata(directory, model_config_file(model), model.config)  # type: ignore[arg-type]


def _own_files(directory: Path, rank: int) -> list[Path]:
    """The files of `directory` that `rank` wrote: its shards and RNG file; rank 0 also the shared ones."""
    out = []
    for p in sorted(directory.rglob("*")):
        m = _PER_RANK.match(p.name)
        owner = int(m.group(1) or m.group(2)) if m else 0
        if p.is_file() and owner == rank:
            out.append(p)
    return out


def _write_marker(ckpt: Path, step: int) -> None:
    with open(ckpt / MARKER, "w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_path(ckpt)


class DCPCheckpointer:
    """The `Checkpointer` of multi-process runs (and of one process): DCP shards, see the module docstring.
    Every method is called on every rank with the same arguments. `after_write(rank, tmp_dir)` is a test
    hook run after the rank wrote and fsynced its files, before the barrier that precedes the commit."""

    def __init__(self, after_write: Callable[[int, Path], None] | None = None) -> None:
        self.after_write = after_write

    def save(
        self, run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
        state: dict[str, Any], *, tokenizer: Any = None, keep_last: int = 2,
    ) -> Path:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter
        from torch.distributed.checkpoint.state_dict import get_state_dict

        rank, world = _rank_world()
        final = checkpoint_dir(Path(run_dir), step)
        tmp = final.with_name(final.name + TMP_SUFFIX)
        if rank == 0:
            final.parent.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # the leftover of a save killed at this same step
                shutil.rmtree(tmp)
            tmp.mkdir()
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with _alone_quietly(world == 1):
            dcp.save({MODEL_KEY: model_sd, OPTIM_KEY: optim_sd}, storage_writer=FileSystemWriter(str(tmp)),
                     no_dist=world == 1)
        torch.save(state["torch_rng"], tmp / rng_file(rank))
        if rank == 0:
            host = {k: v for k, v in state.items() if k != "torch_rng"}
            torch.save({**host, "format": FORMAT, "layout": model_layout(model)}, tmp / STATE_FILE)
            write_model_config(model, tmp)
            if tokenizer is not None:
                tokenizer.save(tmp)  # tokenizer.json + tokenizer_config.json with the special tokens
        for p in _own_files(tmp, rank):
            _fsync_path(p)
        if self.after_write is not None:
            self.after_write(rank, tmp)
        _barrier()  # every rank's files are durable: the checkpoint is complete
        if rank == 0:
            _fsync_path(tmp)
            if final.exists():  # an uncommitted leftover of a crashed save, or a damaged one set aside
                remove_checkpoint(final)
            os.replace(tmp, final)
            _fsync_path(final.parent)
            _write_marker(final, step)
            _apply_retention(Path(run_dir), keep_last)
        _barrier()
        return final

    def latest(self, run_dir: Path) -> Path | None:
        return latest_checkpoint(run_dir)

    def checkpoints(self, run_dir: Path) -> list[Path]:
        return committed_checkpoints(run_dir)

    def read_state(self, path: Path) -> dict[str, Any]:
        """The host state plus this rank's torch RNG (rank 0's where this rank did not exist). Collective
        under a process group: a file only one rank reads (its RNG) must not send the ranks different
        ways, so damage seen by any rank is raised on every rank (`_agreed`)."""
        def read() -> dict[str, Any]:
            host = _read_host_state(Path(path))
            rank, _ = _rank_world()
            saved_world = int(host["layout"]["world_size"])
            host["torch_rng"] = _load_pt(Path(path) / rng_file(rank if rank < saved_world else 0))
            return host

        return _agreed(read)

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Collective under a process group (every rank calls it); see `read_state`."""
        import torch.distributed.checkpoint.state_dict as sd_api

        path = Path(path)
        state = self.read_state(path)  # first: a damaged state file must not cost a model load
        metadata = _agreed(lambda: read_dcp_metadata(path))
        _agreed(lambda: check_dcp_files(path, metadata))
        model_sd, optim_sd = sd_api.get_state_dict(model, optimizer)
        check_model_matches(path, metadata, model_sd)
        keep_saved_optimizer_state(metadata, optim_sd)
        _dcp_load(path, {MODEL_KEY: model_sd, OPTIM_KEY: optim_sd}, alone=_rank_world()[1] == 1)
        sd_api.set_model_state_dict(model, model_sd)  # strict: every tensor of the model
        # not strict: parameters without saved state stay without (keep_saved_optimizer_state)
        lenient = sd_api.StateDictOptions(strict=False)
        sd_api.set_optimizer_state_dict(model, optimizer, optim_sd, options=lenient)
        state["saved_layout"] = saved = dict(state.pop("layout"))
        state["load_notices"] = layout_notices(saved, model_layout(model))
        return state


def _agreed(read: Callable[[], Any]) -> Any:
    """`read()` on every rank; when it raised `CheckpointDamaged` on any rank, every rank raises it (the
    lowest such rank's message), so that no rank moves on to an older checkpoint alone."""
    err: str | None = None
    result = None
    try:
        result = read()
    except CheckpointDamaged as e:
        err = str(e)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        errs: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(errs, err)
        err = next((e for e in errs if e is not None), None)
    if err is not None:
        raise CheckpointDamaged(err)
    return result


def _read_host_state(ckpt: Path) -> dict[str, Any]:
    if not (ckpt / MARKER).is_file():
        raise FileNotFoundError(f"{ckpt} is not a committed checkpoint (no {MARKER} marker)")
    state = _load_pt(ckpt / STATE_FILE)
    if isinstance(state, dict) and "format" not in state and "optimizer" in state:
        raise CheckpointFormatError(f"{ckpt}: a Hugging Face checkpoint of a one-process run "
                                    "(HFCheckpointer), not a sharded DCP one; resume it in one process")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointDamaged(f"{ckpt / STATE_FILE}: not the state of a DCP checkpoint")
    missing = [k for k in (*HOST_KEYS, "layout") if k not in state]
    if missing:
        raise CheckpointDamaged(f"{ckpt / STATE_FILE}: lacks {', '.join(missing)}")
    return state


def layout_notices(saved: dict[str, int], now: dict[str, int]) -> list[str]:
    """What a load at another layout than the save's did (empty: same layout)."""
    (w0, e0), (w, e) = (saved["world_size"], saved["ep"]), (now["world_size"], now["ep"])
    if (w0, e0) == (w, e):
        return []
    out = [f"resharded: saved on {w0} process(es) with EP={e0}, loaded on {w} with EP={e}"]
    if w > w0:
        ranks = f"rank {w0}" if w == w0 + 1 else f"ranks {w0}-{w - 1}"
        out.append(f"{ranks} did not exist at save time: continuing from rank 0's torch RNG state")
    elif w < w0:
        ranks = f"rank {w}" if w0 == w + 1 else f"ranks {w}-{w0 - 1}"
        out.append(f"the torch RNG state(s) of saved {ranks} are not used")
    return out


# --- export ----------------------------------------------------------------------------------------


@dataclass
class ExportSummary:
    checkpoint: Path
    dst: Path
    step: int
    family: str
    params: int
    dtype: str
    notices: list[str] = field(default_factory=list)


_EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_full_model(ckpt: Path) -> nn.Module:
    """The fp32 model of a committed DCP checkpoint, whole, in this process (no process group used, also
    when one exists: a rank-0-only export inside a torchrun job must not wait for the other ranks)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from widemoe.hf.loader import allocate_empty, params_on_meta
    from widemoe.hf.resolve import read_config_file
    from widemoe.model.causal_lm import WideMoeForCausalLM

    ckpt = Path(ckpt)
    _read_host_state(ckpt)
    cfg = read_config_file(ckpt / "config.json")
    metadata = read_dcp_metadata(ckpt)
    check_dcp_files(ckpt, metadata)
    with params_on_meta():
        model = WideMoeForCausalLM(cfg)
    allocate_empty(model.float())
    sd = get_model_state_dict(model)
    check_model_matches(ckpt, metadata, sd)
    _dcp_load(ckpt, {MODEL_KEY: sd}, alone=True)
    set_model_state_dict(model, sd)
    return model.eval()


def export_checkpoint(src: str | Path, dst: str | Path, dtype: str = "fp32", overwrite: bool = False
                      ) -> ExportSummary:
    """Write the newest committed checkpoint of run `src` (or checkpoint directory `src`) as a full Hugging
    Face directory `dst` (+ tokenizer), staged beside it and swapped in when complete (a non-empty `dst`
    needs `overwrite`, which replaces its model files and keeps the rest)."""
    from widemoe.hf import adapter_for_config, load_pretrained, save_pretrained
    from widemoe.hf.staging import check_destination, staged_directory

    if dtype not in _EXPORT_DTYPES:
        raise ValueError(f"--dtype {dtype!r} must be one of {', '.join(_EXPORT_DTYPES)}")
    if not Path(src).is_dir():  # a run or checkpoint directory
        raise FileNotFoundError(f"{src}: {'not a' if Path(src).exists() else 'no such'} directory")
    ckpt, dst = checkpoint_dir_of(src), Path(dst)
    if not (ckpt / MARKER).is_file():
        raise CheckpointDamaged(f"{ckpt}: not a committed checkpoint (no {MARKER} marker)")
    check_destination(dst, ckpt, overwrite=overwrite)  # before the model is loaded
    if is_dcp_checkpoint(ckpt):
        step, model = int(_read_host_state(ckpt)["step"]), load_full_model(ckpt)
    else:  # a one-process run's checkpoint (HFCheckpointer) is a Hugging Face directory: rewritten alike
        step, model = int((ckpt / MARKER).read_text()), load_pretrained(ckpt, dtype=torch.float32)
    model = model.to(_EXPORT_DTYPES[dtype])  # the model's own rules keep the router fp32
    tokenizer = ckpt if (ckpt / "tokenizer.json").is_file() else None
    with staged_directory(dst, TOKENIZER_FILES) as tmp:
        save_pretrained(model, tmp, tokenizer=tokenizer)
    notices = [] if tokenizer else [f"{ckpt} has no tokenizer.json: {dst} has none either"]
    return ExportSummary(ckpt, dst, step, adapter_for_config(model.config).name,
                         sum(p.numel() for p in model.parameters()), dtype, notices)


__all__ = ["CheckpointFormatError", "CheckpointMismatch", "DCPCheckpointer", "ExportSummary",
           "checkpointer_for", "export_checkpoint", "is_dcp_checkpoint", "layout_notices", "load_full_model",
           "model_layout"]
