#!/usr/bin/env python3
"""Extract Jane Austen's six novels from the R lazy-load database of Debian's ``r-cran-janeaustenr``.

This is how ``data/austen.txt.gz`` (widemoe's vendored prose corpus) was made; see data/PROVENANCE.md.
It needs only the Python standard library, no R:

    apt-get download r-cran-janeaustenr            # 1.0.0-1 on Debian 12, 1.6 MB
    dpkg-deb -x r-cran-janeaustenr_1.0.0-1_all.deb ja
    python scripts/extract_austen.py ja/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb \
        --out-dir /tmp/austen --vendor data/austen.txt.gz

Format (R's lazy-load database, as written by ``tools:::makeLazyLoadDB``):

- ``Rdata.rdx`` is a gzip-compressed R serialisation of ``list(variables=list(name=c(offset, length)),
  references=list(), compressed=TRUE)``: where each object's block sits inside ``Rdata.rdb``.
- ``Rdata.rdb`` is a sequence of blocks; each block is a 4-byte big-endian uncompressed length and a
  zlib stream (``compressed=TRUE``; types 2/3, bzip2/xz, prefix one more byte and are not used here).
- Each decompressed block is an R XDR serialisation: ``b"X\\n"``, format version, R version, minimal
  version, (version 3:) a native-encoding name, then one object. Every novel is a character vector
  (STRSXP, type 16) of lines: a count, then per element a CHARSXP with a flags int, a length (-1 = NA)
  and the UTF-8 bytes.

When the .rdx file sits beside the .rdb (the normal case) the object names come from it; otherwise the
blocks are read in file order, which is alphabetical order of the object names.

The vendored file holds the novels one after another, each starting with a header line
``<<<NOVEL Title>>>`` followed by the novel's lines joined by newlines. It is written with gzip -9 and
mtime 0, so the same input gives the same bytes.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import struct
import sys
import zlib
from pathlib import Path

# R object names in the package -> the novels' titles, in the package's (alphabetical) order.
TITLES: dict[str, str] = {
    "emma": "Emma",
    "mansfieldpark": "Mansfield Park",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
    "prideprejudice": "Pride and Prejudice",
    "sensesensibility": "Sense and Sensibility",
}
NOVEL_HEADER = "<<<NOVEL {title}>>>"

# SEXP type codes used by the serialisation (R Internals, "Serialization formats").
_SYMSXP, _LISTSXP, _CHARSXP, _LGLSXP, _INTSXP, _REALSXP, _STRSXP, _VECSXP = 1, 2, 9, 10, 13, 14, 16, 19
_REFSXP, _NILVALUE_SXP = 255, 254
_IS_OBJECT, _HAS_ATTR, _HAS_TAG = 1 << 8, 1 << 9, 1 << 10


class RdbError(ValueError):
    """The input is not the R lazy-load format this extractor understands; the message says why."""


class _XdrReader:
    """A minimal reader of R's XDR serialisation: just the types a data package's .rdx/.rdb use."""

    def __init__(self, data: bytes, where: str) -> None:
        self.data, self.pos, self.where = data, 0, where
        self.refs: list[object] = []

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def _bytes(self, n: int) -> bytes:
        b = self.data[self.pos : self.pos + n]
        if len(b) != n:
            raise RdbError(f"{self.where}: truncated serialisation at byte {self.pos}")
        self.pos += n
        return b

    def header(self) -> None:
        if self._bytes(2) != b"X\n":
            raise RdbError(f"{self.where}: not an XDR serialisation (must start with b'X\\n')")
        version = self._int()
        self._int(), self._int()  # writer's R version, minimal reader version
        if version == 3:
            self._bytes(self._int())  # native encoding name, e.g. "UTF-8"
        elif version != 2:
            raise RdbError(f"{self.where}: serialisation format version {version} (need 2 or 3)")

    def item(self) -> object:
        flags = self._int()
        kind = flags & 0xFF
        if kind == _NILVALUE_SXP:
            return None
        if kind == _REFSXP:
            return self.refs[(flags >> 8) - 1]
        if kind == _SYMSXP:
            sym = self.item()  # the symbol's print name, a CHARSXP
            self.refs.append(sym)
            return sym
        if kind == _CHARSXP:
            n = self._int()
            return None if n == -1 else self._bytes(n).decode("utf-8")
        if kind == _LISTSXP:  # pairlist, as used for attributes: (attr?, tag?, car, cdr)
            attrs = self.item() if flags & _HAS_ATTR else None
            del attrs
            tag = self.item() if flags & _HAS_TAG else None
            car = self.item()
            rest = self.item()
            out = {tag: car}
            if isinstance(rest, dict):
                out.update(rest)
            return out
        if kind in (_STRSXP, _VECSXP, _INTSXP, _LGLSXP, _REALSXP):
            n = self._int()
            if kind == _STRSXP:
                value: object = [self.item() for _ in range(n)]
            elif kind == _VECSXP:
                value = [self.item() for _ in range(n)]
            elif kind == _REALSXP:
                value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
                self.pos += 8 * n
            else:
                value = list(struct.unpack_from(f">{n}i", self.data, self.pos))
                self.pos += 4 * n
            if flags & _HAS_ATTR:
                attrs = self.item()
                names = attrs.get("names") if isinstance(attrs, dict) else None
                if names is not None and isinstance(value, list):
                    return dict(zip(names, value))
            return value
        raise RdbError(f"{self.where}: unsupported SEXP type {kind} at byte {self.pos - 4}")


def _unserialize(data: bytes, where: str) -> object:
    reader = _XdrReader(data, where)
    reader.header()
    return reader.item()


def _read_block(rdb: bytes, offset: int, where: str) -> tuple[bytes, int]:
    """Decompress the block at ``offset``; return its payload and the offset just past it."""
    if offset + 4 > len(rdb):
        raise RdbError(f"{where}: block offset {offset} is past the end ({len(rdb)} bytes)")
    (expected,) = struct.unpack_from(">I", rdb, offset)
    dec = zlib.decompressobj()
    payload = dec.decompress(rdb[offset + 4 :])
    if len(payload) != expected or not dec.eof:
        raise RdbError(
            f"{where}: block at {offset} decompressed to {len(payload)} bytes, header says {expected}"
        )
    end = len(rdb) - len(dec.unused_data)
    return payload, end


def read_novels(rdb_path: Path) -> dict[str, list[str]]:
    """Return {object name: lines} for every character vector in the .rdb, in the package's order."""
    rdb = rdb_path.read_bytes()
    rdx_path = rdb_path.with_suffix(".rdx")
    offsets: list[tuple[str | None, int]]
    if rdx_path.exists():
        index = _unserialize(gzip.decompress(rdx_path.read_bytes()), str(rdx_path))
        if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
            raise RdbError(f"{rdx_path}: expected a named list with 'variables'")
        if index.get("compressed") not in ([True], [1]):
            raise RdbError(
                f"{rdx_path}: compressed={index.get('compressed')} (only zlib, TRUE, is supported)"
            )
        offsets = [(name, pos[0]) for name, pos in index["variables"].items()]
    else:
        offsets, pos = [], 0
        while pos < len(rdb):
            offsets.append((None, pos))
            pos = _read_block(rdb, pos, str(rdb_path))[1]
    novels: dict[str, list[str]] = {}
    for i, (name, pos) in enumerate(offsets):
        payload, _ = _read_block(rdb, pos, str(rdb_path))
        lines = _unserialize(payload, f"{rdb_path} block {i}")
        if not isinstance(lines, list) or not all(isinstance(s, str) or s is None for s in lines):
            raise RdbError(f"{rdb_path} block {i}: expected a character vector")
        key = name if name is not None else sorted(TITLES)[i]
        novels[key] = ["" if s is None else s for s in lines]
    return novels


