"""The one exception type for bad user input, and how dptrain prints it (its own, Hydra's and OmegaConf's):
a single line, never a traceback."""

from __future__ import annotations

import sys
from typing import NoReturn

from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import OmegaConfBaseException


class UserError(Exception):
    """Raised for input a user can fix (config, paths, files).

    The message is one line that names what is wrong and how to fix it; the CLI
    prints it without a traceback and exits with status 2.
    """


def require(condition: bool, message: str) -> None:
    """Raise ``UserError(message)`` unless ``condition``; messages are one line naming the rule and its condition."""
    if not condition:
        raise UserError(message)


def fail(message: str, status: int = 2) -> NoReturn:
    """Print ``dptrain: error: <message>`` to stderr and exit with ``status`` (2: bad input, as argparse)."""
    print(f"dptrain: error: {message}", file=sys.stderr)
    sys.exit(status)


def first_line(text: str) -> str:
    """The first non-blank line of ``text``, stripped (a library's multi-line report, as one line)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def config_error_line(error: HydraException | OmegaConfBaseException) -> str:
    """Hydra's or OmegaConf's report of a bad override or config, which spans several lines, as one line.

    Hydra's advice to add an unknown key with ``+`` is dropped: dptrain refuses unknown keys either way.
    """
    if isinstance(error, OverrideParseException):
        return (
            f"cannot parse the override '{error.override}': {first_line(error.message)} "
            "(see https://hydra.cc/docs/advanced/override_grammar/basic)"
        )
    line = first_line(str(error)).rstrip(".")
    if isinstance(error, MissingConfigException) and error.options:
        return f"{line}: choose one of {', '.join(error.options)}"
    if isinstance(error.__cause__, OmegaConfBaseException):
        line = f"{line}: {first_line(str(error.__cause__))}"
    return line
