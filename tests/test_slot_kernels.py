"""The slot engine's Triton kernels on the CPU, under Triton's interpreter: what the GPU runs, checked where CI runs
(``tests/test_gpu.py`` runs the same checks on CUDA)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (the test extra installs it)")
def test_the_slot_kernels_compute_what_the_torch_operations_compute_in_tritons_interpreter() -> None:
    # A process of its own: Triton takes the interpreter when the kernels are defined, at their module's import.
    done = subprocess.run([sys.executable, "-m", "tests.slot_kernel_checks", "cpu"], capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=Path(__file__).parent.parent, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "slot kernels: as the torch operations" in done.stdout
