"""The slot engine's hot spots as CUDA kernels (Triton): the adapter's first product with its hashed dropout, and
the optimizer step.

At 64 slots of the 135M model dropout and the optimizer were a third of the GPU's time per step (BENCHMARKS.md,
benchmark 5): the dropout hash is about 16 tensor operations per adapted layer, the optimizer about 25 per weight
tensor, each a pass over memory and a kernel launch. The optimizer is one pass here, computing what the torch
operations in :mod:`objectives.slot_optim` compute, operation for operation in the same order and rounding (no fused
multiply-add, IEEE division and square root); it and the gradients' norms are one launch each over every weight (a
table of their addresses), where a launch per weight took a few hundred per step on the host. The dropout is drawn
where the first product reads the layer's input, forward and backward, so neither a dropped copy of the input nor
its gradient is written and read again; its masks are those of :mod:`objectives.slots`, bit for bit, and the
products' sums are a tiled product's (equal to torch's to float rounding). They run on CUDA where Triton is
installed; elsewhere the torch operations do.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from objectives.transfer import send

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (a CPU-only install): the torch operations run
    triton = None

BLOCK = 1024
TABLE_COLUMNS = 5
"""An :func:`address_table`'s row: a weight's, its gradient's and its two moments' addresses, then its elements per
slot."""
# Triton's interpreter runs the kernels on CPU tensors: a way to check them without a GPU.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def usable(t: torch.Tensor) -> bool:
    """Whether the kernels serve ``t``: Triton is installed, and ``t`` is on CUDA (on the CPU where the interpreter
    runs: it reads the address tables on the host)."""
    return triton is not None and (t.is_cpu if INTERPRETED else t.is_cuda)


if triton is not None:
    _COLUMNS = tl.constexpr(TABLE_COLUMNS)  # a kernel reads only constexpr globals

    @triton.jit
    def _keep(h, salted, threshold):
        """1.0 where the element of hash input ``h`` (int32) is kept, else 0.0: :func:`objectives.slots.hash32`."""
        h = h ^ salted
        h = h ^ ((h >> 16) & 0xFFFF)
        h = h * 0x7FEB352D
        h = h ^ ((h >> 15) & 0x1FFFF)
        h = h * -2073254261  # 0x846CA68B as int32
        h = h ^ ((h >> 16) & 0xFFFF)
        return ((h & 0xFFFFFF) >= threshold).to(tl.float32)

    @triton.jit
    def _tile_keep(t, k, tokens, max_length, features, salted, threshold):
        """The keep factors of a (tokens ``t``, features ``k``) tile of one slot's part of a pass whose rows are
        ``tokens`` wide: the element's hash input is (row * max_length + token) * features + feature."""
        row = t // tokens
        place = (row * max_length + (t - row * tokens)).to(tl.int64)[:, None] * features + k[None, :]
        return _keep(place.to(tl.int32), salted, threshold)

    @triton.jit
    def _dropped_x_tile(x_base, t, k, T, K, tokens, max_length, salted, threshold, scale):
        """A (tokens ``t``, features ``k``) tile of one slot's input (T, K) from ``x_base``, dropped and scaled."""
        x = tl.load(x_base + t[:, None].to(tl.int64) * K + k[None, :], mask=(t[:, None] < T) & (k[None, :] < K),
                    other=0.0)
        return x * _tile_keep(t, k, tokens, max_length, K, salted, threshold) * scale

    @triton.jit
    def _dropped_product_kernel(x_ptr, a_ptr, out_ptr, salted_ptr, threshold_ptr, scale_ptr, T, K, R, tokens,
                                max_length, PRECISION: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                                BR: tl.constexpr):
        """out[s] = (x[s] * keep * scale[s]) @ a[s]^T for x (S, T, K), a (S, R, K): a tile of T by all of R."""
        s = tl.program_id(1)
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        r = tl.arange(0, BR)
        salted, threshold = tl.load(salted_ptr + s), tl.load(threshold_ptr + s)
        scale = tl.load(scale_ptr + s)
        x_base = x_ptr + s.to(tl.int64) * T * K
        a_base = a_ptr + s.to(tl.int64) * R * K
        acc = tl.zeros((BT, BR), dtype=tl.float32)
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            x = _dropped_x_tile(x_base, t, k, T, K, tokens, max_length, salted, threshold, scale)
            a = tl.load(a_base + r[None, :] * K + k[:, None], mask=(r[None, :] < R) & (k[:, None] < K), other=0.0)
            acc += tl.dot(x, a, input_precision=PRECISION)
        tl.store(out_ptr + s.to(tl.int64) * T * R + t[:, None] * R + r[None, :], acc,
                 mask=(t[:, None] < T) & (r[None, :] < R))

    @triton.jit
    def _dropped_grad_x_kernel(g_ptr, a_ptr, dx_ptr, salted_ptr, threshold_ptr, scale_ptr, T, K, R, tokens,
                               max_length, PRECISION: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                               BR: tl.constexpr, ACCUMULATE: tl.constexpr):
        """dx[s] = (g[s] @ a[s]) * keep * scale[s] for g (S, T, R), added to what dx holds with ``ACCUMULATE``: a
        tile of T by K."""
        s = tl.program_id(2)
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        k = tl.program_id(1) * BK + tl.arange(0, BK)
        r = tl.arange(0, BR)
        g = tl.load(g_ptr + s.to(tl.int64) * T * R + t[:, None] * R + r[None, :],
                    mask=(t[:, None] < T) & (r[None, :] < R), other=0.0)
        a = tl.load(a_ptr + s.to(tl.int64) * R * K + r[:, None] * K + k[None, :],
                    mask=(r[:, None] < R) & (k[None, :] < K), other=0.0)
        dx = tl.dot(g, a, input_precision=PRECISION)
        dx = dx * _tile_keep(t, k, tokens, max_length, K, tl.load(salted_ptr + s), tl.load(threshold_ptr + s))
        dx = dx * tl.load(scale_ptr + s)
        place = dx_ptr + s.to(tl.int64) * T * K + t[:, None].to(tl.int64) * K + k[None, :]
        inside = (t[:, None] < T) & (k[None, :] < K)
        if ACCUMULATE:
            dx = tl.load(place, mask=inside, other=0.0) + dx
        tl.store(place, dx, mask=inside)

    @triton.jit
    def _dropped_grad_a_kernel(g_ptr, x_ptr, da_ptr, salted_ptr, threshold_ptr, scale_ptr, T, K, R, tokens,
                               max_length, PRECISION: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                               BR: tl.constexpr):
        """da[s] = g[s]^T @ (x[s] * keep * scale[s]): all of R by a tile of K."""
        s = tl.program_id(1)
        k = tl.program_id(0) * BK + tl.arange(0, BK)
        r = tl.arange(0, BR)
        salted, threshold = tl.load(salted_ptr + s), tl.load(threshold_ptr + s)
        scale = tl.load(scale_ptr + s)
        g_base = g_ptr + s.to(tl.int64) * T * R
        x_base = x_ptr + s.to(tl.int64) * T * K
        acc = tl.zeros((BR, BK), dtype=tl.float32)
        for t0 in range(0, T, BT):
            t = t0 + tl.arange(0, BT)
            g = tl.load(g_base + r[:, None] + t[None, :] * R, mask=(r[:, None] < R) & (t[None, :] < T), other=0.0)
            x = _dropped_x_tile(x_base, t, k, T, K, tokens, max_length, salted, threshold, scale)
            acc += tl.dot(g, x, input_precision=PRECISION)
        tl.store(da_ptr + s.to(tl.int64) * R * K + r[:, None] * K + k[None, :], acc,
                 mask=(r[:, None] < R) & (k[None, :] < K))

    @triton.jit
    def _tensor_of(table_ptr, column):
        """Row ``program_id(1)`` of an :func:`address_table`: its ``column``'s fp32 tensor and its elements per
        slot."""
        row = table_ptr + tl.program_id(1) * _COLUMNS
        return tl.load(row + column).to(tl.pointer_type(tl.float32)), tl.load(row + _COLUMNS - 1)

    @triton.jit
    def _square_sums_kernel(table_ptr, out_ptr, slots, BLOCK: tl.constexpr):
        """out[i, s] = the sum of squares of slot ``s``'s part of the table's gradient ``i``."""
        s = tl.program_id(0)
        g_ptr, per_slot = _tensor_of(table_ptr, 1)
        base = g_ptr + s.to(tl.int64) * per_slot
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, per_slot, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            g = tl.load(base + offsets, mask=offsets < per_slot, other=0.0)
            acc += g * g
        tl.store(out_ptr + tl.program_id(1) * slots + s, tl.sum(acc, axis=0))

    @triton.jit
    def _step_kernel(table_ptr, c_ptr, clip_ptr, slots, eps, BLOCK: tl.constexpr):
        """Slot ``program_id(0)``'s part of the table's weight ``program_id(1)``, stepped."""
        s = tl.program_id(0)
        p_ptr, per_slot = _tensor_of(table_ptr, 0)
        g_ptr, _ = _tensor_of(table_ptr, 1)
        m_ptr, _ = _tensor_of(table_ptr, 2)
        v_ptr, _ = _tensor_of(table_ptr, 3)
        first = s.to(tl.int64) * per_slot
        c = c_ptr + s  # coefficient k of a slot is at c_ptr + k * slots + slot
        clip = tl.load(clip_ptr + s)
        decay, beta1, one_minus_beta1 = tl.load(c + 0 * slots), tl.load(c + 1 * slots), tl.load(c + 2 * slots)
        beta2, one_minus_beta2 = tl.load(c + 3 * slots), tl.load(c + 4 * slots)
        bias2_sqrt, adam_step, sgd_decay = tl.load(c + 5 * slots), tl.load(c + 6 * slots), tl.load(c + 7 * slots)
        momentum, into_buffer = tl.load(c + 8 * slots), tl.load(c + 9 * slots)
        from_grad, from_buffer, sgd_lr = tl.load(c + 10 * slots), tl.load(c + 11 * slots), tl.load(c + 12 * slots)
        stepped = tl.load(c + 13 * slots) != 0  # a slot that does not step is not touched, whatever its gradient
        for start in range(0, per_slot * stepped.to(tl.int64), BLOCK):
            offsets = first + start + tl.arange(0, BLOCK)
            inside = offsets < first + per_slot
            p = tl.load(p_ptr + offsets, mask=inside, other=0.0)
            g = tl.load(g_ptr + offsets, mask=inside, other=0.0) * clip
            m = tl.load(m_ptr + offsets, mask=inside, other=0.0)
            v = tl.load(v_ptr + offsets, mask=inside, other=0.0)
            # AdamW (objectives.slot_optim.SlotOptimizer.step, in its order)
            p = p * decay
            m = m * beta1
            m = m + g * one_minus_beta1
            v = v * beta2
            v = v + (g * g) * one_minus_beta2
            denom = tl.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps
            p = p - tl.div_rn(m * adam_step, denom)
            # SGD
            d_p = g + p * sgd_decay
            m = m * momentum
            m = m + d_p * into_buffer
            direction = d_p * from_grad + m * from_buffer
            p = p - direction * sgd_lr
            tl.store(p_ptr + offsets, p, mask=inside)
            tl.store(m_ptr + offsets, m, mask=inside)
            tl.store(v_ptr + offsets, v, mask=inside)


