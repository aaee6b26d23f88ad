"""Out-of-memory policy: halve the micro-batch (same effective batch), then fail cleanly; the next trial is unharmed."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import optuna
import pytest
import torch

from objectives.config import TrainConfig
from objectives.objective import TrialOutOfMemory, halve_micro_batch
from sweeper import compose
from sweeper.launch import Resources, memory_in_use_mb
from sweeper.objective import QLoRAObjective
from tests.conftest import TINY


@pytest.mark.parametrize(("micro", "accum", "expected"), [
    (8, 1, (4, 2)), (4, 2, (2, 4)), (3, 2, (1, 6)), (2, 1, (1, 2)), (1, 4, None),
])
def test_halving_keeps_the_effective_batch(micro: int, accum: int, expected: tuple[int, int] | None) -> None:
    smaller = halve_micro_batch(TrainConfig(micro_batch_size=micro, grad_accum=accum))
    assert (None if smaller is None else (smaller.micro_batch_size, smaller.grad_accum)) == expected
    if smaller is not None:
        assert smaller.micro_batch_size * smaller.grad_accum == micro * accum


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, Resources]]:
    out = tmp_path_factory.mktemp("oom")
    cfg, _ = compose.load([*TINY, "search_space=none", "train.micro_batch_size=4", "train.max_steps=2",
                           f"output_dir={out}"])
    yield cfg, Resources.load(cfg)


def _limit_batch(resources: Resources, largest: int) -> torch.utils.hooks.RemovableHandle:
    """The device 'runs out of memory' for training batches larger than ``largest``."""
    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if torch.is_grad_enabled() and args[0].shape[0] > largest:
            raise torch.OutOfMemoryError(f"out of memory: batch of {args[0].shape[0]} (test limit {largest})")

    return resources.base.model.get_input_embeddings().register_forward_pre_hook(hook)


def test_out_of_memory_retries_with_smaller_micro_batches(setup) -> None:  # type: ignore[no-untyped-def]
    cfg, resources = setup
    objective = QLoRAObjective(cfg, [], resources.base, resources.data, None, show_progress=False)
    handle = _limit_batch(resources, 1)
    try:
        trial = optuna.trial.FixedTrial({}, number=0)
        value = objective(trial)
    finally:
        handle.remove()
    assert value > 0
    assert trial.user_attrs["oom_retries"] == 3  # without checkpointing, with it, then 4 -> 2 -> 1
    assert trial.user_attrs["config"]["model"]["gradient_checkpointing"] is True


def test_a_run_that_starts_over_reports_each_step_to_optuna_once(setup) -> None:  # type: ignore[no-untyped-def]
    cfg, resources = setup
    objective = QLoRAObjective(cfg, [], resources.base, resources.data, None, show_progress=False)
    passes = 0

    def second_step_runs_out(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        nonlocal passes
        passes += torch.is_grad_enabled()
        if torch.is_grad_enabled() and passes == 2:  # after the first step's evaluation
            raise torch.OutOfMemoryError("out of memory: the second training pass (test)")

    handle = resources.base.model.get_input_embeddings().register_forward_pre_hook(second_step_runs_out)
    study = optuna.create_study()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*is already reported")  # Optuna: a step reported twice
            study.optimize(objective, n_trials=1)
    finally:
        handle.remove()
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.user_attrs["oom_retries"] == 1
    assert sorted(trial.intermediate_values) == [1, 2]


def test_out_of_memory_at_the_floor_fails_and_the_next_trial_runs(setup) -> None:  # type: ignore[no-untyped-def]
    cfg, resources = setup
    objective = QLoRAObjective(cfg, [], resources.base, resources.data, None, show_progress=False)
    objective(optuna.trial.FixedTrial({}, number=0))
    before = memory_in_use_mb(resources.base.device)
    handle = _limit_batch(resources, 0)
    trial = optuna.trial.FixedTrial({}, number=1)
    try:
        with pytest.raises(TrialOutOfMemory, match="micro_batch_size=1"):
            objective(trial)
    finally:
        handle.remove()
    assert "TrialOutOfMemory" in trial.user_attrs["state_reason"]
    assert objective(optuna.trial.FixedTrial({}, number=2)) > 0
    assert memory_in_use_mb(resources.base.device) - before < 64  # back near the resident base's level


def test_splitting_a_step_into_micro_batches_keeps_the_objective(setup) -> None:  # type: ignore[no-untyped-def]
    """4 x 1 and 2 x 2 see the same examples per step and weigh every response token alike."""
    import dataclasses

    cfg, resources = setup
    split = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=2, grad_accum=2))
    whole = QLoRAObjective(cfg, [], resources.base, resources.data, None, show_progress=False)
    halves = QLoRAObjective(split, [], resources.base, resources.data, None, show_progress=False)
    assert halves(optuna.trial.FixedTrial({})) == pytest.approx(whole(optuna.trial.FixedTrial({})), rel=1e-5)
