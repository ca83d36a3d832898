"""The engine-neutral exception tree.

Names and errno values follow python-rbd (librbd's binding) so code written for
python-rbd catches the same classes on either engine. The native engine raises
these directly; the Ceph engine translates rados/rbd exceptions into them in one
place. The CSI layer maps them to gRPC status codes in one table.
"""

from __future__ import annotations

import errno


class Error(Exception):
    """Base of every engine error."""


class OSError(Error):
    """An engine error carrying an errno, like python-rbd's OSError."""

    errno_value: int = errno.EIO

    def __init__(self, message: str = "", errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = self.errno_value if errno is None else errno


class PermissionError(OSError):
    errno_value = errno.EPERM


class ImageNotFound(OSError):
    errno_value = errno.ENOENT


class ObjectNotFound(OSError):
    errno_value = errno.ENOENT


class ImageExists(OSError):
    errno_value = errno.EEXIST


class ObjectExists(OSError):
    errno_value = errno.EEXIST


class IOError(OSError):
    errno_value = errno.EIO


class NoSpace(OSError):
    errno_value = errno.ENOSPC


class InvalidArgument(OSError):
    errno_value = errno.EINVAL


class ReadOnlyImage(OSError):
    errno_value = errno.EROFS


class ImageBusy(OSError):
    errno_value = errno.EBUSY


class ImageHasSnapshots(OSError):
    errno_value = errno.ENOTEMPTY


class FunctionNotSupported(OSError):
    errno_value = errno.ENOSYS


class ArgumentOutOfRange(OSError):
    errno_value = errno.EDOM


class ConnectionShutdown(OSError):
    errno_value = errno.ESHUTDOWN


class Timeout(OSError):
    errno_value = errno.ETIMEDOUT


class OperationNotSupported(OSError):
    errno_value = errno.EOPNOTSUPP


__all__ = [
    "ArgumentOutOfRange",
    "ConnectionShutdown",
    "Error",
    "FunctionNotSupported",
    "IOError",
    "ImageBusy",
    "ImageExists",
    "ImageHasSnapshots",
    "ImageNotFound",
    "InvalidArgument",
    "NoSpace",
    "OSError",
    "ObjectExists",
    "ObjectNotFound",
    "OperationNotSupported",
    "PermissionError",
    "ReadOnlyImage",
    "Timeout",
]
