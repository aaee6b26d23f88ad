"""Every config in conf/ composes and validates against the schema, and opens with its launch command."""

from __future__ import annotations

from pathlib import Path

import pytest

from sweeper import compose
from sweeper.config import CONF_DIR

# Options whose source is mandatory (???) need one to compose.
REQUIRED = {"model=hub": ["model.source=/nonexistent/model"], "data=file": ["data.source=/nonexistent.jsonl"]}
GROUPS = ("model", "data", "search_space", "study/sampler", "study/pruner")


def options() -> list[str]:
    return [f"{group}={path.stem}" for group in GROUPS for path in sorted((CONF_DIR / group).glob("*.yaml"))]


@pytest.mark.parametrize("option", options())
def test_option_composes_and_validates(option: str) -> None:
    overrides = [option, *REQUIRED.get(option, [])]
    if option == "study/sampler=grid":
        overrides.append("search_space=targets")  # grid needs a discrete space
    if option == "study/sampler=nsga2":
        overrides.append("study.sampler.population_size=4")
    cfg, params = compose.load(overrides)
    assert cfg.study.n_trials > 0
    if option.startswith("search_space=") and option != "search_space=none":
        assert params


@pytest.mark.parametrize("path", sorted(CONF_DIR.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONF_DIR)))
def test_config_opens_with_its_launch_command(path: Path) -> None:
    assert path.read_text().startswith("# python -m sweeper "), path
