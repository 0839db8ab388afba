"""Project exceptions. The CLI turns a ``UserError`` into one line on stderr and exit code 2."""


class UserError(ValueError):
    """Bad input from the user: a path, a file, an option value. Never an internal bug."""


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated, corrupt or of an unsupported kind."""
