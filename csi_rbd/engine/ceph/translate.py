"""The one place where librados/librbd exceptions become :mod:`csi_rbd.engine.errors`.

Every call into the bindings made by :mod:`csi_rbd.engine.ceph` goes through
:func:`call`, which re-raises any ``rados.Error``/``rbd.Error`` as the
engine-neutral class of the same meaning, keeping the message and errno and
chaining the original (:func:`translate` alone serves the one call site that
needs a local meaning for an errno). The CSI layer then
maps those to gRPC codes in its own single table.

The mapping is by class first (``rbd.ImageNotFound`` and
``rados.ObjectNotFound`` share ENOENT but mean different things), then by
errno for the generic ``OSError``s both bindings raise for everything else.
Exceptions that are not the bindings' (``KeyError`` from ``metadata_get``,
``TypeError`` for a wrong argument) pass through untouched.
"""

from __future__ import annotations

import errno as errno_codes
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ParamSpec, TypeVar

from csi_rbd.engine import errors
from csi_rbd.engine.ceph import bindings

P = ParamSpec("P")
T = TypeVar("T")
ErrorClass = type[errors.OSError]

# By errno, for the bindings' generic OSError (and subclasses not named below).
BY_ERRNO: Mapping[int, ErrorClass] = {
    errno_codes.EPERM: errors.PermissionError,
    errno_codes.EACCES: errors.PermissionError,
    errno_codes.ENOENT: errors.ObjectNotFound,
    errno_codes.EEXIST: errors.ObjectExists,
    errno_codes.EIO: errors.IOError,
    errno_codes.ENOSPC: errors.NoSpace,
    errno_codes.EDQUOT: errors.NoSpace,
    errno_codes.EINVAL: errors.InvalidArgument,
    errno_codes.EROFS: errors.ReadOnlyImage,
    errno_codes.EBUSY: errors.ImageBusy,
    errno_codes.ENOTEMPTY: errors.ImageHasSnapshots,
    errno_codes.ENOSYS: errors.FunctionNotSupported,
    errno_codes.EDOM: errors.ArgumentOutOfRange,
    errno_codes.ERANGE: errors.ArgumentOutOfRange,
    errno_codes.ESHUTDOWN: errors.ConnectionShutdown,
    errno_codes.ENOTCONN: errors.ConnectionShutdown,
    errno_codes.ECONNREFUSED: errors.ConnectionShutdown,
    errno_codes.ETIMEDOUT: errors.Timeout,
    errno_codes.EINTR: errors.Timeout,
    errno_codes.EOPNOTSUPP: errors.OperationNotSupported,
}

# (module, class name) -> engine class; checked in order, before BY_ERRNO.
BY_CLASS: tuple[tuple[str, str, ErrorClass], ...] = (
    ("rbd", "ImageNotFound", errors.ImageNotFound),
    ("rbd", "ImageExists", errors.ImageExists),
    ("rbd", "ImageBusy", errors.ImageBusy),
    ("rbd", "ImageHasSnapshots", errors.ImageHasSnapshots),
    ("rbd", "ReadOnlyImage", errors.ReadOnlyImage),
    ("rbd", "InvalidArgument", errors.InvalidArgument),
    ("rbd", "ArgumentOutOfRange", errors.ArgumentOutOfRange),
    ("rbd", "IncompleteWriteError", errors.IOError),
    ("rbd", "DiskQuotaExceeded", errors.NoSpace),
    ("rbd", "Timeout", errors.Timeout),
    ("rbd", "ConnectionShutdown", errors.ConnectionShutdown),
    ("rbd", "PermissionError", errors.PermissionError),
    ("rados", "ObjectNotFound", errors.ObjectNotFound),
    ("rados", "ObjectExists", errors.ObjectExists),
    ("rados", "ObjectBusy", errors.ImageBusy),
    ("rados", "PermissionError", errors.PermissionError),
    ("rados", "PermissionDeniedError", errors.PermissionError),
    ("rados", "TimedOut", errors.Timeout),
    ("rados", "ConnectionShutdown", errors.ConnectionShutdown),
    ("rados", "NotConnected", errors.ConnectionShutdown),
    ("rados", "InvalidArgumentError", errors.InvalidArgument),
    # state errors: a handle used after shutdown/close
    ("rados", "RadosStateError", errors.ConnectionShutdown),
    ("rados", "IoctxStateError", errors.InvalidArgument),
    ("rados", "ObjectStateError", errors.InvalidArgument),
)

_table: list[tuple[type[BaseException], ErrorClass]] | None = None
_bases: tuple[type[BaseException], ...] = ()


def _resolve() -> tuple[
    list[tuple[type[BaseException], ErrorClass]], tuple[type[BaseException], ...]
]:
    global _table, _bases
    if _table is None:
        rados, rbd = bindings.load()
        modules = {"rados": rados, "rbd": rbd}
        table = []
        for module, name, target in BY_CLASS:
            source = getattr(modules[module], name, None)
            if isinstance(source, type) and issubclass(source, BaseException):
                table.append((source, target))
        _bases = (rados.Error, rbd.Error)
        _table = table
    return _table, _bases


def is_binding_error(exc: BaseException) -> bool:
    return isinstance(exc, _resolve()[1])


def translate(
    exc: BaseException, overrides: Mapping[int, ErrorClass] | None = None
) -> BaseException:
    """The engine error for a binding exception (anything else is returned as is).

    ``overrides`` maps errnos to classes for one call site (e.g. ECANCELED of a
    failed omap compare means "the key exists" there, and nothing in general).
    """
    if isinstance(exc, errors.Error):
        return exc
    table, bases = _resolve()
    if not isinstance(exc, bases):
        return exc
    code = getattr(exc, "errno", None)
    code = abs(code) if isinstance(code, int) else None
    target: ErrorClass | None = None
    if overrides and code is not None and code in overrides:
        target = overrides[code]
    if target is None:
        target = next((t for s, t in table if isinstance(exc, s)), None)
    if target is None and code is not None:
        target = BY_ERRNO.get(code)
    if target is None:
        target = errors.IOError if code is None else errors.OSError
    return target(str(exc) or type(exc).__name__, errno=code)


def call(function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Call into the bindings; their exceptions come out as engine errors."""
    try:
        return function(*args, **kwargs)
    except Exception as exc:
        translated_exc = translate(exc)
        if translated_exc is exc:
            raise
        raise translated_exc from exc


def materialize(value: Any) -> Any:
    """Lists instead of the bindings' lazy iterators (which call librbd while iterating)."""
    if isinstance(value, (str, bytes, bytearray, dict, list, tuple)):
        return value
    if isinstance(value, Iterator) or type(value).__name__.endswith("Iterator"):
        return list(value)
    return value
