"""Instruction data: the standard-library default, files in both layouts, templating and masking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from objectives import data
from objectives.config import ConfigError, DataConfig
from objectives.rows import parse_rows, row_problem


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    from objectives.config import ModelConfig
    from objectives.sources import resolve_source

    return AutoTokenizer.from_pretrained(resolve_source(ModelConfig()))


def test_stdlib_pairs_are_many_and_split_by_module(tmp_path: Path) -> None:
    rows = data.stdlib_examples(tmp_path)
    assert len(rows) > 1500
    assert all(len(r["output"]) > 40 for r in rows)
    train, held = data.split(rows, 0.1)
    assert {r["module"] for r in train}.isdisjoint({r["module"] for r in held})
    assert 0.03 < len(held) / len(rows) < 0.3
    assert data.split(rows, 0.1) == (train, held)  # deterministic


def test_loss_covers_the_response_only(tokenizer) -> None:  # type: ignore[no-untyped-def]
    row = {"instruction": "What does `json.dumps` do?", "output": "Serialize obj to a JSON formatted str."}
    t = data.tokenize(row, tokenizer, DataConfig(max_length=256))
    assert t is not None
    pairs = zip(t["input_ids"], t["labels"], strict=True)
    learned = tokenizer.decode([i for i, lab in pairs if lab != data.IGNORE_INDEX])
    assert learned.startswith("Serialize obj to a JSON formatted str.")
    assert "json.dumps" not in learned
    prompt = tokenizer.decode(t["input_ids"])
    assert "<|im_start|>user" in prompt  # the model's own chat template


def test_truncation_keeps_examples_with_response_tokens(tokenizer) -> None:  # type: ignore[no-untyped-def]
    row = {"instruction": "x " * 300, "output": "y"}
    assert data.tokenize(row, tokenizer, DataConfig(max_length=32)) is None


@pytest.mark.parametrize("layout", ["alpaca-jsonl", "chat-jsonl", "alpaca-json", "alpaca-csv"])
def test_files_in_both_layouts(tmp_path: Path, tokenizer, layout: str) -> None:  # type: ignore[no-untyped-def]
    alpaca = [{"instruction": f"Add {i} and {i}.", "input": "", "output": f"The sum is {2 * i}."} for i in range(40)]
    chat = [{"messages": [{"role": "user", "content": r["instruction"]},
                          {"role": "assistant", "content": r["output"]}]} for r in alpaca]
    if layout == "alpaca-jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in alpaca))
    elif layout == "chat-jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in chat))
    elif layout == "alpaca-json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(alpaca))
    else:
        path = tmp_path / "d.csv"
        path.write_text("instruction,input,output\n" + "\n".join(
            f'"{r["instruction"]}",,"{r["output"]}"' for r in alpaca))
    splits = data.prepare(DataConfig(source=str(path), eval_fraction=0.2), tokenizer, tmp_path)
    assert splits.train and splits.eval
    assert len(splits.train) + len(splits.eval) <= 40


def test_bad_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}))
    with pytest.raises(ConfigError, match="bad.jsonl line 1: no 'instruction' or 'output' field; a row holds"):
        data.read_file(path)
    with pytest.raises(ConfigError, match="data.source: 'nope.txt' is not 'stdlib'"):
        data.load_examples(DataConfig(source="nope.txt"), tmp_path)


def test_batches_are_seeded_and_padded() -> None:
    rows = [{"input_ids": [1] * n, "labels": [5] * n} for n in range(1, 11)]
    a = [b for _, b in zip(range(4), data.train_micro_batches(rows, 3, seed=7), strict=False)]
    b = [b for _, b in zip(range(4), data.train_micro_batches(rows, 3, seed=7), strict=False)]
    assert a == b
    assert a != [b for _, b in zip(range(4), data.train_micro_batches(rows, 3, seed=8), strict=False)]
    batch = data.collate(rows[:3], pad_id=0)
    assert batch["attention_mask"].sum().item() == 1 + 2 + 3
    assert (batch["labels"][0, 1:] == data.IGNORE_INDEX).all()


def test_malformed_and_tiny_data_are_clear_errors(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    with pytest.raises(ConfigError, match="broken.jsonl line 2: not JSON"):
        data.read_file(broken)
    with pytest.raises(ConfigError, match="fewer than train.micro_batch_size=4"):
        next(data.train_micro_batches([{"input_ids": [1], "labels": [1]}] * 3, 4, seed=0))
    long = tmp_path / "long.jsonl"
    long.write_text("\n".join(json.dumps({"instruction": f"{i} " + "x " * 200, "output": "y"}) for i in range(20)))
    with pytest.raises(ConfigError, match="keeps response tokens within data.max_length=16"):
        data.prepare(DataConfig(source=str(long), max_length=16, eval_fraction=0.5), tokenizer, tmp_path)


# --- every row checked before training, without the tokenizer (check_rows) -----------------------

GOOD = {"instruction": "Add 1 and 1.", "input": "", "output": "2"}
CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
                     {"role": "assistant", "content": "2"}]}


def jsonl(*rows: object) -> str:
    return "\n".join(json.dumps(r) for r in rows) + "\n"


BAD_FILES: list[tuple[str, str, list[str]]] = [
    ("d.jsonl", jsonl(GOOD, {"messages": "hi"}),
     ["d.jsonl line 2: field 'messages': expected a non-empty list of {role, content} objects, got a string"]),
    ("d.jsonl", jsonl(GOOD, {"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}),
     ["d.jsonl line 2: field 'messages[0].role': expected a role such as system, user, assistant, tool, "
      "got no 'role'"]),
    ("d.jsonl", jsonl({"messages": [{"role": "user", "content": 3}]}),
     ["line 1: field 'messages[0].content': expected a string, got a number (3)"]),
    ("d.jsonl", jsonl(GOOD, GOOD, {"instruction": 5, "output": "x"}),
     ["d.jsonl line 3: field 'instruction': expected a string, got a number (5)"]),
    ("d.jsonl", jsonl(GOOD, {"instruction": "a", "input": ["x"], "output": "y"}),
     ["line 2: field 'input': expected a string or no field, got a list"]),
    ("d.jsonl", jsonl(GOOD, [1, 2]), ["line 2: expected an object with 'instruction' and 'output'", "got a list"]),
    ("d.jsonl", jsonl(GOOD) + "\n{not json\n", ["d.jsonl line 3: not JSON (Expecting property name", "column 2"]),
    ("d.json", json.dumps([GOOD, {"instruction": "a", "output": None}]),
     ["d.json index 1: field 'output': expected a string, got null"]),
    ("d.json", json.dumps({"data": [GOOD, {"instruction": "a", "output": 7}]}),
     ["d.json data[1]: field 'output': expected a string, got a number (7)"]),
    ("d.json", json.dumps({"rows": [GOOD]}), ["d.json: expected a list of rows", "got an object"]),
    ("d.json", "[" + json.dumps(GOOD) + ",", ["d.json is not JSON: Expecting value at line 1 column"]),
    ("d.csv", "instruction,input,output\na,,b\nc,d\n",
     ["d.csv line 3: 2 values, but the header has 3 columns (instruction, input, output)"]),
    ("d.csv", "instruction,input,output\na,,b\n\"c\nc\",,d\ne,f,g,h\n", ["d.csv line 5: 4 values"]),
    ("d.csv", "question,answer\nq,a\n", ["d.csv line 1: the header has columns 'question', 'answer'",
                                           "columns instruction, output and optionally input"]),
    ("d.csv", "messages\n[]\n", ["chat rows with 'messages' go in a .jsonl or .json file"]),
    ("d.jsonl", "", ["d.jsonl holds no examples; expected rows with 'instruction' and 'output'"]),
    ("d.jsonl", "\n  \n", ["holds no examples"]),
    ("d.json", "", ["d.json holds no examples"]),
    ("d.json", "[]", ["d.json holds no examples"]),
    ("d.csv", "", ["d.csv holds no examples"]),
    ("d.csv", "instruction,input,output\n", ["d.csv holds no examples"]),
    ("d.txt", "x", ["data.source: 'd.txt' is not .jsonl, .json or .csv"]),
    ("d.jsonl", jsonl(GOOD), ["data.source: 1 example; training and evaluation need at least 2"]),
    ("d.jsonl", jsonl({**GOOD, "module": "m"}, {**GOOD, "output": "3", "module": "m"}),
     ["data.eval_fraction: all 2 examples are one group"]),
]


@pytest.mark.parametrize(("name", "text", "expected"), BAD_FILES, ids=[e[0] for _, _, e in BAD_FILES])
def test_a_bad_row_or_file_names_the_file_the_row_and_the_field(tmp_path: Path, name: str, text: str,
                                                                 expected: list[str]) -> None:
    path = tmp_path / name
    path.write_bytes(text.encode())
    with pytest.raises(ConfigError) as e:
        data.check_rows(DataConfig(source=str(path)))
    message = str(e.value)
    assert message.startswith("data.") and "\n" not in message
    for part in expected:
        assert part in message, message


def test_a_missing_file_or_a_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data.source: '.*nope.jsonl' is not 'stdlib', 'hf:<dataset>\[:split\]' or"):
        data.check_rows(DataConfig(source=str(tmp_path / "nope.jsonl")))
    (tmp_path / "rows.jsonl").mkdir()
    with pytest.raises(ConfigError, match="rows.jsonl' is a directory; name a .jsonl, .json or .csv file in it"):
        data.check_rows(DataConfig(source=str(tmp_path / "rows.jsonl")))
    with pytest.raises(ConfigError, match="'hf:' names no dataset"):
        data.check_rows(DataConfig(source="hf:"))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"instruction": "caf\xe9", "output": "x"}')
    with pytest.raises(ConfigError, match="latin1.jsonl is not UTF-8 text"):
        data.check_rows(DataConfig(source=str(tmp_path / "latin1.jsonl")))


@pytest.mark.parametrize(("name", "text"), [
    ("d.jsonl", jsonl(*[GOOD | {"instruction": f"q{i}"} for i in range(3)], CHAT) + "\n\n"),  # blank lines
    ("d.json", json.dumps({"data": [GOOD, CHAT, {**GOOD, "input": None, "module": "x"}]})),
    ("d.csv", "\ufeffinstruction,input,output\n\"a, b\",,c\n\"multi\nline\",x,y\nq,,r\n"),  # a BOM, quoting
    ("d.csv", "instruction,output\na,b\nc,d\n"),  # no input column
])
def test_good_files_pass_the_check(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_bytes(text.encode())
    data.check_rows(DataConfig(source=str(path)))
    assert all(data.to_messages(r, "system")[-1]["role"] == "assistant" for r in data.read_file(path))


def test_csv_rows_name_the_line_they_start_on() -> None:
    found = parse_rows('instruction,output\n"a\nb",c\n\nd,e\n', "d.csv")
    assert [where for where, _ in found] == ["d.csv line 2", "d.csv line 5"]


@pytest.mark.parametrize(("row", "problem"), [
    (GOOD, None),
    (CHAT, None),
    ({"instruction": "", "output": "x", "input": "context"}, None),
    ({"instruction": "a", "output": "b", "messages": None}, None),  # an empty chat column beside alpaca fields
    ({"messages": [], "instruction": "a", "output": "b"}, "field 'messages': expected a non-empty list"),
    ({"instruction": "a"}, "no 'output' field; a row holds 'instruction' and 'output' (alpaca) or 'messages' (chat); "
                           "its fields: 'instruction'"),
    ({}, "no 'instruction' or 'output' field; a row holds"),
    ({"instruction": True, "output": "b"}, "field 'instruction': expected a string, got a boolean (true)"),
    ({"instruction": "a", "output": "   "}, None),  # nothing but the end of turn to learn: trained as before
    ({"instruction": "a", "output": {"text": "b"}}, "field 'output': expected a string, got an object"),
    ({"messages": [{"role": "user", "content": "hi"}]}, None),  # nothing to learn: skipped when tokenized
    ({"messages": [{"role": "ipython", "content": "x"}, {"role": "assistant", "content": "y"}]}, None),
    ({"messages": ["hi"]}, "field 'messages[0]': expected a {role, content} object, got a string ('hi')"),
    ({"messages": [{"role": ["user"], "content": "x"}]}, "'messages[0].role': expected a role such as system"),
    ("a row", "expected an object with 'instruction' and 'output' (alpaca) or 'messages' (chat), got a string"),
    (None, "got null"),
])
def test_row_problem(row: object, problem: str | None) -> None:
    found = row_problem(row)
    assert found is None if problem is None else (found is not None and problem in found), found


@pytest.mark.parametrize("n", [2, 3, 5, 10, 50, 200])
@pytest.mark.parametrize("eval_fraction", [0.001, 0.1, 0.999])
def test_a_small_set_keeps_an_example_on_each_side(n: int, eval_fraction: float) -> None:
    rows = [{"instruction": f"Add {i} and {i}.", "output": f"{2 * i}"} for i in range(n)]
    train, held = data.split(rows, eval_fraction)
    assert train and held and len(train) + len(held) == n
    assert data.split(rows, eval_fraction) == (train, held)  # deterministic
    if n >= 50 and eval_fraction == 0.001:
        assert len(held) == 1  # only the one example closest to the fraction moves
