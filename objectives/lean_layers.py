"""Fewer operations and autograd nodes per layer call: peft's LoRA linear layer as one autograd step, and RMSNorm
as ``torch.nn.functional.rms_norm``.

peft's layer runs about ten tensor operations per call (casts, a defensive clone, dropout, two products, the
scaling, the sum), each recorded as its own autograd node, through five module calls. A small pass spends
more time on that bookkeeping than on the products (BENCHMARKS.md, benchmark 2's profile). Here one
:class:`torch.autograd.Function` computes the same operations in the same order with the same dtypes, and its
backward runs the products autograd would run. Dropout draws its mask as ``torch.nn.functional.dropout`` does
on the device (the same random numbers), so a trial's run matches peft's up to the order in which gradients
from a layer's several consumers are summed (float rounding). With 16-bit activations
(``model.upcast_unquantized=false``) the adapter's products run in the activations' dtype instead, as peft's do
under autocast (:class:`_LoraProductHalf`): that run matches peft's within bf16 rounding.

RMSNorm as transformers writes it for Llama and most decoders is seven operations (casts, square, mean, add,
reciprocal square root, two products); ``functional.rms_norm`` is one. With fp32 activations (the default) it is
the same arithmetic, bit for bit on the CPU; with bf16 activations it rounds once where transformers rounds twice
(before and after the weight: one bf16 unit apart in about a quarter of the outputs). It replaces the ``forward``
of a norm whose output it reproduces on a probe (a ``1 + weight`` norm does not, and keeps its own), for inputs in
the weight's dtype (others go through the norm's own).

The layer stays peft's: only its ``forward`` is replaced on the instance, so its weights, state dict and
saved adapter are peft's. Anything this path does not cover (a merged or disabled adapter, a variant such as
DoRA, a LoRA bias, autocast, more than one active adapter, extra arguments, hooks on the base layer, a trainable
base bias) goes through peft's own ``forward``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional

from objectives.base_cache import BUFFER, wide_grad, wide_product, widens

ADAPTER = "default"
FUSED_DROPOUT_DEVICES = ("cuda", "xpu")
"""Where ATen's dropout runs its fused kernel (``native_dropout``) rather than a Bernoulli noise tensor."""
HALF = (torch.bfloat16, torch.float16)
"""16-bit activations: the adapter's products then run in the activations' dtype (:class:`_LoraProductHalf`)."""


def _dropout_backward(grad: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """The gradient through :func:`_dropout` with what it returned for backward (``mask``), shaped as ``grad``."""
    mask = mask.reshape(grad.shape)
    if mask.dtype != torch.bool:
        return grad * mask
    return torch.ops.aten.native_dropout_backward(grad, mask, 1.0 / (1.0 - p))


def _dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``functional.dropout(x, p, training=True)`` for ``0 < p < 1`` and what its backward multiplies by: the
    fused kernel's mask on CUDA, the scaled noise elsewhere (ATen's two paths, the same random numbers)."""
    if x.device.type not in FUSED_DROPOUT_DEVICES:
        noise = torch.empty_like(x).bernoulli_(1 - p)
        noise.div_(1 - p)
        return x * noise, noise
    return torch.native_dropout(x, p, True)


class _LoraProduct(torch.autograd.Function):
    """``base(x) + (B @ A @ dropout(x)) * scaling`` with the base weight dense (``None``: the base's output is
    added outside, by autograd)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, p: float) -> torch.Tensor:
        xa = x.to(lora_a.dtype)
        mask = None
        if p > 0:
            xa, mask = _dropout(xa, p)
        hidden = functional.linear(xa, lora_a)
        update = (functional.linear(hidden, lora_b) * scaling).to(x.dtype)
        ctx.wide = weight is not None and widens(x, weight, bias)
        if weight is not None:
            # The sum promotes a 16-bit product to x's dtype in the same kernel: peft's separate cast, without it.
            base = wide_product(x, weight) if ctx.wide else functional.linear(x.to(weight.dtype), weight, bias)
            update = torch.add(update, base).to(x.dtype)
        # The mask serves only the input's gradient: a layer whose input needs none (the first layer's, from the
        # frozen embedding) keeps none, as autograd keeps none for peft's dropout there.
        ctx.save_for_backward(weight, lora_a, lora_b, xa, hidden, mask if ctx.needs_input_grad[0] else None)
        ctx.scaling, ctx.p, ctx.x_dtype = scaling, p, x.dtype
        return update

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weight, lora_a, lora_b, xa, hidden, mask = ctx.saved_tensors
        grad_update = grad.to(lora_a.dtype) * ctx.scaling
        flat_grad = grad_update.reshape(-1, grad_update.shape[-1])
        grad_b = flat_grad.t().mm(hidden.reshape(-1, hidden.shape[-1])) if ctx.needs_input_grad[4] else None
        grad_hidden = flat_grad.mm(lora_b)
        grad_a = grad_hidden.t().mm(xa.reshape(-1, xa.shape[-1])) if ctx.needs_input_grad[3] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_xa = grad_hidden.mm(lora_a).view(xa.shape)
            if mask is not None:
                grad_xa = _dropout_backward(grad_xa, mask, ctx.p)
            grad_x = grad_xa.to(ctx.x_dtype)
            if weight is not None:
                base = (wide_grad(grad, weight) if ctx.wide
                        else grad.to(weight.dtype).reshape(-1, grad.shape[-1]).mm(weight).view(xa.shape))
                grad_x = torch.add(grad_x, base).to(ctx.x_dtype)
        return grad_x, None, None, grad_a, grad_b, None, None