PRODUCT_TILE = (64, 64)
"""Tokens and features of a tile in the dropped product's kernels."""
PRODUCT_MAX_RANK = 64
"""The widest adapter the dropped product serves: a tile holds a slot's whole rank, so a wider one would need more
shared memory than some GPUs have (wider adapters take torch's dropout and product)."""


def product_serves(x: torch.Tensor, a: torch.Tensor) -> bool:
    """Whether :func:`dropped_product` serves ``x`` against adapters ``a`` (slots, rank, features)."""
    return usable(x) and a.shape[1] <= PRODUCT_MAX_RANK


def _precision() -> str:
    """The fp32 products' precision as torch's own batched products take it (TF32 where torch allows it)."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def dropped_forward(x: torch.Tensor, a: torch.Tensor, salted: torch.Tensor, threshold: torch.Tensor,
                    scale: torch.Tensor, tokens: int, max_length: int) -> torch.Tensor:
    """``torch.bmm(hashed_dropout(x, ...), a.transpose(1, 2))`` in one pass over ``x`` (slots, rows x ``tokens``,
    features), fp32, against ``a`` (slots, rank, features): no dropped copy of ``x`` is written or read back."""
    x, a = x.contiguous(), a.contiguous()
    (slots, t, k), r = x.shape, a.shape[1]
    out = torch.empty(slots, t, r, device=x.device, dtype=torch.float32)
    bt, bk = PRODUCT_TILE
    _dropped_product_kernel[(triton.cdiv(t, bt), slots)](
        x, a, out, salted, threshold, scale, t, k, r, tokens, max_length, PRECISION=_precision(), BT=bt, BK=bk,
        BR=_rank_block(r), enable_fp_fusion=False)
    return out


def dropped_backward(grad: torch.Tensor, x: torch.Tensor, a: torch.Tensor, salted: torch.Tensor,
                     threshold: torch.Tensor, scale: torch.Tensor, tokens: int, max_length: int, need_x: bool = True,
                     need_a: bool = True, into: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients of :func:`dropped_forward`'s ``x`` and ``a`` from its output's ``grad``, the mask drawn again.
    ``into``: a contiguous tensor shaped as ``x`` that the input's gradient is added to, and returned."""
    x, a, grad = x.contiguous(), a.contiguous(), grad.contiguous()
    (slots, t, k), r = x.shape, a.shape[1]
    bt, bk = PRODUCT_TILE
    common = dict(PRECISION=_precision(), BT=bt, BK=bk, BR=_rank_block(r), enable_fp_fusion=False)
    dx = da = None
    if need_x:
        assert into is None or (into.shape == x.shape and into.is_contiguous())
        dx = torch.empty_like(x) if into is None else into
        _dropped_grad_x_kernel[(triton.cdiv(t, bt), triton.cdiv(k, bk), slots)](
            grad, a, dx, salted, threshold, scale, t, k, r, tokens, max_length, ACCUMULATE=into is not None,
            **common)
    if need_a:
        da = torch.empty_like(a)
        _dropped_grad_a_kernel[(triton.cdiv(k, bk), slots)](
            grad, x, da, salted, threshold, scale, t, k, r, tokens, max_length, **common)
    return dx, da


