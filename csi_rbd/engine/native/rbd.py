"""Image management of the native engine (python-rbd's ``rbd.RBD`` shape)."""

from __future__ import annotations

import builtins
import os
import secrets
import sqlite3
import time
from typing import Any

from csi_rbd.engine import errors
from csi_rbd.engine.native import layering, validate
from csi_rbd.engine.native.catalog import ParentSpec
from csi_rbd.engine.native.rados import IoCtx

_INSERT_IMAGE = (
    "INSERT INTO images (id, name, size, obj_order, features, seq, parent_pool, parent_image, "
    "parent_snap, overlap, created) VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?)"
)


def _new_image_id() -> str:
    return secrets.token_hex(6)


def _insert_image(
    db: sqlite3.Connection,
    image_id: str,
    name: str,
    size: int,
    order: int,
    features: int,
    parent: ParentSpec | None = None,
    overlap: int = 0,
) -> None:
    try:
        db.execute(
            _INSERT_IMAGE,
            (
                image_id,
                name,
                size,
                order,
                features,
                parent.pool if parent else None,
                parent.image_id if parent else None,
                parent.snap_id if parent else None,
                overlap,
                time.time(),
            ),
        )
    except sqlite3.IntegrityError as exc:
        raise errors.ImageExists(f"image {name} already exists") from exc
    db.execute("INSERT INTO epochs (image_id, seq) VALUES (?, 0)", (image_id,))


class RBD:
    """Creates, lists, renames, removes and clones images."""

    def version(self) -> tuple[int, int, int]:
        return (1, 18, 0)

    def create(
        self,
        ioctx: IoCtx,
        name: str,
        size: int,
        order: int | None = None,
        old_format: bool = False,
        features: int | None = None,
        stripe_unit: int | None = None,
        stripe_count: int | None = None,
        data_pool: str | None = None,
    ) -> None:
        """Create a thin image; nothing is allocated until it is written."""
        validate.name(name, "image")
        size = validate.size(size)
        order = validate.order(order)
        features = validate.features(features)
        if old_format:
            raise errors.InvalidArgument("format 1 images are not supported")
        if data_pool is not None or stripe_count not in (None, 0, 1):
            raise errors.InvalidArgument("data pools and fancy striping are not supported")
        with ioctx.catalog.transaction() as db:
            _insert_image(db, _new_image_id(), name, size, order, features)

    def list(self, ioctx: IoCtx) -> list[str]:
        return ioctx.catalog.image_names()

    def rename(self, ioctx: IoCtx, src: str, dest: str) -> None:
        validate.name(dest, "image")
        record = ioctx.catalog.image_by_name(validate.name(src, "image"))
        with ioctx.catalog.transaction() as db:
            try:
                db.execute("UPDATE images SET name = ? WHERE id = ?", (dest, record.id))
            except sqlite3.IntegrityError as exc:
                raise errors.ImageExists(f"image {dest} already exists") from exc

    def remove(self, ioctx: IoCtx, name: str, on_progress: Any = None) -> None:
        """Remove an image with no snapshots that nobody is writing."""
        record = ioctx.catalog.image_by_name(validate.name(name, "image"))
        snaps = ioctx.catalog.snapshots(record.id, include_trashed=True)
        if any(not s.trashed for s in snaps):
            raise errors.ImageHasSnapshots(f"image {name} has snapshots; remove them first")
        if any(layering.has_live_children(ioctx, record.id, s.id) for s in snaps):
            raise errors.ImageBusy(
                f"image {name} has clones; flatten or remove them first, or move it to the trash"
            )
        layering.remove_image(ioctx, record)

    def trash_move(self, ioctx: IoCtx, name: str, delay: int = 0) -> None:
        """Hide an image under the trash; it is removed once its last clone goes."""
        record = ioctx.catalog.image_by_name(validate.name(name, "image"))
        with layering.write_locked(ioctx, record), ioctx.catalog.transaction() as db:
            db.execute(
                "UPDATE images SET name = ?, trashed_name = ? WHERE id = ?",
                (f"trash/{record.id}", record.name, record.id),
            )
        layering.purge_trashed_image(ioctx, record.id)

    def trash_list(self, ioctx: IoCtx) -> builtins.list[dict[str, Any]]:
        return [{"id": r.id, "name": r.trashed_name} for r in ioctx.catalog.trashed_images()]

    def trash_remove(self, ioctx: IoCtx, image_id: str, force: bool = False) -> None:
        """Remove a trashed image now; ImageBusy while clones still need it."""
        record = ioctx.catalog.image_by_id(image_id)
        if not record.trashed:
            raise errors.InvalidArgument(f"image {record.name} is not in the trash")
        if not layering.purge_trashed_image(ioctx, image_id):
            raise errors.ImageBusy(f"image {record.trashed_name} still has clones")

    def clone(
        self,
        p_ioctx: IoCtx,
        p_name: str,
        p_snapname: str,
        c_ioctx: IoCtx,
        c_name: str,
        features: int | None = None,
        order: int | None = None,
        stripe_unit: int | None = None,
        stripe_count: int | None = None,
        data_pool: str | None = None,
        clone_format: int | None = None,
    ) -> None:
        """A copy-on-write child of a snapshot, in O(1) whatever the parent's size."""
        validate.name(c_name, "image")
        parent = p_ioctx.catalog.image_by_name(validate.name(p_name, "image"))
        snap = p_ioctx.catalog.snapshot_by_name(parent.id, validate.name(p_snapname, "snapshot"))
        features = validate.features(parent.features if features is None else features)
        if not features & validate.RBD_FEATURE_LAYERING:
            raise errors.InvalidArgument("a clone needs the layering feature")
        order = validate.order(order or parent.order)
        spec = ParentSpec(p_ioctx.name, parent.id, snap.id)
        child_id = _new_image_id()
        link = (
            "INSERT INTO children (parent_image, parent_snap, child_pool, child_image, "
            "pending_pid) VALUES (?, ?, ?, ?, ?)"
        )
        if p_ioctx.catalog is c_ioctx.catalog:
            with c_ioctx.catalog.transaction() as db:
                self._check_parent_snapshot(db, spec)
                db.execute(link, (parent.id, snap.id, c_ioctx.name, child_id, None))
                _insert_image(db, child_id, c_name, snap.size, order, features, spec, snap.size)
            return
        # Two catalogs: a pending link first (see layering), then the child.
        key = (parent.id, snap.id, c_ioctx.name, child_id)
        with p_ioctx.catalog.transaction() as db:
            self._check_parent_snapshot(db, spec)
            db.execute(link, (*key, os.getpid()))
        try:
            with c_ioctx.catalog.transaction() as db:
                _insert_image(db, child_id, c_name, snap.size, order, features, spec, snap.size)
        except BaseException:
            with p_ioctx.catalog.transaction() as db:
                db.execute(layering.DELETE_LINK, key)
            raise
        with p_ioctx.catalog.transaction() as db:
            db.execute(
                "UPDATE children SET pending_pid = NULL WHERE parent_image = ? AND "
                "parent_snap = ? AND child_pool = ? AND child_image = ?",
                key,
            )

    @staticmethod
    def _check_parent_snapshot(db: sqlite3.Connection, spec: ParentSpec) -> None:
        row = db.execute(
            "SELECT trashed FROM snapshots WHERE image_id = ? AND id = ?",
            (spec.image_id, spec.snap_id),
        ).fetchone()
        if row is None or row["trashed"]:
            raise errors.ImageNotFound("the parent snapshot was removed")
