"""The catalog of one pool: images, snapshots, parent links, metadata, omap.

Design
------
One SQLite database per pool (``<pool>/catalog.db``) in WAL mode with
``synchronous=FULL``: every metadata change is one ``BEGIN IMMEDIATE``
transaction, so after a crash each create, snapshot, clone, resize or flatten
either happened or did not. Object data never lives here; the catalog holds
what librbd keeps in an image header object:

* ``images``: name, size, order, features, the snapshot context ``seq``, the
  parent spec and ``overlap`` of a clone, and ``pending_seq`` for a
  multi-object operation (rollback, shrink) that has not committed yet.
* ``epochs``: every value ``seq`` ever took for an image. Object versions are
  tagged with the epoch they were written in, so these are the only tags a
  lookup has to probe.
  An image moved to the trash keeps its row under the name ``trash/<id>``
  (no user name has a '/') with its old name in ``trashed_name``.
* ``snapshots``: id, name, size and the parent spec at snapshot time. A
  snapshot removed while clones still use it is *trashed* (clone v2): hidden
  from listings, kept until its last child goes.
* ``children``: in the parent's pool, one row per (parent snapshot, child).
* ``metadata`` and ``omap``: image key/values, and named key/value objects
  (what the CSI name journal is built on, like RADOS omap in ceph-csi).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from csi_rbd.engine import errors

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    obj_order INTEGER NOT NULL,
    features INTEGER NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0,
    pending_seq INTEGER,
    parent_pool TEXT,
    parent_image TEXT,
    parent_snap INTEGER,
    overlap INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    trashed_name TEXT
);
CREATE TABLE IF NOT EXISTS epochs (
    image_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (image_id, seq)
);
CREATE TABLE IF NOT EXISTS snapshots (
    image_id TEXT NOT NULL,
    id INTEGER NOT NULL,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    protected INTEGER NOT NULL DEFAULT 0,
    trashed INTEGER NOT NULL DEFAULT 0,
    parent_pool TEXT,
    parent_image TEXT,
    parent_snap INTEGER,
    overlap INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    PRIMARY KEY (image_id, id)
);
CREATE UNIQUE INDEX IF NOT EXISTS live_snapshot_names
    ON snapshots (image_id, name) WHERE trashed = 0;
CREATE TABLE IF NOT EXISTS children (
    parent_image TEXT NOT NULL,
    parent_snap INTEGER NOT NULL,
    child_pool TEXT NOT NULL,
    child_image TEXT NOT NULL,
    pending_pid INTEGER,
    PRIMARY KEY (parent_image, parent_snap, child_pool, child_image)
);
CREATE INDEX IF NOT EXISTS children_by_child ON children (child_pool, child_image);
CREATE TABLE IF NOT EXISTS metadata (
    image_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (image_id, key)
);
CREATE TABLE IF NOT EXISTS omap (
    object TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (object, key)
);
"""


@dataclass(frozen=True)
class ParentSpec:
    """Where a clone reads through to: a snapshot of an image in some pool."""

    pool: str
    image_id: str
    snap_id: int


@dataclass(frozen=True)
class ImageRecord:
    id: str
    name: str
    size: int
    order: int
    features: int
    seq: int
    pending_seq: int | None
    parent: ParentSpec | None
    overlap: int
    created: float
    trashed_name: str | None = None

    @property
    def trashed(self) -> bool:
        return self.trashed_name is not None


@dataclass(frozen=True)
class SnapshotRecord:
    image_id: str
    id: int
    name: str
    size: int
    protected: bool
    trashed: bool
    parent: ParentSpec | None
    overlap: int
    created: float


def _parent(row: sqlite3.Row) -> ParentSpec | None:
    if row["parent_pool"] is None:
        return None
    return ParentSpec(row["parent_pool"], row["parent_image"], row["parent_snap"])


def image_from_row(row: sqlite3.Row) -> ImageRecord:
    return ImageRecord(
        id=row["id"],
        name=row["name"],
        size=row["size"],
        order=row["obj_order"],
        features=row["features"],
        seq=row["seq"],
        pending_seq=row["pending_seq"],
        parent=_parent(row),
        overlap=row["overlap"],
        created=row["created"],
        trashed_name=row["trashed_name"],
    )


def snapshot_from_row(row: sqlite3.Row) -> SnapshotRecord:
    return SnapshotRecord(
        image_id=row["image_id"],
        id=row["id"],
        name=row["name"],
        size=row["size"],
        protected=bool(row["protected"]),
        trashed=bool(row["trashed"]),
        parent=_parent(row),
        overlap=row["overlap"],
        created=row["created"],
    )


