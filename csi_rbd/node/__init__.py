"""The node data path: engine image -> FUSE file -> loop device -> mounts.

No gRPC here; the NodeServer calls :class:`NodeStager`.
"""

from csi_rbd.engine.base import ImageLocator
from csi_rbd.node.errors import (
    DataPathError,
    InvalidRequest,
    NodeError,
    OnlineResizeUnsupported,
    PathRefused,
    PreconditionFailed,
    StagingConflict,
    VolumeNotFound,
)
from csi_rbd.node.stager import NodeStager, VolumeStats

__all__ = [
    "DataPathError",
    "ImageLocator",
    "InvalidRequest",
    "NodeError",
    "NodeStager",
    "OnlineResizeUnsupported",
    "PathRefused",
    "PreconditionFailed",
    "StagingConflict",
    "VolumeNotFound",
    "VolumeStats",
]
