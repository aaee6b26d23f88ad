"""Command-line overrides and fixed values against the search-space entries, before they are parsed.

As in Hydra's Optuna sweeper, ``key=a,b`` on the command line and a sweep string in a space file search
a path, while a plain value fixes it. Pure: no model, no study, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sweeper.grammar import as_mapping, distribution_from_grammar, parse_override


def split_overrides(args: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Command-line overrides -> (sweep entries by name, plain overrides for Hydra's compose).

    As in Hydra, ``key=a,b`` is a choice sweep; quote a comma-separated value to keep it one
    value: ``"lora.targets='q_proj,v_proj'"``. A URL that Hydra's grammar cannot read bare
    (``study.storage=postgresql://u:Pa=ss@host/db``) is quoted for it.
    """
    sweeps: dict[str, str] = {}
    plain: list[str] = []
    for arg in args:
        override = parse_override(arg, context=f"override {arg!r}")
        if override.is_sweep_override():
            sweeps[override.key_or_group] = arg.split("=", 1)[1]
        else:
            # As parsed: a URL Hydra reads only quoted (a password with '=') comes back quoted.
            plain.append(override.input_line or arg)
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
