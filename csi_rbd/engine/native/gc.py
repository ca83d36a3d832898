"""Garbage collection of object versions nothing can read any more."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from csi_rbd.engine import errors
from csi_rbd.engine.native.objects import ObjectStore, Version

if TYPE_CHECKING:
    from csi_rbd.engine.native.rados import IoCtx


def newest(versions: Sequence[Version], visible: Callable[[int], bool]) -> Version | None:
    """The newest version whose epoch passes ``visible`` (versions oldest first)."""
    for version in reversed(versions):
        if visible(version.epoch):
            return version
    return None


def collect_garbage(ioctx: IoCtx, image_id: str) -> int:
    """Unlink versions that neither head nor any snapshot reads; returns how many.

    Versions newer than ``seq`` belong to an operation not yet committed and
    are left alone. An absent marker with nothing older below it means the
    same as no version at all, so it goes too.
    """
    try:
        record = ioctx.catalog.image_by_id(image_id)
    except errors.ImageNotFound:
        return 0
    snap_ids = [s.id for s in ioctx.catalog.snapshots(image_id, include_trashed=True)]
    store = ObjectStore(ioctx.image_directory(image_id))
    seq = record.seq
    removed = 0
    for objno, versions in store.scan().items():
        keep = {newest(versions, lambda e: e <= seq)}
        for snap_id in snap_ids:
            keep.add(newest(versions, lambda e, s=snap_id: e < s))  # type: ignore[misc]
        survivors = []
        for version in versions:
            if version.epoch <= seq and version not in keep:
                store.unlink(objno, version.epoch)
                removed += 1
            else:
                survivors.append(version)
        if survivors and survivors[0].absent and survivors[0].epoch <= seq:
            store.unlink(objno, survivors[0].epoch)
            removed += 1
    return removed
