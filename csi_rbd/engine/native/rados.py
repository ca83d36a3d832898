"""Cluster and pool handles of the native engine (python-rados' shape).

A data directory is the native engine's "cluster": one folder per pool, each
with its catalog and one folder per image::

    <data_dir>/.fsid                     the cluster's identity (a UUID)
    <data_dir>/<pool>/catalog.db         images, snapshots, links, omap
    <data_dir>/<pool>/images/<image-id>/ header + object versions
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
import uuid
from pathlib import Path
from types import TracebackType

from csi_rbd.engine import errors
from csi_rbd.engine.native import layering, validate
from csi_rbd.engine.native.catalog import Catalog

DEFAULT_POOL = "rbd"
_CATALOG = "catalog.db"
_FSID = ".fsid"  # pool names cannot start with a dot


class Rados:
    """A connection to a native data directory, shaped like ``rados.Rados``."""

    def __init__(self, data_dir: str | os.PathLike[str], lock_timeout: float = 30.0) -> None:
        self.data_dir = Path(data_dir)
        self.lock_timeout = lock_timeout
        self._catalogs: dict[str, Catalog] = {}
        self._swept: set[str] = set()
        self._lock = threading.Lock()
        self.state = "configuring"

    def connect(self, timeout: int = 0) -> None:
        """Open the data directory; a new one gets the pool ``rbd``, as Ceph's default."""
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(self.data_dir))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fsid = self.data_dir / _FSID
        self.state = "connected"
        if fsid.exists():
            return
        # A new data directory: the default pool first, the identity last, so a
        # crash in between leaves a directory the next connect completes.
        with contextlib.suppress(errors.ObjectExists):
            self.create_pool(DEFAULT_POOL)
        temp = self.data_dir / f"{_FSID}.tmp{os.getpid()}"
        temp.write_text(str(uuid.uuid4()) + "\n")
        with open(temp) as handle:
            os.fsync(handle.fileno())
        try:
            os.link(temp, fsid)  # never replaces the identity another process wrote
        except FileExistsError:
            pass
        finally:
            os.unlink(temp)

    def shutdown(self) -> None:
        with self._lock:
            for catalog in self._catalogs.values():
                catalog.close()
            self._catalogs.clear()
        self.state = "shutdown"

    def __enter__(self) -> Rados:
        self.connect()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shutdown()

    def _require_connected(self) -> None:
        if self.state != "connected":
            raise errors.ConnectionShutdown("not connected to the data directory")

    def get_fsid(self) -> str:
        self._require_connected()
        return (self.data_dir / _FSID).read_text().strip()

    # -- pools ------------------------------------------------------------------
    def pool_directory(self, pool: str) -> Path:
        return self.data_dir / pool

    def list_pools(self) -> list[str]:
        self._require_connected()
        return sorted(p.name for p in self.data_dir.iterdir() if (p / _CATALOG).is_file())

    def pool_exists(self, pool: str) -> bool:
        self._require_connected()
        return (self.pool_directory(validate.pool_name(pool)) / _CATALOG).is_file()

    def create_pool(self, pool: str) -> None:
        self._require_connected()
        directory = self.pool_directory(validate.pool_name(pool))
        if (directory / _CATALOG).is_file():
            raise errors.ObjectExists(f"pool {pool} already exists")
        (directory / "images").mkdir(parents=True, exist_ok=True)
        # The catalog file appears last: a pool exists once it does.
        self._catalog(pool, create=True)

    def delete_pool(self, pool: str) -> None:
        self._require_connected()
        if not self.pool_exists(pool):
            raise errors.ObjectNotFound(f"pool {pool} does not exist")
        with self._lock:
            catalog = self._catalogs.pop(pool, None)
        if catalog is not None:
            catalog.close()
        directory = self.pool_directory(pool)
        os.unlink(directory / _CATALOG)  # no longer a pool, whatever the rest does
        shutil.rmtree(directory, ignore_errors=True)

    def open_ioctx(self, pool: str) -> IoCtx:
        self._require_connected()
        if not self.pool_exists(pool):
            raise errors.ObjectNotFound(f"pool {pool} does not exist")
        ioctx = IoCtx(self, pool, self._catalog(pool))
        with self._lock:
            first = pool not in self._swept
            self._swept.add(pool)
        if first:
            _remove_orphan_image_directories(self.pool_directory(pool) / "images", ioctx.catalog)
            layering.sweep(ioctx)
        return ioctx

    def _catalog(self, pool: str, create: bool = False) -> Catalog:
        with self._lock:
            catalog = self._catalogs.get(pool)
            if catalog is None:
                path = self.pool_directory(pool) / _CATALOG
                if not create and not path.is_file():
                    raise errors.ObjectNotFound(f"pool {pool} does not exist")
                catalog = Catalog(path, busy_timeout=self.lock_timeout)
                self._catalogs[pool] = catalog
            return catalog


def _remove_orphan_image_directories(images: Path, catalog: Catalog) -> None:
    """Delete the folders of images whose removal was interrupted.

    Folders are listed before the catalog is read: an image's folder is only
    ever made after its row committed, so a folder without a row is garbage.
    """
    try:
        folders = [entry for entry in os.scandir(images) if entry.is_dir()]
    except FileNotFoundError:
        return
    known = catalog.image_ids()
    for folder in folders:
        if folder.name not in known:
            shutil.rmtree(folder.path, ignore_errors=True)


class IoCtx:
    """A pool handle, shaped like ``rados.Ioctx``."""

    def __init__(self, rados: Rados, pool: str, catalog: Catalog) -> None:
        self.rados = rados
        self.name = pool
        self.catalog = catalog

    def get_pool_name(self) -> str:
        return self.name

    def image_directory(self, image_id: str) -> Path:
        return self.rados.pool_directory(self.name) / "images" / image_id

    def close(self) -> None:
        """Nothing to release: catalogs belong to the Rados handle."""

    def __enter__(self) -> IoCtx:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- omap: named key/value objects, each call atomic ------------------------
    def omap_get(self, obj: str, keys: list[str] | None = None) -> dict[str, bytes]:
        with self.catalog.reading() as db:
            if keys is None:
                rows = db.execute(
                    "SELECT key, value FROM omap WHERE object = ? ORDER BY key", (obj,)
                ).fetchall()
            else:
                marks = ",".join("?" * len(keys))
                rows = db.execute(
                    f"SELECT key, value FROM omap WHERE object = ? AND key IN ({marks})",
                    (obj, *keys),
                ).fetchall()
        return {r["key"]: bytes(r["value"]) for r in rows}

    def omap_set(self, obj: str, values: dict[str, bytes], exclusive: bool = False) -> None:
        """Set keys; with ``exclusive``, fail with ObjectExists if any is already set."""
        with self.catalog.transaction() as db:
            if exclusive:
                for key in values:
                    if db.execute(
                        "SELECT 1 FROM omap WHERE object = ? AND key = ?", (obj, key)
                    ).fetchone():
                        raise errors.ObjectExists(f"omap key {key!r} of {obj!r} exists")
            db.executemany(
                "INSERT OR REPLACE INTO omap (object, key, value) VALUES (?, ?, ?)",
                [(obj, k, v) for k, v in values.items()],
            )

    def omap_remove(self, obj: str, keys: list[str] | None = None) -> None:
        """Remove some keys, or the whole object when ``keys`` is None."""
        with self.catalog.transaction() as db:
            if keys is None:
                db.execute("DELETE FROM omap WHERE object = ?", (obj,))
            else:
                db.executemany(
                    "DELETE FROM omap WHERE object = ? AND key = ?", [(obj, k) for k in keys]
                )
