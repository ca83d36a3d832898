"""Controller service over a real gRPC server (pytest-grpc) on a unix socket."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from csi_rbd._proto import csi_pb2 as csi
from csi_rbd._proto import csi_pb2_grpc
from csi_rbd.config import DriverConfig
from csi_rbd.control.snapshots import SnapshotService
from csi_rbd.control.volumes import VolumeService
from csi_rbd.csi.controller import ControllerService
from csi_rbd.csi.server import LoggingInterceptor
from csi_rbd.engine.native import Image
from csi_rbd.ids import ResourceId
from csi_rbd.locks import OperationLocks
from tests.csi.conftest import NODE, block_capability, expect_code, mount_capability

MiB = 1 << 20
Code = grpc.StatusCode
AccessMode = csi.VolumeCapability.AccessMode


@pytest.fixture(scope="module")
def grpc_add_to_server() -> Any:
    return csi_pb2_grpc.add_ControllerServicer_to_server


@pytest.fixture(scope="module")
def grpc_servicer(driver_config: DriverConfig, engines: dict[str, Any]) -> ControllerService:
    volumes = VolumeService(driver_config, engines, OperationLocks())
    return ControllerService(volumes, SnapshotService(volumes))


@pytest.fixture(scope="module")
def grpc_interceptors() -> list[Any]:
    return [LoggingInterceptor()]


@pytest.fixture(scope="module")
def grpc_stub_cls() -> Any:
    return csi_pb2_grpc.ControllerStub


def unique(prefix: str = "pvc") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def create(stub: Any, name: str | None = None, size: int = 16 * MiB, **fields: Any) -> csi.Volume:
    fields.setdefault("volume_capabilities", [mount_capability()])
    request = csi.CreateVolumeRequest(
        name=name or unique(), capacity_range=csi.CapacityRange(required_bytes=size), **fields
    )
    return stub.CreateVolume(request).volume


def image_of(engines: dict[str, Any], volume_id: str, snapshot: bool = False) -> Image:
    rid = ResourceId.decode(volume_id)
    with engines["local"].session() as cluster:
        ioctx = cluster.open_ioctx(rid.pool)
    return Image(ioctx, rid.snapshot_image() if snapshot else rid.volume_image())


def write(engines: dict[str, Any], volume_id: str, data: bytes, offset: int = 0) -> None:
    with image_of(engines, volume_id) as image:
        image.write(data, offset)
        image.flush()


def read(engines: dict[str, Any], volume_id: str, length: int, offset: int = 0) -> bytes:
    with image_of(engines, volume_id) as image:
        return bytes(image.read(offset, length))


# -- table of invalid requests ------------------------------------------------------
MISSING_VOLUME = ResourceId("local", "rbd", str(uuid.UUID(int=1))).encode()

INVALID: list[tuple[str, Callable[[Any], Any], Code]] = [
    (
        "create-no-name",
        lambda s: s.CreateVolume(csi.CreateVolumeRequest(volume_capabilities=[mount_capability()])),
        Code.INVALID_ARGUMENT,
    ),
    (
        "create-no-capabilities",
        lambda s: s.CreateVolume(csi.CreateVolumeRequest(name=unique())),
        Code.INVALID_ARGUMENT,
    ),
    (
        "create-multi-node-mode",
        lambda s: create(
            s, volume_capabilities=[mount_capability(mode=AccessMode.MULTI_NODE_MULTI_WRITER)]
        ),
        Code.INVALID_ARGUMENT,
    ),
    (
        "create-bad-fstype",
        lambda s: create(s, volume_capabilities=[mount_capability("btrfs")]),
        Code.INVALID_ARGUMENT,
    ),
    (
        "create-block-and-mount",
        lambda s: create(s, volume_capabilities=[mount_capability(), block_capability()]),
        Code.INVALID_ARGUMENT,
    ),
    (
        "create-unknown-parameter",
        lambda s: create(s, parameters={"colour": "blue"}),
        Code.INVALID_ARGUMENT,
    ),
    ("create-bad-cache", lambda s: create(s, parameters={"cache": "fast"}), Code.INVALID_ARGUMENT),
    (
        "create-bad-discard",
        lambda s: create(s, parameters={"discard": "maybe"}),
        Code.INVALID_ARGUMENT,
    ),
    (
        "create-bad-object-size",
        lambda s: create(s, parameters={"objectSize": "3M"}),
        Code.INVALID_ARGUMENT,
    ),
    (
        "create-bad-feature",
        lambda s: create(s, parameters={"imageFeatures": "layering,journaling"}),
        Code.INVALID_ARGUMENT,
    ),
    (
        "create-unknown-cluster",
        lambda s: create(s, parameters={"clusterID": "elsewhere"}),
        Code.INVALID_ARGUMENT,
    ),
    (
        "create-missing-pool",
        lambda s: create(s, parameters={"pool": "nopool"}),
        Code.INVALID_ARGUMENT,
    ),
    (
        "create-required-over-limit",
        lambda s: s.CreateVolume(
            csi.CreateVolumeRequest(
                name=unique(),
                volume_capabilities=[mount_capability()],
                capacity_range=csi.CapacityRange(required_bytes=10 * MiB, limit_bytes=MiB),
            )
        ),
        Code.OUT_OF_RANGE,
    ),
    (
        "create-missing-source-snapshot",
        lambda s: create(
            s,
            volume_content_source=csi.VolumeContentSource(
                snapshot=csi.VolumeContentSource.SnapshotSource(snapshot_id=MISSING_VOLUME)
            ),
        ),
        Code.NOT_FOUND,
    ),
    (
        "create-missing-source-volume",
        lambda s: create(
            s,
            volume_content_source=csi.VolumeContentSource(
                volume=csi.VolumeContentSource.VolumeSource(volume_id=MISSING_VOLUME)
            ),
        ),
        Code.NOT_FOUND,
    ),
    (
        "create-other-node-topology",
        lambda s: create(
            s,
            accessibility_requirements=csi.TopologyRequirement(
                requisite=[csi.Topology(segments={"topology.rbd.csi-rbd.io/node": "node-z"})]
            ),
        ),
        Code.RESOURCE_EXHAUSTED,
    ),
    ("delete-no-id", lambda s: s.DeleteVolume(csi.DeleteVolumeRequest()), Code.INVALID_ARGUMENT),
    (
        "snapshot-no-name",
        lambda s: s.CreateSnapshot(csi.CreateSnapshotRequest(source_volume_id=MISSING_VOLUME)),
        Code.INVALID_ARGUMENT,
    ),
    (
        "snapshot-no-source",
        lambda s: s.CreateSnapshot(csi.CreateSnapshotRequest(name=unique())),
        Code.INVALID_ARGUMENT,
    ),
    (
        "snapshot-missing-source",
        lambda s: s.CreateSnapshot(
            csi.CreateSnapshotRequest(name=unique(), source_volume_id=MISSING_VOLUME)
        ),
        Code.NOT_FOUND,
    ),
    (
        "delete-snapshot-no-id",
        lambda s: s.DeleteSnapshot(csi.DeleteSnapshotRequest()),
        Code.INVALID_ARGUMENT,
    ),
    (
        "get-snapshot-missing",
        lambda s: s.GetSnapshot(csi.GetSnapshotRequest(snapshot_id=MISSING_VOLUME)),
        Code.NOT_FOUND,
    ),
    (
        "list-volumes-bad-token",
        lambda s: s.ListVolumes(csi.ListVolumesRequest(starting_token="nonsense")),
        Code.ABORTED,
    ),
    (
        "list-snapshots-bad-token",
        lambda s: s.ListSnapshots(csi.ListSnapshotsRequest(starting_token="nonsense")),
        Code.ABORTED,
    ),
    (
        "validate-missing-volume",
        lambda s: s.ValidateVolumeCapabilities(
            csi.ValidateVolumeCapabilitiesRequest(
                volume_id=MISSING_VOLUME, volume_capabilities=[mount_capability()]
            )
        ),
        Code.NOT_FOUND,
    ),
    (
        "validate-no-capabilities",
        lambda s: s.ValidateVolumeCapabilities(
            csi.ValidateVolumeCapabilitiesRequest(volume_id=MISSING_VOLUME)
        ),
        Code.INVALID_ARGUMENT,
    ),
    (
        "expand-missing-volume",
        lambda s: s.ControllerExpandVolume(
            csi.ControllerExpandVolumeRequest(
                volume_id=MISSING_VOLUME, capacity_range=csi.CapacityRange(required_bytes=MiB)
            )
        ),
        Code.NOT_FOUND,
    ),
    (
        "expand-no-capacity",
        lambda s: s.ControllerExpandVolume(
            csi.ControllerExpandVolumeRequest(volume_id=MISSING_VOLUME)
        ),
        Code.INVALID_ARGUMENT,
    ),
    (
        "get-volume-missing",
        lambda s: s.ControllerGetVolume(csi.ControllerGetVolumeRequest(volume_id=MISSING_VOLUME)),
        Code.NOT_FOUND,
    ),
    (
        "modify-missing-volume",
        lambda s: s.ControllerModifyVolume(
            csi.ControllerModifyVolumeRequest(
                volume_id=MISSING_VOLUME, mutable_parameters={"cache": "writeback"}
            )
        ),
        Code.NOT_FOUND,
    ),
    (
        "publish-unimplemented",
        lambda s: s.ControllerPublishVolume(
            csi.ControllerPublishVolumeRequest(volume_id=MISSING_VOLUME, node_id=NODE)
        ),
        Code.UNIMPLEMENTED,
    ),
]


@pytest.mark.parametrize(
    ("call", "code"), [(c, k) for _, c, k in INVALID], ids=[i[0] for i in INVALID]
)
def test_invalid_requests(grpc_stub: Any, call: Callable[[Any], Any], code: Code) -> None:
    expect_code(lambda: call(grpc_stub), code)


def test_unknown_parameter_is_named(grpc_stub: Any) -> None:
    message = expect_code(
        lambda: create(grpc_stub, parameters={"colour": "blue"}), Code.INVALID_ARGUMENT
    )
    assert "colour" in message


# -- CreateVolume ----------------------------------------------------------------------
def test_create_volume_is_idempotent(grpc_stub: Any) -> None:
    name = unique()
    first = create(grpc_stub, name, 20 * MiB)
    again = create(grpc_stub, name, 20 * MiB)
    assert first.volume_id == again.volume_id
    assert first.capacity_bytes == 20 * MiB
    assert dict(first.accessible_topology[0].segments) == {"topology.rbd.csi-rbd.io/node": NODE}
    assert first.volume_context["cache"] == "none"


def test_create_volume_incompatible_repeat(grpc_stub: Any) -> None:
    name = unique()
    create(grpc_stub, name, 20 * MiB)
    expect_code(lambda: create(grpc_stub, name, 40 * MiB), Code.ALREADY_EXISTS)


def test_capacity_range_exact(grpc_stub: Any) -> None:
    volume = grpc_stub.CreateVolume(
        csi.CreateVolumeRequest(
            name=unique(),
            volume_capabilities=[block_capability()],
            capacity_range=csi.CapacityRange(required_bytes=5 * MiB + 1, limit_bytes=6 * MiB),
        )
    ).volume
    assert 5 * MiB + 1 <= volume.capacity_bytes <= 6 * MiB
    expect_code(
        lambda: grpc_stub.CreateVolume(
            csi.CreateVolumeRequest(
                name=unique(),
                volume_capabilities=[block_capability()],
                capacity_range=csi.CapacityRange(required_bytes=4097, limit_bytes=4100),
            )
        ),
        Code.OUT_OF_RANGE,
    )


def test_parameters_reach_the_volume(grpc_stub: Any, engines: dict[str, Any]) -> None:
    volume = create(
        grpc_stub,
        parameters={"cache": "writeback", "discard": "ignore", "objectSize": "1M"},
    )
    assert volume.volume_context["cache"] == "writeback"
    assert volume.volume_context["discard"] == "ignore"
    with image_of(engines, volume.volume_id) as image:
        assert image.stat()["order"] == 20


def test_restore_from_snapshot_and_clone(grpc_stub: Any, engines: dict[str, Any]) -> None:
    source = create(grpc_stub, size=8 * MiB)
    write(engines, source.volume_id, b"golden", 4 * MiB)
    snap = grpc_stub.CreateSnapshot(
        csi.CreateSnapshotRequest(name=unique("snap"), source_volume_id=source.volume_id)
    ).snapshot
    assert snap.ready_to_use and snap.size_bytes == 8 * MiB
    assert snap.source_volume_id == source.volume_id
    write(engines, source.volume_id, b"changed", 4 * MiB)

    restored = create(
        grpc_stub,
        size=12 * MiB,
        volume_content_source=csi.VolumeContentSource(
            snapshot=csi.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)
        ),
    )
    assert restored.capacity_bytes == 12 * MiB
    assert restored.content_source.snapshot.snapshot_id == snap.snapshot_id
    assert read(engines, restored.volume_id, 6, 4 * MiB) == b"golden"

    cloned = create(
        grpc_stub,
        size=8 * MiB,
        volume_content_source=csi.VolumeContentSource(
            volume=csi.VolumeContentSource.VolumeSource(volume_id=source.volume_id)
        ),
    )
    assert read(engines, cloned.volume_id, 7, 4 * MiB) == b"changed"
    write(engines, cloned.volume_id, b"mine", 4 * MiB)
    assert read(engines, source.volume_id, 7, 4 * MiB) == b"changed"

    for too_small in (snap.snapshot_id, None):
        source_field = (
            csi.VolumeContentSource(
                snapshot=csi.VolumeContentSource.SnapshotSource(snapshot_id=too_small)
            )
            if too_small
            else csi.VolumeContentSource(
                volume=csi.VolumeContentSource.VolumeSource(volume_id=source.volume_id)
            )
        )
        expect_code(
            lambda field=source_field: create(grpc_stub, size=4 * MiB, volume_content_source=field),
            Code.OUT_OF_RANGE,
        )


def test_delete_volume_keeps_its_snapshots(grpc_stub: Any, engines: dict[str, Any]) -> None:
    source = create(grpc_stub, size=4 * MiB)
    write(engines, source.volume_id, b"keep me")
    snap = grpc_stub.CreateSnapshot(
        csi.CreateSnapshotRequest(name=unique("snap"), source_volume_id=source.volume_id)
    ).snapshot
    grpc_stub.DeleteVolume(csi.DeleteVolumeRequest(volume_id=source.volume_id))
    grpc_stub.DeleteVolume(csi.DeleteVolumeRequest(volume_id=source.volume_id))  # idempotent
    expect_code(
        lambda: grpc_stub.ControllerGetVolume(
            csi.ControllerGetVolumeRequest(volume_id=source.volume_id)
        ),
        Code.NOT_FOUND,
    )
    restored = create(
        grpc_stub,
        size=4 * MiB,
        volume_content_source=csi.VolumeContentSource(
            snapshot=csi.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)
        ),
    )
    assert read(engines, restored.volume_id, 7) == b"keep me"
    grpc_stub.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    grpc_stub.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert read(engines, restored.volume_id, 7) == b"keep me"
    grpc_stub.DeleteVolume(csi.DeleteVolumeRequest(volume_id=restored.volume_id))
    # everything behind them went too: no image is left in the trash
    with engines["local"].session() as cluster:
        ioctx = cluster.open_ioctx("rbd")
        leftovers = [i for i in engines["local"].rbd.trash_list(ioctx)]
    assert not [i for i in leftovers if source.volume_id.endswith(i["name"][len("csi-vol-") :])]


def test_delete_volume_in_use(grpc_stub: Any, engines: dict[str, Any]) -> None:
    volume = create(grpc_stub, size=4 * MiB)
    with image_of(engines, volume.volume_id) as image:
        image.lock_acquire()
        expect_code(
            lambda: grpc_stub.DeleteVolume(csi.DeleteVolumeRequest(volume_id=volume.volume_id)),
            Code.FAILED_PRECONDITION,
        )
    grpc_stub.DeleteVolume(csi.DeleteVolumeRequest(volume_id=volume.volume_id))


def test_concurrent_call_on_same_volume_is_aborted(
    grpc_stub: Any, grpc_servicer: ControllerService
) -> None:
    volume = create(grpc_stub, size=4 * MiB)
    with grpc_servicer.volumes.locks.hold(volume.volume_id):
        expect_code(
            lambda: grpc_stub.DeleteVolume(csi.DeleteVolumeRequest(volume_id=volume.volume_id)),
            Code.ABORTED,
        )
    name = unique()
    with grpc_servicer.volumes.locks.hold(f"volume-name:{name}"):
        expect_code(lambda: create(grpc_stub, name), Code.ABORTED)
    create(grpc_stub, name)


# -- snapshots ---------------------------------------------------------------------
def test_snapshot_idempotent_and_conflicting(grpc_stub: Any) -> None:
    a = create(grpc_stub, size=4 * MiB)
    b = create(grpc_stub, size=4 * MiB)
    name = unique("snap")
    first = grpc_stub.CreateSnapshot(
        csi.CreateSnapshotRequest(name=name, source_volume_id=a.volume_id)
    ).snapshot
    again = grpc_stub.CreateSnapshot(
        csi.CreateSnapshotRequest(name=name, source_volume_id=a.volume_id)
    ).snapshot
    assert first.snapshot_id == again.snapshot_id
    assert first.creation_time == again.creation_time
    expect_code(
        lambda: grpc_stub.CreateSnapshot(
            csi.CreateSnapshotRequest(name=name, source_volume_id=b.volume_id)
        ),
        Code.ALREADY_EXISTS,
    )
    got = grpc_stub.GetSnapshot(csi.GetSnapshotRequest(snapshot_id=first.snapshot_id)).snapshot
    assert got == first


def test_list_snapshots_filters_and_pages(grpc_stub: Any) -> None:
    volume = create(grpc_stub, size=4 * MiB)
    made = {
        grpc_stub.CreateSnapshot(
            csi.CreateSnapshotRequest(name=unique("snap"), source_volume_id=volume.volume_id)
        ).snapshot.snapshot_id
        for _ in range(3)
    }
    by_source = grpc_stub.ListSnapshots(csi.ListSnapshotsRequest(source_volume_id=volume.volume_id))
    assert {e.snapshot.snapshot_id for e in by_source.entries} == made
    one = sorted(made)[1]
    by_id = grpc_stub.ListSnapshots(csi.ListSnapshotsRequest(snapshot_id=one))
    assert [e.snapshot.snapshot_id for e in by_id.entries] == [one]
    assert not grpc_stub.ListSnapshots(csi.ListSnapshotsRequest(snapshot_id=MISSING_VOLUME)).entries
    seen: list[str] = []
    token = ""
    while True:
        page = grpc_stub.ListSnapshots(
            csi.ListSnapshotsRequest(
                source_volume_id=volume.volume_id, max_entries=2, starting_token=token
            )
        )
        assert len(page.entries) <= 2
        seen += [e.snapshot.snapshot_id for e in page.entries]
        token = page.next_token
        if not token:
            break
    assert sorted(seen) == sorted(made)


def test_list_volumes_pages(grpc_stub: Any) -> None:
    made = {create(grpc_stub, size=MiB).volume_id for _ in range(5)}
    seen: list[str] = []
    token = ""
    while True:
        page = grpc_stub.ListVolumes(csi.ListVolumesRequest(max_entries=3, starting_token=token))
        assert len(page.entries) <= 3
        seen += [e.volume.volume_id for e in page.entries]
        token = page.next_token
        if not token:
            break
    assert made <= set(seen)
    assert len(seen) == len(set(seen))


# -- the rest ------------------------------------------------------------------------
def test_capacity(grpc_stub: Any) -> None:
    free = grpc_stub.GetCapacity(csi.GetCapacityRequest()).available_capacity
    assert free > 0
    elsewhere = grpc_stub.GetCapacity(
        csi.GetCapacityRequest(
            accessible_topology=csi.Topology(segments={"topology.rbd.csi-rbd.io/node": "node-z"})
        )
    ).available_capacity
    assert elsewhere == 0


def test_validate_volume_capabilities(grpc_stub: Any) -> None:
    volume = create(grpc_stub, size=MiB)
    ok = grpc_stub.ValidateVolumeCapabilities(
        csi.ValidateVolumeCapabilitiesRequest(
            volume_id=volume.volume_id, volume_capabilities=[mount_capability("xfs")]
        )
    )
    assert ok.HasField("confirmed")
    refused = grpc_stub.ValidateVolumeCapabilities(
        csi.ValidateVolumeCapabilitiesRequest(
            volume_id=volume.volume_id,
            volume_capabilities=[mount_capability(mode=AccessMode.MULTI_NODE_MULTI_WRITER)],
        )
    )
    assert not refused.HasField("confirmed") and "MULTI_NODE_MULTI_WRITER" in refused.message


@pytest.mark.parametrize(
    ("capability", "node_needed"), [(mount_capability(), True), (block_capability(), False)]
)
def test_expand(
    grpc_stub: Any, engines: dict[str, Any], capability: Any, node_needed: bool
) -> None:
    volume = create(grpc_stub, size=4 * MiB, volume_capabilities=[capability])
    write(engines, volume.volume_id, b"data", 4 * MiB - 4)
    answer = grpc_stub.ControllerExpandVolume(
        csi.ControllerExpandVolumeRequest(
            volume_id=volume.volume_id,
            capacity_range=csi.CapacityRange(required_bytes=10 * MiB),
            volume_capability=capability,
        )
    )
    assert answer.capacity_bytes == 10 * MiB
    assert answer.node_expansion_required is node_needed
    assert read(engines, volume.volume_id, 4, 4 * MiB - 4) == b"data"
    smaller = grpc_stub.ControllerExpandVolume(
        csi.ControllerExpandVolumeRequest(
            volume_id=volume.volume_id, capacity_range=csi.CapacityRange(required_bytes=MiB)
        )
    )
    assert smaller.capacity_bytes == 10 * MiB


def test_get_and_modify_volume(grpc_stub: Any, engines: dict[str, Any]) -> None:
    volume = create(grpc_stub, size=MiB)
    got = grpc_stub.ControllerGetVolume(csi.ControllerGetVolumeRequest(volume_id=volume.volume_id))
    assert got.volume.volume_id == volume.volume_id
    assert got.status.volume_condition.abnormal is False
    grpc_stub.ControllerModifyVolume(
        csi.ControllerModifyVolumeRequest(
            volume_id=volume.volume_id, mutable_parameters={"cache": "writethrough"}
        )
    )
    got = grpc_stub.ControllerGetVolume(csi.ControllerGetVolumeRequest(volume_id=volume.volume_id))
    # the volume context is immutable (spec); the node reads the new mode from the image
    assert got.volume.volume_context == volume.volume_context
    with image_of(engines, volume.volume_id) as image:
        assert image.metadata_get("csi.cache") == "writethrough"
    message = expect_code(
        lambda: grpc_stub.ControllerModifyVolume(
            csi.ControllerModifyVolumeRequest(
                volume_id=volume.volume_id, mutable_parameters={"pool": "other"}
            )
        ),
        Code.INVALID_ARGUMENT,
    )
    assert "pool" in message


def test_capabilities_declared(grpc_stub: Any) -> None:
    caps = grpc_stub.ControllerGetCapabilities(csi.ControllerGetCapabilitiesRequest()).capabilities
    kinds = {c.rpc.type for c in caps}
    rpc = csi.ControllerServiceCapability.RPC.Type
    assert {
        rpc.CREATE_DELETE_VOLUME,
        rpc.CREATE_DELETE_SNAPSHOT,
        rpc.EXPAND_VOLUME,
        rpc.MODIFY_VOLUME,
    } <= kinds
