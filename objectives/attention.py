"""Attention on bf16 copies of an fp32 stream's queries, keys and values, as autocast runs it; packed rows through
flash-attention's variable-length kernel.

peft's k-bit preparation casts embeddings, head and norms to fp32, so every activation after them is fp32, and
sdpa then runs its fp32 kernels: on CUDA the memory-efficient kernel, or for grouped-query heads without a
mask the math kernel, which keeps each layer's (batch, heads, sequence, sequence) probabilities. On the
Llama-3-8B shape fp32 attention took a third of the device's time per step (BENCHMARKS.md, benchmark 2).
Under autocast, the usual bf16 recipe, sdpa gets bf16 inputs. :func:`use_bf16_attention` routes the model's
sdpa attention through :func:`sdpa_in_bf16`, which does the same for fp32 inputs: bf16 copies in, sdpa's bf16
kernels, the output back in fp32. Everything around attention stays as it was.

Packed rows (``train.packing``) keep their examples apart by restarted position ids; sdpa needs them as a
block-diagonal mask, which rules out its flash kernel and makes the memory-efficient kernel compute every block of
the square, across examples and above the diagonal. On CUDA, for models whose every layer is plain causal
attention (:data:`PLAIN_CAUSAL`), :func:`packed_mask` builds no mask, and :func:`sdpa_in_bf16` runs flash's
variable-length kernel with one sequence per example, as transformers' flash-attention path does: causal blocks
within each example only. The training loop hands the examples' bounds in with the pass, computed on the host
(:func:`bounds_kwargs`, transformers' flash-attention arguments); a caller that does not is served from the
position ids on the device, which waits for the device once per pass. Anything else (a padding mask, a cache
offset, attention dropout, a CUDA-graph capture, which cannot wait for the examples' bounds) takes sdpa's mask and
kernels.

The route is a registered attention implementation of its own name, with its own mask, selected on the model's
config: transformers looks both up at every call.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch

NAME = "sdpa_bf16"
SDPA = "sdpa"
PLAIN_CAUSAL = ("llama", "mistral", "qwen2", "qwen3")
"""Model types whose decoder layers all run causal attention with the position ids in their attention's
arguments, when the config has no sliding window: their packed rows can go through the variable-length kernel."""

_bounds: dict[str, Any] = {}
"""The last position ids' example bounds: every layer of a pass reads the same position ids."""


def plain_causal(config: Any) -> bool:
    """Whether every attention layer of a model with ``config`` is causal over its whole input, without dropout."""
    return (getattr(config, "model_type", None) in PLAIN_CAUSAL and getattr(config, "sliding_window", None) is None
            and not getattr(config, "attention_dropout", 0.0))


def takes_varlen(config: Any, device: Any) -> bool:
    """Whether a pass of a model with ``config`` on ``device`` can go through the variable-length kernel: a plain
    causal model (:func:`plain_causal`) with flash's head sizes, on a CUDA device flash runs on (Ampere or newer),
    outside a CUDA-graph capture (the kernel's bounds are read when it is launched)."""
    if device is None or not plain_causal(config):
        return False
    heads = getattr(config, "num_attention_heads", 0) or 1
    head_dim = getattr(config, "head_dim", None) or getattr(config, "hidden_size", 0) // heads
    return (0 < head_dim <= 256 and head_dim % 8 == 0 and _flash_runs(torch.device(device))
            and not torch.cuda.is_current_stream_capturing())


@functools.cache
def _flash_runs(device: torch.device) -> bool:
    return (device.type == "cuda" and torch.backends.cuda.is_flash_attention_available()
            and torch.cuda.get_device_capability(device)[0] >= 8)


def packed_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """sdpa's mask, or none (causal within each example, :func:`sdpa_in_bf16`) for a whole pass without a padding
    mask or a cache offset that can take the variable-length kernel (:func:`takes_varlen`)."""
    from transformers.masking_utils import sdpa_mask

    whole_pass = (kwargs.get("q_length") is not None and kwargs.get("q_length") == kwargs.get("kv_length")
                  and not kwargs.get("q_offset") and not kwargs.get("kv_offset"))
    if (not args and whole_pass and kwargs.get("attention_mask") is None
            and takes_varlen(kwargs.get("config"), kwargs.get("device"))):
        return None
    return sdpa_mask(*args, **kwargs)


