"""Every config in conf/ opens with a launch command that composes, and holds only what its choice changes.

Each default lives in the schema (the dataclasses); a YAML key the schema lacks, or a value equal to the
schema's default, is drift that these tests name.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from objectives.config import ConfigError, DataConfig, ModelConfig
from sweeper import compose
from sweeper.config import CONF_DIR, LauncherConfig, SweepConfig
from sweeper.samplers import PRUNERS, SAMPLERS

GROUPS = ("model", "data", "search_space", "study/sampler", "study/pruner", "launcher")
YAMLS = sorted(CONF_DIR.rglob("*.yaml"))
# Search-space files map entry names to sweeps, not schema fields: the grammar's tests check them.
SCHEMA_YAMLS = [p for p in YAMLS if p.parent != CONF_DIR / "search_space"]


def rel(path: Path) -> str:
    return str(path.relative_to(CONF_DIR))


def group_of(path: Path) -> str:
    return path.parent.relative_to(CONF_DIR).as_posix()


def launch_args(path: Path) -> list[str]:
    """The overrides of the launch command on a file's first line (after ``python -m sweeper launch``)."""
    first = path.read_text().splitlines()[0]
    words = shlex.split(first.removeprefix("# python -m sweeper "), comments=True)
    assert words[0] == "launch", first
    return words[1:]


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    return data or {}  # a file of comments only changes nothing


@pytest.mark.parametrize("path", YAMLS, ids=rel)
def test_config_opens_with_its_launch_command(path: Path) -> None:
    assert path.read_text().startswith("# python -m sweeper "), path


@pytest.mark.parametrize("path", YAMLS, ids=rel)
def test_launch_command_selects_its_file_and_composes(path: Path) -> None:
    args = launch_args(path)
    if path.parent != CONF_DIR:
        assert f"{group_of(path)}={path.stem}" in args
    cfg, params = compose.load(args)
    assert cfg.study.n_trials > 0
    if group_of(path) == "search_space" and path.stem != "none":
        assert params


def defaults_of(path: Path, data: Mapping[str, Any]) -> Any:
    """The schema instance (holding every default) a config file is merged onto."""
    group = group_of(path)
    if group == ".":
        return SweepConfig()
    if group in ("study/sampler", "study/pruner"):
        registry = SAMPLERS if group == "study/sampler" else PRUNERS
        return registry[data["name"]].schema(name=data["name"])
    return {"model": ModelConfig, "data": DataConfig, "launcher": LauncherConfig}[group]()


def drift(data: Mapping[str, Any], defaults: Any, prefix: str = "") -> list[str]:
    """Keys the schema lacks, and values equal to its default (each default lives in one place)."""
    problems = []
    names = {f.name for f in dataclasses.fields(defaults)}
    for key, value in data.items():
        if not prefix and key == "defaults":
            continue  # Hydra's defaults list
        if key not in names:
            problems.append(f"{prefix}{key}: not in {type(defaults).__name__}")
            continue
        default = getattr(defaults, key)
        if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
            problems += drift(value, default, f"{prefix}{key}.")
        elif value == default and key != "name":  # a sampler's or pruner's name selects its schema
            problems.append(f"{prefix}{key}: {value!r} is the schema's default")
    return problems


@pytest.mark.parametrize("path", SCHEMA_YAMLS, ids=rel)
def test_config_holds_only_schema_fields_that_differ_from_defaults(path: Path) -> None:
    data = load(path)
    assert drift(data, defaults_of(path, data)) == []


@pytest.mark.parametrize(("data", "defaults", "expected"), [
    ({"quant_type": "fp4"}, ModelConfig(), []),
    ({"quant_type": "nf4"}, ModelConfig(), ["quant_type: 'nf4' is the schema's default"]),
    ({"quant": "fp4"}, ModelConfig(), ["quant: not in ModelConfig"]),
    ({"defaults": ["_self_"], "lora": {"r": 8, "rank": 4}, "train": {"max_steps": 3}}, SweepConfig(),
     ["lora.r: 8 is the schema's default", "lora.rank: not in LoraConfig"]),
    ({"name": "random", "population_size": 8}, SAMPLERS["random"].schema(name="random"),
     ["population_size: not in RandomSamplerConfig"]),
])
def test_drift_names_unknown_keys_and_repeated_defaults(data: dict[str, Any], defaults: Any,
                                                       expected: list[str]) -> None:
    assert drift(data, defaults) == expected


