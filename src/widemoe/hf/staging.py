"""Write a model directory so that a failure or a kill never loses what the destination held.

`check_destination` refuses, before anything is written, a destination that is the source, lies
inside it or contains it, is a file, or is a non-empty directory without ``overwrite``.
`staged_directory(dst)` yields a fresh temporary directory beside ``dst`` (same file system) to write
into; when the body completes, the destination's own files that are not model files are hard-linked
into it (the user's notes, evaluation results, ... are kept), and the two directories are exchanged in
one atomic ``renameat2(RENAME_EXCHANGE)`` (two renames where the kernel lacks it), then the old one is
removed. On an exception the temporary directory is removed and ``dst`` is exactly as before; a kill
leaves ``dst`` untouched and a ``.NAME.staging-*`` directory beside it that can be deleted. A
symlinked ``dst`` is written through: the directory it points to is replaced, the link stays.

Model files (replaced or dropped with ``overwrite``): weights and their index, ``config.json``,
``generation_config.json`` and the tokenizer files.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from widemoe.hf.safetensors_io import is_weight_file

METADATA_FILES = ("config.json", "generation_config.json")


class DestinationError(ValueError):
    """The destination cannot be written without losing or corrupting something."""


class OverlapError(DestinationError):
    """DST is SRC, lies inside it or contains it: the arguments contradict each other (a usage error)."""

    exit_status = 2  # widemoe.commands.errors: a usage error


def is_model_file(name: str, tokenizer_files: tuple[str, ...]) -> bool:
    return is_weight_file(name) or name in METADATA_FILES or name in tokenizer_files


def check_destination(dst: Path, src: Path, *, overwrite: bool) -> None:
    """Refuse (DestinationError) a destination that a write would clobber or that overlaps ``src``."""
    d, s = dst.resolve(), src.resolve()
    if d == s or d.is_relative_to(s) or s.is_relative_to(d):
        raise OverlapError(
            f"DST {dst} must differ from SRC {src}, and neither may lie inside the other "
            "(SRC is read while DST is written)"
        )
    if dst.exists() and not dst.is_dir():
        raise DestinationError(f"{dst}: exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise DestinationError(
            f"{dst}: directory exists and is not empty; pass --overwrite (overwrite=True) to replace "
            "its model files (weights, config.json, tokenizer; other files are kept), or choose a new "
            "directory"
        )


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def _carry_over(old: Path, new: Path, tokenizer_files: tuple[str, ...]) -> None:
    """Hard-link the entries of ``old`` that ``new`` does not replace into ``new``."""
    if not old.is_dir():
        return
    for entry in old.iterdir():
        if (new / entry.name).exists() or is_model_file(entry.name, tokenizer_files):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), new / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(new / entry.name))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (38, 22, 95):  # ENOSYS, EINVAL (file system without exchange), EOPNOTSUPP
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(tmp: Path, dst: Path) -> Path | None:
    """Put ``tmp`` at ``dst``; returns where the old ``dst`` now lies (to delete), or None."""
    if not dst.exists():
        os.rename(tmp, dst)
        return None
    if _exchange(tmp, dst):
        return tmp
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.rename(dst, old / dst.name)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old / dst.name, dst)  # put the old one back
        os.rmdir(old)
        raise
    return old


@contextlib.contextmanager
def staged_directory(dst: Path, tokenizer_files: tuple[str, ...] = ()) -> Iterator[Path]:
    """A temporary directory to write ``dst``'s new contents into, swapped in when the body completes."""
    if dst.is_symlink():  # replace what the link points to, keep the link
        dst = dst.resolve()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.staging-", dir=dst.parent))
    try:
        yield tmp
        _carry_over(dst, tmp, tokenizer_files)
        old = _swap_in(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["DestinationError", "OverlapError", "check_destination", "is_model_file", "staged_directory"]