def vendored_text(novels: dict[str, list[str]]) -> str:
    """The text of the vendored file: each novel under its ``<<<NOVEL Title>>>`` header."""
    parts = []
    for key in sorted(novels):
        if key not in TITLES:
            raise RdbError(f"unknown object {key!r} in the package (expected one of {sorted(TITLES)})")
        parts.append(
            NOVEL_HEADER.format(title=TITLES[key]) + "\n" + "\n".join(novels[key]).strip("\n") + "\n"
        )
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rdb", type=Path, help="path to janeaustenr/data/Rdata.rdb")
    ap.add_argument("--out-dir", type=Path, help="write one <name>.txt per novel here")
    ap.add_argument("--vendor", type=Path, help="write the combined gzip file here (e.g. data/austen.txt.gz)")
    args = ap.parse_args(argv)
    novels = read_novels(args.rdb)
    if set(novels) != set(TITLES):
        raise RdbError(f"{args.rdb}: found objects {sorted(novels)}, expected {sorted(TITLES)}")
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        for key, lines in novels.items():
            (args.out_dir / f"{key}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    text = vendored_text(novels)
    raw = text.encode("utf-8")
    for key, lines in novels.items():
        print(f"{TITLES[key]:<24} {len(lines):>6} lines {sum(len(s) + 1 for s in lines):>9} chars")
    print(f"combined text: {len(raw)} bytes, sha256 {hashlib.sha256(raw).hexdigest()}")
    if args.vendor:
        args.vendor.parent.mkdir(parents=True, exist_ok=True)
        args.vendor.write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))
        print(f"wrote {args.vendor} ({args.vendor.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
