"""Garbage collection of object versions nothing can read any more."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from csi_rbd.engine import errors
from csi_rbd.engine.native.header import ImageHeader
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

    Candidates are chosen without holding anything; they are unlinked inside
    the image's exclusive barrier and only if the file is still the one that
    was chosen (same inode): a writer may have put a new version under the
    same name meanwhile (replacing an absent marker), and that one must stay.
    """
    try:
        record = ioctx.catalog.image_by_id(image_id)
    except errors.ImageNotFound:
        return 0
    snap_ids = ioctx.catalog.snapshot_ids(image_id)
    store = ObjectStore(ioctx.image_directory(image_id))
    seq = record.seq
    doomed: list[tuple[int, int, int]] = []
    for objno, found in store.scan_with_inodes().items():
        versions = [version for version, _ in found]
        inode = {version.epoch: ino for version, ino in found}
        keep = {newest(versions, lambda e: e <= seq)}
        for snap_id in snap_ids:
            keep.add(newest(versions, lambda e, s=snap_id: e < s))  # type: ignore[misc]
        survivors = []
        for version in versions:
            if version.epoch <= seq and version not in keep:
                doomed.append((objno, version.epoch, inode[version.epoch]))
            else:
                survivors.append(version)
        if survivors and survivors[0].absent and survivors[0].epoch <= seq:
            doomed.append((objno, survivors[0].epoch, inode[survivors[0].epoch]))
    if not doomed:
        return 0
    header = ImageHeader(store.directory / "header", ioctx.rados.lock_timeout)
    try:
        with header.exclusive_section():
            return sum(store.unlink_if_same(objno, epoch, ino) for objno, epoch, ino in doomed)
    finally:
        header.close()
