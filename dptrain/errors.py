"""The one exception type for bad user input, and how dptrain prints it: a single line, never a traceback."""

from __future__ import annotations

import sys
from typing import NoReturn


class UserError(Exception):
    """Raised for input a user can fix (config, paths, files).

    The message is one line that names what is wrong and how to fix it; the CLI
    prints it without a traceback and exits with status 2.
    """


def fail(message: str, status: int = 2) -> NoReturn:
    """Print ``dptrain: error: <message>`` to stderr and exit with ``status`` (2: bad input, as argparse)."""
    print(f"dptrain: error: {message}", file=sys.stderr)
    sys.exit(status)
