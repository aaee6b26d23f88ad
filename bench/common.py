"""What the benchmarks in ``bench/`` share: arguments, environment, GPU sampling, model shapes, trial timing, markdown.

Run from the repository root with the root on ``PYTHONPATH`` (``PYTHONPATH=$PWD python bench/<name>.py``).
This module imports no torch at import time, so a process that only needs a helper starts fast.

``python bench/common.py prepare --model-source FILE --shapes 135m`` converts the model and writes the
random-weight copies once, before benchmarks that share the cache start side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

# Where the device machine's setup puts the default model (see the GPU machine's notes).
GPU_MACHINE_GGUF = "/tmp/SmolLM2-135M-Instruct.Q4_1.gguf"

# Architectures as overrides of the default model's (SmolLM2-135M) config; "135m" is that config itself.
# head_dim is explicit: the source config keeps its own (64) when hidden_size changes.
SHAPES: dict[str, dict[str, Any]] = {
    "135m": {},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "tie_word_embeddings": True},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "tie_word_embeddings": False},
}
SHAPE_NAMES = {"tiny": "tiny random (2 layers)", "135m": "SmolLM2-135M", "1b": "Llama-3.2-1B", "8b": "Llama-3-8B"}

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "optuna", "mlflow-skinny", "mlflow",
            "hydra-core")

RESULT_PREFIX = "BENCH_RESULT "


# ---------------------------------------------------------------------------------------------------------------
# Arguments and overrides


def base_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the options every benchmark takes."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="markdown file to write the tables to")
    p.add_argument("--model-source", default=None,
                   help=f"model.source: a .gguf file, model directory or hub id (default: the config's; on the "
                        f"GPU machine pass {GPU_MACHINE_GGUF})")
    p.add_argument("--workdir", default=None, help="where studies and MLflow stores go (default: a new temp dir)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny random model and tiny sizes: checks the benchmark runs end to end, measures nothing")
    return p


def make_workdir(args: argparse.Namespace, name: str) -> Path:
    path = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def hydra_value(value: Any) -> str:
    """A Python value as a Hydra override value (quoted when the grammar would misread it)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    return text if re.fullmatch(r"[A-Za-z0-9_\-./:]+", text) else "'" + text.replace("'", "\\'") + "'"


def model_overrides(shape: str, source: str | None, random_weights: bool) -> list[str]:
    """Hydra overrides for a model shape: ``tiny`` is ``model=tiny_random``; others reshape the default model."""
    out = ["model=tiny_random"] if shape == "tiny" else []
    if source:
        out.append(f"model.source={hydra_value(source)}")
    if shape != "tiny":
        out.append(f"model.random_init={hydra_value(random_weights)}")
        # one key at a time: Hydra will not replace the whole (empty) mapping from the command line
        out += [f"++model.config_overrides.{k}={hydra_value(v)}" for k, v in SHAPES[shape].items()]
    return out


def value_overrides(values: Mapping[str, Any]) -> list[str]:
    """A trial's sampled ``path -> value`` as plain overrides (which also fix them in the search space)."""
    return [f"{path}={hydra_value(v)}" for path, v in values.items()]


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
    except Exception:  # noqa: BLE001 - any failure here only means "no GPU description"
        pass
    return "none (CPU only)"


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


def model_label(cpu_smoke: bool, weights: str) -> str:
    """How a report names its model."""
    return "tiny random model (CPU smoke: numbers mean nothing)" if cpu_smoke else f"SmolLM2-135M ({weights} weights)"


def say(text: str) -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# GPU busy fraction


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


# ---------------------------------------------------------------------------------------------------------------
# Trial timing (pure)


@dataclass(frozen=True)
class TrialTiming:
    """One trial as the benchmarks see it; times are epoch seconds."""

    number: int
    start: float
    end: float
    state: str
    value: float | None = None
    busy: float | None = None
    """Seconds inside training and evaluation steps (None when the trial did not say)."""
    excluded: float = 0.0
    """Seconds the benchmark itself spent inside the trial (not charged to the method)."""
    worker: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)
    steps: int | None = None
    """Optimizer steps the trial trained: its last reported step (None when it reported none)."""
    checkpointing: bool | None = None
    """Whether the trial ran with gradient checkpointing (None when its config was not recorded)."""


