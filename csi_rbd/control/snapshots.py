"""Snapshots: separate images, so that they outlive the volume they were taken of.

Design
------
A CSI snapshot of volume V is the image ``csi-snap-<uuid>`` (in V's pool),
made in four idempotent steps, as ceph-csi does it:

1. snapshot ``csi-snap-<uuid>`` of V (a temporary);
2. clone it into the image ``csi-snap-<uuid>`` (O(1));
3. snapshot ``csi-snap`` inside that image (what restores clone from);
4. remove the temporary snapshot of V: clone format 2 keeps it, hidden,
   while the snapshot image needs it.

V can then be deleted (it moves to the trash while the snapshot image reads
through to it) and the snapshot stays usable; deleting the snapshot removes
its image, or trashes it while volumes restored from it still read it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from csi_rbd.control import images
from csi_rbd.control.errors import AlreadyExists, InvalidRequest, NotFound
from csi_rbd.control.journal import NameJournal, Reservation
from csi_rbd.control.volumes import SNAPSHOT_NAME, VolumeService
from csi_rbd.engine import errors
from csi_rbd.engine.base import Engine
from csi_rbd.ids import SNAPSHOT_PREFIX, ResourceId


@dataclass(frozen=True)
class Snapshot:
    snapshot_id: str
    source_volume_id: str
    size: int
    created: float
    ready: bool = True


class SnapshotService:
    def __init__(self, volumes: VolumeService) -> None:
        self.volumes = volumes

    def create(
        self,
        name: str,
        source_volume_id: str,
        parameters: Mapping[str, str],
        secrets: Mapping[str, str] | None,
    ) -> Snapshot:
        if not name:
            raise InvalidRequest("snapshot name is missing")
        if not source_volume_id:
            raise InvalidRequest("source volume ID is missing")
        for key in parameters:
            if not key.startswith("csi.storage.k8s.io/"):
                raise InvalidRequest(f"unknown snapshot parameter {key!r}")
        request = {"source_volume": source_volume_id}
        with self.volumes.locks.hold(f"snapshot-name:{name}", source_volume_id):
            done = self._already_cut(name, source_volume_id, request, secrets)
            if done is not None:
                return done  # even if the source volume is gone by now
            with self.volumes.open_volume(source_volume_id, secrets) as (
                engine,
                source,
                _,
                ioctx,
            ):
                journal = NameJournal(ioctx, "snapshot")
                reservation = journal.lookup(name)
                if reservation is not None and reservation.request != request:
                    raise AlreadyExists(
                        f"snapshot {name} exists for another source volume "
                        f"({reservation.request.get('source_volume')})"
                    )
                fresh = reservation is None
                if reservation is None:
                    try:
                        reservation = journal.reserve(name, request)
                    except errors.ObjectExists as exc:
                        raise AlreadyExists(f"snapshot {name} is being created") from exc
                rid = ResourceId(source.cluster, source.pool, reservation.uuid)
                try:
                    self._make(engine, ioctx, source.volume_image(), rid.snapshot_image())
                    return self._describe(engine, ioctx, rid, reservation)
                except BaseException:
                    if fresh:
                        self._remove(engine, ioctx, rid, source.volume_image())
                        with contextlib.suppress(Exception):
                            journal.release(reservation)
                    raise

    def _already_cut(
        self,
        name: str,
        source_volume_id: str,
        request: dict[str, str],
        secrets: Mapping[str, str] | None,
    ) -> Snapshot | None:
        """The snapshot, if one of this name was already cut from this source."""
        source = images.decode(source_volume_id, "volume")
        engine = self.volumes.engine(source.cluster)
        try:
            with images.pool(engine, source.pool, secrets) as (_, ioctx):
                reservation = NameJournal(ioctx, "snapshot").lookup(name)
                if reservation is None or reservation.request != request:
                    return None
                rid = ResourceId(source.cluster, source.pool, reservation.uuid)
                if not images.image_exists(engine, ioctx, rid.snapshot_image()):
                    return None
                with engine.open_image(ioctx, rid.snapshot_image(), read_only=True) as image:
                    if SNAPSHOT_NAME not in [s["name"] for s in image.list_snaps()]:
                        return None
                return self._describe(engine, ioctx, rid, reservation)
        except InvalidRequest:
            return None

    @staticmethod
    def _make(engine: Engine, ioctx: Any, volume_image: str, snap_image: str) -> None:
        temporary = snap_image
        if not images.image_exists(engine, ioctx, snap_image):
            with engine.open_image(ioctx, volume_image) as volume:
                if temporary not in [s["name"] for s in volume.list_snaps()]:
                    volume.create_snap(temporary)
            engine.rbd.clone(ioctx, volume_image, temporary, ioctx, snap_image)
        with engine.open_image(ioctx, snap_image) as image:
            if SNAPSHOT_NAME not in [s["name"] for s in image.list_snaps()]:
                image.create_snap(SNAPSHOT_NAME)
        with engine.open_image(ioctx, volume_image) as volume:
            if temporary in [s["name"] for s in volume.list_snaps()]:
                volume.remove_snap(temporary)

    @staticmethod
    def _remove(engine: Engine, ioctx: Any, rid: ResourceId, volume_image: str | None) -> None:
        """Remove the snapshot image (trashing what clones still need) and any temporary."""
        snap_image = rid.snapshot_image()
        with contextlib.suppress(errors.ImageNotFound):
            with engine.open_image(ioctx, snap_image) as image:
                if SNAPSHOT_NAME in [s["name"] for s in image.list_snaps()]:
                    image.remove_snap(SNAPSHOT_NAME)
            images.remove_or_trash(engine, ioctx, snap_image, f"snapshot {rid.encode()}")
        if volume_image is not None:
            with contextlib.suppress(errors.ImageNotFound):
                with engine.open_image(ioctx, volume_image) as volume:
                    if snap_image in [s["name"] for s in volume.list_snaps()]:
                        volume.remove_snap(snap_image)

    def _describe(
        self, engine: Engine, ioctx: Any, rid: ResourceId, reservation: Reservation
    ) -> Snapshot:
        with engine.open_image(ioctx, rid.snapshot_image(), read_only=True) as image:
            snap = next(s for s in image.list_snaps() if s["name"] == SNAPSHOT_NAME)
            created = image.get_snap_timestamp(int(snap["id"])).timestamp()
        return Snapshot(
            snapshot_id=rid.encode(),
            source_volume_id=str(reservation.request.get("source_volume", "")),
            size=int(snap["size"]),
            created=created,
        )

    def delete(self, snapshot_id: str, secrets: Mapping[str, str] | None) -> None:
        if not snapshot_id:
            raise InvalidRequest("snapshot ID is missing")
        with self.volumes.locks.hold(snapshot_id):
            try:
                rid = ResourceId.decode(snapshot_id)
                engine = self.volumes.engine(rid.cluster)
            except (ValueError, NotFound):
                return  # not a snapshot this driver could have made: nothing to delete
            try:
                with images.pool(engine, rid.pool, secrets) as (_, ioctx):
                    journal = NameJournal(ioctx, "snapshot")
                    reservation = journal.by_uuid(rid.uuid)
                    source_image = None
                    if reservation is not None:
                        with contextlib.suppress(NotFound):
                            source_image = images.decode(
                                str(reservation.request.get("source_volume", "")), "volume"
                            ).volume_image()
                    self._remove(engine, ioctx, rid, source_image)
                    if reservation is not None:
                        journal.release(reservation)
            except InvalidRequest:
                return  # the pool is gone, and the snapshot with it

    def get(self, snapshot_id: str, secrets: Mapping[str, str] | None = None) -> Snapshot:
        rid = images.decode(snapshot_id, "snapshot")
        engine = self.volumes.engine(rid.cluster)
        try:
            with images.pool(engine, rid.pool, secrets) as (_, ioctx):
                reservation = NameJournal(ioctx, "snapshot").by_uuid(rid.uuid)
                if reservation is None or not images.image_exists(
                    engine, ioctx, rid.snapshot_image()
                ):
                    raise NotFound(f"snapshot {snapshot_id} does not exist")
                return self._describe(engine, ioctx, rid, reservation)
        except InvalidRequest as exc:
            raise NotFound(f"snapshot {snapshot_id} does not exist: {exc}") from exc

    def list(self) -> list[Snapshot]:
        """Every snapshot on every configured cluster, sorted by ID."""
        found = []
        for engine in self.volumes.engines.values():
            with engine.session(None) as cluster:
                for pool, name in engine.images(cluster):
                    if not name.startswith(SNAPSHOT_PREFIX):
                        continue
                    with contextlib.suppress(ValueError, NotFound, errors.Error):
                        rid = ResourceId(engine.cluster_id, pool, name[len(SNAPSHOT_PREFIX) :])
                        found.append(self.get(rid.encode()))
        return sorted(found, key=lambda s: s.snapshot_id)
