"""Shared test settings: offline, a tiny random 4-bit model, short trials."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.postgres import find_bindir, loopback_server

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent

SECRET = "Sec-4711"
"""A password in the URLs of tests that check it is never printed or stored."""
# A 2-layer Llama with real NF4 layers; trials of two steps.
TINY = ["model=tiny_random", "train.max_steps=2", "train.eval_every=1", "train.micro_batch_size=2",
        "data.max_length=64", "data.max_eval_examples=8"]
# Where the model package is not installed (a GPU machine), point at the GGUF file itself.
SOURCE = [f"model.source={os.environ['QLORA_SWEEP_MODEL_SOURCE']}"] if "QLORA_SWEEP_MODEL_SOURCE" in os.environ else []


# Architecture fields of two real models, for the memory model's tests (no weights needed).
SMOLLM2: dict[str, object] = {
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True}
LLAMA_8B: dict[str, object] = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "tie_word_embeddings": False}


@pytest.fixture
def tiny_args(tmp_path: Path) -> list[str]:
    return [*TINY, f"output_dir={tmp_path}"]


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``python -m sweeper ARGS`` in a child process, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "sweeper", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def step_losses(res: Any, cfg: Any, train: Any = None, cache: bool = False) -> tuple[list[float], float]:
    """One adapter trained by ``train_adapter`` on a loaded base (``res``, :class:`sweeper.launch.Resources`):
    its per-step train losses and its eval loss. ``train`` replaces ``cfg.train``; ``cache``: the base cache,
    left as set."""
    from objectives.training import train_adapter

    losses: list[float] = []
    res.base.use_base_cache(cache)
    with res.base.adapter(cfg.lora, seed=0) as model:
        result = train_adapter(model, res.data, train or cfg.train, cfg.optimizer, res.base.device,
                               res.base.tokenizer.pad_token_id, on_step=lambda s, m: losses.append(m["train_loss"]))
    return losses, result.eval_loss


def start_cli(*args: str, **popen: Any) -> subprocess.Popen[Any]:
    """``python -m sweeper ARGS`` started in a child process (``popen``: its pipes), with Ctrl-C's default
    disposition: a shell that runs the tests in the background leaves SIGINT ignored, and a child would
    inherit that."""
    return subprocess.Popen([sys.executable, "-m", "sweeper", *args], cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **popen)


# Test files whose tests share what a module- or session-scoped fixture starts: a SLURM cluster, a browser on a
# finished sweep, a loaded model. Under ``-n N`` each runs whole in one worker, so that is started once, not once
# per worker, and SLURM's one-node cluster is never started twice at once (two would share this node's CPUs and
# memory). A PostgreSQL server per worker costs seconds and stays spread. (xdist's own ``--dist loadgroup`` marks
# are lost on pytest 9.2, which no longer reads a test's id from the attribute xdist rewrites.)
RUN_WHOLE = {"tests/test_slurm.py", "tests/test_ui_browser.py", "tests/test_tracking.py", "tests/test_engine.py",
             "tests/test_memory.py", "tests/test_samplers.py", "tests/test_oom.py", "tests/test_packing.py",
             "tests/test_attention.py"}


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        """Every other test is a unit of its own, handed to whichever worker is free; the larger units go first."""

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::")[0]
            return path if path in RUN_WHOLE else nodeid

    return Scheduling(config, log)


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A private PostgreSQL server with password authentication; yields its base URL."""
    bindir = find_bindir()
    if bindir is None:
        if os.environ.get("QLORA_SWEEP_SKIP_POSTGRES"):
            pytest.skip("PostgreSQL is not installed")
        pytest.fail("PostgreSQL is not installed: `make system` installs it")
    with loopback_server(bindir, ["optuna", "mlflow", "optuna2", "mlflow2"]) as base:
        yield base


class ReferenceFusedLoss:
    """A plain cross-entropy in liger-kernel's place (liger-kernel needs CUDA; tests/test_gpu.py runs it there):
    what surrounds the kernel is checked on the CPU. Agreement is to float32 rounding: the head's product runs
    on a (tokens, hidden) matrix instead of (rows, tokens, hidden)."""

    def __call__(self, weight: Any, hidden: Any, target: Any) -> Any:
        import torch

        return torch.nn.functional.cross_entropy((hidden @ weight.t()).float(), target, reduction="sum")


@pytest.fixture
def reference_fused_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    from objectives import loss

    monkeypatch.setitem(loss._FUSED, "sum", ReferenceFusedLoss())


def child_runs_of(tracking_uri: str, experiment: str) -> list[Any]:
    """The MLflow runs of an experiment that have a parent run: the trials'."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]
