"""Copies of a step's tensors from the host to the device that do not wait for the device to be idle."""

from __future__ import annotations

from typing import Any

import torch


def send(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``, without waiting for the device to be idle: a copy from pageable host memory
    first waits for every kernel queued before it (and a slot engine would hold its turn at the interpreter
    meanwhile, :mod:`objectives.host_turns`)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class Staging:
    """One page-locked buffer for copies to the device that go one at a time (a slot engine's new runs' first
    weights): page-locking each run's weights would keep them locked for the whole run, and page-locked memory, once
    allocated, is kept for reuse, not given back."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self._copied: Any = None
        """When the last copy out of the buffer is done (a CUDA event)."""

    def send(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``host`` on ``device``, without waiting for the device to be idle (see :func:`send`)."""
        if device.type != "cuda":
            return host.to(device)
        if self._copied is not None:
            self._copied.synchronize()  # the buffer's last copy has left it before it is written again
        if self._buffer is None or self._buffer.numel() < host.numel() or self._buffer.dtype != host.dtype:
            self._buffer = torch.empty(host.numel(), dtype=host.dtype, pin_memory=True)
        staged = self._buffer[:host.numel()].view(host.shape)
        staged.copy_(host)
        sent = staged.to(device, non_blocking=True)
        self._copied = torch.cuda.current_stream(device).record_event()
        return sent


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: send(v, device) for k, v in batch.items()}
