"""Command line -> validated config and search space, before anything heavy is imported or loaded."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sweeper.config import CONF_DIR, ConfigError, LoraConfig, OptimizerConfig, SweepConfig, TrainConfig, to_schema
from sweeper.space import Param, apply_values, corner_values, fix_params, parse_space, split_overrides

# Only what an adapter swap can change is searchable: the resident base and the data stay put.
SEARCHABLE_PATHS = tuple(
    f"{root}.{f.name}"
    for root, schema in (("lora", LoraConfig), ("optimizer", OptimizerConfig), ("train", TrainConfig))
    for f in dataclasses.fields(schema)
    if (root, f.name) != ("train", "device")
)


def hydra_compose(overrides: Sequence[str], config_file: str | Path | None = None) -> dict[str, Any]:
    """Compose ``conf/config.yaml`` (or a given file, e.g. an exported one) with Hydra overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    path = Path(config_file).resolve() if config_file else CONF_DIR / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--config: {path} does not exist")
    try:
        with initialize_config_dir(config_dir=str(path.parent), version_base=None):
            cfg = compose(config_name=path.stem, overrides=list(overrides))
    except HydraException as e:
        msg = str(e) or str(e.__cause__)
        raise ConfigError(msg.strip().splitlines()[0] if msg.strip() else type(e).__name__) from None
    out = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]


def _lookup(config: dict[str, Any], path: str) -> Any:
    node: Any = config
    for part in path.split("."):
        node = node[part]
    return node


def check_values(base: dict[str, Any], params: Sequence[Param]) -> None:
    """Every choice and both ends of every range must make a valid config (unknown optimizer, bad preset...)."""
    from objectives.model import target_names

    for p in params:
        for value in corner_values(p):
            try:
                to_schema(apply_values(base, {p.path: value}))
                if p.path == "lora.targets":
                    target_names(value)
            except ConfigError as e:
                raise ConfigError(f"search_space.{p.name}: value {value!r} is invalid: {e}") from None


def load(args: Sequence[str], config_file: str | Path | None = None) -> tuple[SweepConfig, list[Param]]:
    """Overrides (plain and sweep) -> typed config and ordered search space, fully validated.

    A plain override of a searched path fixes it (removing it from the space); a sweep override
    (``lora.r=choice(8,16)``) adds or replaces a search-space entry.

    Raises:
        ConfigError: naming the field or entry, the problem and what is allowed.
    """
    sweeps, plain = split_overrides(args)
    config = hydra_compose(plain, config_file)
    fixed_paths = [a.split("=", 1)[0].lstrip("+~") for a in plain]
    fixed = {p: _lookup(config, p) for p in fixed_paths if p in SEARCHABLE_PATHS}
    entries = fix_params(config.get("search_space") or {}, fixed)
    entries.update(sweeps)
    config["search_space"] = entries
    cfg = to_schema(config)
    params = parse_space(entries, SEARCHABLE_PATHS)
    check_values(config, params)
    from sweeper.study import make_pruner, make_sampler

    make_sampler(cfg.study.sampler, params)
    make_pruner(cfg.study.pruner, cfg.train.max_steps)
    return cfg, params
