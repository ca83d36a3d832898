"""Parent/child links between clones and the snapshots they read through to.

Design
------
A clone names its parent snapshot in its own row (and each of its snapshots
keeps the parent it had when taken). The parent's pool keeps the reverse
link, one ``children`` row per (parent snapshot, child image), so a parent
can list its clones and refuse to lose a snapshot they need.

A clone in the parent's pool is created in one transaction with its link. A
clone in another pool spans two catalogs: the link is written first, then the
child; a crash in between leaves a link to a child that does not exist, which
:func:`live_children` ignores and drops. A snapshot removed while it has
children is trashed (clone format 2) and purged by :func:`release_parent`
when its last child stops referring to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from csi_rbd.engine import errors
from csi_rbd.engine.native import gc
from csi_rbd.engine.native.catalog import ImageRecord, ParentSpec
from csi_rbd.engine.native.header import ImageHeader
from csi_rbd.engine.native.objects import ObjectStore

if TYPE_CHECKING:
    from csi_rbd.engine.native.rados import IoCtx, Rados


def live_children(ioctx: IoCtx, image_id: str, snap_id: int | None) -> list[tuple[str, str]]:
    """(child pool, child image id) of existing children; stale links are dropped."""
    found: list[tuple[str, str]] = []
    for parent_snap, child_pool, child_id in ioctx.catalog.children(image_id, snap_id):
        if _child_exists(ioctx.rados, child_pool, child_id):
            found.append((child_pool, child_id))
        else:
            with ioctx.catalog.transaction() as db:
                db.execute(
                    "DELETE FROM children WHERE parent_image = ? AND parent_snap = ? "
                    "AND child_pool = ? AND child_image = ?",
                    (image_id, parent_snap, child_pool, child_id),
                )
    return found


def _child_exists(rados: Rados, pool: str, image_id: str) -> bool:
    try:
        rados.open_ioctx(pool).catalog.image_by_id(image_id)
    except (errors.ImageNotFound, errors.ObjectNotFound):
        return False
    return True


def references(child: IoCtx, child_id: str) -> set[ParentSpec]:
    """Every parent snapshot the child's head or any of its snapshots reads through to."""
    specs: set[ParentSpec] = set()
    try:
        record = child.catalog.image_by_id(child_id)
    except errors.ImageNotFound:
        return specs
    if record.parent is not None:
        specs.add(record.parent)
    for snap in child.catalog.snapshots(child_id, include_trashed=True):
        if snap.parent is not None:
            specs.add(snap.parent)
    return specs


def release_parent(child: IoCtx, child_id: str, parent: ParentSpec) -> None:
    """Drop the link to ``parent`` if the child no longer refers to it at all."""
    if parent in references(child, child_id):
        return
    try:
        parent_ioctx = child.rados.open_ioctx(parent.pool)
    except errors.ObjectNotFound:
        return
    with parent_ioctx.catalog.transaction() as db:
        db.execute(
            "DELETE FROM children WHERE parent_image = ? AND parent_snap = ? "
            "AND child_pool = ? AND child_image = ?",
            (parent.image_id, parent.snap_id, child.name, child_id),
        )
    purge_trashed_snapshot(parent_ioctx, parent.image_id, parent.snap_id)


def purge_trashed_snapshot(ioctx: IoCtx, image_id: str, snap_id: int) -> None:
    """Remove a trashed snapshot for good once no child needs it."""
    try:
        snap = ioctx.catalog.snapshot_by_id(image_id, snap_id)
    except errors.ImageNotFound:
        return
    if not snap.trashed or live_children(ioctx, image_id, snap_id):
        return
    with ioctx.catalog.transaction() as db:
        db.execute("DELETE FROM snapshots WHERE image_id = ? AND id = ?", (image_id, snap_id))
    gc.collect_garbage(ioctx, image_id)
    if snap.parent is not None:
        release_parent(ioctx, image_id, snap.parent)
    purge_trashed_image(ioctx, image_id)


def purge_trashed_image(ioctx: IoCtx, image_id: str) -> bool:
    """Remove a trashed image whose snapshots no clone needs; True if it is gone."""
    try:
        record = ioctx.catalog.image_by_id(image_id)
    except errors.ImageNotFound:
        return True
    if not record.trashed:
        return False
    snaps = ioctx.catalog.snapshots(image_id, include_trashed=True)
    if any(live_children(ioctx, image_id, s.id) for s in snaps):
        return False
    remove_image(ioctx, record)
    return True


@contextmanager
def write_locked(ioctx: IoCtx, record: ImageRecord) -> Iterator[None]:
    """Hold the image's write lock for a block; ImageBusy if a writer has it."""
    store = ObjectStore(ioctx.image_directory(record.id))
    store.ensure_directory()
    header = ImageHeader(store.directory / "header", ioctx.rados.lock_timeout)
    try:
        if not header.try_acquire_write_lock():
            raise errors.ImageBusy(f"image {record.name} is open for writing elsewhere")
        yield
    finally:
        header.close()


def remove_image(ioctx: IoCtx, record: ImageRecord) -> None:
    """Delete an image's rows and objects, then let go of its parents."""
    snaps = ioctx.catalog.snapshots(record.id, include_trashed=True)
    with write_locked(ioctx, record), ioctx.catalog.transaction() as db:
        for table, column in (
            ("images", "id"),
            ("epochs", "image_id"),
            ("snapshots", "image_id"),
            ("metadata", "image_id"),
            ("children", "parent_image"),
        ):
            db.execute(f"DELETE FROM {table} WHERE {column} = ?", (record.id,))
    ObjectStore(ioctx.image_directory(record.id)).remove_all()
    for parent in {record.parent, *(s.parent for s in snaps)} - {None}:
        assert parent is not None
        release_parent(ioctx, record.id, parent)
