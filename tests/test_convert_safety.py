"""`widemoe convert` never loses data: options and the source's accounting are checked before DST is
touched, the output is staged in a temporary directory beside DST and swapped in only when complete,
and a non-empty DST is refused unless `--overwrite` (which replaces the model files, keeps the rest)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from widemoe.cli import main
from widemoe.hf import convert_checkpoint, save_pretrained
from widemoe.model.causal_lm import build_model
from widemoe.presets import get_preset


def _snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under ``root`` with its content hash (directories: '')."""
    return {
        str(p.relative_to(root)): ("" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
    }


def _run(argv: list[str]) -> tuple[int, str]:
    """(exit status, message) of `widemoe argv`, whether the command returns or cli.main exits."""
    try:
        return main(argv), ""
    except SystemExit as e:
        return (e.code if isinstance(e.code, int) else 1), str(e.code)


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ck") / "ck"
    save_pretrained(build_model(get_preset("micro", vocab_size=64), seed=0), d)
    return d


def _used_dst(ck: Path, tmp_path: Path) -> Path:
    """A copy of the checkpoint plus files of the user's own (a note, a folder)."""
    dst = tmp_path / "work" / "dst"
    shutil.copytree(ck, dst)
    (dst / "NOTES.md").write_text("mine\n")
    (dst / "eval").mkdir()
    (dst / "eval" / "scores.json").write_text("{}\n")
    return dst


def test_bad_shard_size_leaves_dst_byte_identical(ck, tmp_path, capsys) -> None:
    dst = _used_dst(ck, tmp_path)
    before = _snapshot(tmp_path / "work")
    rc, msg = _run(["convert", str(ck), str(dst), "--max-shard-size", "lots", "--overwrite"])
    assert rc == 2  # a usage error
    assert "--max-shard-size" in msg + capsys.readouterr().err
    assert _snapshot(tmp_path / "work") == before


@pytest.mark.parametrize("argv", [["--ignore", "("], ["--max-shard-size", "0"]])
def test_bad_options_are_refused_before_dst_exists(ck, tmp_path, argv) -> None:
    dst = tmp_path / "new"
    rc, _ = _run(["convert", str(ck), str(dst), *argv])
    assert rc in (1, 2)
    assert not dst.exists() and list(tmp_path.iterdir()) == []


def test_non_empty_dst_is_refused_without_overwrite(ck, tmp_path, capsys) -> None:
    dst = _used_dst(ck, tmp_path)
    before = _snapshot(tmp_path / "work")
    rc, msg = _run(["convert", str(ck), str(dst)])
    assert rc in (1, 2)  # the status of a refused command is widemoe.cli's
    assert "--overwrite" in msg + capsys.readouterr().err
    assert _snapshot(tmp_path / "work") == before


def test_failure_mid_write_leaves_dst_unchanged(ck, tmp_path, monkeypatch) -> None:
    import widemoe.hf.safetensors_io as sio

    dst = _used_dst(ck, tmp_path)
    before = _snapshot(tmp_path / "work")
    real = sio.write_safetensors

    def broken(path, items, metadata):  # writes part of the output, then the disk "fills up"
        real(path, items[:3], metadata)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sio, "write_safetensors", broken)
    with pytest.raises(OSError, match="No space"):
        convert_checkpoint(ck, dst, "fp32", overwrite=True)
    assert _snapshot(tmp_path / "work") == before  # no temporary directory left beside DST either


def test_overwrite_replaces_model_files_and_keeps_the_users(ck, tmp_path) -> None:
    dst = _used_dst(ck, tmp_path)
    sd = load_file(dst / "model.safetensors")
    save_file({k: v + 1 for k, v in sd.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "model-00001-of-00009.safetensors").write_bytes(b"stale shard of an older save")
    rc, _ = _run(["convert", str(ck), str(dst), "--dtype", "fp32", "--overwrite"])
    assert rc == 0
    assert (dst / "NOTES.md").read_text() == "mine\n" and (dst / "eval" / "scores.json").exists()
    assert not (dst / "model-00001-of-00009.safetensors").exists()
    got, want = load_file(dst / "model.safetensors"), load_file(ck / "model.safetensors")
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["dst"]


def test_convert_into_a_new_directory_leaves_no_temporary(ck, tmp_path) -> None:
    rc, _ = _run(["convert", str(ck), str(tmp_path / "out" / "bf16"), "--max-shard-size", "20KB"])
    assert rc == 0
    assert (tmp_path / "out" / "bf16" / "model.safetensors.index.json").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["bf16"]


def test_src_inside_dst_is_refused(ck, tmp_path) -> None:
    outer = tmp_path / "outer"
    shutil.copytree(ck, outer / "ck")
    before = _snapshot(outer)
    rc, _ = _run(["convert", str(outer / "ck"), str(outer), "--overwrite"])
    assert rc in (1, 2)
    assert _snapshot(outer) == before


_KILLED_MID_WRITE = """
import os, signal, sys
import widemoe.hf.safetensors_io as sio
from widemoe.hf import convert_checkpoint
real, calls = sio.write_safetensors, []
def write_then_die(path, items, metadata):
    real(path, items, metadata)
    calls.append(path)
    if len(calls) == 2:  # two shards on disk in the staging directory, then SIGKILL
        os.kill(os.getpid(), signal.SIGKILL)
sio.write_safetensors = write_then_die
convert_checkpoint(sys.argv[1], sys.argv[2], "fp32", max_shard_size="40KB", overwrite=True)
"""


def test_a_kill_mid_write_leaves_dst_unchanged(ck, tmp_path) -> None:
    """A real SIGKILL (no cleanup runs): DST intact, only a staging directory beside it."""
    import subprocess
    import sys

    dst = _used_dst(ck, tmp_path)
    before = _snapshot(dst)
    p = subprocess.run([sys.executable, "-c", _KILLED_MID_WRITE, str(ck), str(dst)], capture_output=True)
    assert p.returncode == -9, p.stderr.decode()[-2000:]
    assert _snapshot(dst) == before
    left = [q.name for q in (tmp_path / "work").iterdir() if q.name != "dst"]
    assert len(left) == 1 and left[0].startswith(".dst.staging-")


def test_a_symlinked_dst_is_written_through(ck, tmp_path) -> None:
    real = _used_dst(ck, tmp_path)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    convert_checkpoint(ck, link, "fp32", overwrite=True)
    assert link.is_symlink() and (real / "NOTES.md").read_text() == "mine\n"
    assert (real / "model.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["dst"]
