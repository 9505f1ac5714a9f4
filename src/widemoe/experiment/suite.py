"""Suite files for `widemoe experiment`: which trainings to run, how many seeds, and how to judge them.

A suite is a TOML file written before anything runs, so that its comparisons and decision margins cannot
be tuned to the results. Layout (every key is checked; `widemoe/experiment/suites/seed-claims.toml` is the
shipped example):

    [suite]                 name, description, preset, the training settings every arm shares
                            (steps, seq_len, batch_size, lr, ...: `TRAIN_FIELDS`), final_eval_batches
                            (the held-out batches per domain of every run's final evaluation; default
                            all) and
    [suite.model]           model-config overrides every arm shares (widemoe.config.ModelConfig fields)
    [quick]                 `--quick`: steps (replaces suite.steps) and seeds (caps every arm's seeds)
    [[arm]]                 name, seeds, optional steps_factor (scales suite.steps: the dense ladder),
                            model = {...} (ModelConfig overrides), train = {...} (TRAIN_FIELDS except steps)
    [[comparison]]          name, arm_a, arm_b, metric, direction, margin, primary, claim:
                            a difference b - a judged by `widemoe.experiment.stats.verdict` with `rule`

`load_suite` validates everything it can without training: unknown keys, duplicate names, comparisons of
unknown arms, seed counts, and every arm's ModelConfig and TrainConfig are built (their own validation
names the field). Every error is a `SuiteError` naming the file, the entry (``arm[3] "E64k16"``), the field
and the rule. `interleaved_runs` gives the run order: seed by seed, every arm once per seed, so that
drifting machine load hits every arm alike.

The training-specific model changes (vocabulary, the balancing mode's loss coefficients) are applied by
`widemoe.train.build.model_config_for` when an arm trains; `Suite.arm_configs` is the architecture.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from widemoe.config import ConfigError, ModelConfig
from widemoe.experiment.stats import Rule
from widemoe.presets import PRESET_NAMES, get_preset
from widemoe.train.config import TrainConfig, TrainConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the `tomli` package (a dependency there)
    import tomli as tomllib

# Training settings a suite may set (shared in [suite], per arm in `train`). Left out on purpose: what the
# runner decides per run (run_dir, seed, resume, fresh, stop_at, progress), the model's name (preset and
# model tables instead of config_file/model_overrides) and expert parallelism (ep: one process per run).
TRAIN_FIELDS = (
    "seq_len", "batch_size", "grad_accum", "steps", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
    "betas", "grad_clip", "bf16", "balance", "bias_update_speed", "eval_every", "eval_batches", "log_every",
    "save_every", "keep_last", "vocab_size",
)
# The metrics a comparison may name: what the runner records per run (held-out loss: mean over domains).
METRICS = ("heldout_loss", "maxvio_batch", "maxvio_global", "dead_experts", "tokens_per_s")
DIRECTIONS = ("lower_is_better", "higher_is_better")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # arm names become run ids and directory names
_SUITE_KEYS = ("name", "description", "preset", "model", "final_eval_batches", *TRAIN_FIELDS)
_ARM_KEYS = ("name", "seeds", "steps_factor", "model", "train")
_QUICK_KEYS = ("steps", "seeds")
_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
_MODEL_LISTING = "the fields of widemoe.config.ModelConfig"
_COMPARISON_KEYS = ("name", "arm_a", "arm_b", "metric", "direction", "margin", "primary", "claim")


class SuiteError(ValueError):
    """An invalid suite file: the message names the file, the entry, the field and the rule."""

    exit_status = 2  # widemoe.commands.errors: a usage error (the file the user gave)


@dataclass(frozen=True)
class Arm:
    """One configuration trained with `seeds` seeds (0 .. seeds-1) for suite.steps * steps_factor steps."""

    name: str
    seeds: int
    steps_factor: float = 1.0
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Comparison:
    """A claim: the difference arm_b - arm_a of `metric`, judged by `rule` (stats.verdict)."""

    name: str
    arm_a: str
    arm_b: str
    metric: str
    direction: str
    margin: float
    primary: bool
    claim: str

    @property
    def rule(self) -> Rule:
        return Rule(self.name, self.direction, self.margin)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Run:
    """One training of the suite: an arm at a seed; `run_id` names its directory and its records."""

    arm: str
    seed: int

    @property
    def run_id(self) -> str:
        return f"{self.arm}-s{self.seed}"


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    preset: str
    model: dict[str, Any]
    train: dict[str, Any]  # the shared TRAIN_FIELDS, steps included
    arms: tuple[Arm, ...]
    comparisons: tuple[Comparison, ...]
    quick_steps: int | None = None
    quick_seeds: int | None = None
    is_quick: bool = False  # built by `quick()`: a smoke test, not evidence
    path: str = ""
    final_eval_batches: int | None = None  # per domain, of batch_size windows; None: the whole held-out set

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(f"{self.path}: no arm named {name!r}")

    def arm_config(self, arm: Arm) -> ModelConfig:
        """The arm's architecture: the preset, then the suite's model overrides, then the arm's."""
        return get_preset(self.preset, **{**self.model, **arm.model})

    def arm_configs(self) -> dict[str, ModelConfig]:
        return {a.name: self.arm_config(a) for a in self.arms}

    def arm_steps(self, arm: Arm) -> int:
        return max(1, round(self.train["steps"] * arm.steps_factor))

    def train_config(self, arm: Arm, seed: int, run_dir: str) -> TrainConfig:
        """The TrainConfig of one run (validated by TrainConfig itself)."""
        settings = {**self.train, **arm.train, "steps": self.arm_steps(arm)}
        return TrainConfig(
            run_dir=run_dir, preset=self.preset, model_overrides={**self.model, **arm.model}, seed=seed,
            progress=False, **settings,
        )

    def quick(self) -> Suite:
        """The `--quick` version: [quick] steps and seeds (a smoke test, not evidence)."""
        if self.quick_steps is None and self.quick_seeds is None:
            raise SuiteError(f"{self.path}: no [quick] table, so the suite has no --quick version")
        train = dict(self.train)
        if self.quick_steps is not None:
            train["steps"] = self.quick_steps
            train.pop("warmup_steps", None)  # a tenth of the shorter schedule
        arms = self.arms
        if self.quick_seeds is not None:
            arms = tuple(dataclasses.replace(a, seeds=min(a.seeds, self.quick_seeds)) for a in arms)
        return dataclasses.replace(self, train=train, arms=arms, is_quick=True)


