"""A space's values: what a trial samples, the corners and grid of each parameter, and a config with values set.

Pure: no model, no study, no I/O; a trial is anything with Optuna's ``suggest_*`` methods.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from objectives.config import ConfigError
from sweeper.grammar import entry_error
from sweeper.space import Param


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
    raise entry_error(p.name, f"grid sampling needs categorical or stepped parameters; {p.describe()} is "
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
