"""Several runs' rows in one forward pass: merged batches, and each row's own loss."""

from __future__ import annotations

import collections

import torch

from objectives.data import IGNORE_INDEX


def merge_passes(parts: list[tuple[int, dict[str, torch.Tensor], int]],
                 pad_id: int) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
    """Several slots' passes as one batch: each padded to the widest pass and to the most rows of any slot
    (a padding row is one padding token's own sequence: no loss, no effect on other rows), slot after slot;
    and each slot's dropout key."""
    width = max(batch["input_ids"].shape[1] for _, batch, _ in parts)
    rows = max(batch["input_ids"].shape[0] for _, batch, _ in parts)
    out: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
    for _, batch, _ in parts:
        n = batch["input_ids"].shape[0]
        for name, t in widen(batch, width, pad_id).items():
            if rows > n:
                t = torch.cat([t, padding_rows(name, rows - n, width, pad_id)])
            out[name].append(t)
    return {k: torch.cat(v) for k, v in out.items()}, [(slot, key) for slot, _, key in parts]


def merged_chunks(shapes: list[tuple[int, int]], budget: int) -> list[tuple[int, int]]:
    """Consecutive (start, end) ranges of passes with (rows, width) ``shapes``, each merged into one forward: as
    many passes as stay within ``budget`` tokens once padded to the range's most rows and widest row (a pass over
    the budget alone gets a forward of its own)."""
    chunks: list[tuple[int, int]] = []
    start, rows, width = 0, 0, 0
    for i, (r, w) in enumerate(shapes):
        if i > start and (i - start + 1) * max(rows, r) * max(width, w) > budget:
            chunks.append((start, i))
            start, rows, width = i, 0, 0
        rows, width = max(rows, r), max(width, w)
    if shapes:
        chunks.append((start, len(shapes)))
    return chunks


PAD_SEGMENT = 128
"""The most padding tokens in one segment: a block of flash's kernel, and inside any model's positions."""
PAD_VALUES = {"input_ids": lambda pad: pad, "labels": lambda pad: IGNORE_INDEX, "attention_mask": lambda pad: 0}


def widen(batch: dict[str, torch.Tensor], width: int, pad_id: int) -> dict[str, torch.Tensor]:
    """``batch`` padded on the right to ``width`` tokens (wider batches stay as they are): in every row the padding
    is more segments of their own, with their own positions and no labels, so the other tokens' outputs and the
    loss keep their values. A segment is at most ``PAD_SEGMENT`` tokens: one row per run (the slot engine) can pad
    by several rows' worth, whose positions would pass the model's range and whose attention, one segment, would
    grow with its square."""
    n, extra = batch["input_ids"].shape
    extra = width - extra
    if extra <= 0:
        return batch
    positions = (torch.arange(extra) % PAD_SEGMENT).expand(n, extra)
    return {name: torch.cat([t, positions], dim=1) if name == "position_ids"
            else torch.nn.functional.pad(t, (0, extra), value=PAD_VALUES[name](pad_id)) for name, t in batch.items()}


def padding_rows(name: str, n: int, width: int, pad_id: int) -> torch.Tensor:
    if name == "position_ids":
        return torch.arange(width).expand(n, width).clone()
    if name == "attention_mask":  # one visible token: a fully masked row would give NaN attention
        mask = torch.zeros(n, width, dtype=torch.long)
        mask[:, 0] = 1
        return mask
    return torch.full((n, width), PAD_VALUES[name](pad_id), dtype=torch.long)


def row_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of each row over the tokens it predicts (labels shifted by one, as the model's loss)."""
    vocab = logits.shape[-1]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), labels[:, 1:].reshape(-1),
                                           ignore_index=IGNORE_INDEX, reduction="none")
    return ce.view(labels.shape[0], -1).sum(1)


def predicted_tokens(labels: torch.Tensor, row_groups: torch.Tensor) -> torch.Tensor:
    """(3, n): for each token a pass predicts (labels shifted by one, as the model's loss), its flat position
    (row x width + token), the token, and the group of its row (``row_groups``, one per row)."""
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    where = (shifted != IGNORE_INDEX).nonzero().squeeze(1)
    return torch.stack([where, shifted[where], row_groups[where // labels.shape[1]]])
