"""Fixtures of tests/test_bad_inputs.py: tiny checkpoints, run directories and config files, good and damaged.

`build_fixtures(root)` writes everything under `root` (a micro model saved once, then copied and broken
one way per directory) and returns {name: path}; the test rows name their inputs by these names.
`snapshot(root)` records every file's size, mtime and hash, so a row can assert that a refused
command changed nothing on disk. `Row` / `R` / `both` are how the test's rows are written.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from widemoe.hf import save_pretrained
from widemoe.hf.registry import model_config_to_hf
from widemoe.model.causal_lm import WideMoeForCausalLM
from widemoe.presets import get_preset

WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class Row:
    id: str
    argv: tuple[str, ...]
    code: int
    message: str  # regex searched in the single `error:` line of stderr
    env: dict[str, str] = field(default_factory=dict)


def both(*parts: str) -> str:
    """A regex that matches when every part matches, in any order (a path and the rule it breaks)."""
    return "".join(f"(?=.*(?:{p}))" for p in parts)


def R(id: str, argv: str | tuple[str, ...], code: int, message: str, **env: str) -> Row:
    return Row(id, tuple(argv.split()) if isinstance(argv, str) else argv, code, message, env)


def snapshot(root: Path) -> dict[str, tuple[int, ...]]:
    """{relative path: (size, mtime_ns, inode)} of every file under `root`, {path: ()} of every directory.

    A rewrite changes a file's mtime, a replacement (a temporary file renamed over it) its inode, a
    deletion or a new file or directory the keys. A directory's own mtime is left out: a lock file
    taken and released inside it changes that and nothing else."""
    snap: dict[str, tuple[int, ...]] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        snap[str(p.relative_to(root))] = () if p.is_dir() else (st.st_size, st.st_mtime_ns, st.st_ino)
    return snap


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(d: Path, **changes: object) -> None:
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is _DELETE:
            cfg.pop(k)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg, indent=2))


_DELETE = object()


def _edit_tensors(d: Path, fn) -> None:
    tensors = load_file(d / WEIGHTS)
    fn(tensors)
    save_file(tensors, d / WEIGHTS, metadata={"format": "pt"})


def _truncate(f: Path, keep: float = 0.5) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])


def _checkpoints(root: Path, ck: Path) -> dict[str, Path]:
    """Damaged copies of the good checkpoint `ck`, one defect each."""
    out: dict[str, Path] = {}
    bad = root / "bad"
    d = out["no_config"] = _copy(ck, bad / "no_config")
    (d / "config.json").unlink()
    d = out["garbled_config"] = _copy(ck, bad / "garbled_config")
    (d / "config.json").write_text('{"model_type": "deepseek_v3", "hidden_size": ')
    d = out["binary_config"] = _copy(ck, bad / "binary_config")
    (d / "config.json").write_bytes(b"\xff\xfe\x00garbage\x80")
    d = out["config_is_dir"] = _copy(ck, bad / "config_is_dir")
    (d / "config.json").unlink()
    (d / "config.json").mkdir()
    d = out["config_list"] = _copy(ck, bad / "config_list")
    (d / "config.json").write_text("[1, 2, 3]")
    variants = {
        "config_unknown_type": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
        "config_str_int": {"hidden_size": "64"},
        "config_null_int": {"num_hidden_layers": None},
        "config_bool_int": {"num_hidden_layers": True},
        "config_float_int": {"n_routed_experts": 8.5},
        "config_nan": {"rms_norm_eps": float("nan")},
        "config_inf": {"routed_scaling_factor": float("inf")},
        "config_bool_str": {"norm_topk_prob": "false"},
        "config_negative": {"num_hidden_layers": -1},
        "config_topk_gt_experts": {"num_experts_per_tok": 16},
        "config_no_vocab": {"vocab_size": _DELETE},
        "config_widemoe_str": {"widemoe": "x"},
        "config_hf_flag_str": {"attention_bias": "false"},
        "config_hf_float_null": {"rms_norm_eps": None},
        "config_widemoe_bad_type": {"widemoe": {"capacity_factor": "large"}},
        "config_rope_scaling_str": {"rope_scaling": "yarn"},
        "config_rope_params_list": {"rope_parameters": [1, 2]},
        "config_prf_bool": {"partial_rotary_factor": True},
    }
    for name, changes in variants.items():
        d = out[name] = _copy(ck, bad / name)
        _edit_config(d, **changes)
    d = out["missing_tensor"] = _copy(ck, bad / "missing_tensor")
    _edit_tensors(d, lambda t: t.pop("model.layers.0.self_attn.o_proj.weight"))
    d = out["extra_tensor"] = _copy(ck, bad / "extra_tensor")
    _edit_tensors(d, lambda t: t.__setitem__("model.layers.0.mystery.weight", torch.zeros(3, 3)))
    d = out["misshaped_tensor"] = _copy(ck, bad / "misshaped_tensor")
    _edit_tensors(d, lambda t: t.__setitem__("model.norm.weight", torch.ones(65)))
    d = out["truncated_weights"] = _copy(ck, bad / "truncated_weights")
    _truncate(d / WEIGHTS)
    d = out["empty_weights"] = _copy(ck, bad / "empty_weights")
    (d / WEIGHTS).write_bytes(b"")
    d = out["garbage_weights"] = _copy(ck, bad / "garbage_weights")
    (d / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a json header at all")
    d = out["no_weights"] = _copy(ck, bad / "no_weights")
    (d / WEIGHTS).unlink()
    d = out["pickle_only"] = _copy(ck, bad / "pickle_only")
    torch.save(load_file(d / WEIGHTS), d / "pytorch_model.bin")
    (d / WEIGHTS).unlink()
    return out


def _sharded(root: Path, sharded: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    bad = root / "bad"
    shards = sorted(sharded.glob("model-*.safetensors"))
    d = out["shard_deleted"] = _copy(sharded, bad / "shard_deleted")
    (d / shards[2].name).unlink()
    d = out["shard_truncated"] = _copy(sharded, bad / "shard_truncated")
    _truncate(d / shards[2].name)
    d = out["index_garbled"] = _copy(sharded, bad / "index_garbled")
    (d / "model.safetensors.index.json").write_text('{"weight_map": ')
    return out


def _runs(root: Path, run: Path) -> dict[str, Path]:
    """Damaged copies of the trained run directory `run`."""
    out: dict[str, Path] = {}
    (ckpt,) = sorted((run / "checkpoints").iterdir())
    d = out["run_no_ckpt"] = root / "run_no_ckpt"
    (d / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "metrics.jsonl", d / "metrics.jsonl")
    d = out["run_uncommitted"] = _copy(run, root / "run_uncommitted")
    (d / "checkpoints" / ckpt.name / "COMMITTED").unlink()
    d = out["run_truncated"] = _copy(run, root / "run_truncated")
    _truncate(d / "checkpoints" / ckpt.name / WEIGHTS)
    d = out["run_deleted"] = _copy(run, root / "run_deleted")
    (d / "checkpoints" / ckpt.name / WEIGHTS).unlink()
    d = out["run_no_metrics"] = _copy(run, root / "run_no_metrics")
    (d / "metrics.jsonl").unlink()
    d = out["run_garbled_metrics"] = _copy(run, root / "run_garbled_metrics")
    (d / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": \nnot json\n')
    d = out["run_garbled_eval"] = _copy(run, root / "run_garbled_eval")  # the eval record cut in half
    lines = (d / "metrics.jsonl").read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if '"kind": "eval"' in line)
    lines[i] = lines[i][: len(lines[i]) // 2]
    (d / "metrics.jsonl").write_text("\n".join(lines + ['{"kind": "stopped", "step": 2}']) + "\n")
    d = out["run_dcp"] = _copy(run, root / "run_dcp")  # a checkpoint as torchrun writes it (DCP shards)
    for f in (d / "checkpoints" / ckpt.name).glob("*.safetensors"):
        f.unlink()
    (d / "checkpoints" / ckpt.name / ".metadata").write_bytes(b"not read")
    d = out["run_empty_metrics"] = _copy(run, root / "run_empty_metrics")
    (d / "metrics.jsonl").write_text("")
    # locked by a live training: pid 1 on this host is always alive
    d = out["run_locked"] = _copy(run, root / "run_locked")
    owner = {"pid": 1, "host": socket.gethostname(), "since": time.time(), "argv": ["widemoe", "train"]}
    (d / ".lock").write_text(json.dumps(owner) + "\n")
    return out


CONFIG_FILES = {
    "cfg_unknown_field.json": '{"preset": "micro", "hiden_size": 64}',
    "cfg_str_int.json": '{"preset": "micro", "hidden_size": "64"}',
    "cfg_null_int.json": '{"preset": "micro", "num_hidden_layers": null}',
    "cfg_bool_int.json": '{"preset": "micro", "num_hidden_layers": true}',
    "cfg_bool_str.json": '{"preset": "micro", "norm_topk_prob": "false"}',
    "cfg_nan.json": '{"preset": "micro", "rms_norm_eps": NaN}',
    "cfg_negative.json": '{"preset": "micro", "hidden_size": -64}',
    "cfg_zero_layers.json": '{"preset": "micro", "num_hidden_layers": 0}',
    "cfg_topk.json": '{"preset": "micro", "num_experts_per_tok": 9}',
    "cfg_unknown_preset.json": '{"preset": "nonesuch"}',
    "cfg_not_object.json": '["preset", "micro"]',
    "cfg_syntax.json": '{"preset": "micro",',
    "cfg_empty.json": "",
    "cfg_missing_sizes.json": '{"hidden_size": 64}',
    "cfg_unknown_field.toml": 'preset = "micro"\nhiden_size = 64\n',
    "cfg_str_int.toml": 'preset = "micro"\nhidden_size = "64"\n',
    "cfg_syntax.toml": 'preset = "micro"\nhidden_size = \n',
    "cfg_bool_int.toml": 'preset = "micro"\nnum_hidden_layers = true\n',
    "cfg_inf.toml": 'preset = "micro"\nrouted_scaling_factor = inf\n',
    "cfg_unknown_preset.toml": 'preset = "nonesuch"\n',
    "cfg.yaml": "preset: micro\n",
}


def _v4_hf_config() -> dict:
    return model_config_to_hf(get_preset("v4-tiny"))


def build_fixtures(root: Path, run: Path) -> dict[str, str]:
    """Every input of the bad-input table under `root`; `run` is a trained run directory to copy."""
    torch.manual_seed(0)
    ck = root / "ck"
    save_pretrained(WideMoeForCausalLM(get_preset("micro")), ck)
    sharded = root / "ck_sharded"
    save_pretrained(WideMoeForCausalLM(get_preset("micro")), sharded, max_shard_size="200KB")
    paths: dict[str, Path] = {"ck": ck, "ck_sharded": sharded, "run": _copy(run, root / "run")}
    paths["dst_existing"] = _copy(ck, root / "dst_existing")
    paths["dst_user"] = root / "dst_user"  # a directory of the user's own files
    paths["dst_user"].mkdir()
    (paths["dst_user"] / "notes.txt").write_text("mine\n")
    paths.update(_checkpoints(root, ck))
    paths.update(_sharded(root, sharded))
    paths.update(_runs(root, paths["run"]))
    (root / "empty_dir").mkdir()
    paths["empty_dir"] = root / "empty_dir"
    paths["a_file"] = root / "a_file.txt"
    paths["a_file"].write_text("not a model\n")
    cfg_dir = root / "configs"
    cfg_dir.mkdir()
    for name, text in CONFIG_FILES.items():
        (cfg_dir / name).write_text(text)
        paths[name.replace(".", "_")] = cfg_dir / name
    v4 = _v4_hf_config()  # DeepSeek-V4's config.json reader, with a RoPE block of the wrong shape
    for name, changes in {"v4_rope_params_str": {"rope_parameters": "yarn"},
                          "v4_rope_scaling_list": {"rope_scaling": [["type", "yarn"]]}}.items():
        (cfg_dir / f"{name}.json").write_text(json.dumps({**v4, **changes}))
        paths[name] = cfg_dir / f"{name}.json"
    paths["missing"] = root / "does_not_exist"
    paths["new_out"] = root / "new_out"
    paths["root"] = root
    return {k: str(v) for k, v in paths.items()}
