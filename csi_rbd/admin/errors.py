"""The one error type commands raise for bad input; the CLI prints it on one line."""

from __future__ import annotations

import errno


class CliError(Exception):
    """A user-facing failure: ``message`` goes to stderr, ``code`` becomes the exit status.

    Exit statuses are errno values, as Ceph's ``rbd`` tool returns ``abs(r)``.
    """

    def __init__(self, message: str, code: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def invalid(message: str) -> CliError:
    return CliError(message, errno.EINVAL)


def not_found(message: str) -> CliError:
    return CliError(message, errno.ENOENT)


def exists(message: str) -> CliError:
    return CliError(message, errno.EEXIST)


def busy(message: str) -> CliError:
    return CliError(message, errno.EBUSY)
