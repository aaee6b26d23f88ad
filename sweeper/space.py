"""Search space: YAML entries and Hydra sweep strings -> Optuna distributions, and trial -> config values.

An entry maps an Optuna parameter name to either a string in the override grammar of Hydra's Optuna
sweeper plugin (``choice(a, b)``, ``range(1, 9, step=2)``, ``interval(0, 1)``,
``tag(log, interval(1e-5, 1e-3))``, ``int(interval(4, 64))``), with the plugin's meaning, or a mapping::

    adamw.lr:
      path: optimizer.lr          # config path set by the value (default: the entry's name)
      type: float                 # float | int | categorical
      low: 1.0e-5
      high: 1.0e-3
      log: true
      when: {optimizer.name: adamw}   # sampled only when another parameter has one of these values

As in the plugin, an entry that is not a sweep (``lora.targets: qkv``, ``optimizer.betas: [0.9, 0.99]``)
fixes its path instead of searching it.

Everything here is pure: no model, no study, no I/O.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.errors import HydraException
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from objectives.config import ConfigError

MAPPING_KEYS = ("path", "type", "low", "high", "step", "log", "choices", "when")
TYPES = ("float", "int", "categorical")
GRAMMAR = ("choice(a, b, ...), range(start, stop, step=s), interval(low, high), "
           "tag(log, interval(low, high)), int(interval(low, high))")

Condition = tuple[tuple[str, tuple[Any, ...]], ...]


@dataclass(frozen=True)
class Param:
    """One sampled parameter: its Optuna name, the config path it sets, its distribution, its condition."""

    name: str
    path: str
    distribution: BaseDistribution
    when: Condition = ()

    def active(self, sampled: Mapping[str, Any]) -> bool:
        """True when every condition holds for the parameters sampled so far."""
        return all(name in sampled and sampled[name] in allowed for name, allowed in self.when)

    def describe(self) -> str:
        """The distribution in one line, e.g. ``float [1e-05, 0.001] log``."""
        d = self.distribution
        if isinstance(d, CategoricalDistribution):
            return f"categorical {list(d.choices)}"
        assert isinstance(d, (IntDistribution, FloatDistribution))
        kind = "int" if isinstance(d, IntDistribution) else "float"
        text = f"{kind} [{d.low}, {d.high}]"
        if d.log:
            text += " log"
        if d.step is not None and (kind == "float" or d.step != 1):
            text += f" step {d.step}"
        return text

    def describe_condition(self) -> str:
        """The condition in one line, e.g. ``optimizer.name == 'sgd'``; empty when unconditional."""
        return " and ".join(
            f"{n} == {v[0]!r}" if len(v) == 1 else f"{n} in {list(v)!r}" for n, v in self.when
        )


def _err(name: str, problem: str) -> ConfigError:
    return ConfigError(f"search_space.{name}: {problem}")


def _num(x: float) -> str:
    return f"{x:.10g}"


def _check_bounds(name: str, low: float, high: float, log: bool, step: float | None) -> None:
    if low >= high:
        raise _err(name, f"low ({low}) must be < high ({high})")
    if log and low <= 0:
        raise _err(name, f"log scale needs low > 0, got {low}")
    if step is None:
        return
    if step <= 0:
        raise _err(name, f"step must be > 0, got {step}")
    if log:
        raise _err(name, "log scale and step cannot be combined")
    n = (high - low) / step
    if abs(n - round(n)) > 1e-8 * max(1.0, abs(n)):
        below, above = low + math.floor(n) * step, low + math.ceil(n) * step
        raise _err(name, f"step {step} does not divide the range [{low}, {high}]; "
                         f"high = {_num(below)} or {_num(above)} would")


def _categorical(name: str, choices: Sequence[Any]) -> CategoricalDistribution:
    choices = list(choices)
    if not choices:
        raise _err(name, "choices are empty; give at least one value")
    seen: list[Any] = []
    for c in choices:
        if isinstance(c, (list, tuple, dict)):
            raise _err(name, f"choice {c!r} must be a scalar; write module lists as 'q_proj,v_proj'")
        # Optuna finds a choice by ==, so 1 and true (or 1 and 1.0) would be one choice.
        if c in seen:
            raise _err(name, f"duplicate choice {c!r} in {choices}")
        seen.append(c)
    return CategoricalDistribution(choices)


def _numeric(name: str, kind: str, low: Any, high: Any, log: bool, step: Any) -> BaseDistribution:
    for label, v in (("low", low), ("high", high), ("step", step)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise _err(name, f"{label} must be a number, got {v!r}")
    if low is None or high is None:
        raise _err(name, f"{kind} needs low and high")
    # Optuna's int distributions take log with the default step 1; only a coarser step clashes.
    checked_step = None if kind == "int" and log and step == 1 else step
    _check_bounds(name, low, high, log, checked_step)
    if kind == "int":
        given = [v for v in (low, high, step) if v is not None]
        if any(isinstance(v, float) and not v.is_integer() for v in given):
            raise _err(name, f"int bounds and step must be whole numbers, got {low}, {high}, {step}")
        return IntDistribution(int(low), int(high), log=log, step=1 if step is None else int(step))
    return FloatDistribution(float(low), float(high), log=log, step=None if step is None else float(step))


def distribution_from_override(name: str, override: Override) -> BaseDistribution:
    """The distribution Hydra's Optuna sweeper plugin gives a sweep override.

    ``range(start, stop, step)`` is a stepped int (or float) distribution with both ends included,
    ``interval`` a float distribution unless cast with ``int(...)``, ``tag(log, ...)`` a log scale,
    ``choice`` and ``shuffle(range(...))`` categoricals.
    """
    value = override.value()
    if isinstance(value, ChoiceSweep):
        return _categorical(name, list(override.sweep_iterator()))
    if isinstance(value, RangeSweep):
        if value.shuffle:
            return _categorical(name, list(override.sweep_iterator()))
        start, stop, step = value.start, value.stop, value.step
        kind = "float" if any(isinstance(v, float) for v in (start, stop, step)) else "int"
        return _numeric(name, kind, start, stop, False, step)
    if isinstance(value, IntervalSweep):
        start, end = value.start, value.end
        kind = "int" if isinstance(start, int) and isinstance(end, int) else "float"
        return _numeric(name, kind, start, end, "log" in value.tags, None)
    raise _err(name, f"{override.input_line!r} is not a sweep; use {GRAMMAR}")


_PARSER: OverridesParser | None = None


def parse_override(text: str, context: str | None = None) -> Override:
    """Parse ``key=value`` in Hydra's override grammar.

    Args:
        text: the override.
        context: how an error names the override; default ``search_space.<key>``.

    Raises:
        ConfigError: naming the override, Hydra's reason and the grammar.
    """
    global _PARSER
    _PARSER = _PARSER or OverridesParser.create()
    try:
        return _PARSER.parse_override(text)
    except HydraException as e:
        key, _, value = text.partition("=")
        where = context or f"search_space.{key}"
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{where}: cannot parse {value!r}: {first_line}; "
                          f"sweeps are written {GRAMMAR}") from None


def distribution_from_grammar(name: str, text: str) -> BaseDistribution:
    """``choice(...)``/``range(...)``/``interval(...)``/``tag(log, ...)``/``int(...)`` -> distribution."""
    override = parse_override(f"{name}={text}")
    if not override.is_sweep_override():
        raise _err(name, f"{text!r} is not a sweep; use {GRAMMAR}")
    return distribution_from_override(name, override)


def distribution_from_mapping(name: str, spec: Mapping[str, Any]) -> BaseDistribution:
    """A ``{type, low, high, step, log, choices}`` mapping -> distribution."""
    unknown = set(spec) - set(MAPPING_KEYS)
    if unknown:
        raise _err(name, f"unknown key(s) {sorted(unknown)}; allowed: {', '.join(MAPPING_KEYS)}")
    kind = spec.get("type") or ("categorical" if "choices" in spec else None)
    if kind not in TYPES:
        raise _err(name, f"type {kind!r} is not allowed; choose one of {', '.join(TYPES)}")
    if kind == "categorical":
        if spec.get("choices") is None:
            raise _err(name, "categorical needs choices")
        return _categorical(name, spec["choices"])
    return _numeric(name, kind, spec.get("low"), spec.get("high"), bool(spec.get("log", False)),
                    spec.get("step"))


def as_mapping(distribution: BaseDistribution) -> dict[str, Any]:
    """The mapping form of a distribution (the inverse of ``distribution_from_mapping``)."""
    d = distribution
    if isinstance(d, CategoricalDistribution):
        return {"type": "categorical", "choices": list(d.choices)}
    assert isinstance(d, (IntDistribution, FloatDistribution))
    kind = "int" if isinstance(d, IntDistribution) else "float"
    out: dict[str, Any] = {"type": kind, "low": d.low, "high": d.high, "log": d.log}
    if d.step is not None and not (kind == "int" and d.step == 1):
        out["step"] = d.step
    return out


def _condition(name: str, when: Any) -> Condition:
    if when is None:
        return ()
    if not isinstance(when, Mapping) or not when:
        raise _err(name, f"when must map a parameter to a value or list of values, got {when!r}")
    return tuple(
        (str(k), tuple(v) if isinstance(v, (list, tuple)) else (v,)) for k, v in when.items()
    )


def parse_entry(name: str, value: Any) -> Param:
    """One search-space entry (grammar string or mapping) -> Param."""
    if isinstance(value, str):
        return Param(name, name, distribution_from_grammar(name, value))
    if isinstance(value, Mapping):
        path = str(value.get("path") or name)
        return Param(name, path, distribution_from_mapping(name, value), _condition(name, value.get("when")))
    raise _err(name, f"expected a grammar string ({GRAMMAR}) or a mapping, got {value!r}")


def parse_entries(entries: Mapping[str, Any]) -> list[Param]:
    """Every entry -> Param, in the entries' order (no cross-entry checks)."""
    return [parse_entry(str(name), value) for name, value in entries.items()]


