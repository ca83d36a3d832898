"""Failures of the control plane, each one a CSI status code's meaning."""

from __future__ import annotations


class ControlError(Exception):
    """Base: the message is what the caller reads."""


class InvalidRequest(ControlError):
    """A field or parameter is missing or wrong (INVALID_ARGUMENT)."""


class NotFound(ControlError):
    """The volume, snapshot or source does not exist (NOT_FOUND)."""


class AlreadyExists(ControlError):
    """The name exists with incompatible arguments (ALREADY_EXISTS)."""


class OutOfRange(ControlError):
    """A capacity that cannot be satisfied (OUT_OF_RANGE)."""


class FailedPrecondition(ControlError):
    """The volume is in a state that forbids the call, e.g. in use (FAILED_PRECONDITION)."""


class Exhausted(ControlError):
    """No room for the volume (RESOURCE_EXHAUSTED)."""


class Unavailable(ControlError):
    """The engine cannot be reached now (UNAVAILABLE)."""