def example_bounds(position_ids: torch.Tensor, rows: int) -> tuple[torch.Tensor, int]:
    """Where each example starts in the flattened rows (an example starts at a row's start and wherever the
    position ids do not count on by one), as the variable-length kernel reads them: int32 offsets ending with the
    token count; and the longest example's length."""
    width = position_ids.shape[-1]
    positions = position_ids.expand(rows, width).reshape(-1)
    start = torch.ones_like(positions, dtype=torch.bool)
    start[1:] = positions[1:] != positions[:-1] + 1
    start[::width] = True
    offsets = torch.cat([start.nonzero().flatten(), positions.new_tensor([positions.numel()])]).to(torch.int32)
    return offsets, int((offsets[1:] - offsets[:-1]).max())


def _cached_bounds(position_ids: torch.Tensor, rows: int) -> tuple[torch.Tensor, int]:
    key = (position_ids._version, rows, position_ids.device)
    if _bounds.get("ids") is None or _bounds["ids"]() is not position_ids or _bounds["key"] != key:
        _bounds.update(ids=weakref.ref(position_ids), key=key, value=example_bounds(position_ids, rows))
    value: tuple[torch.Tensor, int] = _bounds["value"]
    return value


def bounds_kwargs(model: Any, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
    """The examples' bounds of a pass on the host (``batch``) as the model's forward takes them (transformers'
    flash-attention arguments), where the model's attention on ``device`` reads them (:func:`sdpa_in_bf16`,
    :func:`takes_varlen`); otherwise nothing."""
    config = getattr(model, "config", None)
    positions = batch.get("position_ids")
    if (positions is None or getattr(config, "_attn_implementation", None) != NAME
            or not takes_varlen(config, device)):
        return {}
    offsets, longest = example_bounds(positions, positions.shape[0])
    return {"cu_seq_lens_q": offsets, "cu_seq_lens_k": offsets, "max_length_q": longest, "max_length_k": longest}


def varlen_causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: tuple[torch.Tensor, int],
                  scale: float | None) -> torch.Tensor:
    """Causal attention within each example of packed rows, with the examples' ``bounds`` (offsets, the longest):
    (batch, heads, sequence, head_dim) in, (batch, sequence, heads, head_dim) out, as transformers' attention
    functions return it."""
    rows, heads, width, dim = query.shape
    offsets, longest = bounds
    q, k, v = (t.transpose(1, 2).reshape(rows * width, t.shape[1], dim) for t in (query, key, value))
    out = torch.ops.aten._flash_attention_forward(q, k, v, offsets, offsets, longest, longest, 0.0, True, False,
                                                  scale=scale)[0]
    return out.view(rows, width, heads, dim)


def sdpa_in_bf16(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """transformers' sdpa attention, on bf16 copies of fp32 inputs (other inputs go through as they are); without
    a mask, on CUDA, packed rows through :func:`varlen_causal`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    if dtype == torch.float32:
        query, key, value = (t.to(torch.bfloat16) for t in (query, key, value))
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.to(torch.bfloat16)
    position_ids = kwargs.get("position_ids")
    if (attention_mask is None and position_ids is not None and position_ids.dim() == 2
            and query.shape[2] == key.shape[2] and not kwargs.get("dropout")
            and takes_varlen(getattr(module, "config", None), query.device)):
        bounds = ((kwargs["cu_seq_lens_q"], kwargs["max_length_q"]) if kwargs.get("cu_seq_lens_q") is not None
                  else _cached_bounds(position_ids, query.shape[0]))
        out, weights = varlen_causal(query, key, value, bounds, kwargs.get("scaling")), None
    else:
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return out.to(dtype), weights


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, sdpa_in_bf16)
    AttentionMaskInterface.register(NAME, packed_mask)
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
