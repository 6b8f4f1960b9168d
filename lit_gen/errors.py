"""The one exception type users see as a one-line message (the CLI prints it without a traceback)."""


class LitGenError(Exception):
    """Bad input a user can fix: missing shards, unreadable checkpoint, mismatched teacher, bad recipe value."""
