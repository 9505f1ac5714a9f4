"""Seeded synthetic math: arithmetic, multi-step word problems and linear equations with worked answers.

The "math" domain of widemoe's demo corpus (docs/data: shared/reference/ecosystem.md section 1 recommends
template problems with a worked "A:" line). Every problem is one text of the form

    Q: <question>
    A: <steps>. The answer is <result>.

All numbers are integers and every division is exact, so the worked steps are always correct (the tests
re-evaluate them). Randomness comes only from the ``random.Random`` passed in, never from the global RNG,
so a seed fixes the text byte for byte on every machine and Python >= 3.10 (``Random.randint``/``choice``
are stable across these versions for integer arguments).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

__all__ = ["PROBLEM_KINDS", "generate_problems", "make_problem"]

_NAMES = (
    "Ada", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam",
    "Maya", "Noor", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Wen", "Yusuf", "Zoe",
)  # fmt: skip
# (singular, plural, container, containers) for word problems.
_ITEMS = (
    ("apple", "apples", "bag", "bags"), ("pencil", "pencils", "box", "boxes"),
    ("marble", "marbles", "jar", "jars"), ("card", "cards", "pack", "packs"),
    ("egg", "eggs", "carton", "cartons"), ("book", "books", "crate", "crates"),
    ("sticker", "stickers", "sheet", "sheets"), ("cookie", "cookies", "tray", "trays"),
    ("coin", "coins", "purse", "purses"), ("flower", "flowers", "bunch", "bunches"),
    ("stamp", "stamps", "album", "albums"), ("bolt", "bolts", "tin", "tins"),
)  # fmt: skip
_VARS = ("x", "y", "n", "k", "t")


def _arith(rng: random.Random) -> tuple[str, str]:
    """One binary operation; division is built from a product so it is exact."""
    op = rng.choice("+-*/")
    if op == "+":
        a, b = rng.randint(2, 9999), rng.randint(2, 9999)
        r = a + b
    elif op == "-":
        a, b = rng.randint(2, 9999), rng.randint(2, 9999)
        r = a - b
    elif op == "*":
        a, b = rng.randint(2, 999), rng.randint(2, 99)
        r = a * b
    else:
        b, r = rng.randint(2, 99), rng.randint(2, 999)
        a = b * r
    q = rng.choice(("What is {e}?", "Compute {e}.", "Calculate {e}.", "{e} = ?"))
    return q.format(e=f"{a} {op} {b}"), f"{a} {op} {b} = {r}. The answer is {r}."


def _expression(rng: random.Random) -> tuple[str, str]:
    """A three-operand expression evaluated in two worked steps (brackets fix the order)."""
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 20)
    op1, op2 = rng.choice("+-"), rng.choice("*+-")
    s1 = a + b if op1 == "+" else a - b
    r = s1 * c if op2 == "*" else (s1 + c if op2 == "+" else s1 - c)
    expr = f"({a} {op1} {b}) {op2} {c}"
    steps = f"{a} {op1} {b} = {s1}. {s1} {op2} {c} = {r}."
    if rng.random() < 0.5:  # a third step half the time
        d = rng.randint(2, 50)
        op3 = rng.choice("+-")
        r2 = r + d if op3 == "+" else r - d
        expr, steps, r = f"{expr} {op3} {d}", f"{steps} {r} {op3} {d} = {r2}.", r2
    return f"Evaluate {expr}.", f"{steps} The answer is {r}."


def _word_problem(rng: random.Random) -> tuple[str, str]:
    """Start amount, buy groups of items, give some away: three worked steps."""
    name, other = rng.sample(_NAMES, 2)
    one, many, box, boxes = rng.choice(_ITEMS)
    start, groups, per = rng.randint(3, 60), rng.randint(2, 9), rng.randint(2, 12)
    bought = groups * per
    have = start + bought
    give = rng.randint(1, have - 1)
    left = have - give
    q = (
        f"{name} has {start} {many}. {name} buys {groups} {boxes} with {per} {many} in each {box}, "
        f"then gives {give} {one if give == 1 else many} to {other}. How many {many} does {name} have now?"
    )
    a = (
        f"{groups} * {per} = {bought}. {start} + {bought} = {have}. {have} - {give} = {left}. "
        f"The answer is {left}."
    )
    return q, a


def _share_problem(rng: random.Random) -> tuple[str, str]:
    """Total cost, then an exact equal share: multiplication then division."""
    names = rng.sample(_NAMES, rng.randint(2, 5))
    one, many, _, _ = rng.choice(_ITEMS)
    share, price = rng.randint(1, 20), rng.randint(1, 15)
    count = share * len(names)
    total = count * price
    who = ", ".join(names[:-1]) + f" and {names[-1]}"
    q = (
        f"{who} buy {count} {many if count > 1 else one} at {price} dollars each and split the cost equally. "
        f"How much does each person pay?"
    )
    each = total // len(names)
    a = f"{count} * {price} = {total}. {total} / {len(names)} = {each}. The answer is {each}."
    return q, a


def _linear(rng: random.Random) -> tuple[str, str]:
    """a*v + b = c with an integer solution, solved in two steps."""
    v = rng.choice(_VARS)
    sol, a, b = rng.randint(-20, 20), rng.randint(2, 12), rng.randint(-50, 50)
    c = a * sol + b
    lhs = f"{a}{v} + {b}" if b >= 0 else f"{a}{v} - {-b}"
    move = f"{c} - {b}" if b >= 0 else f"{c} + {-b}"
    return (
        f"Solve for {v}: {lhs} = {c}.",
        f"{a}{v} = {move} = {c - b}. {v} = {c - b} / {a} = {sol}. The answer is {v} = {sol}.",
    )


def _linear_both_sides(rng: random.Random) -> tuple[str, str]:
    """a*v + b = c*v + d with a != c and an integer solution."""
    v = rng.choice(_VARS)
    sol = rng.randint(-15, 15)
    a, c = rng.sample(range(2, 13), 2)
    b = rng.randint(-40, 40)
    d = (a - c) * sol + b  # so that a*sol + b == c*sol + d

    def side(k: int, m: int) -> str:
        return f"{k}{v} + {m}" if m >= 0 else f"{k}{v} - {-m}"

    return (
        f"Solve for {v}: {side(a, b)} = {side(c, d)}.",
        f"{a}{v} - {c}{v} = {d} - {b}, so {a - c}{v} = {d - b}. {v} = {d - b} / {a - c} = {sol}. "
        f"The answer is {v} = {sol}.",
    )


PROBLEM_KINDS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic": _arith,
    "expression": _expression,
    "word": _word_problem,
    "share": _share_problem,
    "linear": _linear,
    "linear2": _linear_both_sides,
}
_KIND_ORDER = tuple(PROBLEM_KINDS)
_KIND_WEIGHTS = (3, 2, 2, 1, 2, 1)  # arithmetic and equations dominate, word problems add English


def make_problem(rng: random.Random, kind: str | None = None) -> str:
    """One "Q: ...\\nA: ..." problem; ``kind`` is one of PROBLEM_KINDS, or None for a weighted choice."""
    if kind is None:
        kind = rng.choices(_KIND_ORDER, weights=_KIND_WEIGHTS)[0]
    elif kind not in PROBLEM_KINDS:
        raise ValueError(f"kind={kind!r} is not one of {list(PROBLEM_KINDS)}")
    q, a = PROBLEM_KINDS[kind](rng)
    return f"Q: {q}\nA: {a}"


def generate_problems(seed: int, target_chars: int) -> Iterator[str]:
    """Problems from ``random.Random(seed)`` until their total length reaches ``target_chars``."""
    rng = random.Random(seed)
    total = 0
    while total < target_chars:
        p = make_problem(rng)
        total += len(p) + 2  # the blank line that separates problems in a document
        yield p
