"""Checks of :mod:`objectives.slot_kernels` against the torch operations they replace, on any device the kernels
serve: CUDA, or the CPU under Triton's interpreter (``TRITON_INTERPRET=1`` before Triton is imported).

``python -m tests.slot_kernel_checks DEVICE`` runs them all; a test runs that in a process of its own, since the
interpreter is chosen when the kernels are defined."""

from __future__ import annotations

import math
import sys

import torch


def check_dropped_product(device: str, n: int = 3, rows: int = 2, tokens: int = 70, features: int = 100,
                          rank: int = 40, max_length: int = 90) -> None:
    """The dropped product and its gradients against torch's dropout (the same hashed masks) and products; the
    input's gradient added in the kernel's epilogue against the sum."""
    from objectives import slot_kernels
    from objectives.slots import SlotContext, hash32

    assert slot_kernels.usable(torch.zeros(1, device=device)), f"the kernels do not serve {device}"
    torch.manual_seed(0)
    x = torch.randn(n, rows * tokens, features, device=device, requires_grad=True)
    a = torch.randn(n, rank, features, device=device, requires_grad=True)
    salted = torch.tensor([123456789, 2**31 - 5, 42][:n], dtype=torch.int32, device=device) ^ 0x5EED
    p = [0.3, 0.0, 0.5][:n]
    threshold = torch.tensor([round(q * 2**24) for q in p], dtype=torch.int32, device=device)
    scale = torch.tensor([1 / (1 - q) for q in p], device=device)
    index = SlotContext(n, max_length).element_index(rows, tokens, features, x.device)
    keep = (hash32(index.unsqueeze(0) ^ salted.view(-1, 1, 1, 1)) & 0xFFFFFF) >= threshold.view(-1, 1, 1, 1)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # both products in IEEE fp32
    try:
        plain = torch.bmm((x.view(n, rows, -1, features) * keep * scale.view(-1, 1, 1, 1)).view(x.shape),
                          a.transpose(1, 2))
        fused = slot_kernels.dropped_product(x, a, salted, threshold, scale, tokens, max_length)
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-4)
        grad = torch.randn_like(plain)
        for got, want in zip(torch.autograd.grad(fused, (x, a), grad), torch.autograd.grad(plain, (x, a), grad),
                             strict=True):
            assert torch.equal(got == 0, want == 0)  # the same elements dropped
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        into = torch.randn_like(x)
        alone, _ = slot_kernels.dropped_backward(grad, x, a, salted, threshold, scale, tokens, max_length,
                                                 need_a=False)
        added, _ = slot_kernels.dropped_backward(grad, x, a, salted, threshold, scale, tokens, max_length,
                                                 need_a=False, into=into.clone())
        assert alone is not None and added is not None and torch.equal(added, into + alone)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def check_optimizer_step(device: str) -> None:
    """Three steps of AdamW and SGD (nesterov, none, momentum) slots, some skipped, with clipping: the step's kernel
    against the torch operations, operation for operation, and the norms' kernel against theirs to float rounding; a
    NaN and an infinite gradient in slots that do not step leave them untouched."""
    from objectives import slot_kernels
    from objectives.config import OptimizerConfig
    from objectives.slot_optim import SlotOptimizer

    configs = [OptimizerConfig(name="adamw", lr=1e-2, weight_decay=0.1, warmup_ratio=0.0),
               OptimizerConfig(name="sgd", lr=1e-1, momentum=0.9, nesterov=True, weight_decay=0.01),
               OptimizerConfig(name="sgd", lr=1e-1, momentum=0.0), OptimizerConfig(name="adamw", betas=[0.8, 0.99]),
               OptimizerConfig(name="sgd", lr=1e-1, momentum=0.9)]
    n = len(configs)
    usable = slot_kernels.usable

    def train(kernels: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        slot_kernels.usable = lambda t: kernels and usable(t)  # type: ignore[method-assign]
        try:
            torch.manual_seed(1)
            # a weight of several blocks per slot; one whose gradient is not contiguous; one without a gradient once
            shapes = ((6, 5), (3, 6), (40, 60))
            params = [torch.nn.Parameter(torch.randn(n, *shape, device=device)) for shape in shapes]
            optimizer = SlotOptimizer(params, n)
            norms: list[torch.Tensor] = []
            for slot, opt in enumerate(configs):
                optimizer.reset(slot, opt, total_steps=10)
            for step in range(3):
                params[0].grad = torch.randn(n, 5, 6, device=device).transpose(1, 2)
                params[1].grad = None if step == 1 else torch.randn_like(params[1])
                params[2].grad = torch.randn_like(params[2])
                if step == 1:  # slots 1 and 2 do not step: a NaN and an infinite gradient must not reach them
                    params[2].grad[1, 0, 0], params[2].grad[2, 5, 7] = math.nan, math.inf
                    before = [t.detach()[1:3].clone() for t in (*params, *optimizer.exp_avg, *optimizer.exp_avg_sq)]
                norms.append(optimizer.grad_norms())
                # Both ways clip by the torch operations' norms: the kernel's sum in another order would otherwise
                # reach the step through the clipping and hide a change in the step's own arithmetic.
                grads = [w.grad for w in params if w.grad is not None]
                reference = torch.stack([(g * g).flatten(1).sum(1) for g in grads]).sum(0).sqrt()
                optimizer.clip(reference, [0.5, float("inf"), 1.0, 2.0, 1.5])
                optimizer.step([0, 3, 4] if step == 1 else [0, 1, 2, 4])
                if step == 1:
                    after = [t.detach()[1:3] for t in (*params, *optimizer.exp_avg, *optimizer.exp_avg_sq)]
                    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True)), "a skipped slot moved"
            return torch.stack(norms), [t.detach() for t in (*params, *optimizer.exp_avg, *optimizer.exp_avg_sq)]
        finally:
            slot_kernels.usable = usable  # type: ignore[method-assign]

    assert usable(torch.zeros(1, device=device)), f"the kernels do not serve {device}"
    (torch_norms, torch_state), (kernel_norms, kernel_state) = train(False), train(True)
    torch.testing.assert_close(kernel_norms, torch_norms, rtol=1e-5, atol=0.0, equal_nan=True)  # sums reordered
    for a, b in zip(torch_state, kernel_state, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


if __name__ == "__main__":
    check_dropped_product(sys.argv[1])
    check_optimizer_step(sys.argv[1])
    print("slot kernels: as the torch operations")
