"""The 4-bit base's linear weights kept dequantized (``model.base_cache``): one copy, no dequantization per call.

bitsandbytes' ``Linear4bit`` dequantizes its whole weight into the compute dtype in every forward and backward
call of a training step and then runs an ordinary matrix product with it (its ``gemm_4bit`` fallback on the CPU
and for passes over 1,536 tokens on CUDA; the backward always does). With the copy, the layer runs that product
on the kept weight: the same dequantized values and the same product, so the same numbers, without the
dequantization kernels and bitsandbytes' Python dispatch in each call. On CUDA bitsandbytes 0.50 runs a fused
4-bit kernel instead for passes of a few hundred tokens or less, whose rounding differs from the product's.

On CUDA, with fp32 activations (the default), the product takes the bf16 operands and writes fp32 from its fp32
accumulator, forward and backward (:func:`wide_product`): no cast kernel of its output or of its input's gradient,
and no rounding of either to bf16. The products that read one input (q, k and v; gate and up) share its cast to
bf16. Elsewhere the product rounds to bf16 and the result is cast back, as bitsandbytes' does. The lean LoRA layers
(:mod:`objectives.lean_layers`) multiply with the kept weight the same way, so a trial trained alone and one in a
slot engine run the same arithmetic.

The copy replaces the layer's ``forward`` on the instance and nothing else: the module stays a ``Linear4bit`` in
its place, so peft's LoRA layers and :class:`objectives.slots.SlotLinear`, which call ``base_layer(x)``, wrap it
as before, and an adapter trained on it loads into peft on the plain 4-bit base. The copy is a non-persistent
buffer: no state dict or saved adapter holds it.
"""

from __future__ import annotations

import threading
import types
import weakref
from typing import Any

import torch
from torch.autograd.function import once_differentiable

BUFFER = "base_cache_weight"
HALF = (torch.bfloat16, torch.float16)


def widens(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether ``x @ weight^T`` runs as :func:`wide_product`: fp32 ``x`` against a 16-bit weight without a bias,
    on CUDA (the one backend whose products write fp32 from 16-bit operands)."""
    return x.is_cuda and x.dtype == torch.float32 and weight.dtype in HALF and bias is None


class _LastCast:
    """One thread's last input cast to 16 bits, for the next product that reads the same tensor; forgotten with
    that tensor (a layer's input lives through its products, not through the step)."""

    def __init__(self) -> None:
        self.source: weakref.ref[torch.Tensor] | None = None
        self.version = -1
        self.cast: torch.Tensor | None = None

    def forget(self, source: weakref.ref[torch.Tensor]) -> None:
        if self.source is source:
            self.source, self.cast = None, None


_threads = threading.local()


def _narrow(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)`` outside autograd, shared by consecutive products of one unchanged input in a thread."""
    last: _LastCast | None = getattr(_threads, "last", None)
    if last is None:
        last = _threads.last = _LastCast()
    cast = last.cast  # read once: another thread's release of an older input may clear it
    if (cast is None or cast.dtype != dtype or last.source is None or last.source() is not x
            or last.version != x._version):
        cast = x.detach().to(dtype)
        last.source, last.version, last.cast = weakref.ref(x, last.forget), x._version, cast
    return cast


def wide_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight^T`` in ``x``'s dtype from the 16-bit product of ``x`` cast to ``weight``'s dtype (see
    :func:`widens`); no autograd."""
    flat = _narrow(x, weight.dtype).reshape(-1, x.shape[-1])
    # Not a view of the product: a custom Function's output that is a view cannot be changed in place
    return torch.ops.aten._unsafe_view(torch.mm(flat, weight.t(), out_dtype=x.dtype),
                                       (*x.shape[:-1], weight.shape[0]))


def wide_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`wide_product`'s input: ``grad @ weight`` in ``grad``'s dtype, from 16-bit operands."""
    flat = grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
    return torch.ops.aten._unsafe_view(torch.mm(flat, weight, out_dtype=grad.dtype),
                                       (*grad.shape[:-1], weight.shape[1]))


def dense_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight^T`` in ``x``'s dtype, as the kept weight's layer computes it: :func:`wide_product` where it
    :func:`widens`, else the 16-bit product cast back; no autograd."""
    if widens(x, weight, None):
        return wide_product(x, weight)
    return torch.nn.functional.linear(x.to(weight.dtype), weight).to(x.dtype)


def dense_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`dense_product`'s input, in ``grad``'s dtype (that of the product's input)."""
    if widens(grad, weight, None):
        return wide_grad(grad, weight)
    return grad.to(weight.dtype).matmul(weight).to(grad.dtype)


class _WideProduct(torch.autograd.Function):
    """:func:`wide_product` with its input's gradient from :func:`wide_grad` (the weight is frozen)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.weight = weight
        return wide_product(x, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return wide_grad(grad, ctx.weight), None


def _dense_forward(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """``Linear4bit.forward`` with the kept weight: input cast to the compute dtype, output back to the input's
    (on CUDA written in the input's dtype by the product itself: :func:`widens`)."""
    weight: torch.Tensor = getattr(layer, BUFFER)
    if widens(x, weight, layer.bias):
        out: torch.Tensor = _WideProduct.apply(x, weight)
        return out
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
