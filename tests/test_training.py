"""The training loop's stop rule: a non-finite loss or gradient norm ends the trial before the update."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from objectives.config import LoraConfig
from objectives.training import LossNotFinite, train_adapter
from sweeper import compose
from sweeper.launch import Resources
from tests.conftest import TINY


@pytest.mark.parametrize("scale", [math.inf, math.nan])
def test_a_non_finite_gradient_stops_before_the_update(tmp_path: Path, scale: float) -> None:
    cfg, _ = compose.load([*TINY, "search_space=none", "train.max_grad_norm=0", f"output_dir={tmp_path}"])
    res = Resources.load(cfg)
    with res.base.adapter(LoraConfig(r=4, targets="qk"), seed=0) as model:
        params = [p for p in model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        handle = params[0].register_hook(lambda grad: grad * scale)
        try:
            with pytest.raises(LossNotFinite, match="gradient norm is (inf|nan) at step 1"):
                train_adapter(model, res.data, cfg.train, cfg.optimizer, res.base.device,
                              res.base.tokenizer.pad_token_id)
        finally:
            handle.remove()
        assert all(torch.equal(a, p.detach()) for a, p in zip(before, params, strict=True))


def test_checkpointing_auto_turns_it_off_when_the_trial_fits_and_changes_no_result(tmp_path: Path) -> None:
    """Non-reentrant checkpointing replays dropout's random state: the same loss with it on or off."""
    import dataclasses

    import optuna

    from sweeper.objective import QLoRAObjective

    cfg, _ = compose.load([*TINY, "search_space=none", "lora.dropout=0.1", f"output_dir={tmp_path}"])
    assert cfg.model.gradient_checkpointing == "auto"
    res = Resources.load(cfg)
    values = []
    for setting in (True, "auto", False, True):  # on as loaded, off, off, on again
        trial_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, gradient_checkpointing=setting))
        trial = optuna.trial.FixedTrial({})
        values.append(QLoRAObjective(trial_cfg, [], res.base, res.data, None, show_progress=False)(trial))
        ran = trial.user_attrs["config"]["model"]["gradient_checkpointing"]
        assert ran is (setting if setting != "auto" else False)  # the tiny model fits: auto runs without it
        assert res.base.checkpointing is ran
    assert values[1] == values[2] == pytest.approx(values[0], rel=1e-5)
    assert values[3] == values[0]


@pytest.mark.parametrize(("scheduler", "reference"), [("cosine", "cosine"), ("linear", "linear"),
                                                      ("constant", "constant_with_warmup")])
@pytest.mark.parametrize(("warmup_ratio", "steps"), [(0.1, 20), (0.1, 12), (0.0, 8), (0.2, 24), (0.15, 7)])
def test_the_schedule_is_transformers_schedule_with_a_trainers_warmup_ratio(
        scheduler: str, reference: str, warmup_ratio: float, steps: int) -> None:
    from transformers import get_scheduler

    from objectives.config import OptimizerConfig
    from objectives.training import lr_lambda

    warmup = math.ceil(warmup_ratio * steps)  # TrainingArguments.get_warmup_steps
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = get_scheduler(reference, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    expected = []
    for _ in range(steps):
        expected.append(theirs.get_last_lr()[0])
        optimizer.step()
        theirs.step()
    ours = lr_lambda(OptimizerConfig(scheduler=scheduler, warmup_ratio=warmup_ratio), steps)
    assert [ours(step) for step in range(steps)] == pytest.approx(expected, abs=1e-12)


def test_an_adapter_reused_in_place_trains_like_a_freshly_injected_one(tmp_path: Path) -> None:
    import optuna

    from sweeper.objective import QLoRAObjective

    cfg, _ = compose.load([*TINY, "search_space=none", "lora.dropout=0.1", f"output_dir={tmp_path}"])
    res = Resources.load(cfg)
    objective = QLoRAObjective(cfg, [], res.base, res.data, None, show_progress=False)
    fresh = objective(optuna.trial.FixedTrial({}))  # the first trial injects the adapter
    reused = objective(optuna.trial.FixedTrial({}))  # the same shape: re-initialised in place
    assert reused == fresh


def test_a_released_adapter_is_freed_without_a_garbage_collection(tmp_path: Path) -> None:
    """Releasing skips the full collection (~0.5 s per change of adapter shape): that is only safe while
    nothing of a trained adapter sits in a reference cycle."""
    import gc
    import weakref

    import optuna

    from sweeper.objective import QLoRAObjective

    cfg, _ = compose.load([*TINY, "search_space=none", f"output_dir={tmp_path}"])
    res = Resources.load(cfg)
    QLoRAObjective(cfg, [], res.base, res.data, None, show_progress=False)(optuna.trial.FixedTrial({}))
    lora = [weakref.ref(p) for name, p in res.base.model.named_parameters() if "lora_" in name]
    assert lora
    gc.disable()
    try:
        res.base.release_adapter()
        assert not [ref for ref in lora if ref() is not None]
    finally:
        gc.enable()
