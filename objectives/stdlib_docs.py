"""Instruction/response pairs from the Python standard library's own docstrings.

Run as ``python -m objectives.stdlib_docs OUT.jsonl`` (in a child process, because importing every
module has side effects); each public function or class with a docstring summary of over 40 characters
becomes ``{"module", "instruction", "output"}``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import sys
import warnings

SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__main__", "lib2to3", "test",
        "ensurepip", "pydoc_data", "msilib", "winreg", "winsound", "msvcrt", "_winapi", "nt", "xxsubtype",
        "pty", "tty", "curses", "readline", "webbrowser", "venv", "idle", "sre_compile", "sre_parse",
        "sre_constants", "asynchat", "asyncore", "smtpd", "imp", "distutils"}


def summary(doc: str) -> str:
    """The docstring's first paragraph on one line."""
    first = inspect.cleandoc(doc).split("\n\n", 1)[0]
    return " ".join(first.split())


def signature(obj: object) -> str:
    try:
        return str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "(...)"


def pairs(module_name: str) -> list[dict[str, str]]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module(module_name)
    public = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    out = []
    for name in sorted(set(public)):
        obj = getattr(module, name, None)
        if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
            continue
        if getattr(obj, "__module__", module_name).split(".")[0] not in (module_name, "_" + module_name):
            continue  # re-exported from elsewhere: counted where it is defined
        kind = "class" if inspect.isclass(obj) else "function"
        out.extend(_pair(module_name, f"{module_name}.{name}", kind, obj))
        if inspect.isclass(obj):
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and callable(member):
                    out.extend(_pair(module_name, f"{module_name}.{name}.{attr}", "method", member))
    return out


def _pair(module_name: str, qualname: str, kind: str, obj: object) -> list[dict[str, str]]:
    doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else ""
    text = summary(doc) if doc else ""  # own docstring only: inherited ones say nothing of this object
    if len(text) <= 40 or text.startswith(qualname.rsplit(".", 1)[-1] + "("):
        return []
    return [{
        "module": module_name,
        "instruction": f"What does the Python standard library {kind} `{qualname}{signature(obj)}` do?",
        "output": text,
    }]


def main(out_path: str) -> None:
    rows = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP:
            continue
        try:
            rows.extend(pairs(name))
        except Exception:  # modules that cannot import on this platform are skipped
            continue
    with open(out_path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
