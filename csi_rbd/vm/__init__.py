"""Volumes as VM disks: QEMU's ``rbd:`` specs and ``-drive`` values.

:mod:`.rbd_spec` parses and formats ``rbd:pool/image[@snap][:opt=val...]``
exactly as QEMU reads it; :mod:`.drive` turns a volume and its cache and
discard modes into a ``-drive`` value (NBD for the native engine, ``rbd:``
for Ceph). The ``csi-rbd qemu drive`` command is in :mod:`csi_rbd.admin.qemu`.
"""

from csi_rbd.vm.drive import DiskSettings, Drive, DriveError, ceph_spec, nbd_drive, rbd_drive
from csi_rbd.vm.rbd_spec import RbdSpec, RbdSpecError, format_spec, parse

__all__ = [
    "DiskSettings",
    "Drive",
    "DriveError",
    "RbdSpec",
    "RbdSpecError",
    "ceph_spec",
    "format_spec",
    "nbd_drive",
    "parse",
    "rbd_drive",
]
