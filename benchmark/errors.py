"""The one exception type for bad user input (the CLI prints its message on one line and exits with 2), the
interrupt of a study (one line, exit 130), and the one-line reason a failed run is recorded with."""


class UsageError(Exception):
    """Bad input from the user (config, data, key). The message names the problem and the fix."""


class Interrupted(BaseException):
    """Ctrl-C (SIGINT) or SIGTERM in a study: not a KeyboardInterrupt, which Lightning's Trainer catches and
    turns into ``exit(1)``; a BaseException, so that no run records it as a failure."""


INTERRUPTED = "interrupted; rerun the same command to resume"


def failure_reason(e: BaseException) -> str:
    """``Type: first line of the message``: what a record or a progress line says of a failed run (a NaN
    tensor's repr alone is 60 lines; an exception may have no message at all)."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def plain(doc: str) -> str:
    """A docstring as a terminal shows it: without reST's double backticks."""
    return doc.replace("``", "")
