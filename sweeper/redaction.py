"""Secrets out of free text before it is shown: URL passwords and ``password=...``-like values, wherever they stand.

``tracking.redact`` blanks the values of a config; this is for text such as a parser's error message, which
quotes the command line it failed on, and pieces of it. Pure: no I/O.
"""

from __future__ import annotations

import re

REDACTED = "***"

SECRET_WORD = r"(?:password|passwd|pwd|token|secret|api[_-]?key|private[_-]?key|credentials?)"

SECRET_PATTERNS = (
    # A password runs to the last '@' before a space, so one holding '/', '=', '@' or a quote is hidden whole;
    # at worst a path with an '@' after it is hidden too.
    re.compile(r"[a-z][a-z0-9+.-]*://[^:/@\s'\"]*:(?P<secret>\S*)@", re.IGNORECASE),
    # libpq's ?password=..., and key=value pairs (hf_token=..., db.password=...); 'tokens=' and
    # 'tokenizer=' are other words.
    re.compile(rf"(?<![a-z0-9])[\w.-]*{SECRET_WORD}=['\"]?(?P<secret>[^\s&#'\"]+)", re.IGNORECASE),
)


def secret_spans(text: str) -> list[tuple[int, int]]:
    """Where secrets stand in ``text``: sorted, non-overlapping ``(start, end)`` pairs."""
    spans = sorted((m.start("secret"), m.end("secret")) for p in SECRET_PATTERNS for m in p.finditer(text)
                   if m.end("secret") > m.start("secret"))
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def redact_text(text: str, source: str | None = None) -> str:
    """``text`` with every secret replaced by ``***``.

    Args:
        text: e.g. an error message.
        source: what the message is about (an override), when it may quote pieces of it: a quoted piece that
            overlaps a secret of ``source`` (a parser's ``mismatched input 'Sec'``) is hidden too.
    """
    if source:
        source_spans = secret_spans(source)
        # Longest first; a secret of one or two characters would blank unrelated words, so the patterns and
        # the quoted pieces below are what hide it.
        for start, end in sorted(source_spans, key=lambda s: s[0] - s[1]):
            secret = source[start:end]
            if len(secret) > 2:
                # As it stands, and as repr() writes it inside quotes (messages quote the override with repr).
                for form in (secret, repr(secret)[1:-1], secret.replace("'", "\\'")):
                    text = text.replace(form, REDACTED)

        def piece(m: re.Match[str]) -> str:
            return f"'{REDACTED}'" if _overlaps(m[1], source, source_spans) else m[0]

        text = re.sub(r"'([^'\n]+)'", piece, text)
    for start, end in reversed(secret_spans(text)):
        text = text[:start] + REDACTED + text[end:]
    return text


def first_line(e: BaseException, limit: int = 300) -> str:
    """An error's first line, cut to ``limit`` characters and redacted: what a one-line message quotes of it."""
    text = str(e).strip()
    return redact_text((text.splitlines()[0] if text else type(e).__name__)[:limit])


def _overlaps(piece: str, source: str, spans: list[tuple[int, int]]) -> bool:
    at = source.find(piece)
    while at >= 0:
        if any(at < end and start < at + len(piece) for start, end in spans):
            return True
        at = source.find(piece, at + 1)
    return False
