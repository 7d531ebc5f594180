"""The one exception type a user is meant to read.

Anything raised as `UserError` is printed by the entry point as a single line
(`error: <message>`) with exit status 2 and no traceback; `TRAIN_DEBUG=1` shows
the traceback too. Messages name the file, line, key or value at fault and say
what was expected.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a file, a config value, a model path. Printed as one line."""


def at(path: object, line: int | None = None) -> str:
    """`data/nli.jsonl:1832` style location prefix."""
    return f"{path}:{line}" if line is not None else str(path)
