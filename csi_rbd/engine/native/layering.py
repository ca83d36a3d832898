"""Parent/child links between clones and the snapshots they read through to.

Design
------
A clone names its parent snapshot in its own row (and each of its snapshots
keeps the parent it had when taken). The parent's pool keeps the reverse
link, one ``children`` row per (parent snapshot, child image), so a parent
can list its clones and refuse to lose a snapshot they need.

A link is *live* when its child exists and still refers to that snapshot
(head or any of the child's snapshots). A link that is not live is stale (a
crash between a child's change and the link's removal leaves one) and is
dropped wherever links are read; a trashed snapshot whose links are all gone
is then purged. Pools sweep such leftovers when a process first opens them.

A clone in the parent's pool is created in one transaction with its link. A
clone in another pool spans two catalogs: the link is written first, marked
*pending* with the creating process's pid, then the child, then the mark is
cleared. A pending link of a live process counts as live (its child may not
be committed yet); one whose process died is settled by looking at the child.

A snapshot is removed or trashed in one transaction that counts its links,
so a clone committed at the same moment either is counted or sees the
snapshot trashed and fails.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from csi_rbd.engine import errors
from csi_rbd.engine.native import gc
from csi_rbd.engine.native.catalog import ImageRecord, ParentSpec
from csi_rbd.engine.native.header import ImageHeader
from csi_rbd.engine.native.objects import ObjectStore, process_alive

if TYPE_CHECKING:
    from csi_rbd.engine.native.rados import IoCtx

DELETE_LINK = (
    "DELETE FROM children WHERE parent_image = ? AND parent_snap = ? "
    "AND child_pool = ? AND child_image = ?"
)


def live_children(ioctx: IoCtx, image_id: str, snap_id: int | None) -> list[tuple[str, str]]:
    """(child pool, child image id) of live links; stale ones are dropped."""
    return list(_live_links(ioctx, image_id, snap_id))


def has_live_children(ioctx: IoCtx, image_id: str, snap_id: int | None) -> bool:
    """Whether any link is live; stops at the first one (purges ask this often)."""
    return next(_live_links(ioctx, image_id, snap_id), None) is not None


def _live_links(ioctx: IoCtx, image_id: str, snap_id: int | None) -> Iterator[tuple[str, str]]:
    for parent_snap, child_pool, child_id, pending_pid in ioctx.catalog.children(image_id, snap_id):
        key = (image_id, parent_snap, child_pool, child_id)
        if pending_pid is not None and process_alive(pending_pid):
            yield child_pool, child_id
            continue
        spec = ParentSpec(ioctx.name, image_id, parent_snap)
        try:
            child_ioctx: IoCtx | None = ioctx.rados.open_ioctx(child_pool)
        except errors.ObjectNotFound:
            child_ioctx = None
        if spec in references(child_ioctx, child_id):
            if pending_pid is not None:
                with ioctx.catalog.transaction() as db:
                    db.execute(
                        "UPDATE children SET pending_pid = NULL WHERE parent_image = ? AND "
                        "parent_snap = ? AND child_pool = ? AND child_image = ?",
                        key,
                    )
            yield child_pool, child_id
            continue
        with ioctx.catalog.transaction() as db:
            db.execute(DELETE_LINK, key)


def references(child: IoCtx | None, child_id: str) -> set[ParentSpec]:
    """Every parent snapshot the child's head or any of its snapshots reads through to."""
    specs: set[ParentSpec] = set()
    if child is None:
        return specs
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


def drop_unreferenced_links(db: sqlite3.Connection, pool: str, child_id: str) -> None:
    """Inside a child's transaction: drop its links in the same pool that it no longer uses.

    Links of parents in this pool live in the same catalog, so detaching and
    unlinking commit together; links in other pools wait for release_parent
    (or, after a crash, for the next reader or sweep).
    """
    used = {
        (row["parent_image"], row["parent_snap"])
        for row in db.execute(
            "SELECT parent_image, parent_snap FROM images WHERE id = ? AND parent_pool = ? "
            "UNION SELECT parent_image, parent_snap FROM snapshots "
            "WHERE image_id = ? AND parent_pool = ?",
            (child_id, pool, child_id, pool),
        )
    }
    for row in db.execute(
        "SELECT parent_image, parent_snap FROM children WHERE child_pool = ? AND child_image = ?",
        (pool, child_id),
    ).fetchall():
        if (row["parent_image"], row["parent_snap"]) not in used:
            db.execute(DELETE_LINK, (row["parent_image"], row["parent_snap"], pool, child_id))


def release_parent(child: IoCtx, child_id: str, parent: ParentSpec) -> None:
    """Drop the link to ``parent`` if the child no longer refers to it at all."""
    if parent in references(child, child_id):
        return
    try:
        parent_ioctx = child.rados.open_ioctx(parent.pool)
    except errors.ObjectNotFound:
        return
    with parent_ioctx.catalog.transaction() as db:
        db.execute(DELETE_LINK, (parent.image_id, parent.snap_id, child.name, child_id))
    purge_trashed_snapshot(parent_ioctx, parent.image_id, parent.snap_id)


def sweep(ioctx: IoCtx) -> None:
    """Finish what crashes left in a pool: purge trashed snapshots and images no clone needs."""
    for image_id, snap_id in ioctx.catalog.trashed_snapshots():
        purge_trashed_snapshot(ioctx, image_id, snap_id)
    for record in ioctx.catalog.trashed_images():
        purge_trashed_image(ioctx, record.id)


def purge_trashed_snapshot(ioctx: IoCtx, image_id: str, snap_id: int) -> None:
    """Remove a trashed snapshot for good once no child needs it; then maybe its image."""
    try:
        snap = ioctx.catalog.snapshot_by_id(image_id, snap_id)
    except errors.ImageNotFound:
        snap = None
    if snap is not None and snap.trashed and not has_live_children(ioctx, image_id, snap_id):
        store = ObjectStore(ioctx.image_directory(image_id))
        store.ensure_directory()
        header = ImageHeader(store.directory / "header", ioctx.rados.lock_timeout)
        try:
            with header.exclusive_section():
                header.bump_generation()  # open handles stop counting the snapshot
                with ioctx.catalog.transaction() as db:
                    db.execute(
                        "DELETE FROM snapshots WHERE image_id = ? AND id = ?", (image_id, snap_id)
                    )
        finally:
            header.close()
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
    if any(has_live_children(ioctx, image_id, s.id) for s in snaps):
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
        drop_unreferenced_links(db, ioctx.name, record.id)
    ObjectStore(ioctx.image_directory(record.id)).remove_all()
    for parent in {record.parent, *(s.parent for s in snaps)} - {None}:
        assert parent is not None
        release_parent(ioctx, record.id, parent)
