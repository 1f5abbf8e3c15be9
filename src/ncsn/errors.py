"""User-facing errors.

Anything a user can cause (bad config value, missing data, bad checkpoint path) raises a subclass of
``UserError`` with a one-line message that says what to do. The entry points (train.py, sample.py) print
that line and exit with a non-zero code instead of showing a traceback (set HYDRA_FULL_ERROR=1 to see it).
"""


class UserError(Exception):
    """An error caused by the user's input; its message is one line that says what to do."""


class ConfigError(UserError, ValueError):
    """An invalid configuration value (sigma schedule, step size, batch size, ...)."""


class DataNotFoundError(UserError, FileNotFoundError):
    """A dataset is missing on disk and downloading is off or impossible."""


class CheckpointError(UserError):
    """A checkpoint path is missing, not a checkpoint, truncated or from another model."""


def one_line(error: BaseException) -> str:
    """The message a UserError was raised with. One raised in a DataLoader worker reaches the main process
    re-created with the worker's whole traceback as its message ("Caught DataNotFoundError in DataLoader worker
    process 0. ... ncsn.errors.DataNotFoundError: <message>"): its last line holds the message."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        marker = f"{type(error).__name__}: "
        return lines[-1].split(marker, 1)[1] if marker in lines[-1] else lines[-1]
    return str(error)
