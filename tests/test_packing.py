"""Packing: examples share rows without changing the loss; the bf16 activation stream trains too."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import optuna
import pytest
import torch

from objectives import data
from objectives.objective import QLoRAObjective
from objectives.training import targets_in, to_device
from sweeper import compose
from sweeper.config import LoraConfig
from sweeper.launch import Resources
from tests.conftest import TINY

X = data.IGNORE_INDEX


def _row(n: int, first: int, prompt: int = 1) -> dict[str, list[int]]:
    ids = list(range(first, first + n))
    return {"input_ids": ids, "labels": [X] * prompt + ids[prompt:]}


@pytest.mark.parametrize(("lengths", "rows"), [
    ((5,), [[5]]),                      # one example: one row, no padding
    ((5, 3, 2), [[5], [3, 2]]),         # 3 + 2 fill the second row exactly
    ((5, 1, 1, 1), [[5], [1, 1, 1]]),
    ((4, 4, 4), [[4], [4], [4]]),       # equal lengths: nothing to gain, nothing lost
    ((2, 5, 3, 4, 1), [[5], [4, 1], [3, 2]]),  # first fit by decreasing length
])
def test_pack_fills_rows_as_wide_as_the_longest_example(lengths: tuple[int, ...], rows: list[list[int]]) -> None:
    examples = [_row(n, 100 * (i + 1)) for i, n in enumerate(lengths)]
    batch = data.pack(examples, pad_id=0)
    width = max(lengths)
    assert batch["input_ids"].shape == (len(rows), width)
    assert "attention_mask" not in batch
    for j, members in enumerate(rows):
        positions = batch["position_ids"][j].tolist()
        expected = [p for n in members for p in range(n)]
        assert positions == expected + list(range(width - len(expected)))
    assert targets_in(examples) == int((batch["labels"][:, 1:] != X).sum())


def test_pack_masks_each_examples_first_label() -> None:
    """Nothing is predicted across an example boundary, even for an example whose first token is a target."""
    batch = data.pack([_row(3, 10, prompt=0), _row(3, 20, prompt=0)], pad_id=0)
    assert batch["labels"].tolist() == [[X, 11, 12], [X, 21, 22]]
    both = data.pack([_row(4, 10, prompt=0), _row(2, 20, prompt=0), _row(2, 30, prompt=0)], pad_id=0)
    assert both["labels"].tolist() == [[X, 11, 12, 13], [X, 21, X, 31]]


@pytest.fixture(scope="module")
def resources(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, Resources]]:
    out = tmp_path_factory.mktemp("packing")
    cfg, _ = compose.load([*TINY, "search_space=none", "train.micro_batch_size=4", "train.max_steps=3",
                           "data.max_length=256",
                           f"output_dir={out}"])
    yield cfg, Resources.load(cfg)


def test_packed_loss_equals_padded_loss(resources) -> None:  # type: ignore[no-untyped-def]
    cfg, res = resources
    by_length = sorted(res.data.train, key=lambda r: len(r["input_ids"]))
    rows = [*by_length[:5], by_length[-1]]  # variable lengths: there is padding to remove
    pad = res.base.tokenizer.pad_token_id
    with torch.no_grad(), res.base.adapter(LoraConfig(r=4, targets="all-linear"), seed=0) as model:
        model.eval()
        padded = model(**to_device(rows, False, pad, res.base.device)).loss
        packed = model(**to_device(rows, True, pad, res.base.device)).loss
        model.train()
    assert data.pack(rows, pad)["input_ids"].numel() < data.collate(rows, pad)["input_ids"].numel()
    assert float(packed) == pytest.approx(float(padded), rel=1e-5)


def test_a_packed_trial_reaches_the_padded_trials_objective(resources) -> None:  # type: ignore[no-untyped-def]
    cfg, res = resources
    packed_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, packing=True))
    padded = QLoRAObjective(cfg, [], res.base, res.data, None, show_progress=False)
    packed = QLoRAObjective(packed_cfg, [], res.base, res.data, None, show_progress=False)
    assert packed(optuna.trial.FixedTrial({})) == pytest.approx(padded(optuna.trial.FixedTrial({})), rel=1e-4)


def test_without_the_upcast_activations_stay_bf16_and_a_trial_trains(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg, _ = compose.load([*TINY, "search_space=none", "model.upcast_unquantized=false", f"output_dir={tmp_path}"])
    res = Resources.load(cfg)
    embeddings = res.base.model.get_input_embeddings()
    assert embeddings.weight.dtype == torch.bfloat16
    value = QLoRAObjective(cfg, [], res.base, res.data, None, show_progress=False)(optuna.trial.FixedTrial({}))
    assert 0 < value < 20
