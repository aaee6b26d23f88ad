"""What every benchmark in ``bench/`` shares: arguments, environment, child processes, logging.

Run from the repository root with the root on ``PYTHONPATH`` (``PYTHONPATH=$PWD python bench/<name>.py``).
This module and the helpers it imports load no torch at import time, so a process that only needs a helper
starts fast.

``python bench/common.py prepare --model-source FILE --shapes 135m`` converts the model and writes the
random-weight copies once, before benchmarks that share the cache start side by side.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.gpu import gpu_description
from bench.models import prepare

REPO_ROOT = Path(__file__).resolve().parent.parent

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "optuna", "mlflow-skinny", "mlflow",
            "hydra-core")

RESULT_PREFIX = "BENCH_RESULT "


# ---------------------------------------------------------------------------------------------------------------
# Arguments


def base_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the options every benchmark takes."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="markdown file to write the tables to")
    p.add_argument("--model-source", default=None,
                   help="model.source: a .gguf file, model directory or hub id (default: the config's)")
    p.add_argument("--workdir", default=None, help="where studies and MLflow stores go (default: a new temp dir)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny random model and tiny sizes: checks the benchmark runs end to end, measures nothing")
    return p


def make_workdir(args: argparse.Namespace, name: str) -> Path:
    path = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


# ---------------------------------------------------------------------------------------------------------------
# Environment


def versions() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def environment() -> dict[str, str]:
    """Date, machine, GPUs and package versions, for the report header."""
    env = {"date (UTC)": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
           "GPU": gpu_description(),
           "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)"),
           "CPU cores": str(os.cpu_count()),
           "python": platform.python_version()}
    try:
        import torch

        env["torch CUDA"] = str(torch.version.cuda)
    except ImportError:
        pass
    env.update(versions())
    return env


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that produced this run, as it can be pasted again from the repository root."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    try:
        shown = str(script.relative_to(REPO_ROOT))
    except ValueError:
        shown = argv[0]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    prefix = f"CUDA_VISIBLE_DEVICES={visible} " if visible is not None else ""
    return prefix + "PYTHONPATH=$PWD " + shlex.join(["python", shown, *argv[1:]])


def quiet_logs() -> None:
    """Benchmark output is the report: keep library chatter to warnings."""
    import logging

    logging.basicConfig(level=os.environ.get("LOGLEVEL", "WARNING"), format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "alembic", "mlflow", "transformers", "optuna"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------------------------------------------------------
# Child processes


def run_child(cmd: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None,
              timeout: float | None = None) -> tuple[int, dict[str, Any] | None]:
    """Run a command from the repository root; its output goes to ``log_path``. Returns (exit code, the
    JSON object on its last ``BENCH_RESULT`` line, if any)."""
    with log_path.open("w") as log:
        proc = subprocess.run(list(cmd), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log, text=True,
                              env=dict(env) if env is not None else None, timeout=timeout)
        log.write(proc.stdout)
    results = [ln[len(RESULT_PREFIX):] for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    return proc.returncode, json.loads(results[-1]) if results else None


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------------------------
# Cache preparation


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Prepare the model caches the benchmarks share.")
    p.add_argument("verb", choices=["prepare"])
    p.add_argument("--model-source", default=None)
    p.add_argument("--shapes", default="135m", help="comma-separated: tiny, 135m, 1b, 8b")
    p.add_argument("--real-weights", action="store_true", help="the source's weights instead of random ones")
    args = p.parse_args(argv)
    quiet_logs()
    prepare([s.strip() for s in args.shapes.split(",") if s.strip()], args.model_source, not args.real_weights)
    return 0


if __name__ == "__main__":
    sys.exit(main())
