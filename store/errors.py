"""The one exception type that reaches the user as a one-line message (no traceback)."""


class UserError(Exception):
    """Bad input or a state the user must fix; the CLI prints `error: <message>` and exits 2."""
