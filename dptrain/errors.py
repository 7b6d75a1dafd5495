"""The one exception type for bad user input: printed as a single line, never a traceback."""


class UserError(Exception):
    """Raised for input a user can fix (config, paths, files).

    The message is one line that names what is wrong and how to fix it; the CLI
    prints it without a traceback and exits with status 2.
    """
