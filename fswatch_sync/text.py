"""Names from the disk or the database, made safe to print on one line.

A model slug is any name a directory can have, newlines and terminal escapes included. Printed as
it is, ``evil\\n2026-01-01 INFO fswatch_sync: removed ...`` would forge a log line or a journal
row. Every place that prints a name (logs, the ``journal`` and ``status`` tables) goes through
:func:`printable`.
"""

from __future__ import annotations

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str) -> str:
    """``text`` with every character that is not printable (control characters, line and
    paragraph separators, a non-UTF-8 byte's surrogate escape) written as a Python-style escape.

    Printable text, non-ASCII letters included, is returned unchanged, so ordinary names read as
    they are; a backslash is left alone too, which keeps ``a\\b`` readable.
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def first_line(exc: BaseException) -> str:
    """What an exception says, as one printable line (its type when it says nothing); for a
    database error, the driver's own message rather than SQLAlchemy's wrapper with the SQL."""
    inner = getattr(exc, "orig", None)
    text = str(inner if inner is not None else exc).strip()
    return printable(text.splitlines()[0]) if text else type(exc).__name__
