"""The one exception type for mistakes a user can fix.

Entry points turn a ``TTKDError`` into a one-line message and a non-zero exit;
any other exception is a bug in ttkd and stays loud.
"""


class TTKDError(Exception):
    """A user error: the message names the problem and how to fix it."""

    exit_code = 1  # what the entry point exits with

