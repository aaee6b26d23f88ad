"""Sweep strings and mappings -> Optuna distributions, with the meaning Hydra's Optuna sweeper plugin gives them.

The plugin's override grammar: ``choice(a, b)``, ``range(1, 9, step=2)``, ``interval(0, 1)``,
``tag(log, interval(1e-5, 1e-3))``, ``int(interval(4, 64))``; the mapping form: ``{type, low, high, step,
log, choices}``. Pure: no model, no study, no I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
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
from sweeper.redaction import redact_text

MAPPING_KEYS = ("path", "type", "low", "high", "step", "log", "choices", "when")
TYPES = ("float", "int", "categorical")
GRAMMAR = ("choice(a, b, ...), range(start, stop, step=s), interval(low, high), "
           "tag(log, interval(low, high)), int(interval(low, high))")


def entry_error(name: str, problem: str) -> ConfigError:
    """An error that names the search-space entry, as the user wrote it, before the problem."""
    return ConfigError(f"search_space.{name}: {problem}")


def _num(x: float) -> str:
    return f"{x:.10g}"


def _check_bounds(name: str, low: float, high: float, log: bool, step: float | None) -> None:
    if low >= high:
        raise entry_error(name, f"low ({low}) must be < high ({high})")
    if log and low <= 0:
        raise entry_error(name, f"log scale needs low > 0, got {low}")
    if step is None:
        return
    if step <= 0:
        raise entry_error(name, f"step must be > 0, got {step}")
    if log:
        raise entry_error(name, "log scale and step cannot be combined")
    n = (high - low) / step
    if n < 1:
        raise entry_error(name, f"step {step} is wider than the range [{low}, {high}]")
    if abs(n - round(n)) > 1e-8 * max(1.0, abs(n)):
        below, above = low + math.floor(n) * step, low + math.ceil(n) * step
        raise entry_error(name, f"step {step} does not divide the range [{low}, {high}]; "
                                f"high = {_num(below)} or {_num(above)} would")


def _categorical(name: str, choices: Sequence[Any]) -> CategoricalDistribution:
    if not isinstance(choices, (list, tuple)):  # a string would be split into its characters
        raise entry_error(name, f"choices must be a list of values, got {choices!r}")
    choices = list(choices)
    if not choices:
        raise entry_error(name, "choices are empty; give at least one value")
    seen: list[Any] = []
    for c in choices:
        if isinstance(c, (list, tuple, dict)):
            raise entry_error(name, f"choice {c!r} must be a scalar; write module lists as 'q_proj,v_proj'")
        # Optuna finds a choice by ==, so 1 and true (or 1 and 1.0) would be one choice.
        if c in seen:
            raise entry_error(name, f"duplicate choice {c!r} in {choices}")
        seen.append(c)
    return CategoricalDistribution(choices)


def _numeric(name: str, kind: str, low: Any, high: Any, log: bool, step: Any) -> BaseDistribution:
    for label, v in (("low", low), ("high", high), ("step", step)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise entry_error(name, f"{label} must be a number, got {v!r}")
        if v is not None and not math.isfinite(v):
            raise entry_error(name, f"{label} must be a finite number, got {v!r}")
    if low is None or high is None:
        raise entry_error(name, f"{kind} needs low and high")
    # Optuna's int distributions take log with the default step 1; only a coarser step clashes.
    checked_step = None if kind == "int" and log and step == 1 else step
    _check_bounds(name, low, high, log, checked_step)
    if kind == "int":
        given = [v for v in (low, high, step) if v is not None]
        if any(isinstance(v, float) and not v.is_integer() for v in given):
            raise entry_error(name, f"int bounds and step must be whole numbers, got {low}, {high}, {step}")
        return IntDistribution(int(low), int(high), log=log, step=1 if step is None else int(step))
    return FloatDistribution(float(low), float(high), log=log, step=None if step is None else float(step))


def range_end(start: Any, stop: Any, step: Any) -> Any:
    """The highest value ``range(start, stop, step=step)`` samples in the plugin: ``stop`` when the steps reach
    it (the plugin's ranges include it), else the last step below it (where Optuna trims ``high`` to).

    Anything that is not an increasing range of finite numbers comes back as ``stop``, for the bound checks
    to name.
    """
    values = (start, stop, step)
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
        return stop
    if step <= 0 or stop <= start:
        return stop
    if all(isinstance(v, int) for v in values):
        n = (stop - start) // step
        return start + n * step if n else stop
    # The tolerance keeps range(0.0, 0.3, step=0.1) ending at 0.3, not at 0.2.
    n = math.floor((stop - start) / step + 1e-9)
    return round(start + n * step, 12) if n else stop


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
        return _numeric(name, kind, start, range_end(start, stop, step), False, step)
    if isinstance(value, IntervalSweep):
        start, end = value.start, value.end
        kind = "int" if isinstance(start, int) and isinstance(end, int) else "float"
        return _numeric(name, kind, start, end, "log" in value.tags, None)
    raise entry_error(name, f"{override.input_line!r} is not a sweep; use {GRAMMAR}")


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
        error = str(e).strip()
        reason = error.splitlines()[0] if error else type(e).__name__
    quoted = quoted_url(text)
    if quoted is not None:
        try:
            return _PARSER.parse_override(quoted)
        except HydraException:
            pass
    key, _, value = text.partition("=")
    where = context or f"search_space.{key}"
    # The override may hold a password, and Hydra's reason quotes pieces of it.
    raise ConfigError(redact_text(f"{where}: cannot parse {value!r}: {reason}; sweeps are written {GRAMMAR}",
                                  source=text)) from None


URL = re.compile(r"[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)


def quoted_url(text: str) -> str | None:
    """``key=URL`` with the URL quoted, which Hydra's grammar reads as one string even where it could not read it
    bare (an ``=`` or a quote in a password or query: ``postgresql://u:Pa=ss@host/db``); None for other values.
    """
    key, sep, value = text.partition("=")
    quote = next((q for q in ("'", '"') if q not in value), None)
    if not sep or quote is None or not URL.fullmatch(value):
        return None
    body = value.rstrip("\\")
    # Backslashes are literal in a quoted string, except before its closing quote, where they come in pairs.
    tail = "\\" * 2 * (len(value) - len(body))
    return f"{key}={quote}{body}{tail}{quote}"


def distribution_from_grammar(name: str, text: str) -> BaseDistribution:
    """``choice(...)``/``range(...)``/``interval(...)``/``tag(log, ...)``/``int(...)`` -> distribution."""
    override = parse_override(f"{name}={text}")
    if not override.is_sweep_override():
        raise entry_error(name, f"{text!r} is not a sweep; use {GRAMMAR}")
    return distribution_from_override(name, override)


def distribution_from_mapping(name: str, spec: Mapping[str, Any]) -> BaseDistribution:
    """A ``{type, low, high, step, log, choices}`` mapping -> distribution."""
    unknown = set(spec) - set(MAPPING_KEYS)
    if unknown:
        raise entry_error(name, f"unknown key(s) {sorted(unknown)}; allowed: {', '.join(MAPPING_KEYS)}")
    kind = spec.get("type") or ("categorical" if "choices" in spec else None)
    if kind not in TYPES:
        raise entry_error(name, f"type {kind!r} is not allowed; choose one of {', '.join(TYPES)}")
    if kind == "categorical":
        if spec.get("choices") is None:
            raise entry_error(name, "categorical needs choices")
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
