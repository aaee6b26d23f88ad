"""Instruction data: the standard-library default, files in both layouts, templating and masking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from objectives import data
from objectives.config import ConfigError, DataConfig


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    from objectives.config import ModelConfig
    from objectives.sources import resolve_source

    return AutoTokenizer.from_pretrained(resolve_source(ModelConfig()))


def test_stdlib_pairs_are_many_and_split_by_module(tmp_path: Path) -> None:
    rows = data.stdlib_examples(tmp_path)
    assert len(rows) > 1500
    assert all(len(r["output"]) > 40 for r in rows)
    train, held = data.split(rows, 0.1)
    assert {r["module"] for r in train}.isdisjoint({r["module"] for r in held})
    assert 0.03 < len(held) / len(rows) < 0.3
    assert data.split(rows, 0.1) == (train, held)  # deterministic


def test_loss_covers_the_response_only(tokenizer) -> None:  # type: ignore[no-untyped-def]
    row = {"instruction": "What does `json.dumps` do?", "output": "Serialize obj to a JSON formatted str."}
    t = data.tokenize(row, tokenizer, DataConfig(max_length=256))
    assert t is not None
    pairs = zip(t["input_ids"], t["labels"], strict=True)
    learned = tokenizer.decode([i for i, lab in pairs if lab != data.IGNORE_INDEX])
    assert learned.startswith("Serialize obj to a JSON formatted str.")
    assert "json.dumps" not in learned
    prompt = tokenizer.decode(t["input_ids"])
    assert "<|im_start|>user" in prompt  # the model's own chat template


def test_truncation_keeps_examples_with_response_tokens(tokenizer) -> None:  # type: ignore[no-untyped-def]
    row = {"instruction": "x " * 300, "output": "y"}
    assert data.tokenize(row, tokenizer, DataConfig(max_length=32)) is None


@pytest.mark.parametrize("layout", ["alpaca-jsonl", "chat-jsonl", "alpaca-json", "alpaca-csv"])
def test_files_in_both_layouts(tmp_path: Path, tokenizer, layout: str) -> None:  # type: ignore[no-untyped-def]
    alpaca = [{"instruction": f"Add {i} and {i}.", "input": "", "output": f"The sum is {2 * i}."} for i in range(40)]
    chat = [{"messages": [{"role": "user", "content": r["instruction"]},
                          {"role": "assistant", "content": r["output"]}]} for r in alpaca]
    if layout == "alpaca-jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in alpaca))
    elif layout == "chat-jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in chat))
    elif layout == "alpaca-json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(alpaca))
    else:
        path = tmp_path / "d.csv"
        path.write_text("instruction,input,output\n" + "\n".join(
            f'"{r["instruction"]}",,"{r["output"]}"' for r in alpaca))
    splits = data.prepare(DataConfig(source=str(path), eval_fraction=0.2), tokenizer, tmp_path)
    assert splits.train and splits.eval
    assert len(splits.train) + len(splits.eval) <= 40


def test_bad_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}))
    with pytest.raises(ConfigError, match="row 0 of bad.jsonl has neither 'messages'"):
        data.read_file(path)
    with pytest.raises(ConfigError, match="data.source: 'nope.txt' is not 'stdlib'"):
        data.load_examples(DataConfig(source="nope.txt"), tmp_path)


def test_batches_are_seeded_and_padded() -> None:
    rows = [{"input_ids": [1] * n, "labels": [5] * n} for n in range(1, 11)]
    a = [b for _, b in zip(range(4), data.train_micro_batches(rows, 3, seed=7), strict=False)]
    b = [b for _, b in zip(range(4), data.train_micro_batches(rows, 3, seed=7), strict=False)]
    assert a == b
    assert a != [b for _, b in zip(range(4), data.train_micro_batches(rows, 3, seed=8), strict=False)]
    batch = data.collate(rows[:3], pad_id=0)
    assert batch["attention_mask"].sum().item() == 1 + 2 + 3
    assert (batch["labels"][0, 1:] == data.IGNORE_INDEX).all()


def test_malformed_and_tiny_data_are_clear_errors(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    with pytest.raises(ConfigError, match="broken.jsonl does not parse"):
        data.read_file(broken)
    with pytest.raises(ConfigError, match="fewer than train.micro_batch_size=4"):
        next(data.train_micro_batches([{"input_ids": [1], "labels": [1]}] * 3, 4, seed=0))
    long = tmp_path / "long.jsonl"
    long.write_text("\n".join(json.dumps({"instruction": f"{i} " + "x " * 200, "output": "y"}) for i in range(20)))
    with pytest.raises(ConfigError, match="keeps response tokens within data.max_length=16"):
        data.prepare(DataConfig(source=str(long), max_length=16, eval_fraction=0.5), tokenizer, tmp_path)
