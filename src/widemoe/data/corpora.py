"""The offline demo corpus: prose (Jane Austen), code (Python stdlib) and math (synthetic), with fixed splits.

Sources and licences are in shared/reference/ecosystem.md section 1 and data/PROVENANCE.md:

- **prose**: Jane Austen's six novels, vendored as ``data/austen.txt.gz`` (extracted from Debian's
  ``r-cran-janeaustenr`` 1.0.0-1 by scripts/extract_austen.py; package MIT, texts public domain). One
  document per chapter (front matter joins the first chapter; a "VOLUME II" heading joins the chapter it
  opens). Held out: the last ``PROSE_HELDOUT_CHAPTERS`` chapters of every novel.
- **code**: the running Python's own standard-library source (PSF-2.0 licence, ``LICENSE.txt`` beside it),
  the fixed sorted list ``STDLIB_MODULES`` of top-level modules present in CPython 3.10, 3.11, 3.12 and
  3.13 and in Debian's python3.11 (tests, idlelib, lib2to3, turtledemo, ensurepip, site-packages,
  tkinter, the PEP 594 removals and data-table modules left out): about 3.8 MB. One module per document.
  The same Python version gives the same corpus; a listed file that is missing raises ``CorpusError``
  naming it (no silent skip, so the content hash always means the full list). Held out: the modules in
  ``CODE_HELDOUT`` (picked once as the names whose sha256 is 0 mod 20).
- **math**: ``math_gen.generate_problems(seed, chars)``, about 2.5 MB by default. A problem goes to the
  held-out split when the sha256 of its text is 0 mod 20, so a problem text that happens to be generated
  twice always lands in the same split: train and held-out can never share a problem. Problems are
  grouped ``MATH_PROBLEMS_PER_DOC`` to a document.

Every ``Document`` carries its domain ("prose", "code", "math") and split ("train", "heldout"). The
``Corpus.content_hash`` (sha256 over every document's domain, split, name and text) keys the tokenizer and
token caches downstream.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import sys
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from widemoe.data.math_gen import generate_problems

__all__ = [
    "CODE_HELDOUT",
    "DOMAINS",
    "SPLITS",
    "STDLIB_MODULES",
    "Corpus",
    "CorpusError",
    "Document",
    "build_corpus",
    "data_dir",
    "default_cache_dir",
]

DOMAINS = ("prose", "code", "math")  # index = the domain id in packed batches
SPLITS = ("train", "heldout")
PROSE_HELDOUT_CHAPTERS = 2
MATH_PROBLEMS_PER_DOC = 8
MATH_HELDOUT_MOD = 20
NOVEL_HEADER_RE = re.compile(r"^<<<NOVEL (.+)>>>$")
_CHAPTER_RE = re.compile(r"^(CHAPTER|Chapter) [IVXLC\d]+\.?$")
_VOLUME_RE = re.compile(r"^VOLUME [IVX]+$")

# Top-level stdlib modules present (as <name>.py) in CPython 3.10.13, 3.11.7, 3.12.1, 3.13.0 and Debian
# 12's /usr/lib/python3.11. Left out on purpose: _pydecimal and pydoc (one 230 kB / 110 kB file each),
# this (rot13 text), antigravity, stringprep and _compat_pickle (tables), the sre_* shims, __future__.
STDLIB_MODULES: tuple[str, ...] = (
    "_aix_support", "_collections_abc", "_compression", "_markupbase", "_osx_support", "_py_abc", "_pyio",
    "_sitebuiltins", "_strptime", "_threading_local", "_weakrefset", "abc", "argparse", "ast", "base64",
    "bdb", "bisect", "bz2", "cProfile", "calendar", "cmd", "code", "codecs", "codeop", "colorsys",
    "compileall", "configparser", "contextlib", "contextvars", "copy", "copyreg", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "dis", "doctest", "enum", "filecmp", "fileinput", "fnmatch",
    "fractions", "ftplib", "functools", "genericpath", "getopt", "getpass", "gettext", "glob", "graphlib",
    "gzip", "hashlib", "heapq", "hmac", "imaplib", "inspect", "io", "ipaddress", "keyword", "linecache",
    "locale", "lzma", "mailbox", "mimetypes", "modulefinder", "netrc", "ntpath", "nturl2path", "numbers",
    "opcode", "operator", "optparse", "os", "pdb", "pickle", "pickletools", "pkgutil", "platform",
    "plistlib", "poplib", "posixpath", "pprint", "profile", "pstats", "pty", "py_compile", "pyclbr",
    "queue", "quopri", "random", "reprlib", "rlcompleter", "runpy", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "signal", "site", "smtplib", "socket", "socketserver", "ssl", "stat",
    "statistics", "string", "struct", "subprocess", "symtable", "tabnanny", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "token", "tokenize", "trace", "traceback", "tracemalloc", "tty",
    "turtle", "types", "typing", "uuid", "warnings", "wave", "weakref", "webbrowser", "zipapp",
    "zipimport",
)  # fmt: skip
CODE_HELDOUT: tuple[str, ...] = (
    "colorsys",
    "enum",
    "mailbox",
    "pickletools",
    "tarfile",
    "tempfile",
    "traceback",
)


class CorpusError(ValueError):
    """The corpus cannot be built as specified; the message names the file or setting and the rule (a
    ValueError: the CLI reports it as one line, see widemoe.commands.errors)."""


@dataclass(frozen=True)
class Document:
    name: str  # e.g. "Emma/12", "argparse", "math/00042"
    domain: str  # one of DOMAINS
    split: str  # one of SPLITS
    text: str


@dataclass(frozen=True)
class Corpus:
    documents: tuple[Document, ...]
    content_hash: str = field(default="")

    def __post_init__(self) -> None:
        if not self.content_hash:
            object.__setattr__(self, "content_hash", _content_hash(self.documents))

    def select(self, split: str | None = None, domain: str | None = None) -> list[Document]:
        """Documents of one split and/or domain, in corpus order."""
        if split is not None and split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {SPLITS}")
        if domain is not None and domain not in DOMAINS:
            raise ValueError(f"domain={domain!r} is not one of {DOMAINS}")
        return [
            d
            for d in self.documents
            if (split is None or d.split == split) and (domain is None or d.domain == domain)
        ]

    def sizes(self) -> dict[str, dict[str, int]]:
        """{"<domain>/<split>": {"docs": n, "chars": n, "bytes": n (UTF-8)}}."""
        out: dict[str, dict[str, int]] = {}
        for d in self.documents:
            s = out.setdefault(f"{d.domain}/{d.split}", {"docs": 0, "chars": 0, "bytes": 0})
            s["docs"] += 1
            s["chars"] += len(d.text)
            s["bytes"] += len(d.text.encode("utf-8"))
        return out


def _content_hash(docs: Iterable[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        body = d.text.encode("utf-8")
        h.update(f"{d.domain}\0{d.split}\0{d.name}\0{len(body)}\0".encode())
        h.update(body)
    return h.hexdigest()


def default_cache_dir() -> Path:
    """``$WIDEMOE_CACHE`` if set, else ``~/.cache/widemoe``."""
    env = os.environ.get("WIDEMOE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "widemoe"


def data_dir() -> Path:
    """Where the vendored data lives: ``$WIDEMOE_DATA_DIR`` if set, else ``data/`` at the repository root."""
    env = os.environ.get("WIDEMOE_DATA_DIR")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[3] / "data"


# --- prose --------------------------------------------------------------------------------------------


def read_austen(path: Path | None = None) -> dict[str, str]:
    """{title: full text} from the vendored gzip file written by scripts/extract_austen.py."""
    path = path or data_dir() / "austen.txt.gz"
    if not path.exists():
        raise CorpusError(
            f"{path}: the vendored Austen text is missing (set WIDEMOE_DATA_DIR or regenerate it with "
            "scripts/extract_austen.py, see data/PROVENANCE.md)"
        )
    novels: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in gzip.decompress(path.read_bytes()).decode("utf-8").split("\n"):
        m = NOVEL_HEADER_RE.match(line)
        if m:
            current = novels.setdefault(m.group(1), [])
        elif current is not None:
            current.append(line)
        elif line:
            raise CorpusError(f"{path}: text before the first <<<NOVEL Title>>> header")
    return {title: "\n".join(lines).strip("\n") for title, lines in novels.items()}


def split_chapters(text: str) -> list[str]:
    """Cut a novel at its chapter headings; front matter joins chapter 1, a VOLUME heading its chapter."""
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if _CHAPTER_RE.match(line.strip())]
    if not starts:
        return [text]
    # Move each start back over blank lines to a "VOLUME n" heading that opens the chapter.
    for k, i in enumerate(starts):
        j = i - 1
        while j > 0 and not lines[j].strip():
            j -= 1
        if j >= 0 and _VOLUME_RE.match(lines[j].strip()):
            starts[k] = j
    starts[0] = 0
    bounds = starts + [len(lines)]
    return ["\n".join(lines[a:b]).strip("\n") for a, b in zip(bounds[:-1], bounds[1:])]


def prose_documents(path: Path | None = None) -> list[Document]:
    docs = []
    for title, text in read_austen(path).items():
        chapters = split_chapters(text)
        n_train = len(chapters) - PROSE_HELDOUT_CHAPTERS
        if n_train < 1:
            raise CorpusError(f"{title}: {len(chapters)} chapters, need more than {PROSE_HELDOUT_CHAPTERS}")
        for i, ch in enumerate(chapters):
            docs.append(Document(f"{title}/{i + 1}", "prose", "train" if i < n_train else "heldout", ch))
    return docs


# --- code ---------------------------------------------------------------------------------------------


def code_documents(stdlib: Path | None = None) -> list[Document]:
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    docs = []
    for name in STDLIB_MODULES:
        path = root / f"{name}.py"
        if not path.is_file():
            raise CorpusError(
                f"{path}: stdlib module {name!r} of the fixed code corpus (STDLIB_MODULES) is missing on "
                f"Python {sys.version.split()[0]}; the list was checked on CPython 3.10-3.13"
            )
        # Decoding the bytes (no newline translation) keeps the text byte-exact across platforms.
        text = path.read_bytes().decode("utf-8")
        docs.append(Document(name, "code", "heldout" if name in CODE_HELDOUT else "train", text))
    return docs


# --- math ---------------------------------------------------------------------------------------------


def math_documents(seed: int, target_chars: int) -> list[Document]:
    groups: dict[str, list[str]] = {"train": [], "heldout": []}
    for p in generate_problems(seed, target_chars):
        bucket = int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "big") % MATH_HELDOUT_MOD
        groups["heldout" if bucket == 0 else "train"].append(p)
    docs = []
    for split, problems in groups.items():
        for i in range(0, len(problems), MATH_PROBLEMS_PER_DOC):
            text = "\n\n".join(problems[i : i + MATH_PROBLEMS_PER_DOC])
            docs.append(Document(f"math/{split}/{i // MATH_PROBLEMS_PER_DOC:05d}", "math", split, text))
    return docs


def build_corpus(
    math_chars: int = 2_500_000,
    math_seed: int = 1234,
    austen_path: Path | None = None,
    stdlib_dir: Path | None = None,
) -> Corpus:
    """The three-domain corpus (about 10 MB): Austen chapters, stdlib modules, seeded math problems."""
    if math_chars < 0:
        raise CorpusError(f"math_chars={math_chars} must be >= 0")
    docs = prose_documents(austen_path) + code_documents(stdlib_dir) + math_documents(math_seed, math_chars)
    return Corpus(tuple(docs))
