"""Project exceptions. The CLI turns a ``UserError`` into one line on stderr and exit code 2."""

import os


class UserError(ValueError):
    """Bad input from the user: a path, a file, an option value. Never an internal bug."""


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated, corrupt or of an unsupported kind."""


def env_choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
    """An environment setting with a fixed set of values; a bad one is a UserError naming it."""
    value = os.environ.get(name, default)
    if value not in allowed:
        raise UserError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value
