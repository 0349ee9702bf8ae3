"""What a terminal shows of ttkd: its log (logger ``ttkd``) and a progress bar per epoch.
The library logs and asks :func:`progress` to wrap an epoch's batches; the entry points decide
what is shown (``entry.options.show_log`` installs :class:`Terminal` and turns the bars on), and
a sweep's quiet worker points the log at a point's log file, with no bar."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

from tqdm import tqdm


class Terminal(logging.Handler):
    """ttkd's log as a terminal shows it: a line on stdout for each message, ``warning: …``
    on stderr for each warning. The streams are looked up at each line, so output redirected
    after the handler was installed (a sweep's quiet worker, a test's capture) follows."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            warn = record.levelno >= logging.WARNING
            stream = sys.stderr if warn else sys.stdout
            stream.write(("warning: " if warn else "") + record.getMessage() + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


_bars = False  # whether progress() shows a bar: an entry point's choice (show_progress)


def show_progress(on: bool = True) -> None:
    """Show (or stop showing) a progress bar on stderr during each epoch, where stderr is a terminal."""
    global _bars
    _bars = on


def progress(batches: Iterable, total: int, label: str) -> Iterable:
    """An epoch's batches, wrapped in a tqdm bar (``total`` steps, ``label``) that vanishes when
    the epoch ends, if an entry point asked for bars and stderr is a terminal; else as they are."""
    if not _bars:
        return batches
    return tqdm(batches, total=total, desc=label, leave=False, disable=not sys.stderr.isatty())
