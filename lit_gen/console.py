"""What ``lit-gen`` prints: Lightning's messages that are expected in lit_gen's own setup are filtered; real ones stay.

``lit-gen -v ...`` / ``--verbose`` or ``LIT_GEN_VERBOSE=1`` shows everything. Each filter below names the message and
why it is harmless *here*; anything not listed (a real warning) is printed as before.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

VERBOSE_ENV = "LIT_GEN_VERBOSE"
VERBOSE_FLAGS = ("-v", "--verbose")

# Python warnings (``warnings.warn`` / Lightning's ``rank_zero_warn``): (regex matched at the message start, why).
KNOWN_WARNINGS: tuple[tuple[str, str], ...] = (
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        "torch 2.14 deprecates LeafSpec, which Lightning 2.6's own _pytree helper still uses: a note to Lightning's "
        "developers, nothing a lit_gen user can change",
    ),
    (
        r"Found \d+ module\(s\) in eval mode at the start of training",
        "distillation methods hold a frozen teacher (and frozen feature nets) in eval mode on purpose; the networks "
        "that train are in train mode",
    ),
    (
        r"You defined a `validation_step` but have no `val_dataloader`",
        "every method can validate on the shards' val/ split; a shard folder without one simply has no val loop",
    ),
    (
        r"The number of training batches \(\d+\) is smaller than the logging interval",
        "lit_gen logs per optimizer step across epochs (epochs are only the data stream's passes), so a short epoch "
        "loses no logged points",
    ),
)

# Lightning's ``rank_zero_info`` log records (the logging module): (regex, why).
KNOWN_INFO: tuple[tuple[str, str], ...] = (
    (
        r"💡 Tip: For seamless cloud logging",
        "an advertisement for Lightning's hosted logger; lit_gen logs to TensorBoard under the run folder",
    ),
)

_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero", "lightning.pytorch")


class _KnownInfoFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(re.match(pattern, message) for pattern, _ in KNOWN_INFO)


_FILTER = _KnownInfoFilter()


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def split_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``-v``/``--verbose`` (those before a lone ``--``: what follows belongs to another command)
    and whether one was there."""
    end = argv.index("--") if "--" in argv else len(argv)
    head = [a for a in argv[:end] if a not in VERBOSE_FLAGS]
    return head + argv[end:], len(head) < end


def quiet_known_noise(verbose: bool | None = None) -> bool:
    """Install the filters above unless verbose (argument, else ``LIT_GEN_VERBOSE``); returns whether they are on.
    Verbose mode is exported to ``LIT_GEN_VERBOSE`` so that processes launched by the run (DDP ranks) follow it."""
    if verbose is None:
        verbose = is_verbose()
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        for name in _LOGGERS:
            logging.getLogger(name).removeFilter(_FILTER)
        return False
    for pattern, _ in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    return True
