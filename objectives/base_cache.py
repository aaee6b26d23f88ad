"""The 4-bit base's linear weights kept dequantized (``model.base_cache``): one copy, no dequantization per call.

bitsandbytes' ``Linear4bit`` dequantizes its whole weight into the compute dtype in every forward and backward
call of a training step and then runs an ordinary matrix product with it (its ``gemm_4bit`` fallback on the CPU
and for passes over 1,536 tokens on CUDA; the backward always does). With the copy, the layer runs that product
on the kept weight: the same dequantized values and the same product, so the same numbers, without the
dequantization kernels and bitsandbytes' Python dispatch in each call. On CUDA bitsandbytes 0.50 runs a fused
4-bit kernel instead for passes of a few hundred tokens or less, whose rounding differs from the product's.

The copy replaces the layer's ``forward`` on the instance and nothing else: the module stays a ``Linear4bit`` in
its place, so peft's LoRA layers and :class:`objectives.slots.SlotLinear`, which call ``base_layer(x)``, wrap it
as before, and an adapter trained on it loads into peft on the plain 4-bit base. The copy is a non-persistent
buffer: no state dict or saved adapter holds it.
"""

from __future__ import annotations

import types
from typing import Any

import torch

BUFFER = "base_cache_weight"


def _dense_forward(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """``Linear4bit.forward`` with the kept weight: input cast to the compute dtype, output back to the input's."""
    weight: torch.Tensor = getattr(layer, BUFFER)
    bias = None if layer.bias is None else layer.bias.to(weight.dtype)
    return torch.nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


def four_bit_layers(model: torch.nn.Module) -> list[Any]:
    """Every bitsandbytes 4-bit linear layer, wrapped by an adapter or not."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes: no 4-bit layers
        return []
    return [m for m in model.modules() if isinstance(m, Linear4bit)]


def cache_base_weights(model: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Dequantize every 4-bit linear weight once into ``compute_dtype`` and multiply with that; returns the
    bytes kept. Layers already cached are left alone."""
    from bitsandbytes.functional import dequantize_4bit

    kept = 0
    for layer in four_bit_layers(model):
        if BUFFER not in layer._buffers:
            quant_state = layer.weight.quant_state
            # The dtype the layer's own product runs in: its input is cast to compute_dtype, and the weight is
            # dequantized to the input's dtype (quant_state.dtype is the same here: the base loads in it).
            dtype = layer.compute_dtype or compute_dtype
            with torch.no_grad():
                dense = dequantize_4bit(layer.weight.data, quant_state).to(dtype)
            layer.register_buffer(BUFFER, dense, persistent=False)
            layer.forward = types.MethodType(_dense_forward, layer)
        kept += getattr(layer, BUFFER).nbytes
    return kept


def drop_base_cache(model: torch.nn.Module) -> None:
    """Back to bitsandbytes' own forward; the copies go with their last reference."""
    for layer in four_bit_layers(model):
        if BUFFER in layer._buffers:
            del layer._buffers[BUFFER]
            del layer.forward


def cached(model: torch.nn.Module) -> bool:
    """Whether the model's 4-bit layers multiply with a kept copy."""
    layers = four_bit_layers(model)
    return bool(layers) and all(BUFFER in layer._buffers for layer in layers)