class DroppedProduct(torch.autograd.Function):
    """:func:`dropped_forward` with its gradients: ``x`` itself is kept for backward, and the mask recomputed."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, salted: torch.Tensor, threshold: torch.Tensor,
                scale: torch.Tensor, tokens: int, max_length: int) -> torch.Tensor:
        ctx.save_for_backward(x, a, salted, threshold, scale)
        ctx.geometry = (tokens, max_length)
        return dropped_forward(x, a, salted, threshold, scale, tokens, max_length)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, a, salted, threshold, scale = ctx.saved_tensors
        tokens, max_length = ctx.geometry
        dx, da = dropped_backward(grad, x, a, salted, threshold, scale, tokens, max_length,
                                  need_x=ctx.needs_input_grad[0], need_a=ctx.needs_input_grad[1])
        return dx, da, None, None, None, None, None


def dropped_product(x: torch.Tensor, a: torch.Tensor, salted: torch.Tensor, threshold: torch.Tensor,
                    scale: torch.Tensor, tokens: int, max_length: int) -> torch.Tensor:
    """:func:`dropped_forward` under autograd."""
    out: torch.Tensor = DroppedProduct.apply(x, a, salted, threshold, scale, tokens, max_length)
    return out


def address_table(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avg: list[torch.Tensor],
                  exp_avg_sq: list[torch.Tensor]) -> torch.Tensor:
    """The weights (each contiguous, fp32, shaped (slots, ...)), their gradients and moments as one int64 tensor of
    addresses on their device, a row per weight (:data:`TABLE_COLUMNS`): one kernel launch then serves them all,
    where a launch per weight took a few hundred per step. The caller keeps the tensors alive until the kernel has
    been queued."""
    rows = [[p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), p.numel() // p.shape[0]]
            for p, g, m, v in zip(params, grads, exp_avg, exp_avg_sq, strict=True)]
    return send(torch.tensor(rows, dtype=torch.int64), params[0].device)


def square_sums(table: torch.Tensor, slots: int) -> torch.Tensor:
    """(weights, slots): the sum of squares of each slot's part of each gradient in ``table``, in one launch."""
    out = torch.empty(table.shape[0], slots, device=table.device, dtype=torch.float32)
    _square_sums_kernel[(slots, table.shape[0])](table, out, slots, BLOCK=BLOCK)
    return out


def optimizer_step(table: torch.Tensor, coefficients: torch.Tensor, clip: torch.Tensor, eps: float) -> None:
    """One :class:`objectives.slot_optim.SlotOptimizer` step in place over ``table``'s weights, in one launch:
    ``coefficients`` (14, slots) in the order of its table, ``clip`` (slots,) each slot's gradient scale."""
    slots = clip.numel()
    _step_kernel[(slots, table.shape[0])](table, coefficients, clip, slots, eps, BLOCK=BLOCK, enable_fp_fusion=False)
