"""Every bad input a user can type: one line naming the setting, exit 2, no traceback, no secret, no file written.

The commands run in this process (``sweeper.cli.main``), as the CLI runs them, so that the table stays quick;
the subprocess tests in test_cli.py and test_workers.py cover the same path as a child process.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sweeper.cli import main
from tests.conftest import SECRET, TINY

CLOSED_PORT = "127.0.0.1:9"  # the discard port: nothing listens there

DATA_FILES = {
    "empty.jsonl": "",
    "messages_string.jsonl": json.dumps({"messages": "hello"}) + "\n",
    "no_role.jsonl": json.dumps({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}) + "\n",
    "numeric_instruction.jsonl": json.dumps({"instruction": 5, "output": "five"}) + "\n",
    "null_output.jsonl": json.dumps({"instruction": "say hi", "output": None}) + "\n",
    "bad_json.jsonl": '{"instruction": "a", "output": "b"}\n{"instruction": "c", \n',
    "no_fields.jsonl": json.dumps({"question": "a", "answer": "b"}) + "\n",
    "ragged.csv": "instruction,input,output\nsay hi,,hello\nsay bye,,bye,extra\n",
    "no_columns.csv": "question,answer\na,b\n",
    "list_of_numbers.json": "[1, 2, 3]",
    "object.json": json.dumps({"instruction": "a", "output": "b"}),
    "notes.txt": "instruction: say hi\n",
}

# (arguments after the verb, text the one-line error must contain); "{tmp}" is the test's scratch folder,
# "{data}/<name>" one of DATA_FILES.
CASES: list[tuple[str, list[str], str]] = [
    # the config schema
    ("launch", ["optimizer.name=adam"], "optimizer.name: 'adam' is not allowed; choose one of adamw, sgd"),
    ("launch", ["lora.rnk=8"], "lora.rnk"),
    ("launch", ["model.quant_type=nf3"], "model.quant_type: 'nf3' is not allowed"),
    ("launch", ["model.compute_dtype=float8"], "model.compute_dtype"),
    ("launch", ["train.max_steps=0"], "train.max_steps: must be > 0"),
    ("launch", ["train.max_steps=-3"], "train.max_steps"),
    ("launch", ["train.max_steps=many"], "train.max_steps"),
    ("launch", ["train.micro_batch_size=0"], "train.micro_batch_size"),
    ("launch", ["train.device=tpu"], "train.device: 'tpu' is not allowed"),
    ("launch", ["study/sampler=bayes"], "study/sampler"),
    ("launch", ["study.pruner.name=sometimes"], "study.pruner.name: 'sometimes' is not allowed"),
    ("launch", ["study.sampler.n_startup_trials=-1"], "study.sampler.n_startup_trials"),
    ("launch", ["study.n_trials=0"], "study.n_trials"),
    ("launch", ["study.directions=[up]"], "study.directions"),
    ("launch", ["study.objectives=[accuracy]"], "study.objectives"),
    ("launch", ["workers.per_gpu=0"], "workers.per_gpu: must be > 0"),
    ("launch", ["workers.count=-1"], "workers.count"),
    ("launch", ["workers.slots=0"], "workers.slots"),
    ("launch", ["workers.slots=many"], "workers.slots"),
    ("launch", ["workers.engine_process=sometimes"], "workers.engine_process: 'sometimes' is not allowed; use auto"),
    ("launch", ["workers.engines=0"], "workers.engines: 0 is not allowed; use auto or a whole number >= 1"),
    ("launch", ["workers.engines=two"], "workers.engines: 'two' is not allowed; use auto or a whole number"),
    ("launch", ["workers.engines=2", "workers.slots=1"], "workers.engines: 2 engines train trials in slots"),
    ("launch", ["workers.engines=2", "workers.engine_process=false"], "workers.engines: 2 engines each train in"),
    ("launch", ["workers.grace_s=5"], "workers.grace_s"),
    ("launch", ["model.gradient_checkpointing=sometimes"], "model.gradient_checkpointing: 'sometimes'"),
    ("launch", ["train.cuda_graphs=sometimes"], "train.cuda_graphs: 'sometimes' is not allowed; choose one of auto"),
    ("launch", ["train.cuda_graphs=on", "train.device=cpu"], "train.cuda_graphs: on needs CUDA"),
    ("launch", ["train.cuda_graphs=on", "workers.slots=4"], "train.cuda_graphs: on is not run in slots"),
    ("launch", ["data.eval_fraction=1.5"], "data.eval_fraction"),
    ("launch", ["data.max_length=0"], "data.max_length"),
    ("launch", ["lora.dropout=2"], "lora.dropout"),
    ("launch", ["lora.r=0"], "lora.r"),
    ("launch", ["optimizer.lr=-1"], "optimizer.lr"),
    ("launch", ["optimizer.betas=[0.9]"], "optimizer.betas"),
    ("launch", ["optimizer.warmup_ratio=1"], "optimizer.warmup_ratio"),
    ("launch", ["tracking.log_adapter=sometimes"], "tracking.log_adapter"),
    ("launch", ["model=nope"], "model"),
    ("launch", ["search_space=nope"], "search_space"),
    # the search space
    ("launch", ["lora.r=choice(8,16"], "lora.r"),
    ("launch", ["lora.r=range(8,4)"], "lora.r"),
    ("launch", ["optimizer.lr=interval(0.1,0.01)"], "optimizer.lr"),
    ("launch", ["optimizer.lr=tag(log,interval(0,1))"], "optimizer.lr"),
    ("launch", ["optimizer.name=choice(adamw,adam)"], "optimizer.name"),
    ("launch", ["lora.targets=choice(qk,foo_proj)"], "foo_proj is not a linear module"),
    ("launch", ["lora.targets=foo_proj"], "lora.targets: foo_proj is not a linear module"),
    ("launch", ["lora.targets='q_proj,foo_proj'"], "lora.targets: foo_proj is not a linear module"),
    ("launch", ["lora.targets=nonsense"], "lora.targets: unknown preset 'nonsense'"),
    ("launch", ["data.max_length=choice(64,128)"], "data.max_length"),
    ("launch", ["model.source=choice(a,b)"], "model.source"),
    # the model
    ("launch", ["model.source=/no/such/model"], "model.source: no such folder '/no/such/model'"),
    ("launch", ["model.source=/no/such/model.gguf"], "model.source: GGUF file '/no/such/model.gguf' does not exist"),
    ("launch", ["model.source={tmp}"], "holds no config.json"),
    ("launch", ["model.config_overrides.no_such_field=1"], "model.config_overrides.no_such_field"),
    # the data
    ("launch", ["data=file", "data.source=/no/such/train.jsonl"], "data.source"),
    ("launch", ["data=file", "data.source={tmp}"], "data.source"),
    *[("launch", ["data=file", f"data.source={{data}}/{name}"], name) for name in DATA_FILES],
    # the study's storage
    ("launch", ["study.storage=foo://bar"], "study.storage: 'foo://bar' is not a storage Optuna opens"),
    ("launch", [f"study.storage=postgresql://u:{SECRET}@{CLOSED_PORT}/x"], "study.storage: cannot open"),
    ("launch", [f"study.storage=postgresql://u@{CLOSED_PORT}/x?password={SECRET}"], "study.storage: cannot open"),
    ("launch", ["study.storage=sqlite:////proc/no/optuna.db"], "output_dir"),
    ("launch", ["study.storage=journal:/proc/no/optuna.journal"], "output_dir"),
    # the tracking store
    ("launch", ["tracking.uri=foo://bar"], "tracking.uri: 'foo://bar' is not a store MLflow logs to"),
    ("launch", [f"tracking.uri=http://{CLOSED_PORT}"], "tracking.uri: cannot reach MLflow"),
    ("launch", [f"tracking.uri=postgresql://u:{SECRET}@{CLOSED_PORT}/m"], "tracking.uri: cannot reach MLflow"),
    ("launch", ["tracking.uri=sqlite:////proc/no/mlflow.db"], "output_dir"),
    # the output folder
    ("launch", ["output_dir={data}/notes.txt"], "is a file, not a folder"),
    ("launch", ["output_dir=/proc/no/mlruns"], "output_dir: cannot write in /proc"),
    # the other verbs
    ("train", ["--config", "/no/such/export.yaml"], "--config"),
    ("train", ["--config", "{data}/bad.yaml"], "is not valid YAML"),
    ("train", ["lora.targets=foo_proj"], "lora.targets"),
    ("worker", ["study.name=no-such-study"], "no study store"),
    ("export", [], "no study store"),
    ("report", [], "no study store"),
    ("plan", ["lora.rnk=8"], "lora.rnk"),
    ("space", ["lora.r=choice(8,16"], "lora.r"),
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    for name, text in DATA_FILES.items():
        (folder / name).write_text(text)
    (folder / "bad.yaml").write_text("model:\n  source: [unclosed\n")
    return folder


@pytest.mark.parametrize(("verb", "args", "message"), CASES, ids=[f"{v} {' '.join(a)}" for v, a, _ in CASES])
def test_bad_input_is_one_clear_line(verb: str, args: list[str], message: str, data_dir: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    args = [a.replace("{tmp}", str(tmp_path)).replace("{data}", str(data_dir)) for a in args]
    message = message.replace("{tmp}", str(tmp_path))
    overrides = [*TINY, f"output_dir={out}"] if verb not in ("plan", "space") else TINY
    try:
        code = main([verb, *overrides, *args])  # last wins: the bad value is the one in force
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err[-3000:]
    assert len(errors) == 1 and message in errors[0], err[-3000:]
    assert "Traceback" not in err
    assert SECRET not in err
    assert not out.exists() or not any(out.iterdir())  # nothing written to the study or MLflow


@contextlib.contextmanager
def mounted(target: Path, *mount_args: str) -> Iterator[Path]:
    """A mount for the test's duration; skipped where this user may not mount (not root, no CAP_SYS_ADMIN)."""
    target.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", *mount_args, str(target)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount here: {result.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_a_read_only_or_full_output_folder_is_one_line_within_seconds(
        fault: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "source"
    source.mkdir()
    # As root, permission bits do not stop a write: a read-only bind mount and a full tmpfs do.
    args = ["--bind", "-o", "ro", str(source)] if fault == "read-only" else ["-t", "tmpfs", "-o", "size=1m", "tmpfs"]
    with mounted(tmp_path / "mnt", *args) as folder:
        if fault == "full":
            (folder / "filler").write_bytes(b"\0" * 900_000)
        code = main(["launch", *TINY, f"output_dir={folder / 'mlruns'}"])
        err = capsys.readouterr().err
        assert code == 2, err[-3000:]
        expected = "Read-only file system" if fault == "read-only" else "MiB free; a sweep needs at least"
        assert expected in err and "Traceback" not in err
        assert not (folder / "mlruns").exists()