def _scaled_mm(m1: torch.Tensor, m2: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * (m1 @ m2)`` in one product: the scaling applied to the fp32 accumulator, one rounding."""
    return m1.new_empty((m1.shape[0], m2.shape[1])).addmm_(m1, m2, beta=0, alpha=scaling)


class _LoraProductHalf(torch.autograd.Function):
    """:class:`_LoraProduct` for 16-bit activations: the adapter's products run in the activations' dtype, as
    peft's layer runs them under autocast (the usual bf16 recipe), and the scaling and the sum with the base's
    output are the products' epilogue (``addmm``). The layer then makes no fp32 copy of its input, its output or
    their gradients: on the 8B shape those copies, casts and scalings cost the device as much time as the base's
    products (BENCHMARKS.md, benchmark 2). The adapter's gradients come out of 16-bit products with fp32
    accumulation, as under autocast."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, p: float) -> torch.Tensor:
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        xd, mask = _dropout(x, p) if p > 0 else (x, None)
        hidden = xd.reshape(-1, x.shape[-1]).mm(a.t())
        # A fresh tensor, not a view (a view made inside a Function cannot be changed in place by its consumer).
        update = (x.new_empty((*x.shape[:-1], b.shape[0])) if weight is None
                  else functional.linear(x, weight, bias).contiguous())
        update.view(-1, b.shape[0]).addmm_(hidden, b.t(), beta=0 if weight is None else 1, alpha=scaling)
        ctx.save_for_backward(weight, lora_a, lora_b, xd, hidden, mask if ctx.needs_input_grad[0] else None)
        ctx.scaling, ctx.p = scaling, p
        return update

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weight, lora_a, lora_b, xd, hidden, mask = ctx.saved_tensors
        flat_grad = grad.reshape(-1, grad.shape[-1])
        grad_b = (_scaled_mm(flat_grad.t(), hidden, ctx.scaling).to(lora_b.dtype)
                  if ctx.needs_input_grad[4] else None)
        grad_hidden = _scaled_mm(flat_grad, lora_b.to(grad.dtype), ctx.scaling)
        flat_xd = xd.reshape(-1, xd.shape[-1])
        grad_a = grad_hidden.t().mm(flat_xd).to(lora_a.dtype) if ctx.needs_input_grad[3] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_hidden.mm(lora_a.to(grad.dtype))
            if mask is not None:
                grad_x = _dropout_backward(grad_x, mask, ctx.p)
            if weight is not None:
                grad_x.addmm_(flat_grad, weight)
            grad_x = grad_x.view(xd.shape)
        return grad_x, None, None, grad_a, grad_b, None, None


class _Forward:
    """A module's ``forward`` replaced on the instance without a reference back to it: a bound method would make
    a cycle (module -> method -> module) that keeps a released adapter's layers alive until a full collection."""

    def __init__(self, module: torch.nn.Module, forward: Callable[..., torch.Tensor]) -> None:
        self.module = weakref.ref(module)
        self.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.forward(self.module(), *args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> _Forward:
        # A module's copy registers itself in ``memo`` before its attributes are copied: bind to the copy.
        module = self.module()
        assert module is not None  # the module being copied holds this forward
        return _Forward(memo.get(id(module), module), self.forward)

    def __reduce__(self) -> tuple[Any, ...]:
        return _Forward, (self.module(), self.forward)


def _route(module: torch.nn.Module, forward: Callable[..., torch.Tensor] | None) -> None:
    """Put ``forward`` in place of the module's own, or (``None``) give the module its own back."""
    if forward is not None:
        module.forward = _Forward(module, forward)
    elif "forward" in module.__dict__:
        del module.forward


def _lean_forward(layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    base = layer.base_layer
    if (args or kwargs or layer.disable_adapters or layer.merged or layer.active_adapters != [ADAPTER]
            or ADAPTER not in layer.lora_A or ADAPTER in layer.lora_variant or layer.lora_bias.get(ADAPTER)
            or not getattr(layer, "cast_input_dtype_enabled", True) or torch.is_autocast_enabled(x.device.type)
            or base._forward_hooks or base._forward_pre_hooks
            or (base.bias is not None and base.bias.requires_grad)):
        return type(layer).forward(layer, x, *args, **kwargs)
    dropout = layer.lora_dropout[ADAPTER]
    p = dropout.p if layer.training and isinstance(dropout, torch.nn.Dropout) else 0.0
    a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    weight = base._buffers.get(BUFFER)
    half = x.dtype in HALF and a.dtype not in HALF and (weight is None or weight.dtype == x.dtype)
    product = _LoraProductHalf if half else _LoraProduct
    if weight is None:
        return base(x) + product.apply(x, None, None, a, b, layer.scaling[ADAPTER], p)
    bias = None if base.bias is None else base.bias.to(weight.dtype)
    return product.apply(x, weight, bias, a, b, layer.scaling[ADAPTER], p)


def use_lean_layers(model: torch.nn.Module, on: bool = True) -> int:
    """Route every peft LoRA layer on a 4-bit linear layer of ``model`` through :class:`_LoraProduct`
    (:class:`_LoraProductHalf` for 16-bit inputs) (``on``) or back through peft's own ``forward``; returns how
    many layers."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and type(m).__name__ == "Linear4bit"]
    for layer in layers:
        _route(layer, _lean_forward if on else None)
    return len(layers)


def _rms_norm_forward(norm: Any, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != norm.weight.dtype:  # transformers' formula returns the weight's dtype: keep its arithmetic
        return type(norm).forward(norm, x)
    return functional.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def use_fused_norms(model: torch.nn.Module, on: bool = True) -> int:
    """Give every RMSNorm of ``model`` whose output ``functional.rms_norm`` reproduces (checked once per class
    on a probe input) that one operation (``on``), or its own ``forward`` back; returns how many norms."""
    verdict: dict[type, bool] = {}
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (not type(module).__name__.endswith("RMSNorm") or not hasattr(module, "variance_epsilon")
                or not isinstance(weight, torch.Tensor) or weight.dim() != 1):
            continue
        if not on:
            count += "forward" in module.__dict__
            _route(module, None)
            continue
        if type(module) not in verdict:
            with torch.no_grad():
                probe = torch.randn(2, 3, weight.shape[0], generator=torch.Generator().manual_seed(0))
                probe = probe.to(device=weight.device, dtype=weight.dtype)
                verdict[type(module)] = torch.allclose(_rms_norm_forward(module, probe).float(),
                                                       type(module).forward(module, probe).float(), rtol=1e-2,
                                                       atol=1e-2)
        if verdict[type(module)]:
            _route(module, _rms_norm_forward)
            count += 1
    return count