def from_frozen(trial: Any, excluded: float = 0.0) -> TrialTiming:
    """An Optuna FrozenTrial -> TrialTiming (busy from the objective's ``train_seconds`` attribute)."""
    start = trial.datetime_start.timestamp() if trial.datetime_start else float("nan")
    end = trial.datetime_complete.timestamp() if trial.datetime_complete else start
    busy = trial.user_attrs.get("train_seconds")
    model = (trial.user_attrs.get("config") or {}).get("model", {})
    return TrialTiming(number=trial.number, start=start, end=end, state=trial.state.name, value=trial.value,
                       busy=float(busy) if busy is not None else None, excluded=excluded,
                       worker=str(trial.user_attrs.get("worker", "")), params=dict(trial.params),
                       steps=max(trial.intermediate_values, default=None),
                       checkpointing=model.get("gradient_checkpointing"))


def finished_timings(study: Any) -> list[TrialTiming]:
    """The study's finished trials, less the surplus ones a budget guard dropped without running them."""
    return [from_frozen(t) for t in study.get_trials(deepcopy=False)
            if t.datetime_complete is not None and not t.user_attrs.get("surplus")]


def best_value(trials: Iterable[TrialTiming]) -> float | None:
    """The lowest value of a complete trial, or None."""
    return min((t.value for t in trials if t.state == "COMPLETE" and t.value is not None), default=None)


def trial_walls(trials: Sequence[TrialTiming]) -> list[float]:
    """Each trial's wall time: from its start to the next trial's start, so the work between trials is
    charged to the trial before it; the last one runs to its own end. Benchmark-only time is removed."""
    ordered = sorted(trials, key=lambda t: t.start)
    walls = [nxt.start - t.start for t, nxt in zip(ordered, ordered[1:], strict=False)]
    if ordered:
        walls.append(ordered[-1].end - ordered[-1].start)
    return [w - t.excluded for w, t in zip(walls, ordered, strict=True)]


def overheads(trials: Sequence[TrialTiming]) -> list[float]:
    """Wall time minus time in training and evaluation steps, per trial that reported its busy time."""
    ordered = sorted(trials, key=lambda t: t.start)
    return [w - t.busy for w, t in zip(trial_walls(ordered), ordered, strict=True) if t.busy is not None]


def steady_per_hour(trials: Sequence[TrialTiming]) -> float | None:
    """Completed trials per hour on one worker after its first (warm-up) trial: those after it, over the time
    from its end to the last trial's end."""
    ordered = sorted(trials, key=lambda t: t.start)
    if len(ordered) < 2:
        return None
    span = ordered[-1].end - ordered[0].end - sum(t.excluded for t in ordered[1:])
    done = sum(t.state == "COMPLETE" for t in ordered[1:])
    return done / span * 3600 if span > 0 else None


def assign_workers(trials: Sequence[TrialTiming], k: int) -> list[list[TrialTiming]]:
    """Split trials into ``k`` sequential workers: by their ``worker`` label, else by timing.

    Without labels, each trial goes to the free worker whose last trial ended most recently before it
    started (a worker starts its next trial right after the last), which recovers k sequential workers.
    """
    if trials and all(t.worker for t in trials):
        groups: dict[str, list[TrialTiming]] = {}
        for t in sorted(trials, key=lambda t: t.start):
            groups.setdefault(t.worker, []).append(t)
        return list(groups.values())
    lanes: list[list[TrialTiming]] = [[] for _ in range(k)]
    for t in sorted(trials, key=lambda t: t.start):
        free = [lane for lane in lanes if not lane or lane[-1].end <= t.start]
        pool = free or lanes
        lane = max(pool, key=lambda ln: ln[-1].end if ln else float("-inf"))
        lane.append(t)
    return [lane for lane in lanes if lane]


def time_to_target(trials: Sequence[TrialTiming], threshold: float,
                   cost: Callable[[TrialTiming], float] = lambda t: t.end - t.start) -> float | None:
    """Cost (by default GPU seconds: trial walls), summed in trial order until a complete trial's value is at or
    under ``threshold``."""
    spent = 0.0
    for t in sorted(trials, key=lambda t: t.number):
        spent += cost(t)
        if t.state == "COMPLETE" and t.value is not None and t.value <= threshold:
            return spent
    return None


# ---------------------------------------------------------------------------------------------------------------
# Statistics and markdown