def unknown_path_hint(path: str, known: Iterable[str]) -> str:
    """What to say about a path that cannot be searched: the searchable paths under its root, or all."""
    known = sorted(known)
    root = path.split(".")[0]
    near = [k for k in known if k.split(".")[0] == root]
    if near:
        return f"searchable paths under {root}: {', '.join(near)}"
    if root in ("model", "data"):
        return (f"{root}.* is loaded once per sweep and cannot be searched; searchable roots: "
                f"{', '.join(sorted({k.split('.')[0] for k in known}))}")
    return f"searchable paths: {', '.join(known)}"


def check_paths(params: Sequence[Param], known_paths: Iterable[str]) -> None:
    """ConfigError naming the first parameter whose config path is not searchable, and what is."""
    known = set(known_paths)
    for p in params:
        if p.path not in known:
            raise _err(p.name, f"unknown config path {p.path!r}; {unknown_path_hint(p.path, known)}")


def order_params(params: Sequence[Param]) -> list[Param]:
    """Check conditions and path clashes; order so that each condition's parameter comes first.

    Raises:
        ConfigError: a condition on a missing parameter or on a value it cannot take, two parameters
            setting one path under conditions that can hold together, or conditions in a cycle.
    """
    by_name = {p.name: p for p in params}
    for p in params:
        for cond_name, allowed in p.when:
            parent = by_name.get(cond_name)
            if parent is None:
                raise _err(p.name, f"condition on {cond_name!r}, which is not a parameter of the space; "
                                   f"parameters: {', '.join(by_name)}")
            choices = getattr(parent.distribution, "choices", None)
            if choices is not None:
                bad = [a for a in allowed if a not in choices]
                if bad:
                    raise _err(p.name, f"condition value(s) {bad} are not choices of {cond_name}: "
                                       f"{list(choices)}")
    _check_path_clashes(params)
    return _topological(params, by_name)


