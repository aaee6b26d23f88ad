"""Command line -> validated config and search space, before anything heavy is imported or loaded."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from objectives.config import ConfigError, LoraConfig, OptimizerConfig, TrainConfig, close_matches
from sweeper.config import CONF_DIR, SweepConfig, schema_message, to_schema
from sweeper.overrides import fix_params, merge_sweeps, split_fixed, split_overrides
from sweeper.redaction import redact_text
from sweeper.samplers import make_pruner, make_sampler
from sweeper.space import Param, check_paths, exclusive, order_params, parse_entries, unknown_path_hint
from sweeper.values import apply_values, corner_values

# Only what an adapter swap can change is searchable: the resident base and the data stay put.
SEARCHABLE_PATHS = tuple(
    f"{root}.{f.name}"
    for root, schema in (("lora", LoraConfig), ("optimizer", OptimizerConfig), ("train", TrainConfig))
    for f in dataclasses.fields(schema)
    if (root, f.name) != ("train", "device")
)


def hydra_message(text: str) -> str:
    """Hydra's error in one line, with the options of a config group when it lists them (naming the closest to
    an option it could not find), and no secret the overrides held."""
    lines = [line.strip() for line in text.strip().splitlines()]
    if not lines:
        return ""
    message = lines[0]
    heading = next((i for i, line in enumerate(lines) if line.startswith("Available options")), None)
    if heading is not None:
        options = []
        for line in lines[heading + 1:]:
            if not line or line.startswith("Config search path"):
                break
            options.append(line)
        in_group = re.search(r"'([^']+)'", lines[heading])
        group = in_group[1] if in_group else ""
        # The option may hold '/' (a mistyped URL), so it is what follows the group.
        missing = re.search(rf"Could not find '{re.escape(group)}/([^']*)'", message) if group else None
        hint = ""
        if missing:
            option = missing[1]
            message = f"{group}={option}: could not find '{group}/{option}'"
            near = " or ".join(f"{group}={o}" for o in close_matches(option, options))
            hint = f"did you mean {near}? " if near else ""
        message += f"; {hint}{lines[heading].rstrip(':').lower()}: {', '.join(options)}"
    return redact_text(message)


def force_values(overrides: Sequence[str], is_group: Callable[[str], bool]) -> list[str]:
    """Plain ``key=value`` overrides as Hydra's ``++key=value``: set the value, adding the key where it is absent.

    The YAML files hold only what differs from the schema's defaults, so most keys are absent from the composed
    config and Hydra would refuse a plain override of them; the schema (``to_schema``) checks every key instead,
    naming an unknown one. Group choices (``model=hub``), Hydra's own settings (``hydra.*``), additions,
    deletions and package overrides pass as is.
    """
    out = []
    for arg in overrides:
        key = arg.split("=", 1)[0]
        plain = "=" in arg and not arg.startswith(("+", "~")) and "@" not in key
        ours = key.split(".")[0].split("/")[0] != "hydra" and not is_group(key)
        out.append(f"++{arg}" if plain and ours else arg)
    return out


def hydra_compose(overrides: Sequence[str], config_file: str | Path | None = None) -> dict[str, Any]:
    """Compose ``conf/config.yaml`` (or a given file, e.g. an exported one) with Hydra overrides."""
    import yaml
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    path = Path(config_file).resolve() if config_file else CONF_DIR / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--config: {path} does not exist")
    try:
        with initialize_config_dir(config_dir=str(path.parent), version_base=None):
            cfg = compose(config_name=path.stem,
                          overrides=force_values(overrides, lambda key: (path.parent / key).is_dir()))
    except yaml.YAMLError as e:
        where = f" at line {e.problem_mark.line + 1}" if getattr(e, "problem_mark", None) else ""
        raise ConfigError(f"--config: {path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except HydraException as e:
        msg = hydra_message(str(e) or str(e.__cause__))
        raise ConfigError(msg or type(e).__name__) from None
    try:
        # A mandatory ``???`` left unset would otherwise be dropped by the schema merge, leaving its default.
        out = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise ConfigError(schema_message(e)) from None
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]


def _lookup(config: dict[str, Any], path: str) -> Any:
    node: Any = config
    for part in path.split("."):
        node = node[part]
    return node


def check_values(base: dict[str, Any], params: Sequence[Param]) -> None:
    """Every choice and both ends of every range must make a valid config (no unknown optimizer or preset)."""
    from objectives.targets import target_names

    for p in params:
        for value in corner_values(p):
            try:
                to_schema(apply_values(base, {p.path: value}))
                if p.path == "lora.targets":
                    target_names(value)
            except ConfigError as e:
                raise ConfigError(f"search_space.{p.name}: value {value!r} is invalid: {e}") from None


def check_consistent(cfg: SweepConfig, params: Sequence[Param]) -> None:
    """Checks across the fixed config and the space: a fixed target preset, and alpha against its ratio.

    ``lora.alpha`` overrides ``lora.alpha_ratio``, so searching the ratio while alpha is set (fixed
    or searched in the same trials) would search a parameter with no effect.
    """
    from objectives.targets import target_names

    by_path: dict[str, list[Param]] = {}
    for p in params:
        by_path.setdefault(p.path, []).append(p)
    if "lora.targets" not in by_path:
        target_names(cfg.lora.targets)
    for ratio in by_path.get("lora.alpha_ratio", []):
        if cfg.lora.alpha is not None and "lora.alpha" not in by_path:
            raise ConfigError(f"search_space.{ratio.name}: lora.alpha_ratio has no effect while lora.alpha "
                              f"is fixed at {cfg.lora.alpha}; fix the ratio too (lora.alpha_ratio="
                              f"{cfg.lora.alpha_ratio}) or set lora.alpha=null to search it")
        for alpha in by_path.get("lora.alpha", []):
            if not exclusive(ratio, alpha):
                raise ConfigError(
                    f"search_space.{ratio.name}: searched together with {alpha.name}, which overrides it; "
                    "search one of lora.alpha and lora.alpha_ratio (fix the other, e.g. lora.alpha_ratio=2), "
                    "or give them exclusive 'when' values")


def _space_entries(config: dict[str, Any], plain: Sequence[str],
                   sweeps: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The entries to sample, and the config with the space's fixed entries and the fixed paths applied."""
    entries = config.get("search_space") or {}
    space_fixed = split_fixed(entries)[1]
    for path in space_fixed:
        if path not in SEARCHABLE_PATHS:
            raise ConfigError(f"search_space.{path}: unknown config path {path!r}; "
                              f"{unknown_path_hint(path, SEARCHABLE_PATHS)}")
    cli_fixed = {a.split("=", 1)[0].lstrip("+~") for a in plain}
    # The command line wins over a value fixed in the space file.
    config = apply_values(config, {p: v for p, v in space_fixed.items() if p not in cli_fixed})
    fixed = {p: _lookup(config, p) for p in cli_fixed | set(space_fixed) if p in SEARCHABLE_PATHS}
    # Fixed entries drop out here, with the branches their values rule out.
    return merge_sweeps(fix_params(entries, fixed), sweeps), config


def load(args: Sequence[str], config_file: str | Path | None = None) -> tuple[SweepConfig, list[Param]]:
    """Overrides (plain and sweep) -> typed config and ordered search space, fully validated.

    A plain override of a searched path fixes it (removing it from the space); a sweep override
    (``lora.r=choice(8,16)``) adds or replaces a search-space entry (see ``overrides.merge_sweeps``).

    Raises:
        ConfigError: naming the field or entry, the problem and what is allowed.
    """
    sweeps, plain = split_overrides(args)
    entries, config = _space_entries(hydra_compose(plain, config_file), plain, sweeps)
    config["search_space"] = entries
    cfg = to_schema(config)
    params = parse_entries(entries)
    check_paths(params, SEARCHABLE_PATHS)
    # Values before conditions: an unknown optimizer is reported as such, not as a broken condition.
    check_values(config, params)
    params = order_params(params)
    check_consistent(cfg, params)
    make_sampler(cfg.study.sampler, params)
    make_pruner(cfg.study.pruner, cfg.train)
    return cfg, params
