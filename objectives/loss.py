"""The loss of a causal-LM pass: the model's own (full logits), or fused with the output head (``train.fused_loss``).

The fused loss is liger-kernel's ``LigerFusedLinearCrossEntropyLoss`` on the decoder's last hidden state and the
head's weight: it computes the logits of a chunk of tokens at a time, turns them into their gradient at once and
keeps only the gradient of the hidden state, so batch x sequence x vocabulary logits never exist (for the
default SmolLM2-135M trial they are most of the peak). It needs CUDA and triton; elsewhere the model's own loss
runs. It is called with ``reduction="sum"`` only: with ``"none"``, liger-kernel before its fix of July 2026
(linkedin/Liger-Kernel#1298) scales every token's gradient by the first token's weight, so a weighted sum (the
slot engine's per-run normalisation) is one call per run's contiguous rows instead.

The labels are shifted as transformers' ``ForCausalLMLoss`` shifts them (padded with the ignore index, not the
hidden state sliced), so both paths predict the same tokens.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

import torch

from objectives.config import ConfigError
from objectives.data import IGNORE_INDEX

PLAIN_HEAD_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Families whose causal-LM head is a plain linear layer on the last hidden state (no scaling or soft-capping of
the logits), so the fused loss, or the head on a pass's predicted tokens alone, computes what the model's forward
would."""


def fused_loss_unavailable(device_kind: str, model_config: Any = None) -> str | None:
    """Why the fused loss cannot run here (None: it can). Looks liger-kernel up without importing it."""
    if device_kind != "cuda":
        return "it needs CUDA"
    if importlib.util.find_spec("liger_kernel") is None or importlib.util.find_spec("triton") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    model_type = (model_config.get("model_type") if isinstance(model_config, Mapping)
                  else getattr(model_config, "model_type", None))
    if model_type is not None and model_type not in PLAIN_HEAD_TYPES:
        return f"{model_type} models are not supported (only {', '.join(PLAIN_HEAD_TYPES)})"
    return None


def check_fused_loss(setting: Any, device_kind: str, model_config: Any = None) -> str | None:
    """Why the fused loss cannot run here (None: it can), for ``train.fused_loss`` set to ``setting``.

    Raises:
        ConfigError: ``setting`` is on where it cannot run.
    """
    reason = fused_loss_unavailable(device_kind, model_config)
    if setting is True and reason is not None:
        raise ConfigError(f"train.fused_loss: on, but {reason}; set train.fused_loss=auto or off")
    return reason


def fused_loss_on(setting: Any, device: torch.device, model: Any) -> bool:
    """``train.fused_loss`` for a loop given an undecided config: ``auto`` is on where the fused loss can run."""
    if setting == "auto":
        return fused_loss_unavailable(device.type, getattr(causal_lm(model), "config", None)) is None
    return bool(setting)


def plain_head(model_config: Any) -> bool:
    """Whether the model's head is a plain linear layer (:data:`PLAIN_HEAD_TYPES`)."""
    return getattr(model_config, "model_type", None) in PLAIN_HEAD_TYPES


def causal_lm(model: Any) -> Any:
    """The transformers causal LM inside a peft model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def hidden_and_head(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's last hidden state for ``batch`` (without labels) and the output head's weight: the
    causal LM's forward up to its head. peft's LoRA wrapper adds nothing to that forward."""
    lm = causal_lm(model)
    hidden = lm.model(**batch).last_hidden_state
    return hidden, lm.get_output_embeddings().weight


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """The token each position predicts (the next one); the last position predicts nothing."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


_FUSED: dict[str, Any] = {}


def fused_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over the tokens ``labels`` (unshifted, as the batch holds them) predicts, from the
    hidden state of shape (rows, tokens, hidden) and the head's weight."""
    if "sum" not in _FUSED:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        _FUSED["sum"] = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    flat = hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype)
    return _FUSED["sum"](weight, flat, shifted_labels(labels).reshape(-1))  # type: ignore[no-any-return]


def pass_loss(model: Any, batch: dict[str, Any], num_items: int | torch.Tensor,
              fused: bool) -> torch.Tensor:
    """The pass's loss: summed over its predicted tokens and divided by ``num_items`` (the step's, so passes
    add up to the step's mean)."""
    if not fused:
        return model(**batch, num_items_in_batch=num_items).loss  # type: ignore[no-any-return]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden, weight = hidden_and_head(model, inputs)
    return fused_loss_sum(hidden, weight, batch["labels"]) / max(1, num_items)


def group_loss_sums(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, groups: int) -> torch.Tensor:
    """The fused summed loss of each of ``groups`` equal, consecutive blocks of rows (one run's rows of a merged
    pass each): one call per block, so each run's gradient scale reaches only its own rows."""
    rows = labels.shape[0] // groups
    return torch.stack([fused_loss_sum(hidden[i * rows:(i + 1) * rows], weight, labels[i * rows:(i + 1) * rows])
                        for i in range(groups)])


def target_loss_sums(model: Any, batch: dict[str, Any], predicted: torch.Tensor, groups: int) -> torch.Tensor:
    """Each of ``groups``' summed cross-entropy, with the head applied to the tokens the pass predicts alone
    (:func:`objectives.passes.predicted_tokens` gives ``predicted``: flat positions, their targets and their
    groups). A prompt's tokens and padding predict nothing: on the default data three in four tokens of a pass,
    whose vocabulary-wide logits were a fifth of a 1B model's forward. For :func:`plain_head` models only."""
    lm = causal_lm(model)
    hidden = lm.model(**batch).last_hidden_state
    where, targets, owners = predicted
    logits = lm.get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1]).index_select(0, where))
    ce = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    return torch.zeros(groups, device=ce.device).index_add(0, owners, ce)
