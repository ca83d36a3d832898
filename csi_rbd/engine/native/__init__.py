"""The native engine: RBD semantics in pure Python over one data directory.

The public API mirrors python-rbd and python-rados for the subset the driver
uses, so code written for librbd's binding runs here unchanged::

    from csi_rbd.engine.native import Rados, RBD, Image

    with Rados(data_dir="/var/lib/csi-rbd") as cluster:
        ioctx = cluster.open_ioctx("rbd")
        RBD().create(ioctx, "disk", 10 << 30)
        with Image(ioctx, "disk") as image:
            image.write(b"hello", 0)
            image.flush()
"""

from csi_rbd.engine import errors as _errors
from csi_rbd.engine.errors import *  # noqa: F403 (the same exception tree for every engine)
from csi_rbd.engine.native.image import RBD_LOCK_MODE_EXCLUSIVE, RBD_LOCK_MODE_SHARED, Image
from csi_rbd.engine.native.rados import DEFAULT_POOL, IoCtx, Rados
from csi_rbd.engine.native.rbd import RBD
from csi_rbd.engine.native.validate import (
    RBD_FEATURE_DEEP_FLATTEN,
    RBD_FEATURE_EXCLUSIVE_LOCK,
    RBD_FEATURE_FAST_DIFF,
    RBD_FEATURE_LAYERING,
    RBD_FEATURE_OBJECT_MAP,
    RBD_FEATURES_DEFAULT,
)

__all__ = [
    "DEFAULT_POOL",
    "RBD",
    "RBD_FEATURES_DEFAULT",
    "RBD_FEATURE_DEEP_FLATTEN",
    "RBD_FEATURE_EXCLUSIVE_LOCK",
    "RBD_FEATURE_FAST_DIFF",
    "RBD_FEATURE_LAYERING",
    "RBD_FEATURE_OBJECT_MAP",
    "RBD_LOCK_MODE_EXCLUSIVE",
    "RBD_LOCK_MODE_SHARED",
    "Image",
    "IoCtx",
    "Rados",
]
__all__ += _errors.__all__
