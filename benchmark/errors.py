"""The one exception type for bad user input: the CLI prints its message on one line and exits with 2."""


class UsageError(Exception):
    """Bad input from the user (config, data, key). The message names the problem and the fix."""
