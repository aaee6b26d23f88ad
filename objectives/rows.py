"""Data files -> rows, each checked against the alpaca or the chat layout before anything trains.

A bad row is named by file, row (line for JSONL and CSV, index for JSON) and field, with what the field must
hold. Pure but for ``read_file``: no tokenizer, no model.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from objectives.config import ConfigError

Example = dict[str, Any]
"""One row: alpaca (instruction, input, output) or chat (messages), plus any other fields."""


def source_path(source: str) -> Path:
    """The data file ``data.source`` names; ConfigError when it is a directory or does not exist."""
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        raise ConfigError(f"data.source: {source!r} is a directory; name a .jsonl, .json or .csv file in it")
    if not path.is_file():
        raise ConfigError(f"data.source: {source!r} is not 'stdlib', 'hf:<dataset>[:split]' or an existing "
                          ".jsonl, .json or .csv file")
    return path


def read_file(path: Path) -> list[Example]:
    """JSONL, JSON (a list) or CSV rows in the alpaca (instruction/input/output) or chat (messages) layout.

    Raises:
        ConfigError: a file that does not parse, holds no rows, or has a row ``row_problem`` refuses, naming
            the file, the row (line for JSONL and CSV, index for JSON) and the field.
    """
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise ConfigError(f"data.source: {path.name!r} is not .jsonl, .json or .csv")
    try:
        # utf-8-sig: spreadsheet programs start CSV files with a byte-order mark.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"data.source: {path.name} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"data.source: cannot read {path}: {e.strerror or e}") from None
    rows = parse_rows(text, path.name)
    if not rows:
        raise ConfigError(f"data.source: {path} holds no examples; expected rows with 'instruction' and 'output' "
                          "(alpaca) or 'messages' (chat)")
    for where, row in rows:
        check_row(row, where)
    return [row for _, row in rows]


def parse_rows(text: str, name: str) -> list[tuple[str, Any]]:
    """A data file's rows, each with where it is (``d.jsonl line 3``, ``d.json index 2``), unchecked.

    The format is ``name``'s suffix (.jsonl, .json or .csv); blank lines are skipped but counted.

    Raises:
        ConfigError: text that does not parse, naming the file and the line.
    """
    suffix = Path(name).suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_rows(text, name)
    if suffix == ".json":
        return _json_rows(text, name)
    return _csv_rows(text, name)


def _json_error(e: ValueError | RecursionError, *, with_line: bool = True) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at {f'line {e.lineno} ' if with_line else ''}column {e.colno}"
    return "nested too deeply" if isinstance(e, RecursionError) else str(e)


def _jsonl_rows(text: str, name: str) -> list[tuple[str, Any]]:
    rows = []
    # Not splitlines(): U+2028 and friends may stand unescaped inside a JSON string.
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"{name} line {n}", json.loads(line)))
        except (ValueError, RecursionError) as e:
            raise ConfigError(f"data.source: {name} line {n}: not JSON ({_json_error(e, with_line=False)}); "
                              "each line of a .jsonl file "
                              "holds one JSON object") from None
    return rows


def _json_rows(text: str, name: str) -> list[tuple[str, Any]]:
    if not text.strip():
        return []
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"data.source: {name} is not JSON: {_json_error(e)}") from None
    wrapped = isinstance(doc, dict) and "data" in doc
    rows = doc["data"] if wrapped else doc
    if not isinstance(rows, list):
        raise ConfigError(f"data.source: {name}{' data' if wrapped else ''}: expected a list of rows "
                          f"(or {{\"data\": [rows]}}), got {shown(rows)}")
    return [(f"{name} data[{i}]" if wrapped else f"{name} index {i}", row) for i, row in enumerate(rows)]


def _csv_rows(text: str, name: str) -> list[tuple[str, Any]]:
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader, None)
        if header is None:
            return []
        if not {"instruction", "output"} <= set(header):
            chat = " (chat rows with 'messages' go in a .jsonl or .json file)" if "messages" in header else ""
            raise ConfigError(f"data.source: {name} line 1: the header has columns {', '.join(map(repr, header))}; "
                              f"a CSV file holds the alpaca layout: columns instruction, output and optionally "
                              f"input{chat}")
        rows = []
        start = reader.line_num + 1
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not cells:  # a blank line
                continue
            if len(cells) != len(header):
                raise ConfigError(f"data.source: {name} line {line}: {len(cells)} values, but the header has "
                                  f"{len(header)} columns ({', '.join(header)}); quote a value that holds a comma")
            rows.append((f"{name} line {line}", dict(zip(header, cells, strict=True))))
    except csv.Error as e:
        raise ConfigError(f"data.source: {name} line {reader.line_num}: not CSV ({e})") from None
    return rows


ROLES = ("system", "user", "assistant", "tool")
"""Message roles a chat row may use (the roles chat templates render)."""


def shown(value: Any) -> str:
    """A JSON value as an error names it: its type and, for a scalar, a short excerpt."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        if not value.strip():
            return "an empty string"
        return f"a string ({value[:40]!r}{'...' if len(value) > 40 else ''})"
    if isinstance(value, (list, tuple)):
        return "a list" if value else "an empty list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _messages_problem(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"field 'messages': expected a non-empty list of {{role, content}} objects, got {shown(messages)}"
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            return f"field 'messages[{i}]': expected a {{role, content}} object, got {shown(m)}"
        if not isinstance(m.get("role"), str) or not m["role"].strip():
            got = shown(m["role"]) if "role" in m else "no 'role'"
            return f"field 'messages[{i}].role': expected a role such as {', '.join(ROLES)}, got {got}"
        if not isinstance(m.get("content"), str):
            got = shown(m["content"]) if "content" in m else "no 'content'"
            return f"field 'messages[{i}].content': expected a string, got {got}"
    # A conversation that does not end with an assistant's reply has nothing to learn: tokenizing skips it.
    return None


def row_problem(row: Any) -> str | None:
    """What makes one row unusable, naming the field and what it must hold; None for a usable row.

    A row is alpaca (``instruction`` and ``output`` strings, the output non-empty, and an optional ``input``
    string) or chat (``messages``: a non-empty list of ``{role, content}`` objects ending with the assistant's
    reply, which is what is learned). Other fields (``module``, ``id``, ...) are allowed and ignored.
    """
    if not isinstance(row, Mapping):
        return f"expected an object with 'instruction' and 'output' (alpaca) or 'messages' (chat), got {shown(row)}"
    if row.get("messages") is not None:
        return _messages_problem(row["messages"])
    missing = [k for k in ("instruction", "output") if k not in row]
    if missing:
        has = ", ".join(repr(str(k)) for k in row) or "none"
        return (f"no {' or '.join(map(repr, missing))} field; a row holds 'instruction' and 'output' (alpaca) or "
                f"'messages' (chat); its fields: {has}")
    if not isinstance(row["instruction"], str):
        return f"field 'instruction': expected a string, got {shown(row['instruction'])}"
    if not isinstance(row["output"], str):
        return f"field 'output': expected a string, got {shown(row['output'])}"
    if row.get("input") is not None and not isinstance(row["input"], str):
        return f"field 'input': expected a string or no field, got {shown(row['input'])}"
    return None


def check_row(row: Any, where: str) -> None:
    """ConfigError naming ``where`` (file and row) and the field, when ``row_problem`` finds one."""
    problem = row_problem(row)
    if problem is not None:
        raise ConfigError(f"data.source: {where}: {problem}")
