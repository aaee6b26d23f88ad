"""The command line: help on every verb, and bad input rejected before any heavy work."""

from __future__ import annotations

from pathlib import Path

import pytest

from sweeper.cli import VERBS
from tests.conftest import run_cli


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_has_help_with_an_example(verb: str) -> None:
    result = run_cli(verb, "--help")
    assert result.returncode == 0
    assert "example:" in result.stdout and f"python -m sweeper {verb}" in result.stdout


@pytest.mark.parametrize(("override", "message"), [
    ("optimizer.name=adam", "optimizer.name: 'adam' is not allowed; choose one of adamw, sgd"),
    ("lora.rank=4", "lora.rank"),
    ("model.quant_type=nf3", "model.quant_type: 'nf3' is not allowed; choose one of nf4, fp4, int8, none"),
    ("train.max_steps=0", "train.max_steps: must be > 0"),
    ("study/sampler=bayes", "study/sampler"),
    ("study.pruner.name=sometimes", "study.pruner.name: 'sometimes' is not allowed"),
    ("workers.per_gpu=0", "workers.per_gpu: must be > 0"),
    ("model.gradient_checkpointing=sometimes",
     "model.gradient_checkpointing: 'sometimes' is not allowed; choose one of true, false, auto"),
    ("model.gradient_checkpointing=0", "model.gradient_checkpointing: 0 is not allowed"),
])
def test_bad_input_exits_before_heavy_work(tmp_path: Path, override: str, message: str) -> None:
    result = run_cli("launch", override, f"output_dir={tmp_path}")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # nothing written to the study or MLflow
