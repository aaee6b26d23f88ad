"""Instruction data: load, split, template with the model's chat template, mask the prompt, batch."""

from __future__ import annotations

import csv
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

IGNORE_INDEX = -100
Example = dict[str, Any]
Rows = list[dict[str, list[int]]]


@dataclass
class TokenizedSplits:
    """Token ids and labels (prompt tokens masked) for training and evaluation."""

    train: Rows
    eval: Rows
    max_length: int
    """data.max_length: no example is longer; packed rows are this wide."""


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


def read_file(path: Path) -> list[Example]:
    """JSONL, JSON (a list) or CSV rows in the alpaca (instruction/input/output) or chat (messages) layout."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise ConfigError(f"data.source: {path.name!r} is not .jsonl, .json or .csv")
    try:
        if suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        elif suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(rows, dict) and "data" in rows:
                rows = rows["data"]
        else:
            with path.open(encoding="utf-8", newline="") as f:
                rows = list(csv.DictReader(f))
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as e:
        raise ConfigError(f"data.source: {path.name} does not parse: {e}") from None
    if not isinstance(rows, list) or not rows:
        raise ConfigError(f"data.source: {path} holds no examples")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not (row.get("messages") or {"instruction", "output"} <= set(row)):
            raise ConfigError(f"data.source: row {i} of {path.name} has neither 'messages' (non-empty) nor "
                              "'instruction' and 'output'")
    return rows


def hub_examples(name: str) -> list[Example]:
    try:
        import datasets
    except ImportError:
        raise ConfigError("data.source: hf:... needs the datasets package (pip install datasets)") from None
    dataset_name, _, split = name.partition(":")
    ds = datasets.load_dataset(dataset_name, split=split or "train")
    return [dict(r) for r in ds]


def load_examples(cfg: DataConfig, cache_dir: Path) -> list[Example]:
    if cfg.source == "stdlib":
        return stdlib_examples(cache_dir)
    if cfg.source.startswith("hf:"):
        return hub_examples(cfg.source[3:])
    path = Path(os.path.expanduser(cfg.source))
    if not path.is_file():
        raise ConfigError(f"data.source: {cfg.source!r} is not 'stdlib', 'hf:<name>' or an existing file")
    return read_file(path)


def split(examples: list[Example], eval_fraction: float) -> tuple[list[Example], list[Example]]:
    """Deterministic split: by module when examples carry one (eval modules are unseen), else by content."""
    def key(e: Example) -> str:
        return str(e.get("module") or json.dumps(e, sort_keys=True))

    held_out = [_bucket(key(e)) < eval_fraction for e in examples]
    train = [e for e, out in zip(examples, held_out, strict=True) if not out]
    held = [e for e, out in zip(examples, held_out, strict=True) if out]
    if not train or not held:
        raise ConfigError(f"data.eval_fraction: {eval_fraction} leaves an empty split of {len(examples)} examples")
    return train, held


def to_messages(e: Example, system_prompt: str | None) -> list[dict[str, str]]:
    if "messages" in e:
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


def pack(rows: Rows, pad_id: int, width: int, max_rows: int) -> list[dict[str, torch.Tensor]]:
    """Forward passes without padding between examples: examples share rows of ``width`` tokens, at most
    ``max_rows`` rows per pass, so a pass holds no more tokens than a padded micro-batch could.

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
