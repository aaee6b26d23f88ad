"""The slot engine's Triton kernels on the CPU, under Triton's interpreter: what the GPU runs, checked where CI runs
(``tests/test_gpu.py`` runs the same checks on CUDA)."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


def triton_version() -> tuple[int, ...]:
    """The installed Triton's (major, minor), under either of its distributions' names; (0,) where there is none."""
    for name in ("triton", "pytorch-triton"):
        try:
            found = re.match(r"(\d+)\.(\d+)", importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            continue
        if found:
            return int(found[1]), int(found[2])
    return (0,)


# Triton 3.6's interpreter fails on a loop whose bound is a kernel's argument (with NumPy 2.4; 3.7 runs it). CUDA
# builds of torch pin their Triton, 3.6 with torch 2.11: there tests/test_gpu.py runs the same checks on the GPU.
@pytest.mark.skipif(triton_version() < (3, 7), reason="needs Triton 3.7 or later (the test extra installs the newest)")
def test_the_slot_kernels_compute_what_the_torch_operations_compute_in_tritons_interpreter() -> None:
    # A process of its own: Triton takes the interpreter when the kernels are defined, at their module's import.
    done = subprocess.run([sys.executable, "-m", "tests.slot_kernel_checks", "cpu"], capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=Path(__file__).parent.parent, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "slot kernels: as the torch operations" in done.stdout
