"""Malformed input of every shape: the data check and the search-space grammar fail only with a ConfigError
that names the row or the key, and never show a password they were given.

Property-based (hypothesis): random JSON values in every field of a row, random lines of a data file, random
text and near-grammar in an override, random values in a mapping entry.
"""

from __future__ import annotations

import csv
import io
import json
import string
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from objectives import data
from objectives.config import ConfigError
from objectives.rows import check_row, parse_rows
from sweeper.grammar import MAPPING_KEYS, parse_override
from sweeper.overrides import merge_sweeps, split_overrides
from sweeper.space import parse_entries, parse_space

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

FEW = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
# Messages near the chat layout, so that the checks past the first one are reached too.
messages = st.lists(st.dictionaries(st.sampled_from(["role", "content", "name"]),
                                    st.sampled_from(["user", "assistant", "system", "human", ""]) | json_values,
                                    max_size=3) | json_values, max_size=4)
any_rows = st.dictionaries(st.sampled_from(["instruction", "input", "output", "messages", "module"]),
                       json_values | messages | st.text(max_size=12), max_size=5) | json_values
PLAIN = SimpleNamespace(chat_template=None, eos_token="</s>")  # a tokenizer without a chat template


def fields_named(message: str) -> bool:
    return any(f in message for f in ("'instruction'", "'output'", "'input'", "'messages", "expected an object"))


@FEW
@given(any_rows)
def test_a_row_is_usable_or_refused_naming_the_row_and_field(row: Any) -> None:
    try:
        check_row(row, "d.jsonl line 7")
    except ConfigError as e:
        assert str(e).startswith("data.source: d.jsonl line 7: ") and fields_named(str(e)), str(e)
        return
    # A row the check passes goes through templating without an error. A conversation that does not end with the
    # assistant's reply passes too: it has nothing to learn, and tokenizing skips it.
    messages = data.to_messages(row, "Be brief.")
    assert messages[-1]["role"] == "assistant" or row.get("messages") is not None
    assert isinstance(data._render(PLAIN, messages, prompt_only=False), str)


lines = st.one_of(any_rows.map(json.dumps), st.text(max_size=30), st.just(""), st.just("{not json"))


@FEW
@given(st.lists(lines, max_size=6))
def test_jsonl_text_is_read_or_refused_naming_the_line(text_lines: list[str]) -> None:
    text = "\n".join(text_lines)
    try:
        for where, row in parse_rows(text, "d.jsonl"):
            check_row(row, where)
    except ConfigError as e:
        line = int(str(e).split("d.jsonl line ", 1)[1].split(":", 1)[0])
        assert 1 <= line <= len(text.split("\n")), str(e)


@FEW
@given(json_values | st.text(max_size=30))
def test_json_text_is_read_or_refused_naming_the_index(doc: Any) -> None:
    text = doc if isinstance(doc, str) else json.dumps(doc)
    try:
        for where, row in parse_rows(text, "d.json"):
            check_row(row, where)
    except ConfigError as e:
        assert str(e).startswith(("data.source: d.json index ", "data.source: d.json data", "data.source: d.json:",
                                  "data.source: d.json is not JSON")), str(e)


cells = st.text(alphabet=string.printable, max_size=8)


@FEW
@given(st.lists(cells, min_size=1, max_size=4), st.lists(st.lists(cells, max_size=5), max_size=5))
def test_csv_text_is_read_or_refused_naming_the_line(header: list[str], table: list[list[str]]) -> None:
    out = io.StringIO()
    csv.writer(out).writerows([header, *table])
    try:
        for where, row in parse_rows(out.getvalue(), "d.csv"):
            check_row(row, where)
    except ConfigError as e:
        assert str(e).startswith("data.source: d.csv line "), str(e)


# --- the search-space grammar ------------------------------------------------------------------------

TOKENS = ["choice(", "range(", "interval(", "tag(", "int(", "shuffle(", "log", ",", ")", "(", "step=", "start=",
          "stop=", "1", "10", "-2", "0.5", "1e-5", "inf", "nan", "true", "null", "a", "'", '"', "=", "[", "]",
          "{", "}", ":", " ", "\\", "$", "${x}"]
grammar_text = st.lists(st.sampled_from(TOKENS), max_size=12).map("".join) | st.text(max_size=20)


@FEW
@given(grammar_text)
def test_a_space_entry_is_parsed_or_refused_naming_the_entry(text: str) -> None:
    try:
        parse_space({"key": text})
    except ConfigError as e:
        assert str(e).startswith("search_space.key: "), str(e)


@FEW
@given(grammar_text)
def test_an_override_is_split_or_refused_naming_the_override(text: str) -> None:
    arg = f"lora.r={text}"
    try:
        sweeps, _ = split_overrides([arg])
    except ConfigError as e:
        assert str(e).startswith(f"override {arg!r}: "), str(e)
        return
    try:
        parse_entries(merge_sweeps({}, sweeps))
    except ConfigError as e:
        assert str(e).startswith("search_space.lora.r: "), str(e)


@FEW
@given(st.dictionaries(st.sampled_from([*MAPPING_KEYS, "grid"]), json_values | st.sampled_from(
    ["float", "int", "categorical"]), max_size=6))
def test_a_mapping_entry_is_parsed_or_refused_naming_the_entry(spec: dict[str, Any]) -> None:
    try:
        parse_space({"key": spec})
    except ConfigError as e:
        assert str(e).startswith("search_space.key: "), str(e)


NAMES = ["a", "b", "c"]
specs = st.fixed_dictionaries({}, optional={
    "path": st.sampled_from(["x", "y"]), "type": st.sampled_from(["float", "int", "categorical"]),
    "low": scalars, "high": scalars, "step": scalars, "log": st.booleans(),
    "choices": st.lists(scalars, max_size=3) | json_values,
    "when": st.dictionaries(st.sampled_from(NAMES), scalars | st.lists(json_values, max_size=2), max_size=2)})


@FEW
@given(st.dictionaries(st.sampled_from(NAMES), specs | grammar_text, min_size=1, max_size=3))
def test_a_space_with_conditions_is_ordered_or_refused_naming_an_entry(entries: dict[str, Any]) -> None:
    try:
        params = parse_space(entries)
    except ConfigError as e:
        assert str(e).split(": ", 1)[0] in {f"search_space.{n}" for n in entries}, str(e)
        return
    assert {p.name for p in params} == set(entries)


# --- secrets in an override that does not parse --------------------------------------------------------

passwords = st.text(alphabet=string.ascii_letters + string.digits + string.punctuation, min_size=1, max_size=16)


@FEW
@given(passwords, st.sampled_from(["postgresql://u:{}@db-host:5432/optuna", "postgresql://u@db-host/x?password={}",
                                   "mysql://:{}@h/db", "study.storage=x hf_token={}"]))
def test_a_password_never_shows_in_a_parse_error(secret: str, form: str) -> None:
    secret = f"Q{secret}7"  # never a word of the message itself
    url = form.format(secret)
    assume(not url.startswith("study.storage=") or " " not in secret)
    arg = url if url.startswith("study.storage=") else f"study.storage={url}"
    try:
        override = parse_override(arg, context=f"override {arg!r}")
    except ConfigError as e:
        assert secret not in str(e) and repr(secret)[1:-1] not in str(e), str(e)
        return
    if not override.is_sweep_override() and " " not in url and "\\" not in url:
        assert override.value() == url  # a URL that parses means itself (a backslash escapes in Hydra's grammar)