def parse_space(entries: Mapping[str, Any], known_paths: Iterable[str] | None = None) -> list[Param]:
    """All entries -> Params in a sampling order where each condition's parameter comes first.

    Raises:
        ConfigError: a bad entry, an unknown config path (when ``known_paths`` is given), or any
            problem ``order_params`` finds.
    """
    params = parse_entries(entries)
    if known_paths is not None:
        check_paths(params, known_paths)
    return order_params(params)


def _check_path_clashes(params: Sequence[Param]) -> None:
    by_path: dict[str, list[Param]] = {}
    for p in params:
        by_path.setdefault(p.path, []).append(p)
    for path, group in by_path.items():
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                if not exclusive(a, b):
                    raise _err(b.name, f"sets {path!r} like {a.name!r} under a condition that can hold "
                                       "at the same time; give them exclusive 'when' values")


def exclusive(a: Param, b: Param) -> bool:
    """True when no trial can sample both: they require different values of one parameter."""
    da, db = dict(a.when), dict(b.when)
    return any(k in db and not set(da[k]) & set(db[k]) for k in da)


def _topological(params: Sequence[Param], by_name: Mapping[str, Param]) -> list[Param]:
    ordered: list[Param] = []
    state: dict[str, int] = {}

    def visit(p: Param) -> None:
        if state.get(p.name) == 2:
            return
        if state.get(p.name) == 1:
            raise _err(p.name, "conditions form a cycle")
        state[p.name] = 1
        for cond_name, _ in p.when:
            visit(by_name[cond_name])
        state[p.name] = 2
        ordered.append(p)

    for p in params:
        visit(p)
    return ordered