# Columns added after a table first shipped: (table, column, declaration).
_ADDED_COLUMNS = (
    ("images", "trashed_name", "TEXT"),
    ("children", "pending_pid", "INTEGER"),
)


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a catalog made by an older version up to the current schema."""
    for table, column, declaration in _ADDED_COLUMNS:
        present = {row["name"] for row in db.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")


class Catalog:
    """A pool's catalog; one connection shared by the threads of a process."""

    def __init__(self, path: Path, busy_timeout: float = 30.0) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
        self._db.row_factory = sqlite3.Row
        # Switching to WAL takes a lock that the busy timeout does not cover:
        # processes opening a new pool at the same moment retry.
        deadline = time.monotonic() + busy_timeout
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise errors.ImageBusy(f"catalog {path} is locked: {exc}") from exc
                time.sleep(0.01)
        self._db.execute("PRAGMA synchronous=FULL")
        with self.transaction() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            _migrate(db)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic change: BEGIN IMMEDIATE ... COMMIT, rolled back on error."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise errors.ImageBusy(f"catalog {self.path} is locked: {exc}") from exc
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """A consistent read of several statements."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("COMMIT")

    # -- images -------------------------------------------------------------
    def image_by_id(self, image_id: str, db: sqlite3.Connection | None = None) -> ImageRecord:
        with self._lock:
            row = (
                (db or self._db)
                .execute("SELECT * FROM images WHERE id = ?", (image_id,))
                .fetchone()
            )
        if row is None:
            raise errors.ImageNotFound(f"image id {image_id} not found")
        return image_from_row(row)

    def image_by_name(self, name: str, db: sqlite3.Connection | None = None) -> ImageRecord:
        with self._lock:
            row = (
                (db or self._db).execute("SELECT * FROM images WHERE name = ?", (name,)).fetchone()
            )
        if row is None:
            raise errors.ImageNotFound(f"image {name} not found")
        return image_from_row(row)

    def image_names(self) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name FROM images WHERE trashed_name IS NULL ORDER BY name"
            ).fetchall()
        return [r["name"] for r in rows]

    def trashed_images(self) -> list[ImageRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM images WHERE trashed_name IS NOT NULL ORDER BY id"
            ).fetchall()
        return [image_from_row(r) for r in rows]

    def image_ids(self) -> set[str]:
        with self._lock:
            return {r["id"] for r in self._db.execute("SELECT id FROM images").fetchall()}

    def epochs(self, image_id: str) -> list[int]:
        """All epochs of an image, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq FROM epochs WHERE image_id = ? ORDER BY seq DESC", (image_id,)
            ).fetchall()
        return [r["seq"] for r in rows]

    # -- snapshots ----------------------------------------------------------
    def snapshots(
        self, image_id: str, include_trashed: bool = False, db: sqlite3.Connection | None = None
    ) -> list[SnapshotRecord]:
        query = "SELECT * FROM snapshots WHERE image_id = ?"
        if not include_trashed:
            query += " AND trashed = 0"
        with self._lock:
            rows = (db or self._db).execute(query + " ORDER BY id", (image_id,)).fetchall()
        return [snapshot_from_row(r) for r in rows]

    def snapshot_ids(self, image_id: str) -> tuple[int, ...]:
        """Ids of every snapshot of an image, trashed ones included, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM snapshots WHERE image_id = ? ORDER BY id", (image_id,)
            ).fetchall()
        return tuple(r["id"] for r in rows)

    def snapshot_exists(self, image_id: str, name: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM snapshots WHERE image_id = ? AND name = ? AND trashed = 0",
                (image_id, name),
            ).fetchone()
        return row is not None

    def snapshot_by_name(self, image_id: str, name: str) -> SnapshotRecord:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM snapshots WHERE image_id = ? AND name = ? AND trashed = 0",
                (image_id, name),
            ).fetchone()
        if row is None:
            raise errors.ImageNotFound(f"snapshot {name} not found")
        return snapshot_from_row(row)

    def snapshot_by_id(self, image_id: str, snap_id: int) -> SnapshotRecord:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM snapshots WHERE image_id = ? AND id = ?", (image_id, snap_id)
            ).fetchone()
        if row is None:
            raise errors.ImageNotFound(f"snapshot id {snap_id} of image {image_id} not found")
        return snapshot_from_row(row)

    # -- children -----------------------------------------------------------
    def children(
        self, image_id: str, snap_id: int | None = None
    ) -> list[tuple[int, str, str, int | None]]:
        """(parent snap id, child pool, child image id, pending pid) links of a parent."""
        query = "SELECT * FROM children WHERE parent_image = ?"
        args: tuple[object, ...] = (image_id,)
        if snap_id is not None:
            query += " AND parent_snap = ?"
            args += (snap_id,)
        with self._lock:
            rows = self._db.execute(query, args).fetchall()
        return [
            (r["parent_snap"], r["child_pool"], r["child_image"], r["pending_pid"]) for r in rows
        ]

    def trashed_snapshots(self) -> list[tuple[str, int]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT image_id, id FROM snapshots WHERE trashed = 1 ORDER BY image_id, id"
            ).fetchall()
        return [(r["image_id"], r["id"]) for r in rows]

    # -- metadata -----------------------------------------------------------
    def metadata(self, image_id: str) -> dict[str, str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT key, value FROM metadata WHERE image_id = ? ORDER BY key", (image_id,)
            ).fetchall()
        return {r["key"]: r["value"] for r in rows}
