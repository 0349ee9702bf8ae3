"""Stop requests: SIGINT and SIGTERM ask training to stop after its current step.

A stage trains inside ``stop_on_signals``; between stages (a sweep's worker, a process of a
group) ``note_signal`` keeps a request for the next stage, which then stops at its first step.
"""

from __future__ import annotations

import signal
from collections.abc import Callable


class stop_on_signals:
    """While active, SIGINT and SIGTERM ask training to stop after the current step
    (a second signal stops at once); calling the object returns the signal that came (0: none).
    ``forward(signum)``, if given, is called with the first one (a sweep passes it on to
    its workers). A signal taken by an enclosing block, or noted by ``note_signal`` while
    no block was active, counts for the blocks entered after it: a stage started after
    the stop request stops at its first step."""

    pending: int | None = None  # the stop request this process has received, if any
    _depth = 0

    def __init__(self, forward: Callable[[int], None] | None = None):
        self.signum = None
        self.forward = forward
        self._old = {}

    def __call__(self) -> int:
        return self.signum or 0

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = stop_on_signals.pending = signum
        if self.forward:
            self.forward(signum)

    def __enter__(self):
        self.signum = stop_on_signals.pending
        stop_on_signals._depth += 1
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        stop_on_signals._depth -= 1
        if stop_on_signals._depth == 0 and not note_signal.installed:
            stop_on_signals.pending = None  # handled: the next command starts afresh
        return False


def note_signal(signum, frame) -> None:
    """A handler for SIGINT and SIGTERM between stages (a sweep's worker): remember the
    stop request for the next ``stop_on_signals`` block."""
    stop_on_signals.pending = signum


note_signal.installed = False  # set where note_signal is the process's handler
