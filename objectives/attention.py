"""Attention on bf16 copies of an fp32 stream's queries, keys and values, as autocast runs it.

peft's k-bit preparation casts embeddings, head and norms to fp32, so every activation after them is fp32, and
sdpa then runs its fp32 kernels: on CUDA the memory-efficient kernel, or for grouped-query heads without a
mask the math kernel, which keeps each layer's (batch, heads, sequence, sequence) probabilities. On the
Llama-3-8B shape fp32 attention took a third of the device's time per step (BENCHMARKS.md, benchmark 2).
Under autocast, the usual bf16 recipe, sdpa gets bf16 inputs. :func:`use_bf16_attention` routes the model's
sdpa attention through :func:`sdpa_in_bf16`, which does the same for fp32 inputs: bf16 copies in, sdpa's bf16
kernels, the output back in fp32. Everything around attention stays as it was.

The route is a registered attention implementation of its own name, with sdpa's mask, selected on the
model's config: transformers looks the implementation up at every call.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "sdpa_bf16"
SDPA = "sdpa"


def sdpa_in_bf16(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """transformers' sdpa attention, on bf16 copies of fp32 inputs (other inputs go through as they are)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.dtype != torch.float32:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.to(torch.bfloat16)
    out, weights = sdpa_attention_forward(module, query.to(torch.bfloat16), key.to(torch.bfloat16),
                                          value.to(torch.bfloat16), attention_mask, **kwargs)
    return out.to(query.dtype), weights


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, sdpa_in_bf16)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_bf16_attention(model: torch.nn.Module, on: bool = True) -> bool:
    """Route ``model``'s sdpa attention through :func:`sdpa_in_bf16` (``on``) or back to sdpa's own; returns
    whether it is routed now. A model on another attention implementation, or whose code does not look its
    attention up in transformers' interface, keeps its own."""
    config: Any = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    # Some models test for the name "sdpa" in their own code (Falcon's causal mask): only a model that looks its
    # attention up in transformers' interface takes another name safely.
    if current not in (SDPA, NAME) or not getattr(model, "_supports_attention_backend", False):
        return False
    if on:
        _register()
    config._attn_implementation = NAME if on else SDPA
    return on