def interleaved_runs(suite: Suite, seeds: int | None = None) -> list[Run]:
    """The run order: seed 0 of every arm (file order), then seed 1 of every arm, ...; an arm with fewer
    seeds drops out after its last. `seeds` (`--seeds N`) sets the count of the arms that have the suite's
    largest count and caps the others at N (arms given fewer seeds on purpose stay fewer)."""
    if seeds is not None and seeds < 1:
        raise SuiteError(f"--seeds {seeds}: must be >= 1")
    full = max(a.seeds for a in suite.arms)
    counts = {a.name: a.seeds if seeds is None else (seeds if a.seeds == full else min(a.seeds, seeds))
              for a in suite.arms}
    top = max(counts.values())
    return [Run(a.name, s) for s in range(top) for a in suite.arms if s < counts[a.name]]


# --- reading and validation ------------------------------------------------------------------------


def _check_keys(
    where: str, table: Any, allowed: tuple[str, ...], required: tuple[str, ...], listing: str | None = None
) -> None:
    """`table` is a table with only `allowed` keys and all `required` ones; `listing` replaces the list of
    allowed keys in the message (ModelConfig has ~60 fields: name where they are, suggest the closest)."""
    if not isinstance(table, dict):
        raise SuiteError(f"{where}: must be a table, got {table!r}")
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        close = [m for u in unknown for m in difflib.get_close_matches(u, allowed, n=1)]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        allowed_text = listing or ", ".join(allowed)
        raise SuiteError(f"{where}: unknown field(s) {unknown}{hint}; allowed: {allowed_text}")
    missing = [k for k in required if k not in table]
    if missing:
        raise SuiteError(f"{where}: missing required field(s) {missing}")


