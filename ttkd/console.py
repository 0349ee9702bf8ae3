"""ttkd's log (logger ``ttkd``) as a terminal shows it; the entry points install it
(``entry.options.show_log``), and a sweep's quiet worker points it at a point's log file."""

from __future__ import annotations

import logging
import sys


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
