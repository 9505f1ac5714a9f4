"""The errors of reading a checkpoint, apart so that the byte level (`safetensors_io`) and the
accounting (`plan`) raise the same types: every one is a ``ValueError`` (``widemoe.cli`` prints it as
``error: ...``) and every refusal to load is a :class:`LoadError` (a caller that falls back to an
older checkpoint catches that one type)."""

from __future__ import annotations


class LoadError(ValueError):
    """Strict accounting failed: the message lists every offending key."""

    def __init__(
        self,
        path: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[str],
        other: list[str] | None = None,
    ) -> None:
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        self.other = other or []
        parts = [f"{path}: checkpoint does not match the model"]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches (key: expected vs found)", mismatched),
            ("other problems", self.other),
        ):
            if items:
                shown = items[:40] + ([f"... and {len(items) - 40} more"] if len(items) > 40 else [])
                parts.append(f"{len(items)} {title}:\n  " + "\n  ".join(shown))
        parts.append("Pass ignore=[regex, ...] (CLI: --ignore) only for keys you mean to skip.")
        super().__init__("\n".join(parts))


class DamagedCheckpointError(LoadError):
    """A weight file is missing, truncated or malformed; the one-line message names the file and what
    is wrong with it (``<file>: truncated: header says 1234 bytes of tensor data, file has 1000``)."""

    def __init__(self, message: str) -> None:
        self.missing, self.unexpected, self.mismatched, self.other = [], [], [], [message]
        ValueError.__init__(self, message)


class PickleCheckpointError(ValueError):
    """The directory holds only pickle weights, which widemoe never loads."""


__all__ = ["DamagedCheckpointError", "LoadError", "PickleCheckpointError"]
