"""User-facing errors: one line that names the problem and the fix, exit code 2, no traceback."""

import errno
from typing import Optional

USER_ERROR_EXIT_CODE = 2
# The trainer exits with this after saving on SIGTERM/SIGUSR1; the Slurm script requeues on it.
REQUEUE_EXIT_CODE = 3
# Ctrl-C: the run stopped where it was; its last complete checkpoint is intact (128 + SIGINT, as shells do).
INTERRUPTED_EXIT_CODE = 130
# An OSError with one of these is the disk's or the folder's fault (full, quota, read-only, permissions, a
# file where a folder should be), not a bug: it is reported as a user error.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST)


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint). `cli.main` prints it as one line and exits 2."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class CheckpointError(UserError):
    pass


class RunFolderError(UserError):
    """The run folder (or a file in it) cannot be written: full disk, permissions, a file in the way."""


def run_folder_error(error: BaseException) -> Optional[RunFolderError]:
    """The one-line user error for an OSError the disk or the folder caused, else None."""
    if not isinstance(error, OSError) or error.errno not in DISK_ERRNOS:
        return None
    where = f" ({error.filename})" if error.filename else ""
    return RunFolderError(f"cannot write{where}: {error.strerror}; free disk space, fix the permissions or choose "
                          f"another folder (hydra.run.dir=...)")


class UsageError(UserError):
    """Bad command-line arguments of an argparse subcommand (scaletrain.cli.ArgumentParser)."""


class InputError(UserError):
    """Bad command-line input to inference: a prompt longer than the context, a text without a mask token."""


def one_line(message: str) -> str:
    return " ".join(str(message).split())
