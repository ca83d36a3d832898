"""The CSI Node service: request validation and translation only.

The data path (attach daemons, loop devices, mounts, the stash) lives in
:mod:`csi_rbd.node`; this module checks fields, takes the per-volume lock,
finds the image and its cache/discard settings, and calls the stager.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping

import grpc

from csi_rbd._proto import csi_pb2 as csi
from csi_rbd._proto import csi_pb2_grpc
from csi_rbd.config import DriverConfig
from csi_rbd.control import images, parameters
from csi_rbd.control.errors import InvalidRequest, NotFound
from csi_rbd.csi import capabilities
from csi_rbd.csi.status import Abort, require, rpc
from csi_rbd.engine.base import Engine
from csi_rbd.locks import OperationLocks
from csi_rbd.node.stager import NodeStager
from csi_rbd.node.stash import load_stash

_FILESYSTEM_DEFAULT = "ext4"


def _capability(request_capability: csi.VolumeCapability, engine: str) -> tuple[bool, bool]:
    """(block, read-only mode) of a capability ``engine`` (its kind) supports.

    A malformed capability is INVALID_ARGUMENT; an access mode the volume
    cannot have is FAILED_PRECONDITION ("exceeds capabilities" in the spec's
    node tables).
    """
    require(request_capability.WhichOneof("access_type"), "volume_capability")
    mode = capabilities.unsupported_mode(request_capability, engine)
    if mode:
        raise Abort(grpc.StatusCode.FAILED_PRECONDITION, mode)
    reason = capabilities.unsupported(request_capability, engine)
    if reason:
        raise Abort(grpc.StatusCode.INVALID_ARGUMENT, reason)
    block = request_capability.WhichOneof("access_type") == "block"
    read_only = request_capability.access_mode.mode in capabilities.READ_ONLY_MODES
    return block, read_only


def _mode(
    metadata: Mapping[str, str], context: Mapping[str, str], key: str, allowed: tuple[str, ...]
) -> str:
    """A volume's ``cache``/``discard`` mode: image metadata ``csi.<key>`` (what
    ControllerModifyVolume changes), else the volume context, else the default
    (the first allowed value); an unknown value falls back to the default."""
    value = metadata.get(f"csi.{key}", context.get(key, allowed[0]))
    return value if value in allowed else allowed[0]


def _must_be_absolute(volume_path: str) -> None:
    """A relative volume path cannot be where any volume of ours is: NOT_FOUND."""
    if not os.path.isabs(volume_path):
        raise Abort(grpc.StatusCode.NOT_FOUND, f"no volume is published at {volume_path!r}")


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(
        self,
        config: DriverConfig,
        engines: Mapping[str, Engine],
        stager: NodeStager | None = None,
    ) -> None:
        self.config = config
        self.engines = engines
        self.locks = OperationLocks()
        self.stager = stager or NodeStager(
            config.state_dir,
            config.allowed_roots,
            clusters={cluster.id: cluster for cluster in config.clusters},
        )

    def recover(self) -> list[str]:
        """Re-attach what was staged before a restart."""
        return self.stager.recover()

    def _engine_kind(self, volume_id: str) -> str:
        rid = images.decode(volume_id, "volume")
        engine = self.engines.get(rid.cluster)
        if engine is None:
            raise NotFound(f"volume {volume_id} is in cluster {rid.cluster}, unknown to this node")
        return engine.kind

    def _image(
        self, volume_id: str, secrets: Mapping[str, str]
    ) -> tuple[Engine, str, str, dict[str, str]]:
        """(engine, pool, image name, image metadata) of an existing volume."""
        rid = images.decode(volume_id, "volume")
        engine = self.engines.get(rid.cluster)
        if engine is None:
            raise NotFound(f"volume {volume_id} is in cluster {rid.cluster}, unknown to this node")
        try:
            with images.pool(engine, rid.pool, secrets) as (_, ioctx):
                if not images.image_exists(engine, ioctx, rid.volume_image()):
                    raise NotFound(f"volume {volume_id} does not exist")
                with engine.open_image(ioctx, rid.volume_image(), read_only=True) as image:
                    metadata = dict(image.metadata_list())
        except InvalidRequest as exc:
            raise NotFound(f"volume {volume_id} does not exist: {exc}") from exc
        return engine, rid.pool, rid.volume_image(), metadata

    @rpc
    def NodeStageVolume(
        self, request: csi.NodeStageVolumeRequest, context: grpc.ServicerContext
    ) -> csi.NodeStageVolumeResponse:
        require(request.volume_id, "volume_id")
        require(request.staging_target_path, "staging_target_path")
        require(request.HasField("volume_capability"), "volume_capability")
        block, read_only = _capability(
            request.volume_capability, self._engine_kind(request.volume_id)
        )
        shared = request.volume_capability.access_mode.mode in capabilities.SHARED_WRITER_MODES
        with self.locks.hold(request.volume_id):
            engine, pool, image, metadata = self._image(request.volume_id, request.secrets)
            context_params = dict(request.volume_context)
            discard = _mode(metadata, context_params, "discard", parameters.DISCARD_MODES)
            cache = _mode(metadata, context_params, "cache", parameters.CACHE_MODES)
            mkfs = metadata.get("csi.mkfsOptions", context_params.get("mkfsOptions", ""))
            mount = request.volume_capability.mount
            self.stager.stage(
                request.volume_id,
                engine.locator(pool, image),
                request.staging_target_path,
                block=block,
                fstype=None if block else (mount.fs_type or _FILESYSTEM_DEFAULT),
                mkfs_options=shlex.split(mkfs),
                mount_flags=list(mount.mount_flags),
                read_only=read_only,
                discard=discard,
                cache=cache,
                secrets=request.secrets,
                shared=shared,
            )
        return csi.NodeStageVolumeResponse()

    @rpc
    def NodeUnstageVolume(
        self, request: csi.NodeUnstageVolumeRequest, context: grpc.ServicerContext
    ) -> csi.NodeUnstageVolumeResponse:
        require(request.volume_id, "volume_id")
        require(request.staging_target_path, "staging_target_path")
        with self.locks.hold(request.volume_id):
            self.stager.unstage(request.volume_id, request.staging_target_path)
        return csi.NodeUnstageVolumeResponse()

    @rpc
    def NodePublishVolume(
        self, request: csi.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi.NodePublishVolumeResponse:
        require(request.volume_id, "volume_id")
        require(request.target_path, "target_path")
        require(request.HasField("volume_capability"), "volume_capability")
        block, read_only = _capability(
            request.volume_capability, self._engine_kind(request.volume_id)
        )
        if not request.staging_target_path:
            raise Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "staging_target_path is missing: the volume must be staged first",
            )
        single_writer = capabilities.AccessMode.SINGLE_NODE_SINGLE_WRITER
        with self.locks.hold(request.volume_id):
            if request.volume_capability.access_mode.mode == single_writer:
                self._refuse_second_target(request.staging_target_path, request.target_path)
            self.stager.publish(
                request.volume_id,
                request.staging_target_path,
                request.target_path,
                block=block,
                read_only=read_only or request.readonly,
                mount_flags=list(request.volume_capability.mount.mount_flags),
            )
        return csi.NodePublishVolumeResponse()

    def _refuse_second_target(self, staging_path: str, target_path: str) -> None:
        """SINGLE_NODE_SINGLE_WRITER (ReadWriteOncePod): one publish target at most."""
        record = load_stash(self.stager.check_path(staging_path))
        others = [t for t in (record.targets if record else ()) if str(t.path) != target_path]
        if others:
            raise Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the volume is single-writer and already published at {others[0].path}",
            )

    @rpc
    def NodeUnpublishVolume(
        self, request: csi.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi.NodeUnpublishVolumeResponse:
        require(request.volume_id, "volume_id")
        require(request.target_path, "target_path")
        with self.locks.hold(request.volume_id):
            self.stager.unpublish(request.volume_id, request.target_path)
        return csi.NodeUnpublishVolumeResponse()

    @rpc
    def NodeGetVolumeStats(
        self, request: csi.NodeGetVolumeStatsRequest, context: grpc.ServicerContext
    ) -> csi.NodeGetVolumeStatsResponse:
        require(request.volume_id, "volume_id")
        require(request.volume_path, "volume_path")
        _must_be_absolute(request.volume_path)
        stats = self.stager.stats(request.volume_id, request.volume_path)
        unit = csi.VolumeUsage.Unit
        usage = [
            csi.VolumeUsage(
                unit=unit.BYTES,
                total=stats.total_bytes,
                used=stats.used_bytes or 0,
                available=stats.available_bytes or 0,
            )
        ]
        if stats.total_inodes is not None:
            usage.append(
                csi.VolumeUsage(
                    unit=unit.INODES,
                    total=stats.total_inodes,
                    used=stats.used_inodes or 0,
                    available=stats.available_inodes or 0,
                )
            )
        return csi.NodeGetVolumeStatsResponse(
            usage=usage,
            volume_condition=csi.VolumeCondition(abnormal=stats.abnormal, message=stats.message),
        )

    @rpc
    def NodeExpandVolume(
        self, request: csi.NodeExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi.NodeExpandVolumeResponse:
        require(request.volume_id, "volume_id")
        require(request.volume_path, "volume_path")
        _must_be_absolute(request.volume_path)
        if request.HasField("volume_capability"):
            engine = self._engine_kind(request.volume_id)
            reason = capabilities.unsupported(request.volume_capability, engine)
            if reason:
                raise Abort(grpc.StatusCode.INVALID_ARGUMENT, reason)
        wanted = request.capacity_range.required_bytes or None
        limit = request.capacity_range.limit_bytes
        with self.locks.hold(request.volume_id):
            size = self.stager.expand(request.volume_id, request.volume_path, wanted)
        if wanted is not None and size < wanted:
            raise Abort(
                grpc.StatusCode.OUT_OF_RANGE,
                f"the volume is {size} bytes, less than the {wanted} requested; "
                f"expand it with ControllerExpandVolume first",
            )
        if limit and size > limit:
            raise Abort(
                grpc.StatusCode.OUT_OF_RANGE, f"the volume is {size} bytes, over the limit {limit}"
            )
        return csi.NodeExpandVolumeResponse(capacity_bytes=size)

    @rpc
    def NodeGetCapabilities(
        self, request: csi.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi.NodeGetCapabilitiesResponse:
        return csi.NodeGetCapabilitiesResponse(capabilities=capabilities.node_capabilities())

    @rpc
    def NodeGetInfo(
        self, request: csi.NodeGetInfoRequest, context: grpc.ServicerContext
    ) -> csi.NodeGetInfoResponse:
        return csi.NodeGetInfoResponse(
            node_id=self.config.node_id,
            max_volumes_per_node=self.config.max_volumes_per_node,
            accessible_topology=csi.Topology(
                segments={self.config.topology_key: self.config.node_id}
            ),
        )
