"""What a benchmark prints and writes: numbers as text, markdown tables, the report file and progress lines."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


def say(text: str) -> None:
    print(text, flush=True)


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
