"""Search space: YAML entries -> Params (name, config path, distribution, condition) in a sampling order.

An entry maps an Optuna parameter name to either a string in the override grammar of Hydra's Optuna
sweeper plugin (``choice(a, b)``, ``range(1, 9, step=2)``, ``interval(0, 1)``,
``tag(log, interval(1e-5, 1e-3))``, ``int(interval(4, 64))``; see ``sweeper.grammar``), with the plugin's
meaning, or a mapping::

    adamw.lr:
      path: optimizer.lr          # config path set by the value (default: the entry's name)
      type: float                 # float | int | categorical
      low: 1.0e-5
      high: 1.0e-3
      log: true
      when: {optimizer.name: adamw}   # sampled only when another parameter has one of these values

As in the plugin, an entry that is not a sweep (``lora.targets: qkv``, ``optimizer.betas: [0.9, 0.99]``)
fixes its path instead of searching it (``sweeper.overrides.split_fixed``).

Everything here is pure: no model, no study, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from sweeper.grammar import GRAMMAR, distribution_from_grammar, distribution_from_mapping, entry_error

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


def _condition(name: str, when: Any) -> Condition:
    if when is None:
        return ()
    if not isinstance(when, Mapping) or not when:
        raise entry_error(name, f"when must map a parameter to a value or list of values, got {when!r}")
    for k, v in when.items():
        if any(isinstance(x, (list, tuple, Mapping)) for x in (v if isinstance(v, (list, tuple)) else (v,))):
            raise entry_error(name, f"when: {k} must map to a value or a list of values, got {v!r}")
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
    raise entry_error(name, f"expected a grammar string ({GRAMMAR}) or a mapping, got {value!r}")


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
            raise entry_error(p.name, f"unknown config path {p.path!r}; {unknown_path_hint(p.path, known)}")


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
                raise entry_error(p.name, f"condition on {cond_name!r}, which is not a parameter of the space; "
                                          f"parameters: {', '.join(by_name)}")
            choices = getattr(parent.distribution, "choices", None)
            if choices is not None:
                bad = [a for a in allowed if a not in choices]
                if bad:
                    raise entry_error(p.name, f"condition value(s) {bad} are not choices of {cond_name}: "
                                              f"{list(choices)}")
    _check_path_clashes(params)
    return _topological(params, by_name)


def parse_space(entries: Mapping[str, Any], known_paths: Iterable[str] | None = None) -> list[Param]:
    """All entries -> Params in a sampling order where each condition's parameter comes first.

    ``compose.load`` runs the same steps with its value checks between them; this is the one call for a
    space written in code.

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
                    raise entry_error(b.name, f"sets {path!r} like {a.name!r} under a condition that can hold "
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
            raise entry_error(p.name, "conditions form a cycle")
        state[p.name] = 1
        for cond_name, _ in p.when:
            visit(by_name[cond_name])
        state[p.name] = 2
        ordered.append(p)

    for p in params:
        visit(p)
    return ordered
