"""Engine-neutral exceptions of the node data path.

The gRPC NodeServer maps each class to one status code; ``grpc_code`` names it
so that the mapping can also be read off the class. Subclasses come first in
any table that maps by ``isinstance``.
"""

from __future__ import annotations


class NodeError(Exception):
    """Base of every node data path error."""

    grpc_code = "INTERNAL"


class VolumeNotFound(NodeError):
    """The volume is not known on this node, or not at the given path."""

    grpc_code = "NOT_FOUND"


class StagingConflict(NodeError):
    """Staged or published at the same path with an incompatible capability."""

    grpc_code = "ALREADY_EXISTS"


class PreconditionFailed(NodeError):
    """The volume is busy elsewhere, not staged, still published, and the like."""

    grpc_code = "FAILED_PRECONDITION"


class OnlineResizeUnsupported(PreconditionFailed):
    """The mounted filesystem cannot be grown online here (e.g. no CAP_SYS_RESOURCE)."""


class InvalidRequest(NodeError):
    """An argument that can never work (an unsupported fstype, a bad discard mode)."""

    grpc_code = "INVALID_ARGUMENT"


class PathRefused(InvalidRequest):
    """A path outside the allowed roots (checked after resolving ``..`` and symlinks)."""


class DataPathError(NodeError):
    """A daemon, loop device, mkfs or mount step failed."""

    grpc_code = "INTERNAL"


__all__ = [
    "DataPathError",
    "InvalidRequest",
    "NodeError",
    "OnlineResizeUnsupported",
    "PathRefused",
    "PreconditionFailed",
    "StagingConflict",
    "VolumeNotFound",
]
