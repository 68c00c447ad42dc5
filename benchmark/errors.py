"""The one exception type for bad user input (the CLI prints its message on one line and exits with 2), and
the one-line reason a failed run is recorded with."""


class UsageError(Exception):
    """Bad input from the user (config, data, key). The message names the problem and the fix."""


def failure_reason(e: BaseException) -> str:
    """``Type: first line of the message``: what a record or a progress line says of a failed run (a NaN
    tensor's repr alone is 60 lines; an exception may have no message at all)."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
