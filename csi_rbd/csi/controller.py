"""The CSI Controller service: request validation and translation only.

The work happens in :mod:`csi_rbd.control`; this module checks fields, turns
messages into plain requests and results back into messages.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from csi_rbd._proto import csi_pb2 as csi
from csi_rbd._proto import csi_pb2_grpc
from csi_rbd.control import parameters
from csi_rbd.control.errors import NotFound
from csi_rbd.control.images import decode
from csi_rbd.control.snapshots import Snapshot, SnapshotService
from csi_rbd.control.volumes import CreateVolumeRequest, Volume, VolumeService
from csi_rbd.csi import capabilities
from csi_rbd.csi.status import Abort, require, rpc
from csi_rbd.ids import BadId, ResourceId

T = TypeVar("T")
_UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED


def _page(items: Sequence[T], key: list[str], token: str, max_entries: int) -> tuple[list[T], str]:
    """One page after ``token`` (the last key of the previous page, in sorted order).

    A token is any key this driver could have handed out; it need not still
    exist: listing resumes after where it would be. Anything else is ABORTED.
    """
    if max_entries < 0:
        raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "max_entries must not be negative")
    start = 0
    if token:
        try:
            ResourceId.decode(token)
        except BadId as exc:
            raise Abort(grpc.StatusCode.ABORTED, f"starting_token {token!r} is not valid") from exc
        start = bisect.bisect_right(key, token)
    end = len(items) if max_entries == 0 else min(len(items), start + max_entries)
    next_token = key[end - 1] if end < len(items) and end > start else ""
    return list(items[start:end]), next_token


def _volume_message(volume: Volume) -> csi.Volume:
    message = csi.Volume(
        volume_id=volume.volume_id,
        capacity_bytes=volume.capacity,
        volume_context=volume.context,
    )
    if volume.source_snapshot:
        message.content_source.snapshot.snapshot_id = volume.source_snapshot
    elif volume.source_volume:
        message.content_source.volume.volume_id = volume.source_volume
    if volume.topology:
        message.accessible_topology.add(segments=volume.topology)
    return message


def _snapshot_message(snapshot: Snapshot) -> csi.Snapshot:
    created = Timestamp()
    created.FromNanoseconds(int(snapshot.created * 1e9))
    return csi.Snapshot(
        snapshot_id=snapshot.snapshot_id,
        source_volume_id=snapshot.source_volume_id,
        size_bytes=snapshot.size,
        creation_time=created,
        ready_to_use=snapshot.ready,
    )


def _check_capabilities(caps: Sequence[csi.VolumeCapability], engine: str) -> None:
    require(caps, "volume_capabilities")
    for cap in caps:
        reason = capabilities.unsupported(cap, engine)
        if reason:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, reason)


class ControllerService(csi_pb2_grpc.ControllerServicer):
    def __init__(self, volumes: VolumeService, snapshots: SnapshotService) -> None:
        self.volumes = volumes
        self.snapshots = snapshots

    def _engine_for_parameters(self, params: Mapping[str, str]) -> str:
        """The engine kind of the cluster a StorageClass's parameters pick."""
        cluster_id = parameters.parse(dict(params), self.volumes.config).cluster_id
        return self.volumes.engine(cluster_id).kind

    def _engine_of_volume(self, volume_id: str) -> str:
        return self.volumes.engine(decode(volume_id, "volume").cluster).kind

    @rpc
    def CreateVolume(
        self, request: csi.CreateVolumeRequest, context: grpc.ServicerContext
    ) -> csi.CreateVolumeResponse:
        require(request.name, "name")
        require(request.volume_capabilities, "volume_capabilities")
        _check_capabilities(
            request.volume_capabilities, self._engine_for_parameters(request.parameters)
        )
        kinds = {cap.WhichOneof("access_type") for cap in request.volume_capabilities}
        if len(kinds) > 1:
            raise Abort(
                grpc.StatusCode.INVALID_ARGUMENT, "a volume is either block or mount, not both"
            )
        source = request.volume_content_source
        if source.HasField("snapshot"):
            require(source.snapshot.snapshot_id, "volume_content_source.snapshot.snapshot_id")
        if source.HasField("volume"):
            require(source.volume.volume_id, "volume_content_source.volume.volume_id")
        requisite = None
        if request.HasField("accessibility_requirements"):
            wanted = [*request.accessibility_requirements.requisite]
            wanted += [*request.accessibility_requirements.preferred]
            requisite = tuple(dict(t.segments) for t in wanted) or None
        volume = self.volumes.create(
            CreateVolumeRequest(
                name=request.name,
                required_bytes=request.capacity_range.required_bytes,
                limit_bytes=request.capacity_range.limit_bytes,
                parameters=dict(request.parameters),
                block=kinds == {"block"},
                source_snapshot=source.snapshot.snapshot_id
                if source.HasField("snapshot")
                else None,
                source_volume=source.volume.volume_id if source.HasField("volume") else None,
                secrets=dict(request.secrets),
                requisite=requisite,
                mutable_parameters=dict(request.mutable_parameters),
            )
        )
        return csi.CreateVolumeResponse(volume=_volume_message(volume))

    @rpc
    def DeleteVolume(
        self, request: csi.DeleteVolumeRequest, context: grpc.ServicerContext
    ) -> csi.DeleteVolumeResponse:
        require(request.volume_id, "volume_id")
        self.volumes.delete(request.volume_id, dict(request.secrets))
        return csi.DeleteVolumeResponse()

    @rpc
    def ControllerPublishVolume(
        self, request: csi.ControllerPublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi.ControllerPublishVolumeResponse:
        raise Abort(_UNIMPLEMENTED, "volumes need no controller publish (attachRequired: false)")

    @rpc
    def ControllerUnpublishVolume(
        self, request: csi.ControllerUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi.ControllerUnpublishVolumeResponse:
        raise Abort(_UNIMPLEMENTED, "volumes need no controller publish (attachRequired: false)")

    @rpc
    def ValidateVolumeCapabilities(
        self, request: csi.ValidateVolumeCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi.ValidateVolumeCapabilitiesResponse:
        require(request.volume_id, "volume_id")
        require(request.volume_capabilities, "volume_capabilities")
        self.volumes.get(request.volume_id)
        if request.parameters:
            parameters.parse(dict(request.parameters), self.volumes.config)
        engine = self._engine_of_volume(request.volume_id)
        reasons = [capabilities.unsupported(cap, engine) for cap in request.volume_capabilities]
        problems = [r for r in reasons if r]
        if problems:
            return csi.ValidateVolumeCapabilitiesResponse(message="; ".join(problems))
        return csi.ValidateVolumeCapabilitiesResponse(
            confirmed=csi.ValidateVolumeCapabilitiesResponse.Confirmed(
                volume_context=request.volume_context,
                volume_capabilities=request.volume_capabilities,
                parameters=request.parameters,
                mutable_parameters=request.mutable_parameters,
            )
        )

    @rpc
    def ListVolumes(
        self, request: csi.ListVolumesRequest, context: grpc.ServicerContext
    ) -> csi.ListVolumesResponse:
        ids = self.volumes.list_ids()
        page, next_token = _page(ids, ids, request.starting_token, request.max_entries)
        entries = []
        for volume_id in page:
            try:
                volume = self.volumes.get(volume_id)
                abnormal, message = self.volumes.condition(volume_id)
            except NotFound:  # removed since listed
                continue
            entries.append(
                csi.ListVolumesResponse.Entry(
                    volume=_volume_message(volume),
                    status=csi.ListVolumesResponse.VolumeStatus(
                        volume_condition=csi.VolumeCondition(abnormal=abnormal, message=message)
                    ),
                )
            )
        return csi.ListVolumesResponse(entries=entries, next_token=next_token)

    @rpc
    def GetCapacity(
        self, request: csi.GetCapacityRequest, context: grpc.ServicerContext
    ) -> csi.GetCapacityResponse:
        params = parameters.parse(dict(request.parameters), self.volumes.config)
        engine = self.volumes.engine(params.cluster_id)
        for cap in request.volume_capabilities:
            if capabilities.unsupported(cap, engine.kind):
                return csi.GetCapacityResponse(available_capacity=0)
        mine = self.volumes.topology(engine)
        if request.HasField("accessible_topology") and mine is not None:
            segments = dict(request.accessible_topology.segments)
            if any(mine.get(k) != v for k, v in segments.items()):
                return csi.GetCapacityResponse(available_capacity=0)
        return csi.GetCapacityResponse(available_capacity=engine.free_bytes(params.pool))

    @rpc
    def ControllerGetCapabilities(
        self, request: csi.ControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi.ControllerGetCapabilitiesResponse:
        return csi.ControllerGetCapabilitiesResponse(
            capabilities=capabilities.controller_capabilities()
        )

    @rpc
    def CreateSnapshot(
        self, request: csi.CreateSnapshotRequest, context: grpc.ServicerContext
    ) -> csi.CreateSnapshotResponse:
        require(request.name, "name")
        require(request.source_volume_id, "source_volume_id")
        snapshot = self.snapshots.create(
            request.name, request.source_volume_id, dict(request.parameters), dict(request.secrets)
        )
        return csi.CreateSnapshotResponse(snapshot=_snapshot_message(snapshot))

    @rpc
    def DeleteSnapshot(
        self, request: csi.DeleteSnapshotRequest, context: grpc.ServicerContext
    ) -> csi.DeleteSnapshotResponse:
        require(request.snapshot_id, "snapshot_id")
        self.snapshots.delete(request.snapshot_id, dict(request.secrets))
        return csi.DeleteSnapshotResponse()

    @rpc
    def ListSnapshots(
        self, request: csi.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> csi.ListSnapshotsResponse:
        if request.snapshot_id:
            try:
                found = [self.snapshots.get(request.snapshot_id)]
            except NotFound:
                found = []
        else:
            found = self.snapshots.list()
        if request.source_volume_id:
            found = [s for s in found if s.source_volume_id == request.source_volume_id]
        keys = [s.snapshot_id for s in found]
        page, next_token = _page(found, keys, request.starting_token, request.max_entries)
        return csi.ListSnapshotsResponse(
            entries=[csi.ListSnapshotsResponse.Entry(snapshot=_snapshot_message(s)) for s in page],
            next_token=next_token,
        )

    @rpc
    def GetSnapshot(
        self, request: csi.GetSnapshotRequest, context: grpc.ServicerContext
    ) -> csi.GetSnapshotResponse:
        require(request.snapshot_id, "snapshot_id")
        snapshot = self.snapshots.get(request.snapshot_id, dict(request.secrets))
        return csi.GetSnapshotResponse(snapshot=_snapshot_message(snapshot))

    @rpc
    def ControllerExpandVolume(
        self, request: csi.ControllerExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi.ControllerExpandVolumeResponse:
        require(request.volume_id, "volume_id")
        require(request.capacity_range.required_bytes, "capacity_range.required_bytes")
        if request.HasField("volume_capability"):
            _check_capabilities(
                [request.volume_capability], self._engine_of_volume(request.volume_id)
            )
        size = self.volumes.expand(
            request.volume_id,
            request.capacity_range.required_bytes,
            request.capacity_range.limit_bytes,
            dict(request.secrets),
        )
        block = request.volume_capability.WhichOneof("access_type") == "block"
        return csi.ControllerExpandVolumeResponse(
            capacity_bytes=size, node_expansion_required=not block
        )

    @rpc
    def ControllerGetVolume(
        self, request: csi.ControllerGetVolumeRequest, context: grpc.ServicerContext
    ) -> csi.ControllerGetVolumeResponse:
        require(request.volume_id, "volume_id")
        volume = self.volumes.get(request.volume_id)
        abnormal, message = self.volumes.condition(request.volume_id)
        return csi.ControllerGetVolumeResponse(
            volume=_volume_message(volume),
            status=csi.ControllerGetVolumeResponse.VolumeStatus(
                volume_condition=csi.VolumeCondition(abnormal=abnormal, message=message)
            ),
        )

    @rpc
    def ControllerModifyVolume(
        self, request: csi.ControllerModifyVolumeRequest, context: grpc.ServicerContext
    ) -> csi.ControllerModifyVolumeResponse:
        require(request.volume_id, "volume_id")
        require(request.mutable_parameters, "mutable_parameters")
        self.volumes.modify(request.volume_id, dict(request.mutable_parameters))
        return csi.ControllerModifyVolumeResponse()
