"""One table from exceptions to gRPC status codes, and the decorator that applies it."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from csi_rbd.control import errors as control
from csi_rbd.engine import errors as engine
from csi_rbd.locks import OperationPending
from csi_rbd.node import errors as node

log = logging.getLogger(__name__)

# Most specific first: the first match wins.
STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (OperationPending, grpc.StatusCode.ABORTED),
    (control.InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (control.NotFound, grpc.StatusCode.NOT_FOUND),
    (control.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (control.OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (control.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (control.Exhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (control.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (node.VolumeNotFound, grpc.StatusCode.NOT_FOUND),
    (node.StagingConflict, grpc.StatusCode.ALREADY_EXISTS),
    (node.PreconditionFailed, grpc.StatusCode.FAILED_PRECONDITION),
    (node.InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (node.DataPathError, grpc.StatusCode.INTERNAL),
    (engine.ImageNotFound, grpc.StatusCode.NOT_FOUND),
    (engine.ObjectNotFound, grpc.StatusCode.NOT_FOUND),
    (engine.ImageExists, grpc.StatusCode.ALREADY_EXISTS),
    (engine.ImageBusy, grpc.StatusCode.ABORTED),
    (engine.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (engine.NoSpace, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (engine.PermissionError, grpc.StatusCode.UNAUTHENTICATED),
    (engine.Timeout, grpc.StatusCode.UNAVAILABLE),
    (engine.ConnectionShutdown, grpc.StatusCode.UNAVAILABLE),
)


class Abort(Exception):
    """Raised by handlers that decide the status themselves."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def code_for(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, Abort):
        return exc.code
    for kind, code in STATUS_TABLE:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


F = TypeVar("F", bound=Callable[..., Any])


def rpc(method: F) -> F:
    """Run a servicer method; turn any exception into its status code and message."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:
            code = code_for(exc)
            message = str(exc) or type(exc).__name__
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", method.__name__)
                message = f"internal error: {message}"
            context.abort(code, message)

    return wrapper  # type: ignore[return-value]


def require(value: object, what: str) -> None:
    """INVALID_ARGUMENT when a required field is empty."""
    if not value:
        raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{what} is missing")