def sample(trial: Any, params: Sequence[Param]) -> dict[str, Any]:
    """Ask the trial for every active parameter; returns config path -> value."""
    sampled: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for p in params:
        if not p.active(sampled):
            continue
        sampled[p.name] = _suggest(trial, p)
        values[p.path] = sampled[p.name]
    return values


def _suggest(trial: Any, p: Param) -> Any:
    d = p.distribution
    if isinstance(d, CategoricalDistribution):
        return trial.suggest_categorical(p.name, d.choices)
    if isinstance(d, IntDistribution):
        return trial.suggest_int(p.name, d.low, d.high, step=d.step, log=d.log)
    assert isinstance(d, FloatDistribution)
    return trial.suggest_float(p.name, d.low, d.high, step=d.step, log=d.log)


def split_overrides(args: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Command-line overrides -> (sweep entries by name, plain overrides for Hydra's compose).

    As in Hydra, ``key=a,b`` is a choice sweep; quote a comma-separated value to keep it one
    value: ``"lora.targets='q_proj,v_proj'"``.
    """
    sweeps: dict[str, str] = {}
    plain: list[str] = []
    for arg in args:
        override = parse_override(arg, context=f"override {arg!r}")
        if override.is_sweep_override():
            sweeps[override.key_or_group] = arg.split("=", 1)[1]
        else:
            plain.append(arg)
    return sweeps, plain


def split_fixed(entries: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Entries -> (entries to sample, config path -> fixed value for entries that are not sweeps).

    Hydra's Optuna sweeper treats a plain value among its params as fixed; so does this, which lets
    its configs move over unchanged. A string is read in the override grammar (``'8'`` is 8).
    """
    sampled: dict[str, Any] = {}
    fixed: dict[str, Any] = {}
    for name, value in entries.items():
        name = str(name)
        if isinstance(value, Mapping):
            sampled[name] = value
        elif isinstance(value, str):
            override = parse_override(f"{name}={value}")
            if override.is_sweep_override():
                sampled[name] = value
            else:
                fixed[name] = override.value()
        else:
            fixed[name] = value
    return sampled, fixed


def _entry_path(name: str, value: Any) -> str:
    return str(value.get("path") or name) if isinstance(value, Mapping) else name


def merge_sweeps(entries: Mapping[str, Any], sweeps: Mapping[str, str]) -> dict[str, Any]:
    """Add command-line sweeps to the entries.

    A sweep named like an entry replaces its distribution and keeps its path and condition
    (``adamw.lr='tag(log, interval(1e-5, 1e-3))'`` narrows AdamW's rate only); a sweep on a config
    path replaces every entry that sets that path (``optimizer.lr=...`` replaces both per-optimizer
    rates with one range).
    """
    out = {str(k): v for k, v in entries.items()}
    for name, text in sweeps.items():
        current = out.get(name)
        if isinstance(current, Mapping):
            keep = {k: current[k] for k in ("path", "when") if current.get(k) is not None}
            out[name] = {**keep, **as_mapping(distribution_from_grammar(name, text))}
            continue
        out = {k: v for k, v in out.items() if k == name or _entry_path(k, v) != name}
        out[name] = text
    return out


def corner_values(p: Param) -> list[Any]:
    """The values at the edges of a parameter's range (all choices for a categorical)."""
    d = p.distribution
    if isinstance(d, CategoricalDistribution):
        return list(d.choices)
    assert isinstance(d, (IntDistribution, FloatDistribution))
    return [d.low, d.high]


def grid_values(p: Param) -> list[Any]:
    """Every value a grid search visits; ConfigError when the parameter is continuous."""
    d = p.distribution
    if isinstance(d, CategoricalDistribution):
        return list(d.choices)
    if isinstance(d, IntDistribution) and not d.log:
        return list(range(d.low, d.high + 1, d.step))
    if isinstance(d, FloatDistribution) and d.step is not None:
        n = int(round((d.high - d.low) / d.step))
        # Rounded so the grid holds 0.3, not 0.30000000000000004.
        return [round(d.low + i * d.step, 12) for i in range(n + 1)]
    raise _err(p.name, f"grid sampling needs categorical or stepped parameters; {p.describe()} is "
                       "continuous: use choice(...) or range(low, high, step=...)")


def volume(params: Sequence[Param]) -> float:
    """Number of distinct configurations, or inf when a parameter is continuous."""
    total = 1.0
    for p in params:
        try:
            total *= len(grid_values(p))
        except ConfigError:
            return math.inf
    return total


def apply_values(config: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a nested config with each ``path -> value`` set (the trial's sampled values)."""
    out: dict[str, Any] = copy.deepcopy(dict(config))
    for path, value in values.items():
        node = out
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def fix_params(entries: Mapping[str, Any], fixed: Mapping[str, Any]) -> dict[str, Any]:
    """Drop entries whose path the user fixed on the command line.

    Entries conditioned on a fixed parameter keep only the branch that matches the fixed value, with
    that condition removed (``optimizer.name=sgd`` keeps SGD's learning rate and drops AdamW's).
    """
    name_to_path = {str(n): _entry_path(str(n), v) for n, v in entries.items()}
    fixed_names = {n for n, path in name_to_path.items() if path in fixed}
    out: dict[str, Any] = {}
    for name, value in entries.items():
        name = str(name)
        if name in fixed_names:
            continue
        if isinstance(value, Mapping) and value.get("when"):
            when = dict(value["when"])
            keep = True
            for cond in list(when):
                if cond in fixed_names:
                    allowed = when.pop(cond)
                    allowed = allowed if isinstance(allowed, (list, tuple)) else [allowed]
                    keep = keep and fixed[name_to_path[cond]] in allowed
            if not keep:
                continue
            value = {**value, "when": when or None}
        out[name] = value
    return out
