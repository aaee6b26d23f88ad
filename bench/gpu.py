"""The GPU as the benchmarks see it: its description, its busy fraction (nvidia-smi) and freeing its memory.

torch is imported inside the functions that need it, so a process that only samples starts fast.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field


def gpu_description() -> str:
    """The GPUs as nvidia-smi names them (all of the machine's), else torch's view, else 'none'."""
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            out = subprocess.run([exe, "--query-gpu=index,name,memory.total,driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
            if lines:
                return "; ".join(lines)
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import torch

        if torch.cuda.is_available():
            return "; ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except Exception:  # any failure here only means "no GPU description"
        pass
    return "none (CPU only)"


@dataclass
class GpuSampler:
    """``utilization.gpu`` of the GPUs every ``interval_s``, read from nvidia-smi in a background thread.

    utilization.gpu is the share of the last sample period in which a kernel ran, so its mean over a
    window is the GPU's busy fraction there. Without nvidia-smi nothing is sampled and every fraction
    is None.

    Example:
        >>> with GpuSampler() as gpu:  # doctest: +SKIP
        ...     run()
        >>> gpu.busy_fraction(t0, t1)  # doctest: +SKIP
    """

    gpus: Sequence[str] | None = None
    """nvidia-smi indices to sample; None: those in CUDA_VISIBLE_DEVICES, else all."""
    interval_s: float = 0.2
    samples: list[tuple[float, str, float]] = field(default_factory=list)
    note: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> GpuSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _query(self) -> list[str]:
        exe = shutil.which("nvidia-smi") or "nvidia-smi"
        cmd = [exe, "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits"]
        gpus = self.gpus if self.gpus is not None else _visible_indices()
        return cmd + (["-i", ",".join(gpus)] if gpus else [])

    def start(self) -> None:
        if shutil.which("nvidia-smi") is None:
            self.note = "nvidia-smi not found: GPU busy fraction not measured"
            return
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # One looping nvidia-smi is lighter than a process per sample; if it will not loop, poll instead.
        try:
            self._proc = subprocess.Popen([*self._query(), f"--loop-ms={int(self.interval_s * 1000)}"],
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            assert self._proc.stdout is not None
            for line in self._proc.stdout:
                self._record(line)
                if self._stop.is_set():
                    break
        except OSError as e:
            self.note = f"nvidia-smi failed: {e}"
        while not self._stop.is_set():
            try:
                out = subprocess.run(self._query(), capture_output=True, text=True, timeout=5).stdout
            except (OSError, subprocess.SubprocessError):
                out = ""
            for line in out.splitlines():
                self._record(line)
            self._stop.wait(self.interval_s)

    def _record(self, line: str) -> None:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2:
            with contextlib.suppress(ValueError):  # "[N/A]" or a header line
                self.samples.append((time.time(), parts[0], float(parts[1])))

    def stop(self) -> None:
        self._stop.set()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def busy_fraction(self, t0: float, t1: float, gpu: str | None = None) -> float | None:
        """Mean utilization in [t0, t1] (epoch seconds) over the sampled GPUs, or one of them; None if unsampled."""
        vals = [u for t, i, u in list(self.samples) if t0 <= t <= t1 and (gpu is None or i == gpu)]
        return statistics.fmean(vals) / 100 if vals else None


def _visible_indices() -> list[str]:
    listed = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    names = [n.strip() for n in listed.split(",") if n.strip()]
    return names if names and all(n.isdigit() for n in names) else []


def free_accelerator() -> None:
    """Drop what the last method left behind before the next one is measured."""
    import torch

    from objectives.base import free_accelerator_memory

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    free_accelerator_memory(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