def _need(ok: bool, where: str, name: str, value: Any, rule: str) -> None:
    if not ok:
        raise SuiteError(f"{where}: {name} = {value!r}: {rule}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_name(where: str, name: Any) -> None:
    _need(isinstance(name, str) and bool(_NAME.match(name)), where, "name", name,
          "must be letters, digits, '.', '_' or '-' (it names run directories)")


def _read_suite_table(path: Path, d: dict[str, Any]) -> dict[str, Any]:
    where = f"{path}: [suite]"
    s = d.get("suite")
    _check_keys(where, s, _SUITE_KEYS, ("name", "preset", "steps"))
    _check_name(where, s["name"])
    description = s.get("description", "")
    _need(isinstance(description, str), where, "description", description, "must be text")
    if "final_eval_batches" in s:
        n = s["final_eval_batches"]
        _need(_is_int(n) and n >= 1, where, "final_eval_batches", n, "must be an integer >= 1")
    rule = f"must be one of {', '.join(PRESET_NAMES)}"
    _need(s["preset"] in PRESET_NAMES, where, "preset", s["preset"], rule)
    model = s.get("model", {})
    _check_keys(f"{where} model", model, _MODEL_FIELDS, (), _MODEL_LISTING)
    return s


def _read_arm(path: Path, i: int, a: Any, seen: set[str]) -> Arm:
    where = f"{path}: arm[{i}]" + (f' "{a["name"]}"' if isinstance(a, dict) and "name" in a else "")
    _check_keys(where, a, _ARM_KEYS, ("name", "seeds"))
    _check_name(where, a["name"])
    _need(a["name"] not in seen, where, "name", a["name"], "duplicate arm name (each arm needs its own)")
    _need(_is_int(a["seeds"]) and a["seeds"] >= 1, where, "seeds", a["seeds"], "must be an integer >= 1")
    factor = a.get("steps_factor", 1.0)
    _need(isinstance(factor, (int, float)) and not isinstance(factor, bool) and math.isfinite(factor)
          and factor > 0, where, "steps_factor", factor, "must be a finite number > 0")
    model = a.get("model", {})
    _check_keys(f"{where} model", model, _MODEL_FIELDS, (), _MODEL_LISTING)
    train = a.get("train", {})
    arm_train = tuple(k for k in TRAIN_FIELDS if k != "steps")
    if isinstance(train, dict) and "steps" in train:
        raise SuiteError(f"{where} train: steps: an arm scales the suite's steps with steps_factor instead "
                         "(so --quick shortens every arm alike)")
    _check_keys(f"{where} train", train, arm_train, ())
    return Arm(a["name"], a["seeds"], float(factor), dict(model), dict(train))


def _read_comparison(path: Path, i: int, c: Any, arms: set[str], seen: set[str]) -> Comparison:
    where = f"{path}: comparison[{i}]" + (f' "{c["name"]}"' if isinstance(c, dict) and "name" in c else "")
    _check_keys(where, c, _COMPARISON_KEYS, ("name", "arm_a", "arm_b", "metric", "direction", "margin"))
    _check_name(where, c["name"])
    _need(c["name"] not in seen, where, "name", c["name"], "duplicate comparison name")
    for key in ("arm_a", "arm_b"):
        rule = f"names no arm of this suite (arms: {', '.join(sorted(arms))})"
        _need(c[key] in arms, where, key, c[key], rule)
    _need(c["arm_a"] != c["arm_b"], where, "arm_b", c["arm_b"], "must differ from arm_a")
    _need(c["metric"] in METRICS, where, "metric", c["metric"], f"must be one of {', '.join(METRICS)}")
    rule = f"must be one of {', '.join(DIRECTIONS)}"
    _need(c["direction"] in DIRECTIONS, where, "direction", c["direction"], rule)
    m = c["margin"]
    _need(isinstance(m, (int, float)) and not isinstance(m, bool) and math.isfinite(m) and m >= 0, where,
          "margin", m, "must be a finite number >= 0 (in the metric's units)")
    primary = c.get("primary", False)
    _need(isinstance(primary, bool), where, "primary", primary, "must be true or false")
    claim = c.get("claim", "")
    _need(isinstance(claim, str), where, "claim", claim, "must be text")
    return Comparison(
        c["name"], c["arm_a"], c["arm_b"], c["metric"], c["direction"], float(m), primary, claim
    )


def _read_quick(path: Path, q: Any) -> tuple[int | None, int | None]:
    where = f"{path}: [quick]"
    _check_keys(where, q, _QUICK_KEYS, ())
    for key in _QUICK_KEYS:
        if key in q:
            _need(_is_int(q[key]) and q[key] >= 1, where, key, q[key], "must be an integer >= 1")
    return q.get("steps"), q.get("seeds")


def _check_buildable(suite: Suite, path: Path) -> None:
    """Build every arm's ModelConfig and TrainConfig (and the quick version's): their own validation names
    the field; this adds the file and the arm."""
    for i, arm in enumerate(suite.arms):
        where = f'{path}: arm[{i}] "{arm.name}"'
        try:
            suite.arm_config(arm)
        except ConfigError as e:
            raise SuiteError(f"{where} model: {str(e).removeprefix('ModelConfig: ')}") from None
        for version in (suite, *((suite.quick(),) if suite.quick_steps is not None else ())):
            try:
                version.train_config(version.arm(arm.name), 0, "runs/check")
            except (TrainConfigError, TypeError) as e:
                settings = "[suite] and [quick]" if version.is_quick else "[suite]"
                raise SuiteError(f"{where} train (with the {settings} settings): {e}") from None


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file; `SuiteError` names the file, the entry, the field and the rule."""
    p = Path(path)
    try:
        d = tomllib.loads(p.read_text())
    except OSError as e:
        raise SuiteError(f"{p}: cannot read suite file ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise SuiteError(f"{p}: not valid TOML: {e}") from None
    _check_keys(str(p), d, ("suite", "quick", "arm", "comparison"), ("suite", "arm"))
    s = _read_suite_table(p, d)
    arm_list = d["arm"] if isinstance(d["arm"], list) else [d["arm"]]
    arms: list[Arm] = []
    for i, a in enumerate(arm_list):
        arms.append(_read_arm(p, i, a, {x.name for x in arms}))
    names = {a.name for a in arms}
    comparisons: list[Comparison] = []
    comparison_list = d.get("comparison", [])
    for i, c in enumerate(comparison_list if isinstance(comparison_list, list) else [comparison_list]):
        comparisons.append(_read_comparison(p, i, c, names, {x.name for x in comparisons}))
    quick_steps, quick_seeds = _read_quick(p, d["quick"]) if "quick" in d else (None, None)
    train = {k: s[k] for k in TRAIN_FIELDS if k in s}
    suite = Suite(
        name=s["name"], description=s.get("description", ""), preset=s["preset"],
        model=dict(s.get("model", {})),
        train=train, arms=tuple(arms), comparisons=tuple(comparisons), quick_steps=quick_steps,
        quick_seeds=quick_seeds, path=str(p), final_eval_batches=s.get("final_eval_batches"),
    )
    _check_buildable(suite, p)
    return suite


# Suites shipped with widemoe (package data): `widemoe experiment seed-claims` finds them by name.
SUITES_DIR = Path(__file__).parent / "suites"


def shipped_suite(name: str) -> Path:
    """The path of a shipped suite by name (`seed-claims`), or SuiteError listing the shipped ones."""
    p = SUITES_DIR / f"{name}.toml"
    if not p.is_file():
        names = sorted(q.stem for q in SUITES_DIR.glob("*.toml"))
        raise SuiteError(
            f"no shipped suite named {name!r}; shipped: {', '.join(names)} (or give a file path)"
        )
    return p


__all__ = ["Arm", "Comparison", "METRICS", "Run", "SUITES_DIR", "Suite", "SuiteError", "TRAIN_FIELDS",
           "interleaved_runs", "load_suite", "shipped_suite"]
