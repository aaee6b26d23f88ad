"""Instruction data: load, split, template with the model's chat template, mask the prompt, batch."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from objectives.config import ConfigError, DataConfig
from objectives.rows import Example, check_row, read_file, source_path

IGNORE_INDEX = -100
Rows = list[dict[str, list[int]]]


@dataclass
class TokenizedSplits:
    """Token ids and labels (prompt tokens masked) for training and evaluation."""

    train: Rows
    eval: Rows
    max_length: int
    """data.max_length: no example is longer; packed rows are this wide (a slot engine's one row per run holds a
    pass's rows end to end)."""


def _bucket(key: str) -> float:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def stdlib_examples(cache_dir: Path) -> list[Example]:
    """Pairs from the standard library's docstrings, extracted once per Python version and cached."""
    path = cache_dir / "data" / f"stdlib-docs-py{sys.version_info.major}.{sys.version_info.minor}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        subprocess.run([sys.executable, "-m", "objectives.stdlib_docs", str(tmp)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        tmp.rename(path)
    return read_file(path)


def hub_name(name: str) -> tuple[str, str]:
    """``<dataset>[:split]`` (after ``hf:``) -> dataset and split (default train)."""
    dataset_name, _, split = name.partition(":")
    if not dataset_name:
        raise ConfigError(f"data.source: 'hf:{name}' names no dataset; write hf:<dataset>[:split]")
    return dataset_name, split or "train"


def hub_examples(name: str) -> list[Example]:
    dataset_name, split = hub_name(name)
    try:
        import datasets
    except ImportError:
        raise ConfigError("data.source: hf:... needs the datasets package (pip install datasets)") from None
    ds = datasets.load_dataset(dataset_name, split=split)
    rows = [dict(r) for r in ds]
    for i, row in enumerate(rows):
        check_row(row, f"hf:{name} row {i}")
    return rows


def load_examples(cfg: DataConfig, cache_dir: Path) -> list[Example]:
    if cfg.source == "stdlib":
        return stdlib_examples(cache_dir)
    if cfg.source.startswith("hf:"):
        return hub_examples(cfg.source[3:])
    return read_file(source_path(cfg.source))


def check_rows(cfg: DataConfig) -> None:
    """Every row of a data file in one of the two layouts, and an example for each split; no tokenizer or model.

    Cheap enough for the checks before a sweep creates anything: it reads the file once. ``stdlib`` is built
    here and a ``hf:`` data set is downloaded when the data is loaded, which checks its rows then.

    Raises:
        ConfigError: naming the file, the row (line for JSONL and CSV, index for JSON), the field and what it
            must hold; or that the examples cannot fill both splits.
    """
    if cfg.source == "stdlib":
        return
    if cfg.source.startswith("hf:"):
        hub_name(cfg.source[3:])
        return
    split(read_file(source_path(cfg.source)), cfg.eval_fraction)


def split(examples: list[Example], eval_fraction: float) -> tuple[list[Example], list[Example]]:
    """Deterministic split: by module when examples carry one (eval modules are unseen), else by content.

    A small set keeps an example (or module) on each side, even where ``eval_fraction`` would hold out none
    or all of them: the one closest to the fraction's edge moves.
    """
    def key(e: Example) -> str:
        return str(e.get("module") or json.dumps(e, sort_keys=True))

    if len(examples) < 2:
        raise ConfigError(f"data.source: {len(examples)} example; training and evaluation need at least 2")
    keys = [key(e) for e in examples]
    bucket = {k: _bucket(k) for k in sorted(set(keys))}
    if len(bucket) == 1:
        raise ConfigError(f"data.eval_fraction: all {len(examples)} examples are one group (the same 'module', or "
                          "identical rows), so none is left to evaluate on; add examples of another module")
    held_keys = {k for k, b in bucket.items() if b < eval_fraction}
    if not held_keys:
        held_keys = {min(bucket, key=bucket.__getitem__)}
    elif len(held_keys) == len(bucket):
        held_keys.remove(max(bucket, key=bucket.__getitem__))
    train = [e for e, k in zip(examples, keys, strict=True) if k not in held_keys]
    held = [e for e, k in zip(examples, keys, strict=True) if k in held_keys]
    return train, held


def to_messages(e: Example, system_prompt: str | None) -> list[dict[str, str]]:
    if e.get("messages") is not None:  # as row_problem reads a row
        messages = [dict(m) for m in e["messages"]]
    else:
        user = e["instruction"] + (f"\n\n{e['input']}" if e.get("input") else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": e["output"]}]
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _render(tokenizer: Any, messages: list[dict[str, str]], prompt_only: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        msgs = messages[:-1] if prompt_only else messages
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt_only)
    # No chat template: a plain instruction layout, response closed by the EOS token.
    prompt = "".join(f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in messages[:-1])
    prompt += "### Assistant:\n"
    return prompt if prompt_only else prompt + messages[-1]["content"] + (tokenizer.eos_token or "")


def tokenize(e: Example, tokenizer: Any, cfg: DataConfig) -> dict[str, list[int]] | None:
    """Template one example; labels cover the final assistant turn only. None if nothing is left to learn."""
    messages = to_messages(e, cfg.system_prompt)
    if messages[-1]["role"] != "assistant":
        return None
    prompt_ids = tokenizer(_render(tokenizer, messages, True), add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(_render(tokenizer, messages, False), add_special_tokens=False)["input_ids"]
    # The prompt is where the two tokenizations part (the template can merge tokens at the seam).
    n_prompt = next((i for i, (a, b) in enumerate(zip(prompt_ids, full_ids, strict=False)) if a != b),
                    len(prompt_ids))
    full_ids = full_ids[: cfg.max_length]
    labels = [IGNORE_INDEX] * min(n_prompt, len(full_ids)) + full_ids[n_prompt:]
    if all(t == IGNORE_INDEX for t in labels):
        return None
    return {"input_ids": full_ids, "labels": labels}


def prepare(cfg: DataConfig, tokenizer: Any, cache_dir: Path) -> TokenizedSplits:
    """Load, split and tokenize once per process; trials share the result."""
    train_rows, eval_rows = split(load_examples(cfg, cache_dir), cfg.eval_fraction)
    if cfg.max_train_examples is not None:  # a spread-out subset, not the first rows of the file
        train_rows = sorted(train_rows, key=lambda e: _bucket(json.dumps(e, sort_keys=True)))
        train_rows = train_rows[: cfg.max_train_examples]
    eval_rows = sorted(eval_rows, key=lambda e: _bucket(json.dumps(e, sort_keys=True)))
    train = [t for t in (tokenize(e, tokenizer, cfg) for e in train_rows) if t]
    held = [t for t in (tokenize(e, tokenizer, cfg) for e in eval_rows) if t][: cfg.max_eval_examples]
    for name, rows in (("training", train), ("evaluation", held)):
        if not rows:
            raise ConfigError(f"data: no {name} example keeps response tokens within data.max_length="
                              f"{cfg.max_length}")
    return TokenizedSplits(train, held, cfg.max_length)


def collate(rows: Rows, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest row."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pack(rows: Rows, pad_id: int, width: int, max_rows: int, one_row: bool = False) -> list[dict[str, torch.Tensor]]:
    """Forward passes without padding between examples: examples share rows of ``width`` tokens, at most
    ``max_rows`` rows per pass, so a pass holds no more tokens than a padded micro-batch could; ``one_row``: each
    pass's rows laid end to end as one row (the same examples in each pass).

    First-fit by decreasing length fills the rows; position ids restart at every example, which is how the
    model keeps attention within an example (no attention mask). The rest of a row is one padding segment
    with its own positions, and a pass is trimmed to its fullest row. Each example's first label is
    masked: as in a padded batch, no token is predicted from the end of the previous example.
    """
    lines: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"])):
        n = len(rows[i]["input_ids"])
        slot = next((j for j, room in enumerate(free) if room >= n), len(lines))
        if slot == len(lines):
            lines.append([])
            free.append(max(width, n))
        lines[slot].append(i)
        free[slot] -= n
    passes = []
    for first in range(0, len(lines), max_rows):
        chunk = lines[first:first + max_rows]
        if one_row:
            chunk = [[i for line in chunk for i in line]]
        wide = max(sum(len(rows[i]["input_ids"]) for i in line) for line in chunk)
        ids = torch.full((len(chunk), wide), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), wide), IGNORE_INDEX, dtype=torch.long)
        positions = torch.empty((len(chunk), wide), dtype=torch.long)
        for j, line in enumerate(chunk):
            at = 0
            for i in line:
                n = len(rows[i]["input_ids"])
                ids[j, at:at + n] = torch.tensor(rows[i]["input_ids"])
                labels[j, at + 1:at + n] = torch.tensor(rows[i]["labels"][1:])
                positions[j, at:at + n] = torch.arange(n)
                at += n
            positions[j, at:] = torch.arange(wide - at)
        passes.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return passes


def targets_in(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the loss predicts in a padded or packed batch (the model shifts labels by one)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def train_micro_batches(rows: Rows, batch_size: int, seed: int) -> Iterator[Rows]:
    """Endless seeded shuffles of the training rows, one micro-batch of rows at a time."""
    if len(rows) < batch_size:
        raise ConfigError(f"data: {len(rows)} training examples, fewer than train.micro_batch_size={batch_size}")
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(rows), generator=g).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield [rows[i] for i in order[start:start + batch_size]]
        epoch += 1


def eval_micro_batches(rows: Rows, batch_size: int) -> Iterator[Rows]:
    for start in range(0, len(rows), batch_size):
        yield rows[start:start + batch_size]
