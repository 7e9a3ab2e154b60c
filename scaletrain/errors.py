"""User-facing errors: one line that names the problem and the fix, exit code 2, no traceback."""

USER_ERROR_EXIT_CODE = 2
# The trainer exits with this after saving on SIGTERM/SIGUSR1; the Slurm script requeues on it.
REQUEUE_EXIT_CODE = 3


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint). `cli.main` prints it as one line and exits 2."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class CheckpointError(UserError):
    pass


class InputError(UserError):
    """Bad command-line input to inference: a prompt longer than the context, a text without a mask token."""


def one_line(message: str) -> str:
    return " ".join(str(message).split())
