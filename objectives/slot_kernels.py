"""The slot engine's element-wise hot spots as one CUDA kernel each (Triton): hashed dropout and the optimizer step.

At 64 slots of the 135M model these two were a third of the GPU's time per step (BENCHMARKS.md, benchmark 5):
the dropout hash is about 16 tensor operations per adapted layer, the optimizer about 25 per weight tensor,
each a pass over memory and a kernel launch. Here each is one pass. The kernels compute what the torch
operations in :mod:`objectives.slots` and :mod:`objectives.slot_optim` compute, operation for operation in the
same order and rounding (no fused multiply-add, IEEE division and square root), so a run gives the same numbers
either way. They run on CUDA where Triton is installed; elsewhere the torch operations do.
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (a CPU-only install): the torch operations run
    triton = None

BLOCK = 1024
# Triton's interpreter runs the kernels on CPU tensors: a way to check them without a GPU.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def usable(t: torch.Tensor) -> bool:
    """Whether the kernels serve ``t``: Triton is installed, and ``t`` is on CUDA (or the interpreter runs)."""
    return triton is not None and (t.is_cuda or INTERPRETED)


if triton is not None:

    @triton.jit
    def _dropout_kernel(x_ptr, out_ptr, salted_ptr, threshold_ptr, scale_ptr, n, per_slot, per_row, row_stride,
                        BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n
        slot = offsets // per_slot
        within = offsets - slot * per_slot
        row = within // per_row
        # (row * max_length + token) * features + feature: the element's place in its slot's rows
        h = (row * row_stride + (within - row * per_row)).to(tl.int32)
        h = h ^ tl.load(salted_ptr + slot, mask=inside, other=0)
        h = h ^ ((h >> 16) & 0xFFFF)
        h = h * 0x7FEB352D
        h = h ^ ((h >> 15) & 0x1FFFF)
        h = h * -2073254261  # 0x846CA68B as int32
        h = h ^ ((h >> 16) & 0xFFFF)
        keep = ((h & 0xFFFFFF) >= tl.load(threshold_ptr + slot, mask=inside, other=0)).to(tl.float32)
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
        tl.store(out_ptr + offsets, x * keep * tl.load(scale_ptr + slot, mask=inside, other=0.0), mask=inside)

    @triton.jit
    def _step_kernel(p_ptr, g_ptr, m_ptr, v_ptr, c_ptr, clip_ptr, n, per_slot, slots, eps,
                     BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n
        slot = offsets // per_slot
        c = c_ptr + slot  # coefficient k of a slot is at c_ptr + k * slots + slot

        p = tl.load(p_ptr + offsets, mask=inside, other=0.0)
        g = tl.load(g_ptr + offsets, mask=inside, other=0.0) * tl.load(clip_ptr + slot, mask=inside, other=0.0)
        m = tl.load(m_ptr + offsets, mask=inside, other=0.0)
        v = tl.load(v_ptr + offsets, mask=inside, other=0.0)
        # AdamW (objectives.slot_optim.SlotOptimizer.step, in its order)
        p = p * tl.load(c + 0 * slots, mask=inside, other=1.0)
        m = m * tl.load(c + 1 * slots, mask=inside, other=1.0)
        m = m + g * tl.load(c + 2 * slots, mask=inside, other=0.0)
        v = v * tl.load(c + 3 * slots, mask=inside, other=1.0)
        v = v + (g * g) * tl.load(c + 4 * slots, mask=inside, other=0.0)
        denom = tl.div_rn(tl.sqrt_rn(v), tl.load(c + 5 * slots, mask=inside, other=1.0)) + eps
        p = p - tl.div_rn(m * tl.load(c + 6 * slots, mask=inside, other=0.0), denom)
        # SGD
        d_p = g + p * tl.load(c + 7 * slots, mask=inside, other=0.0)
        m = m * tl.load(c + 8 * slots, mask=inside, other=1.0)
        m = m + d_p * tl.load(c + 9 * slots, mask=inside, other=0.0)
        direction = d_p * tl.load(c + 10 * slots, mask=inside, other=0.0) + \
            m * tl.load(c + 11 * slots, mask=inside, other=0.0)
        p = p - direction * tl.load(c + 12 * slots, mask=inside, other=0.0)
        tl.store(p_ptr + offsets, p, mask=inside)
        tl.store(m_ptr + offsets, m, mask=inside)
        tl.store(v_ptr + offsets, v, mask=inside)


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


class HashedDropout(torch.autograd.Function):
    """``x * keep * scale`` with ``keep`` the hash mask of :func:`objectives.slots.hash32`; the backward applies
    the same mask, recomputed rather than kept."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, salted: torch.Tensor, threshold: torch.Tensor, scale: torch.Tensor,
                per_row: int, row_stride: int) -> torch.Tensor:
        ctx.save_for_backward(salted, threshold, scale)
        ctx.geometry = (per_row, row_stride)
        return _apply_mask(x, salted, threshold, scale, per_row, row_stride)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        salted, threshold, scale = ctx.saved_tensors
        return _apply_mask(grad, salted, threshold, scale, *ctx.geometry), None, None, None, None, None


def _apply_mask(x: torch.Tensor, salted: torch.Tensor, threshold: torch.Tensor, scale: torch.Tensor,
                per_row: int, row_stride: int) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    _dropout_kernel[_grid(n)](x, out, salted, threshold, scale, n, n // salted.numel(), per_row, row_stride,
                              BLOCK=BLOCK, enable_fp_fusion=False)
    return out


def hashed_dropout(x: torch.Tensor, salted: torch.Tensor, threshold: torch.Tensor, scale: torch.Tensor,
                 tokens: int, features: int, max_length: int) -> torch.Tensor:
    """Dropout of ``x`` (slots, rows x ``tokens``, ``features``), fp32: slot ``s`` keeps an element whose hash of
    (``salted[s]`` xor (row * max_length + token) * features + feature) is at least ``threshold[s]``, and scales
    it by ``scale[s]``."""
    out: torch.Tensor = HashedDropout.apply(x, salted, threshold, scale, tokens * features, max_length * features)
    return out


def optimizer_step(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avg: list[torch.Tensor],
                   exp_avg_sq: list[torch.Tensor], coefficients: torch.Tensor, clip: torch.Tensor,
                   eps: float) -> None:
    """One :class:`objectives.slot_optim.SlotOptimizer` step in place, one kernel per weight tensor:
    ``coefficients`` (13, slots) in the order of its table, ``clip`` (slots,) each slot's gradient scale."""
    slots = clip.numel()
    for p, g, m, v in zip(params, grads, exp_avg, exp_avg_sq, strict=True):
        n = p.numel()
        _step_kernel[_grid(n)](p, g.contiguous(), m, v, coefficients, clip, n, n // slots, slots, eps,
                               BLOCK=BLOCK, enable_fp_fusion=False)
