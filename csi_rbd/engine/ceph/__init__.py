"""The Ceph engine: librbd (Debian's python3-rbd) behind the native engine's API.

The public API mirrors :mod:`csi_rbd.engine.native` (python-rbd's shapes, the
exception tree of :mod:`csi_rbd.engine.errors`), so the control plane and the
engine tests drive either one the same way::

    from csi_rbd.engine.ceph import CephEngine

    engine = CephEngine("ceph-a", ["mon-a.example:3300"], default_pool="rbd")
    with engine.session({"userID": "csi", "userKey": "AQ..."}) as cluster:
        ioctx = cluster.open_ioctx("rbd")
        engine.rbd.create(ioctx, "disk", 10 << 30)
        with engine.open_image(ioctx, "disk") as image:
            image.write(b"hello", 0)

Importing this package never needs the bindings; the first connection loads
them (see :mod:`.bindings`) and raises ``BindingsUnavailable`` (an
ImportError naming the Debian packages) when they are missing.

Modules: :mod:`.bindings` (importing python3-rados/python3-rbd into a venv),
:mod:`.translate` (the one exception table), :mod:`.client` (Rados, IoCtx
with omap, RBD, Image wrappers; the trash), :mod:`.engine` (sessions,
credentials, capacity, probe).

Differences from the native engine
----------------------------------
Smoothed over by the wrappers (the driver relies on the native behaviour):

* trash: ``trash_move`` makes librbd remove the image by itself once its
  last clone is gone (librbd's own ``trash_move`` keeps it for ever); images
  that still have user snapshots are purged by this engine instead;
* removing an image whose only snapshots are trashed ones with clones is
  ``ImageBusy`` (librbd: ENOTEMPTY);
* discard always zeroes (``rbd_skip_partial_discard = false``);
* names with ``/``, ``@`` or NUL and negative sizes are refused;
* snapshot handles are read-only; ``rollback_to_snap`` works from any
  read-write handle; a write refused for someone else's exclusive lock is
  ``ImageBusy``; a clone into smaller objects than its parent's says why;
* ``trash_list`` reads the trash itself (python-rbd 16.2 fails on
  "user_parent" entries); an empty whole-object diff returns (librbd 16.2
  aborts the process).

Left as librbd does it (tested in ``tests/ceph``):

* an image open read-write anywhere (a watcher) cannot be removed;
* without ``lock_acquire`` the exclusive lock moves between writers on
  request; with it, a second writer is ``ImageBusy`` (as natively);
* read-only handles keep the size and parent they opened with; open clones
  keep their parent's old name after a rename; handles opened before a deep
  flatten of their (grand)parent may read wrong data once the old parent
  snapshot is gone;
* no clones of a snapshot of size 0, nor into smaller objects than the
  parent's; unprotecting a snapshot with (clone v2) clones is allowed;
* a clone shrunk to 0 bytes reports no parent while its parent still lists it;
* free space comes from ceph-mgr statistics (0 without a mgr or without the
  driver's own identity; see :mod:`.engine`).
"""

from csi_rbd.engine import errors as _errors
from csi_rbd.engine.ceph.bindings import BindingsUnavailable
from csi_rbd.engine.ceph.client import (
    RBD,
    RBD_FEATURE_DEEP_FLATTEN,
    RBD_FEATURE_EXCLUSIVE_LOCK,
    RBD_FEATURE_FAST_DIFF,
    RBD_FEATURE_LAYERING,
    RBD_FEATURE_OBJECT_MAP,
    RBD_FEATURES_DEFAULT,
    RBD_LOCK_MODE_EXCLUSIVE,
    RBD_LOCK_MODE_SHARED,
    Image,
    IoCtx,
    Rados,
    connect,
)
from csi_rbd.engine.ceph.engine import CephEngine
from csi_rbd.engine.errors import *  # noqa: F403 (the same exception tree for every engine)

__all__ = [
    "RBD",
    "RBD_FEATURES_DEFAULT",
    "RBD_FEATURE_DEEP_FLATTEN",
    "RBD_FEATURE_EXCLUSIVE_LOCK",
    "RBD_FEATURE_FAST_DIFF",
    "RBD_FEATURE_LAYERING",
    "RBD_FEATURE_OBJECT_MAP",
    "RBD_LOCK_MODE_EXCLUSIVE",
    "RBD_LOCK_MODE_SHARED",
    "BindingsUnavailable",
    "CephEngine",
    "Image",
    "IoCtx",
    "Rados",
    "connect",
]
__all__ += _errors.__all__
