"""The type pass of a config dataclass: the expected type of each field, read from its annotation, and one
check per value that either normalises it or says what is wrong.

`widemoe.config` runs this pass over every field of `ModelConfig` before its value rules, so a value
from any source (keyword arguments, `replace`, a JSON/TOML file, an HF config.json) is refused the same
way: ``num_hidden_layers='4' must be an integer, not a string``. Nothing is coerced from a string and a
boolean is never a number; what is normalised is what was always meant: an integer where a float
belongs becomes a float, a list where a tuple belongs becomes a tuple, numpy scalars become Python
numbers. The module imports nothing from widemoe (config.py sits on top of it).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from dataclasses import dataclass
from typing import Any

_RULES = {int: "an integer", float: "a number", bool: "a boolean (true or false)", str: "a string",
          dict: "a mapping"}  # fmt: skip
_ITEMS = {int: "a list of integers", str: "a list of strings"}


@dataclass(frozen=True)
class Kind:
    """What a field holds: ``base`` (int, float, bool, str, tuple or dict), the element type of a tuple
    field, and whether null (None) is allowed."""

    base: type
    item: type | None = None
    optional: bool = False

    def rule(self, finite: bool = False) -> str:
        text = _ITEMS[self.item] if self.base is tuple else _RULES[self.base]
        if finite:
            text = "a finite number"
        return f"{text} or null" if self.optional else text


def kind_of(hint: Any) -> Kind:
    """The Kind of one (evaluated) annotation: int, float, bool, str, tuple[T, ...], dict[...] or an
    Optional of one of them. Any other annotation is a programming error."""
    args, origin = typing.get_args(hint), typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return dataclasses.replace(kind_of(inner), optional=True)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in _ITEMS:
        return Kind(tuple, item=args[0])
    if origin is dict or hint is dict:
        return Kind(dict)
    if hint in _RULES:
        return Kind(hint)
    raise TypeError(f"no type check for the annotation {hint!r}")


def kinds_of(cls: type) -> dict[str, Kind]:
    """The Kind of every field of a dataclass, in field order."""
    hints = typing.get_type_hints(cls)
    return {f.name: kind_of(hints[f.name]) for f in dataclasses.fields(cls)}


def is_integer(v: Any) -> bool:
    """An integer (Python or numpy), never a boolean."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _what(v: Any) -> str | None:
    """What a wrong value is, for the message's ``, not ...`` (None: nothing useful to add)."""
    if v is None:
        return "null"
    for cls, text in ((bool, "a boolean"), (str, "a string"), (dict, "a mapping"), ((list, tuple), "a list")):
        if isinstance(v, cls):
            return text
    if is_integer(v):
        return "an integer"
    if _is_real(v):
        return "a fractional number"
    return type(v).__name__


def _scalar(base: type, v: Any) -> tuple[bool, Any]:
    """(whether v is a value of `base`, v normalised) for int, float, bool, str, dict."""
    if base is int:
        return is_integer(v), int(v) if is_integer(v) else v
    if base is float:
        return _is_real(v), float(v) if _is_real(v) else v
    if base is bool:
        return isinstance(v, bool), v
    return isinstance(v, base), v


def check_value(name: str, kind: Kind, v: Any) -> tuple[Any, str | None]:
    """(v normalised, None) when v fits `kind`, else (v, the message naming the field, the value and the
    expected type)."""
    if v is None:
        return (v, None) if kind.optional else (v, f"{name}={v!r} must be {kind.rule()}, not null")
    if kind.base is tuple:
        if isinstance(v, (list, tuple)):
            items = [_scalar(kind.item, x) for x in v]
            if all(ok for ok, _ in items):
                return tuple(x for _, x in items), None
            return v, f"{name}={list(v)!r} must be {kind.rule()}"
        return v, f"{name}={v!r} must be {kind.rule()}, not {_what(v)}"
    ok, out = _scalar(kind.base, v)
    if not ok:
        return v, f"{name}={v!r} must be {kind.rule()}, not {_what(v)}"
    if kind.base is float and not math.isfinite(out):
        return v, f"{name}={v!r} must be {kind.rule(finite=True)}"
    return out, None


def is_finite_number(v: Any) -> bool:
    """A real number (never a boolean) that is neither nan nor infinite."""
    return _is_real(v) and math.isfinite(v)


__all__ = ["Kind", "check_value", "is_finite_number", "is_integer", "kind_of", "kinds_of"]
