"""A trial's training pass replayed as a CUDA graph (``train.cuda_graphs``).

A small model's step is bound by the host: it dispatches a few thousand kernels one at a time (Python, peft's
and transformers' layers, the autograd engine), each shorter than its dispatch (BENCHMARKS.md, benchmark 2).
Captured once, the same forward and backward are launched with one call. What a graph fixes at capture, and how
the loop keeps it true:

- shapes: every pass is widened to ``data.max_length`` tokens (:func:`objectives.passes.widen`: a padding segment
  of its own, no labels), so a trial's passes take as many shapes as row counts, one graph each;
- the inputs and the step's token count (which divides the loss) live in tensors the graph reads; each step
  copies its own into them;
- the gradients: captured where the parameters have none, so each replay writes fresh ones, which the loop
  hands back to the parameters; clipping, the optimizer and the schedule run outside the graph, as before;
- dropout: the CUDA generator moves on by the graph's draws at each replay, so every step draws new masks.

The first pass on a device runs eagerly on the capture stream (the warm-up a capture needs: cuBLAS' workspace
for that stream, kernels loaded on first use); every pass shape is captured when it first comes, and replayed
from then on. A capture that fails turns the graphs off on its device for the rest of the process and says why;
the trial goes on eagerly.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from objectives.attention import on_device, sdpa_only
from objectives.loss import pass_loss
from objectives.passes import widen

log = logging.getLogger(__name__)


_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
_WARM: set[torch.device] = set()
_FAILED: dict[torch.device, str] = {}
"""Why a capture failed on a device: the graphs stay off there for the rest of the process, since a failed capture
can leave the allocator holding its pool."""


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The device's one stream for captures and their warm-ups: cuBLAS keeps a workspace for every stream it ever
    ran on (64 MB on an H200), so a stream per trial would keep that much more memory after every trial."""
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


class _Graph:
    """One captured pass: its graph, the tensors it reads and the loss and gradients it writes."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: dict[str, torch.Tensor], count: torch.Tensor,
                 loss: torch.Tensor, grads: list[torch.Tensor | None]) -> None:
        self.graph, self.inputs, self.count, self.loss, self.grads = graph, inputs, count, loss, grads


class PassGraphs:
    """The captured passes of one trial; :meth:`loss` runs a pass, forward and backward, through them."""

    def __init__(self, model: Any, params: list[torch.nn.Parameter], device: torch.device, width: int,
                 pad_id: int) -> None:
        self.model, self.params, self.device, self.width, self.pad_id = model, params, device, width, pad_id
        self.stream = capture_stream(device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, ...], _Graph] = {}
        self.replays = 0

    @property
    def failure(self) -> str | None:
        """Why the graphs are off on this device (None: they are on)."""
        return _FAILED.get(self.device)

    def loss(self, batch: dict[str, torch.Tensor], num_items: int) -> torch.Tensor:
        """The pass's loss (summed over its tokens, divided by ``num_items``) with its gradients in the parameters'
        ``.grad``, as ``pass_loss(...).backward()`` leaves them where the parameters had none. ``batch`` is on
        the host."""
        if self.failure is not None:
            return self._eager(batch, num_items)
        batch = widen(batch, self.width, self.pad_id)
        key = tuple(batch["input_ids"].shape)
        graph = self.graphs.get(key)
        if graph is None:
            if self.device not in _WARM:
                loss = self._eager(batch, num_items, self.stream)
                _WARM.add(self.device)
                return loss
            try:
                graph = self.graphs[key] = self._capture(batch)
            except RuntimeError as e:
                if "out of memory" in str(e).lower():
                    raise
                _FAILED[self.device] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
                log.warning("CUDA graphs off on %s from now on: a capture failed (%s)", self.device, self.failure)
                self._drop_grads()
                return self._eager(batch, num_items)
        for name, tensor in batch.items():
            graph.inputs[name].copy_(tensor.pin_memory(), non_blocking=True)
        graph.count.fill_(num_items)
        graph.graph.replay()
        self.replays += 1
        for p, g in zip(self.params, graph.grads, strict=True):
            p.grad = g
        return graph.loss

    def _eager(self, batch: dict[str, torch.Tensor], num_items: int,
               stream: torch.cuda.Stream | None = None) -> torch.Tensor:
        """The pass without a graph, on ``stream`` (the capture stream, for the warm-up) or the current one."""
        current = torch.cuda.current_stream(self.device)
        if stream is not None:
            stream.wait_stream(current)
        # The warm-up runs the kernels the capture will record: sdpa's, not the variable-length one.
        with (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext(),
              sdpa_only() if stream is not None else contextlib.nullcontext()):
            loss = pass_loss(self.model, on_device(self.model, batch, self.device), num_items, False)
            loss.backward()
        if stream is not None:
            # The gradients made on the capture stream are used and freed on this one after this wait; the
            # allocator hands their blocks out again only on the capture stream, whose next work comes later still.
            current.wait_stream(stream)
        return loss.detach()

    def _capture(self, batch: dict[str, torch.Tensor]) -> _Graph:
        self._drop_grads()
        # The capture records kernels without running them: the inputs' values arrive with each replay.
        inputs = {name: torch.empty_like(t, device=self.device) for name, t in batch.items()}
        count = torch.ones((), device=self.device)
        graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        # Not torch.cuda.graph: where the body fails, its exit raises from capture_end and never gives the stream
        # back. thread_local: another thread's CUDA call (a logger reading memory) does not void the capture.
        with torch.cuda.stream(self.stream):
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                loss = pass_loss(self.model, inputs, count, False)
                loss.backward()
            except BaseException:
                self._abandon(graph)
                raise
            graph.capture_end()
        return _Graph(graph, inputs, count, loss.detach(), [p.grad for p in self.params])

    def _abandon(self, graph: torch.cuda.CUDAGraph) -> None:
        """End a capture whose body failed, and let the allocator stop filling its pool (capture_end raises before
        that where the capture was voided)."""
        try:
            graph.capture_end()
        except RuntimeError:
            end = getattr(torch._C, "_cuda_endAllocateToPool", None)
            if end is not None:
                with contextlib.suppress(RuntimeError):
                    end(self.device.index or 0, self.pool)

    def _drop_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def close(self) -> None:
        """Release the graphs and their memory pool (the parameters' gradients are dropped too)."""
        self._drop_grads()
        self.graphs.clear()
