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
the square, across examples and above the diagonal. Where flash runs (:func:`takes_varlen`: CUDA, Ampere or newer,
a model whose every layer is plain causal attention, outside a CUDA-graph capture), :func:`packed_mask` builds no
mask for a pass without a padding mask or a cache offset, and only for such a pass: elsewhere on that route it
always builds one. A pass without a mask then runs flash's variable-length kernel in :func:`sdpa_in_bf16`, one
sequence per example, as transformers' flash-attention path does: causal blocks within each example only. The
training loop hands the examples' bounds in with the pass (:func:`on_device`, transformers' flash-attention
arguments, computed on the host); a caller that does not is served from the position ids on the device, which
waits for the device twice per pass.

The route is a registered attention implementation of its own name, with its own mask, selected on the model's
config: transformers looks both up at every call.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from objectives.transfer import send, to_device

NAME = "sdpa_bf16"
SDPA = "sdpa"
PLAIN_CAUSAL = ("llama", "mistral", "qwen2", "qwen3")
"""Model types whose decoder layers all run causal attention with the position ids in their attention's
arguments, when the config has no sliding window: their packed rows can go through the variable-length kernel."""

_sdpa_only = [0]
"""How many :func:`sdpa_only` blocks are open."""


def plain_causal(config: Any) -> bool:
    """Whether every attention layer of a model with ``config`` is causal over its whole input, without dropout."""
    return (getattr(config, "model_type", None) in PLAIN_CAUSAL and getattr(config, "is_causal", True)
            and getattr(config, "sliding_window", None) is None and not getattr(config, "attention_dropout", 0.0))


def takes_varlen(config: Any, device: Any) -> bool:
    """Whether a pass of a model with ``config`` on ``device`` can go through the variable-length kernel: a plain
    causal model (:func:`plain_causal`) with flash's head sizes, on a CUDA device flash runs on (Ampere or newer),
    outside a CUDA-graph capture (the kernel's bounds are read when it is launched) and :func:`sdpa_only`."""
    if device is None or _sdpa_only[0] or not plain_causal(config):
        return False
    heads = getattr(config, "num_attention_heads", 0) or 1
    head_dim = getattr(config, "head_dim", None) or getattr(config, "hidden_size", 0) // heads
    device = torch.device(device)
    return (0 < head_dim <= 256 and head_dim % 8 == 0 and _flash_runs(device)
            and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()))


@functools.cache
def _flash_runs(device: torch.device) -> bool:
    """Asked once per device: every attention layer of every pass asks."""
    return (device.type == "cuda" and torch.backends.cuda.is_flash_attention_available()
            and torch.cuda.get_device_capability(device)[0] >= 8)


@contextlib.contextmanager
def sdpa_only() -> Iterator[None]:
    """Passes inside run sdpa's own mask and kernels: the warm-up before a CUDA-graph capture loads the kernels
    the capture will record."""
    _sdpa_only[0] += 1
    try:
        yield
    finally:
        _sdpa_only[0] -= 1


def packed_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """sdpa's mask; on the variable-length route (:func:`takes_varlen`) none for a whole pass without a padding
    mask or a cache offset, and a mask for every other pass, even a plain causal one (where sdpa's own would be
    none): there a pass without a mask is split at its restarted position ids."""
    from transformers.masking_utils import sdpa_mask

    if args or kwargs.get("use_vmap") or not takes_varlen(kwargs.get("config"), kwargs.get("device")):
        return sdpa_mask(*args, **kwargs)
    whole_pass = (kwargs.get("q_length") is not None and kwargs.get("q_length") == kwargs.get("kv_length")
                  and not kwargs.get("q_offset") and not kwargs.get("kv_offset"))
    if whole_pass and kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": False})


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


class _LastBounds:
    """The bounds of the last position ids read on the device: every layer of a pass gets the same tensor, and
    reading them waits for the device. A changed tensor in the same place (a graph's inputs are refilled in place)
    has a new version."""

    def __init__(self) -> None:
        self.ids: weakref.ref[torch.Tensor] | None = None
        self.key: tuple[Any, ...] = ()
        self.value: tuple[torch.Tensor, int] | None = None

    def get(self, position_ids: torch.Tensor, rows: int) -> tuple[torch.Tensor, int]:
        key = (position_ids._version, rows)
        if self.value is None or self.ids is None or self.ids() is not position_ids or self.key != key:
            self.ids, self.key, self.value = weakref.ref(position_ids), key, example_bounds(position_ids, rows)
        return self.value


_last_bounds = _LastBounds()


def routed(model: Any, device: Any) -> bool:
    """Whether ``model``'s packed passes on ``device`` go through the variable-length kernel: its attention is this
    module's (:func:`use_bf16_attention`) and :func:`takes_varlen` holds."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == NAME and takes_varlen(config, device)


def on_device(model: Any, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
    """A pass on the device, with the examples' bounds as the model's forward takes them (transformers'
    flash-attention arguments) where the model's attention reads them (:func:`sdpa_in_bf16`): computed on the host,
    so the attention need not read them back from the device."""
    positions = batch.get("position_ids")
    sent: dict[str, Any] = to_device(batch, device)
    if positions is None or not routed(model, device):
        return sent
    offsets, longest = example_bounds(positions, positions.shape[0])
    offsets = send(offsets, device)
    return sent | {"cu_seq_lens_q": offsets, "cu_seq_lens_k": offsets, "max_length_q": longest,
                   "max_length_k": longest}


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, longest: int,
           scale: float | None) -> torch.Tensor:
    """Flash's causal variable-length kernel on (tokens, heads, head_dim) inputs."""
    out: torch.Tensor = torch.ops.aten._flash_attention_forward(q, k, v, offsets, offsets, longest, longest, 0.0,
                                                                True, False, scale=scale)[0]
    return out


def varlen_causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: tuple[torch.Tensor, int],
                  scale: float | None) -> torch.Tensor:
    """Causal attention within each example of packed rows, with the examples' ``bounds`` (offsets, the longest):
    (batch, heads, sequence, head_dim) in, (batch, sequence, heads, head_dim) out, as transformers' attention
    functions return it."""
    rows, heads, width, dim = query.shape
    offsets, longest = bounds
    q, k, v = (t.transpose(1, 2).reshape(rows * width, t.shape[1], dim) for t in (query, key, value))
    return _flash(q, k, v, offsets, longest, scale).view(rows, width, heads, dim)


def sdpa_in_bf16(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """transformers' sdpa attention, on bf16 copies of fp32 inputs (other inputs go through as they are); a pass
    without a mask on the variable-length route through :func:`varlen_causal`."""
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
                  else _last_bounds.get(position_ids, query.shape[0]))
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
