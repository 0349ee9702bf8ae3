"""What a terminal shows: the log's lines and the per-epoch bar, both an entry point's choice."""

import io
import logging

import pytest

from ttkd import console


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def bars():
    yield console.show_progress
    console.show_progress(False)


def test_the_library_shows_no_bar_unless_an_entry_point_asks(monkeypatch, bars):
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    batches = [1, 2, 3]
    bars(False)  # as in a worker or a library caller (an entry point run in this process turned them on)
    assert console.progress(batches, 3, "epoch 1/2") is batches
    bars(True)
    assert list(console.progress(batches, 3, "epoch 1/2")) == batches
    assert "epoch 1/2" in terminal.getvalue() and "0/3" in terminal.getvalue()  # its label and its steps
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal: a file, a sweep's point log
    assert list(console.progress(batches, 3, "epoch 2/2")) == batches
    assert "epoch 2/2" not in terminal.getvalue()


def test_terminal_writes_lines_to_stdout_and_warnings_to_stderr(capsys):
    logger = logging.getLogger("ttkd.test_console")
    logger.handlers, logger.propagate = [console.Terminal()], False
    logger.setLevel(logging.INFO)
    logger.info("epoch 1/1")
    logger.warning("emulated bf16")
    out, err = capsys.readouterr()
    assert (out, err) == ("epoch 1/1\n", "warning: emulated bf16\n")
