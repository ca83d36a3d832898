"""Volumes: create (empty, from a snapshot, from a volume), delete, expand, modify.

Design
------
A volume is the image ``csi-vol-<uuid>`` in the pool its StorageClass names;
its ID (see :mod:`csi_rbd.ids`) carries cluster, pool and UUID. Creation:

1. take the operation lock on the request name (and on the source);
2. look the name up in the pool's name journal; a hit with the same request
   fingerprint resumes or returns the volume, a different one is
   ALREADY_EXISTS; a miss reserves a new UUID;
3. create the image (empty, or an O(1) clone of the source snapshot image, or
   of a temporary snapshot of the source volume), grow it to the requested
   size, record cache/discard in the image metadata;
4. on any error, remove what this call created and release the reservation.

Each step checks whether it already happened, so a retry after a crash at any
point finishes the job instead of failing or leaking.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from csi_rbd.config import DriverConfig
from csi_rbd.control import images, parameters
from csi_rbd.control.errors import (
    AlreadyExists,
    Exhausted,
    InvalidRequest,
    NotFound,
    OutOfRange,
)
from csi_rbd.control.journal import NameJournal, Reservation
from csi_rbd.engine import errors
from csi_rbd.engine.base import Engine
from csi_rbd.ids import VOLUME_PREFIX, ResourceId
from csi_rbd.locks import OperationLocks

log = logging.getLogger(__name__)

DEFAULT_SIZE = 1 << 30
SNAPSHOT_NAME = "csi-snap"  # the one snapshot inside every snapshot image
_METADATA = {"cache": "csi.cache", "discard": "csi.discard"}


@dataclass(frozen=True)
class CreateVolumeRequest:
    name: str
    required_bytes: int = 0
    limit_bytes: int = 0
    parameters: Mapping[str, str] = field(default_factory=dict)
    block: bool = False
    source_snapshot: str | None = None
    source_volume: str | None = None
    secrets: Mapping[str, str] = field(default_factory=dict)
    # topology segments the volume must be reachable from (None: anywhere)
    requisite: tuple[Mapping[str, str], ...] | None = None
    # cache/discard overrides that take precedence over ``parameters``
    mutable_parameters: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Volume:
    volume_id: str
    capacity: int
    context: dict[str, str]
    source_snapshot: str | None = None
    source_volume: str | None = None
    topology: dict[str, str] | None = None


def choose_size(required: int, limit: int, source: int | None) -> int:
    """The image size for a capacity range (and a source it must not be smaller than)."""
    if required < 0 or limit < 0:
        raise OutOfRange("capacity range bounds must not be negative")
    if limit and required > limit:
        raise OutOfRange(f"required_bytes {required} exceeds limit_bytes {limit}")
    default = source if source is not None else DEFAULT_SIZE
    wanted = required or (min(default, limit) if limit else default)
    if source is not None and wanted < source:
        raise OutOfRange(
            f"the source is {source} bytes; a volume made from it cannot be smaller "
            f"(requested {wanted})"
        )
    size = images.round_up(wanted)
    if limit and size > limit:
        size = limit - limit % images.ROUNDING
    if size < wanted or (source is not None and size < source):
        raise OutOfRange(
            f"no size in [{required}, {limit or 'unbounded'}] is a multiple of "
            f"{images.ROUNDING} bytes"
        )
    return size


class VolumeService:
    def __init__(
        self, config: DriverConfig, engines: Mapping[str, Engine], locks: OperationLocks
    ) -> None:
        self.config = config
        self.engines = engines
        self.locks = locks

    # -- helpers ----------------------------------------------------------------
    def engine(self, cluster_id: str) -> Engine:
        engine = self.engines.get(cluster_id)
        if engine is None:
            raise NotFound(f"cluster {cluster_id!r} is not configured on this driver")
        return engine

    def topology(self, engine: Engine) -> dict[str, str] | None:
        """Native volumes live on this node; Ceph volumes are reachable from anywhere."""
        if engine.kind == "native":
            return {self.config.topology_key: self.config.node_id}
        return None

    @contextlib.contextmanager
    def open_volume(
        self, volume_id: str, secrets: Mapping[str, str] | None, what: str = "volume"
    ) -> Iterator[tuple[Engine, ResourceId, Any, Any]]:
        """(engine, id, cluster, ioctx) of an existing volume, or NotFound."""
        rid = images.decode(volume_id, what)
        engine = self.engine(rid.cluster)
        try:
            with images.pool(engine, rid.pool, secrets) as (cluster, ioctx):
                if not images.image_exists(engine, ioctx, rid.volume_image()):
                    raise NotFound(f"{what} {volume_id} does not exist")
                yield engine, rid, cluster, ioctx
        except InvalidRequest as exc:  # the pool is gone: so is the volume
            raise NotFound(f"{what} {volume_id} does not exist: {exc}") from exc

    def _volume(
        self, engine: Engine, rid: ResourceId, ioctx: Any, reservation: Reservation | None
    ) -> Volume:
        name = rid.volume_image()
        with engine.open_image(ioctx, name, read_only=True) as image:
            size = int(image.size())
            meta = dict(image.metadata_list())
        request = reservation.request if reservation else {}
        return Volume(
            volume_id=rid.encode(),
            capacity=size,
            context=self._context(rid, request, meta),
            source_snapshot=request.get("source_snapshot"),
            source_volume=request.get("source_volume"),
            topology=self.topology(engine),
        )

    def _context(
        self, rid: ResourceId, request: Mapping[str, Any], meta: Mapping[str, str]
    ) -> dict[str, str]:
        """The volume context: what the volume was created with, the same ever after.

        ControllerModifyVolume changes the image metadata the node reads, not
        this (the spec keeps a volume's context immutable).
        """
        context = {
            "clusterID": rid.cluster,
            "pool": rid.pool,
            "cache": meta.get(_METADATA["cache"], "none"),
            "discard": meta.get(_METADATA["discard"], "unmap"),
            "mkfsOptions": meta.get("csi.mkfsOptions", ""),
        }
        if "parameters" in request:
            with contextlib.suppress(InvalidRequest):
                params = parameters.parse(request["parameters"], self.config)
                context = params.with_mutable(request.get("mutable_parameters", {})).context()
        context["imageName"] = rid.volume_image()
        return context

    # -- CreateVolume -------------------------------------------------------------
    def create(self, request: CreateVolumeRequest) -> Volume:
        if not request.name:
            raise InvalidRequest("volume name is missing")
        if request.source_snapshot and request.source_volume:
            raise InvalidRequest("a volume has one content source, not two")
        params = parameters.parse(request.parameters, self.config)
        params = params.with_mutable(request.mutable_parameters)
        engine = self.engine(params.cluster_id)
        fingerprint = {
            "required_bytes": request.required_bytes,
            "limit_bytes": request.limit_bytes,
            "parameters": {
                k: v
                for k, v in sorted(request.parameters.items())
                if not k.startswith(parameters.K8S_PREFIX + "pv")
            },
            "block": request.block,
            "source_snapshot": request.source_snapshot,
            "source_volume": request.source_volume,
            "mutable_parameters": dict(sorted(request.mutable_parameters.items())),
            "requisite": sorted(sorted(t.items()) for t in request.requisite or ()),
        }
        fingerprint = json.loads(json.dumps(fingerprint))  # as the journal gives it back
        source = request.source_snapshot or request.source_volume
        keys = [f"volume-name:{request.name}"] + ([source] if source else [])
        with (
            self.locks.hold(*keys),
            images.pool(engine, params.pool, request.secrets) as (
                cluster,
                ioctx,
            ),
        ):
            journal = NameJournal(ioctx, "volume")
            reservation = journal.lookup(request.name)
            if reservation is not None and reservation.request != fingerprint:
                raise AlreadyExists(
                    f"volume {request.name} exists with other arguments "
                    f"(capacity, parameters, access type or source)"
                )
            fresh = reservation is None
            if reservation is None:
                self._check_topology(engine, request.requisite)
                try:
                    reservation = journal.reserve(request.name, fingerprint)
                except errors.ObjectExists as exc:
                    raise AlreadyExists(f"volume {request.name} is being created") from exc
            rid = ResourceId(params.cluster_id, params.pool, reservation.uuid)
            created = False
            try:
                if not images.image_exists(engine, ioctx, rid.volume_image()):
                    created = True
                    self._make_image(engine, cluster, ioctx, rid, params, request)
                self._drop_clone_temporary(engine, cluster, rid, request)
                self._limit_depth(engine, cluster, ioctx, rid, request)
                volume = self._volume(engine, rid, ioctx, reservation)
            except BaseException:
                if created or fresh:
                    with contextlib.suppress(Exception):
                        engine.rbd.remove(ioctx, rid.volume_image())
                    with contextlib.suppress(Exception):
                        self._drop_clone_temporary(engine, cluster, rid, request)
                    with contextlib.suppress(Exception):
                        journal.release(reservation)
                raise
        self._mark_thick_provisioned(params)
        return volume

    def _mark_thick_provisioned(self, params: parameters.VolumeParameters) -> None:
        """discard=ignore: annotate the PVC so KubeVirt leaves discard off for its disk.

        Best effort: the data path drops discards anyway, so a failure here (no
        API server, no RBAC) is logged, never a failed CreateVolume.
        """
        if params.discard != "ignore" or not (params.pvc_name and params.pvc_namespace):
            return
        try:
            from csi_rbd import kube

            kube.annotate_thick_provisioned(
                params.pvc_namespace, params.pvc_name, self.config.driver_name
            )
        except Exception as exc:  # the kubernetes client raises many kinds
            log.warning(
                "could not annotate PVC %s/%s as thick-provisioned: %s",
                params.pvc_namespace,
                params.pvc_name,
                exc,
            )

    def _check_topology(
        self, engine: Engine, requisite: tuple[Mapping[str, str], ...] | None
    ) -> None:
        mine = self.topology(engine)
        if not requisite or mine is None:
            return
        for segment in requisite:
            if all(mine.get(k) == v for k, v in segment.items()):
                return
        raise Exhausted(
            f"the native engine serves node {self.config.node_id} only, which is not "
            f"among the requisite topologies"
        )

    def _make_image(
        self,
        engine: Engine,
        cluster: Any,
        ioctx: Any,
        rid: ResourceId,
        params: parameters.VolumeParameters,
        request: CreateVolumeRequest,
    ) -> None:
        name = rid.volume_image()
        if request.source_snapshot:
            self._clone_snapshot(engine, cluster, ioctx, name, params, request)
        elif request.source_volume:
            self._clone_volume(engine, cluster, ioctx, rid, params, request)
        else:
            size = choose_size(request.required_bytes, request.limit_bytes, None)
            self._check_space(engine, params.pool, size)
            engine.rbd.create(ioctx, name, size, order=params.order, features=params.features)

    def _check_space(self, engine: Engine, pool: str, size: int) -> None:
        # Thin images need no space up front; refuse only what could never fit on
        # a native node (asking Ceph would cost a connection and monitor commands).
        if engine.kind != "native":
            return
        free = engine.free_bytes(pool)
        if size > free * 1024:
            raise Exhausted(f"{size} bytes is far beyond the {free} bytes free on this node")

    @contextlib.contextmanager
    def _source(
        self,
        engine: Engine,
        cluster: Any,
        ioctx: Any,
        params: parameters.VolumeParameters,
        request: CreateVolumeRequest,
    ) -> Iterator[tuple[Any, str, int]]:
        """(pool handle, image name, new size) of the request's content source."""
        kind = "snapshot" if request.source_snapshot else "volume"
        source_id = request.source_snapshot or request.source_volume
        assert source_id
        source = images.decode(source_id, kind)
        if source.cluster != params.cluster_id:
            raise InvalidRequest(
                f"{kind} {source_id} is in cluster {source.cluster}, "
                f"the volume would be in {params.cluster_id}"
            )
        other_pool = source.pool != params.pool
        source_ioctx = cluster.open_ioctx(source.pool) if other_pool else ioctx
        try:
            name = source.snapshot_image() if kind == "snapshot" else source.volume_image()
            if not images.image_exists(engine, source_ioctx, name):
                raise NotFound(f"{kind} {source_id} does not exist")
            source_size = images.image_size(engine, source_ioctx, name)
            size = choose_size(request.required_bytes, request.limit_bytes, source_size)
            yield source_ioctx, name, size
        finally:
            if other_pool:
                source_ioctx.close()

    def _clone_snapshot(
        self,
        engine: Engine,
        cluster: Any,
        ioctx: Any,
        name: str,
        params: parameters.VolumeParameters,
        request: CreateVolumeRequest,
    ) -> None:
        with self._source(engine, cluster, ioctx, params, request) as (source_ioctx, image, size):
            engine.rbd.clone(
                source_ioctx,
                image,
                SNAPSHOT_NAME,
                ioctx,
                name,
                features=params.features,
                order=params.order,
            )
        self._grow(engine, ioctx, name, size)

    def _clone_volume(
        self,
        engine: Engine,
        cluster: Any,
        ioctx: Any,
        rid: ResourceId,
        params: parameters.VolumeParameters,
        request: CreateVolumeRequest,
    ) -> None:
        temporary = f"csi-clone-{rid.uuid}"
        with self._source(engine, cluster, ioctx, params, request) as (source_ioctx, source, size):
            with engine.open_image(source_ioctx, source) as image:
                if temporary not in [s["name"] for s in image.list_snaps()]:
                    image.create_snap(temporary)
            engine.rbd.clone(
                source_ioctx,
                source,
                temporary,
                ioctx,
                rid.volume_image(),
                features=params.features,
                order=params.order,
            )
        self._grow(engine, ioctx, rid.volume_image(), size)

    def _drop_clone_temporary(
        self, engine: Engine, cluster: Any, rid: ResourceId, request: CreateVolumeRequest
    ) -> None:
        """Remove the source's temporary snapshot (trashed while the clone reads it)."""
        if not request.source_volume:
            return
        source = images.decode(request.source_volume, "volume")
        source_ioctx = cluster.open_ioctx(source.pool)
        try:
            with engine.open_image(source_ioctx, source.volume_image()) as image:
                temporary = f"csi-clone-{rid.uuid}"
                if temporary in [s["name"] for s in image.list_snaps()]:
                    image.remove_snap(temporary)
        except errors.ImageNotFound:
            return
        finally:
            source_ioctx.close()

    @staticmethod
    def _grow(engine: Engine, ioctx: Any, name: str, size: int) -> None:
        with engine.open_image(ioctx, name) as image:
            if image.size() < size:
                image.resize(size)

    @staticmethod
    def _limit_depth(
        engine: Engine, cluster: Any, ioctx: Any, rid: ResourceId, request: CreateVolumeRequest
    ) -> None:
        """Flatten a new clone whose chain of parents got too deep to read through."""
        if not (request.source_snapshot or request.source_volume):
            return
        name = rid.volume_image()
        if images.clone_depth(engine, cluster, rid.pool, name) > images.MAX_CLONE_DEPTH:
            with engine.open_image(ioctx, name) as image:
                image.flatten()

    # -- DeleteVolume ---------------------------------------------------------------
    def delete(self, volume_id: str, secrets: Mapping[str, str] | None) -> None:
        if not volume_id:
            raise InvalidRequest("volume ID is missing")
        with self.locks.hold(volume_id):
            try:
                with self.open_volume(volume_id, secrets) as (engine, rid, _, ioctx):
                    self._remove(engine, rid, ioctx)
            except NotFound:
                self._release_orphan_reservation(volume_id, secrets)

    def _remove(self, engine: Engine, rid: ResourceId, ioctx: Any) -> None:
        name = rid.volume_image()
        for snap in images.snapshot_names(engine, ioctx, name):
            if snap.startswith(("csi-clone-", "csi-snap-")):
                # a temporary snapshot left by an interrupted clone or snapshot
                with engine.open_image(ioctx, name) as image:
                    image.remove_snap(snap)
        images.remove_or_trash(engine, ioctx, name, f"volume {rid.encode()}")
        journal = NameJournal(ioctx, "volume")
        reservation = journal.by_uuid(rid.uuid)
        if reservation is not None:
            journal.release(reservation)

    def _release_orphan_reservation(
        self, volume_id: str, secrets: Mapping[str, str] | None
    ) -> None:
        """The image is gone; drop a journal entry an interrupted delete left."""
        try:
            rid = ResourceId.decode(volume_id)
            engine = self.engines[rid.cluster]
            with images.pool(engine, rid.pool, secrets) as (_, ioctx):
                journal = NameJournal(ioctx, "volume")
                reservation = journal.by_uuid(rid.uuid)
                if reservation is not None:
                    journal.release(reservation)
        except Exception:  # nothing to release, or nowhere to release it from
            return

    # -- the rest -------------------------------------------------------------------
    def get(self, volume_id: str) -> Volume:
        with self.open_volume(volume_id, None) as (engine, rid, _, ioctx):
            reservation = NameJournal(ioctx, "volume").by_uuid(rid.uuid)
            return self._volume(engine, rid, ioctx, reservation)

    def condition(self, volume_id: str) -> tuple[bool, str]:
        """(abnormal, message): can the image and its parents be read?"""
        with self.open_volume(volume_id, None) as (engine, rid, _, ioctx):
            try:
                with engine.open_image(ioctx, rid.volume_image(), read_only=True) as image:
                    if image.size():
                        image.read(0, min(4096, int(image.size())))
            except errors.Error as exc:
                return True, f"the image cannot be read: {exc}"
            return False, "the image is readable"

    def expand(
        self, volume_id: str, required: int, limit: int, secrets: Mapping[str, str] | None
    ) -> int:
        with (
            self.locks.hold(volume_id),
            self.open_volume(volume_id, secrets) as (
                engine,
                rid,
                _,
                ioctx,
            ),
        ):
            with engine.open_image(ioctx, rid.volume_image()) as image:
                current = int(image.size())
                if required <= current and (not limit or current <= limit):
                    return current
                size = choose_size(required, limit, None)
                if size < current:
                    raise OutOfRange(
                        f"volume is {current} bytes; shrinking to {size} is not supported"
                    )
                image.resize(size)
                return size

    def modify(self, volume_id: str, mutable: Mapping[str, str]) -> None:
        changes = parameters.parse_mutable(mutable)
        with (
            self.locks.hold(volume_id),
            self.open_volume(volume_id, None) as (
                engine,
                rid,
                _,
                ioctx,
            ),
        ):
            with engine.open_image(ioctx, rid.volume_image()) as image:
                for key, value in changes.items():
                    image.metadata_set(_METADATA[key], value)

    def list_ids(self) -> list[str]:
        """Every volume ID on every configured cluster, sorted."""
        found = []
        for engine in self.engines.values():
            with engine.session(None) as cluster:
                for pool, name in engine.images(cluster):
                    if name.startswith(VOLUME_PREFIX):
                        uuid = name[len(VOLUME_PREFIX) :]
                        with contextlib.suppress(ValueError):
                            found.append(ResourceId(engine.cluster_id, pool, uuid).encode())
        return sorted(found)