def spread(values: Iterable[float | None], digits: int = 2) -> str:
    """``median [min, max]`` of the values that exist, or ``n/a``."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.median(vals):.{digits}f} [{min(vals):.{digits}f}, {max(vals):.{digits}f}]"


def num(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_report(title: str, env: Mapping[str, str], command: str,
                  sections: Sequence[tuple[str, str]]) -> str:
    """Markdown: title, the command, the environment, then each (heading, body) section."""
    parts = [f"# {title}", "", "Command (from the repository root):", "", "```", command, "```", "",
             markdown_table(["environment", ""], env.items()), ""]
    for heading, body in sections:
        parts += [f"## {heading}", "", body.rstrip(), ""]
    return "\n".join(parts)


def write_report(path: str | Path, text: str, final: bool = True) -> None:
    """Write the report; the final one is printed too (earlier, partial ones keep what a cut-off run had)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if final:
        say(text)
    say(f"wrote {out}")


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
# Models and batches (torch is imported inside)


def loop_rows(data: Any, train_cfg: Any) -> list[list[dict[str, list[int]]]]:
    """The micro-batches (rows) our training loop feeds in one trial, in its order (same seed, same rows)."""
    from itertools import islice

    from objectives.data import train_micro_batches

    count = train_cfg.max_steps * train_cfg.grad_accum
    return list(islice(train_micro_batches(data.train, train_cfg.micro_batch_size, train_cfg.seed), count))


def trainer_arguments(cfg: Any) -> dict[str, Any]:
    """A trial's optimizer and loop settings as TrainingArguments fields (what ``hp_space`` returns)."""
    o, t = cfg.optimizer, cfg.train
    sgd = o.name == "sgd"
    return {
        "learning_rate": float(o.lr),
        "weight_decay": float(o.weight_decay),
        "optim": "sgd" if sgd else "adamw_torch_fused",  # Trainer's default with torch >= 2.8
        # always a string: hyperparameter_search casts each value to the type of the field's last value
        "optim_args": f"momentum={o.momentum},nesterov={o.nesterov}" if sgd else "",
        "adam_beta1": float(o.betas[0]),
        "adam_beta2": float(o.betas[1]),
        "lr_scheduler_type": {"constant": "constant_with_warmup"}.get(o.scheduler, o.scheduler),
        "warmup_steps": float(o.warmup_ratio),  # a float under 1 is a ratio of the steps
        "max_steps": int(t.max_steps),
        "per_device_train_batch_size": int(t.micro_batch_size),
        "gradient_accumulation_steps": int(t.grad_accum),
        "max_grad_norm": float(t.max_grad_norm),
        "seed": int(t.seed),
    }


def trainer_fixed_arguments(output_dir: Path, cfg: Any, device: Any, bf16: bool) -> dict[str, Any]:
    """TrainingArguments that do not vary per trial: no checkpoints, no reporting, our batches in our order
    (sequential sampler), evaluation only when asked; ``bf16`` adds autocast (CUDA only)."""
    return {"output_dir": str(output_dir), "per_device_eval_batch_size": cfg.train.micro_batch_size,
            "eval_strategy": "no", "save_strategy": "no", "report_to": "none", "disable_tqdm": True,
            "bf16": bf16 and device.type == "cuda", "use_cpu": device.type == "cpu",
            "dataloader_num_workers": 0, "remove_unused_columns": False,
            "train_sampling_strategy": "sequential"}


def free_accelerator() -> None:
    """Drop what the last method left behind before the next one is measured."""
    import torch

    from objectives.base import free_accelerator_memory

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    free_accelerator_memory(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


# ---------------------------------------------------------------------------------------------------------------
# Cache preparation


def prepare(shapes: Sequence[str], source: str | None, random_weights: bool) -> None:
    """Convert the model and write random-weight copies (one per shape) once, plus the stdlib data.

    Benchmarks started side by side would otherwise race to create the same cache directories.
    """
    from objectives.data import load_examples
    from objectives.sources import weights_path
    from sweeper import compose

    for shape in shapes:
        start = time.perf_counter()
        cfg, _ = compose.load([*model_overrides(shape, source, random_weights), "search_space=none"])
        path = weights_path(cfg.model)
        say(f"{shape}: {path} ready in {time.perf_counter() - start:.1f}s")
    load_examples(cfg.data, cfg.model.cache_path)


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