@pytest.mark.parametrize(("group", "names"), [("study/sampler", sorted(SAMPLERS)), ("study/pruner", sorted(PRUNERS))])
def test_every_registered_name_has_a_config_file_and_every_file_a_name(group: str, names: list[str]) -> None:
    files = sorted((CONF_DIR / group).glob("*.yaml"))
    assert [p.stem for p in files] == names
    assert all(load(p)["name"] == p.stem for p in files)


def test_every_group_has_files() -> None:
    assert all(sorted((CONF_DIR / group).glob("*.yaml")) for group in GROUPS)


@pytest.mark.parametrize(("override", "expected"), [
    ("lora.r=4", "++lora.r=4"),
    ("output_dir=/tmp/x", "++output_dir=/tmp/x"),
    ("lora.targets='q_proj,v_proj'", "++lora.targets='q_proj,v_proj'"),
    ("model=hub", "model=hub"),
    ("study/sampler=random", "study/sampler=random"),
    ("+study.timeout_s=60", "+study.timeout_s=60"),
    ("++lora.r=4", "++lora.r=4"),
    ("~lora.alpha", "~lora.alpha"),
    ("model@other=hub", "model@other=hub"),
    ("hydra.verbose=true", "hydra.verbose=true"),
])
def test_plain_values_are_set_whether_or_not_a_file_holds_them(override: str, expected: str) -> None:
    assert compose.force_values([override], {"model", "study/sampler"}.__contains__) == [expected]


@pytest.mark.parametrize("option", ["model=hub", "data=file"])
def test_an_unset_mandatory_source_is_an_error(option: str) -> None:
    with pytest.raises(ConfigError, match=r"^(model|data)\.source: needs a value here"):
        compose.load([option])


@pytest.mark.parametrize(("given", "expected"), [("auto", "auto"), ("on", True), ("off", False), (True, True),
                                                 (False, False)])
def test_switches_take_on_off_and_auto(given: Any, expected: Any) -> None:
    from objectives.config import TrainConfig

    assert ModelConfig(base_cache=given).base_cache == expected
    assert TrainConfig(fused_loss=given).fused_loss == expected


def test_switches_from_the_command_line_and_their_errors() -> None:
    from objectives.config import TrainConfig

    cfg, _ = compose.load(["search_space=none", "model.base_cache=on", "train.fused_loss=off"])
    assert cfg.model.base_cache is True and cfg.train.fused_loss is False
    with pytest.raises(ConfigError, match=r"^model.base_cache: 'sometimes' is not allowed; choose one of auto, on"):
        ModelConfig(base_cache="sometimes")
    with pytest.raises(ConfigError, match=r"^train.fused_loss: 2 is not allowed"):
        TrainConfig(fused_loss=2)
    with pytest.raises(ConfigError, match=r"^model.base_cache: on needs a 4-bit base \(nf4 or fp4\), not 'none'"):
        ModelConfig(base_cache="on", quant_type="none")


def test_tf32_is_on_by_default_and_switches_the_process() -> None:
    import torch

    from objectives.base import use_tf32

    cfg, _ = compose.load(["search_space=none"])
    assert cfg.model.tf32 is True
    cfg, _ = compose.load(["search_space=none", "model.tf32=false"])
    assert cfg.model.tf32 is False
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        use_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32
        use_tf32(False)
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        use_tf32(before)


@pytest.mark.parametrize("space", ["default", "optimizer", "rank_alpha", "targets"])
def test_a_trials_config_without_omegaconf_is_what_the_schema_merge_builds(space: str) -> None:
    import optuna

    from sweeper.config import plain, to_container, to_schema, with_values
    from sweeper.values import apply_values, corner_values, sample

    cfg, params = compose.load([f"search_space={space}"])
    base = to_container(cfg)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trials = [sample(study.ask(), params) for _ in range(40)]
    trials += [{p.path: v} for p in params for v in corner_values(p)]
    for values in trials:
        fast, merged = with_values(cfg, values), to_schema(apply_values(base, values))
        assert fast == merged, values
        assert plain(fast) == to_container(merged)
    # Values a merge would convert or reject, and paths outside the dataclasses, go through the merge.
    assert with_values(cfg, {"lora.r": "8"}) is None
    assert with_values(cfg, {"lora.r": 8.0}) is None
    assert with_values(cfg, {"model.config_overrides.num_hidden_layers": 2}) is None
    assert with_values(cfg, {"lora.nothing": 2}) is None
