"""Packing: examples share rows without changing the loss; the bf16 activation stream trains too."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import optuna
import pytest
import torch

from objectives import data
from objectives.config import LoraConfig
from objectives.data import IGNORE_INDEX
from objectives.passes import merged_chunks, predicted_tokens
from objectives.transfer import to_device
from sweeper import compose
from sweeper.launch import Resources
from sweeper.objective import QLoRAObjective
from tests.conftest import TINY

X = data.IGNORE_INDEX


def _row(n: int, first: int, prompt: int = 1) -> dict[str, list[int]]:
    ids = list(range(first, first + n))
    return {"input_ids": ids, "labels": [X] * prompt + ids[prompt:]}


@pytest.mark.parametrize(("lengths", "width", "max_rows", "passes"), [
    ((5,), 8, 4, [[[5]]]),                          # one example: one row, trimmed to it
    ((5, 3, 2), 5, 4, [[[5], [3, 2]]]),             # 3 + 2 fill the second row exactly
    ((5, 3, 2), 10, 4, [[[5, 3, 2]]]),              # all in one row of 10
    ((4, 4, 4), 4, 2, [[[4], [4]], [[4]]]),         # at most 2 rows per pass
    ((2, 5, 3, 4, 1), 6, 4, [[[5, 1], [4, 2], [3]]]),  # first fit by decreasing length
    ((7, 2), 5, 4, [[[7], [2]]]),                   # an example longer than the width gets a row of its own
])
def test_pack_fills_rows_and_passes(lengths: tuple[int, ...], width: int, max_rows: int,
                                    passes: list[list[list[int]]]) -> None:
    examples = [_row(n, 100 * (i + 1)) for i, n in enumerate(lengths)]
    out = data.pack(examples, 0, width, max_rows)
    assert len(out) == len(passes)
    for batch, rows in zip(out, passes, strict=True):
        wide = max(sum(line) for line in rows)
        assert batch["input_ids"].shape == (len(rows), wide)
        assert "attention_mask" not in batch
        for j, line in enumerate(rows):
            expected = [p for n in line for p in range(n)]
            assert batch["position_ids"][j].tolist() == expected + list(range(wide - len(expected)))
    padded = data.collate(examples, 0)
    assert sum(data.targets_in(b) for b in out) == data.targets_in(padded)
    # One row per pass: the same examples in each pass, its rows end to end.
    ends = data.pack(examples, 0, width, max_rows, one_row=True)
    assert [b["position_ids"].tolist() for b in ends] == [
        [[p for line in rows for n in line for p in range(n)]] for rows in passes]
    assert [data.targets_in(b) for b in ends] == [data.targets_in(b) for b in out]


@pytest.mark.parametrize(("shapes", "budget", "chunks"), [
    ([(1, 100)] * 4, 400, [(0, 4)]),                    # copies of one pass: as many as the budget holds
    ([(1, 100)] * 4, 250, [(0, 2), (2, 4)]),
    ([(4, 100), (1, 192)], 400, [(0, 1), (1, 2)]),      # merged they would pad to 4 x 192
    ([(1, 500), (1, 100)], 400, [(0, 1), (1, 2)]),      # a pass over the budget alone: a forward of its own
    ([(2, 50), (1, 100), (2, 100)], 400, [(0, 2), (2, 3)]),
    ([], 400, []),
])
def test_merged_chunks_stay_within_the_budget(shapes: list[tuple[int, int]], budget: int,
                                               chunks: list[tuple[int, int]]) -> None:
    assert merged_chunks(shapes, budget) == chunks


def test_predicted_tokens_are_the_shifted_labels_with_their_rows_groups() -> None:
    x = IGNORE_INDEX
    labels = torch.tensor([[x, x, 5, 6], [x, 7, x, x], [x, x, x, 8]])
    where, targets, groups = predicted_tokens(labels, torch.tensor([3, 3, 1])).tolist()
    assert where == [1, 2, 4, 10] and targets == [5, 6, 7, 8] and groups == [3, 3, 3, 1]
    assert predicted_tokens(torch.full((2, 3), x), torch.tensor([0, 1])).shape == (3, 0)


def test_pack_masks_each_examples_first_label() -> None:
    """Nothing is predicted across an example boundary, even for an example whose first token is a target."""
    (batch,) = data.pack([_row(4, 10, prompt=0), _row(2, 20, prompt=0), _row(2, 30, prompt=0)], 0, 4, 4)
    assert batch["labels"].tolist() == [[X, 11, 12, 13], [X, 21, X, 31]]


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
        padded = model(**to_device(data.collate(rows, pad), res.base.device)).loss
        (batch,) = data.pack(rows, pad, res.data.max_length, len(rows))
        packed = model(**to_device(batch, res.base.device)).loss
        model.train()
    assert batch["input_ids"].numel() < data.collate(rows, pad)["input_ids"].numel()
    assert float(packed) == pytest.approx(float(padded), rel=1e-5)


def test_a_widened_pass_keeps_its_loss_and_gradients(resources) -> None:  # type: ignore[no-untyped-def]
    """CUDA graphs widen every pass to data.max_length (objectives.step_graphs): the padding is a segment of its own
    without labels, so the loss and the adapter's gradients are those of the pass as packed."""
    from objectives.passes import widen

    cfg, res = resources
    rows = res.data.train[:6]
    pad = res.base.tokenizer.pad_token_id
    (packed,) = data.pack(rows, pad, res.data.max_length, len(rows))
    with res.base.adapter(LoraConfig(r=4, targets="all-linear", dropout=0.0), seed=0) as model:
        params = [p for p in model.parameters() if p.requires_grad]
        torch.nn.init.normal_(params[1])  # B starts at zero: a random one lets the input gradients show
        for batch in (packed, data.collate(rows, pad)):
            wide = widen(batch, res.data.max_length, pad)
            assert wide["input_ids"].shape == (len(batch["input_ids"]), res.data.max_length) != batch["input_ids"].shape
            assert data.targets_in(wide) == data.targets_in(batch)
            results = []
            for b in (batch, wide):
                loss = model(**to_device(b, res.base.device)).loss
                results.append((float(loss), torch.autograd.grad(loss, params)))
            (narrow_loss, narrow_grads), (wide_loss, wide_grads) = results
            assert wide_loss == pytest.approx(narrow_loss, rel=1e-6), sorted(batch)
            for a, b in zip(narrow_grads, wide_grads, strict=True):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


def test_a_packed_trial_reaches_the_padded_trials_objective(resources) -> None:  # type: ignore[no-untyped-def]
    """2 micro-batches of 4 per step, packed into fewer passes: the same examples and loss per step."""
    cfg, res = resources
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=2, grad_accum=2,
                                                             packing=False))
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
    assert isinstance(value, float) and 0 < value < 20


def test_the_packing_check_passes_for_llama_and_catches_a_model_that_mixes_examples(resources) -> None:  # type: ignore[no-untyped-def]
    from objectives.config import ConfigError

    _, res = resources
    res.base.check_packing()
    original = res.base.model.forward

    def ignores_positions(*args, position_ids=None, **kwargs):  # type: ignore[no-untyped-def]
        return original(*args, **kwargs)  # one causal row: the examples attend to each other

    res.base.model.forward = ignores_positions
    try:
        with pytest.raises(ConfigError, match="train.packing: .* lets packed examples attend to each other"):
            res.base.check_packing()
    finally:
        del res.base.model.forward
