"""The one exception type users see as a one-line message (the CLI prints it without a traceback)."""

from __future__ import annotations

_RAISED: list[str] = []


class LitGenError(ValueError):
    """Bad input a user can fix: missing shards, unreadable checkpoint, mismatched teacher, bad recipe value.

    Libraries in between (jsonargparse instantiating a recipe's classes) sometimes re-wrap exceptions in their own
    multi-line errors; every message is remembered so the CLI can still print just this sentence.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        _RAISED.append(message)
        del _RAISED[:-16]


def find_user_error(err: BaseException) -> str | None:
    """The message of a LitGenError raised during this process that ``err`` (or its cause chain) mentions."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, LitGenError):
            return str(seen)
        text = str(seen)
        for message in reversed(_RAISED):
            if message and message in text:
                return message
        seen = seen.__cause__ or seen.__context__
    return None


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when the message is empty)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
