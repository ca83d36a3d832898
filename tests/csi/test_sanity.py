"""CSI conformance: the cases of csi-sanity (kubernetes-csi/csi-test, pkg/sanity) that apply
to this driver's capabilities, plus the spec's error tables, idempotency rules, pagination
and full volume lifecycles.

One real ``csi-rbd serve`` process serves the whole module on a unix socket, with real
loop devices, FUSE and filesystems; every test provisions through a ``Resources`` record
that unpublishes, unstages and deletes what is left at its end (as csi-sanity does).
After the module nothing may remain: no mount, loop device, FUSE mount or attach daemon
under the module's directory, and no image (not even in the trash) in the engine.

Each test names the csi-sanity case it maps (``sanity:``) or the spec rule (``spec:``).
"""

from __future__ import annotations

import concurrent.futures
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_rbd._proto import csi_pb2 as csi
from tests.csi.driver import running_driver
from tests.csi.sanity_support import (
    Code,
    Driver,
    MiB,
    Mode,
    Resources,
    block,
    capability,
    code_of,
    create_request,
    device_size,
    expect,
    missing_snapshot_id,
    missing_volume_id,
    mount,
    read_payload,
    unique,
    unique_with_length,
    write_payload,
)
from tests.node.conftest import _UNUSABLE

pytestmark = pytest.mark.skipif(bool(_UNUSABLE), reason=f"node data path {_UNUSABLE}")

GiB = 1 << 30
MAX_NAME_LENGTH = 128  # csi-sanity's MaxNameLength; the spec's general string limit
ControllerRPC = csi.ControllerServiceCapability.RPC.Type
NodeRPC = csi.NodeServiceCapability.RPC.Type
Service = csi.PluginCapability.Service.Type
Expansion = csi.PluginCapability.VolumeExpansion.Type


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Driver]:
    root = Path(os.path.realpath(tmp_path_factory.mktemp("sanity")))
    with running_driver(root) as running:
        yield running
    images, trash = running.pool_contents()
    assert images == [] and trash == [], f"left in the engine: {images} {trash}"


@pytest.fixture
def r(driver: Driver) -> Iterator[Resources]:
    resources = Resources(driver)
    yield resources
    failures = resources.cleanup()
    assert not failures, "cleanup failed:\n" + "\n".join(failures)


@pytest.fixture(scope="module")
def shared(driver: Driver) -> Iterator[csi.Volume]:
    """One existing volume for the argument-checking tables."""
    volume = driver.controller.CreateVolume(create_request(unique("shared"))).volume
    yield volume
    driver.controller.DeleteVolume(csi.DeleteVolumeRequest(volume_id=volume.volume_id))


def twice(call: Callable[[], Any]) -> Any:
    """Every RPC of a lifecycle is sent twice (a CO retry); both answers must agree."""
    first, second = call(), call()
    assert first == second, f"a retry answered differently:\n{first}\n{second}"
    return first


# -- Identity ------------------------------------------------------------------------------------
def test_get_plugin_info(driver: Driver) -> None:
    """sanity: GetPluginInfo should return appropriate information."""
    info = twice(lambda: driver.identity.GetPluginInfo(csi.GetPluginInfoRequest()))
    assert len(info.name) <= 63
    assert re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", info.name), info.name
    assert info.vendor_version, "vendor_version is REQUIRED"


def test_get_plugin_capabilities(driver: Driver) -> None:
    """sanity: GetPluginCapabilities should return appropriate capabilities."""
    caps = twice(
        lambda: driver.identity.GetPluginCapabilities(csi.GetPluginCapabilitiesRequest())
    ).capabilities
    services = {c.service.type for c in caps if c.HasField("service")}
    expansion = {c.volume_expansion.type for c in caps if c.HasField("volume_expansion")}
    assert services <= set(Service.values()) - {Service.UNKNOWN}
    assert {Service.CONTROLLER_SERVICE, Service.VOLUME_ACCESSIBILITY_CONSTRAINTS} <= services
    assert expansion == {Expansion.ONLINE}


def test_probe(driver: Driver) -> None:
    """sanity: Probe should return appropriate information."""
    answer = twice(lambda: driver.identity.Probe(csi.ProbeRequest()))
    assert not answer.HasField("ready") or answer.ready.value is True


@pytest.mark.parametrize(
    "mode",
    [
        "controller",
        "node",
    ],
)
def test_plugin_capabilities_do_not_depend_on_mode(
    driver: Driver, tmp_path: Path, mode: str
) -> None:
    """spec (GetPluginCapabilities): all instances of the same version SHALL return the same
    set of capabilities, regardless of which RPCs an instance is serving."""
    everything = driver.identity.GetPluginCapabilities(csi.GetPluginCapabilitiesRequest())
    with running_driver(Path(os.path.realpath(tmp_path)), mode=mode) as other:
        answer = other.identity.GetPluginCapabilities(csi.GetPluginCapabilitiesRequest())
    assert sorted(map(str, answer.capabilities)) == sorted(map(str, everything.capabilities))


# -- capabilities --------------------------------------------------------------------------------
def test_controller_get_capabilities(driver: Driver) -> None:
    """sanity: ControllerGetCapabilities should return appropriate capabilities."""
    answer = twice(
        lambda: driver.controller.ControllerGetCapabilities(csi.ControllerGetCapabilitiesRequest())
    )
    found = {c.rpc.type for c in answer.capabilities}
    assert found <= set(ControllerRPC.values()) - {ControllerRPC.UNKNOWN}
    assert found == {
        ControllerRPC.CREATE_DELETE_VOLUME,
        ControllerRPC.CREATE_DELETE_SNAPSHOT,
        ControllerRPC.LIST_SNAPSHOTS,
        ControllerRPC.GET_SNAPSHOT,
        ControllerRPC.LIST_VOLUMES,
        ControllerRPC.GET_CAPACITY,
        ControllerRPC.CLONE_VOLUME,
        ControllerRPC.EXPAND_VOLUME,
        ControllerRPC.GET_VOLUME,
        ControllerRPC.VOLUME_CONDITION,
        ControllerRPC.MODIFY_VOLUME,
        ControllerRPC.SINGLE_NODE_MULTI_WRITER,
    }


def test_node_get_capabilities(driver: Driver) -> None:
    """sanity: NodeGetCapabilities should return appropriate capabilities."""
    answer = twice(lambda: driver.node.NodeGetCapabilities(csi.NodeGetCapabilitiesRequest()))
    assert {c.rpc.type for c in answer.capabilities} == {
        NodeRPC.STAGE_UNSTAGE_VOLUME,
        NodeRPC.GET_VOLUME_STATS,
        NodeRPC.EXPAND_VOLUME,
        NodeRPC.VOLUME_CONDITION,
        NodeRPC.SINGLE_NODE_MULTI_WRITER,
    }


def test_node_get_info(driver: Driver) -> None:
    """sanity: NodeGetInfo should return appropriate values (topology: the plugin declares
    VOLUME_ACCESSIBILITY_CONSTRAINTS)."""
    info = twice(lambda: driver.node.NodeGetInfo(csi.NodeGetInfoRequest()))
    assert info.node_id == "node-a"
    assert info.max_volumes_per_node >= 0
    assert info.HasField("accessible_topology") and info.accessible_topology.segments


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.ControllerPublishVolume(
            csi.ControllerPublishVolumeRequest(
                volume_id=missing_volume_id(), node_id="node-a", volume_capability=mount()
            )
        ),
        lambda c: c.ControllerUnpublishVolume(
            csi.ControllerUnpublishVolumeRequest(volume_id=missing_volume_id(), node_id="node-a")
        ),
    ],
    ids=["controller-publish", "controller-unpublish"],
)
def test_controller_publish_is_not_implemented(driver: Driver, call: Any) -> None:
    """spec (error scheme): an RPC the plugin does not implement answers UNIMPLEMENTED
    (no PUBLISH_UNPUBLISH_VOLUME: csi-sanity's ControllerPublish/Unpublish cases skip)."""
    expect(lambda: call(driver.controller), Code.UNIMPLEMENTED)


# -- missing required fields: INVALID_ARGUMENT ---------------------------------------------------
Call = Callable[[Driver, csi.Volume], Any]

MISSING_FIELD: list[tuple[str, Call]] = [
    # Controller
    ("create-volume-no-name", lambda d, v: d.controller.CreateVolume(create_request(""))),
    (
        "create-volume-no-capabilities",
        lambda d, v: d.controller.CreateVolume(csi.CreateVolumeRequest(name=unique("nocaps"))),
    ),
    (
        "create-volume-empty-snapshot-source",
        lambda d, v: d.controller.CreateVolume(create_request(unique("src"), snapshot="")),
    ),
    (
        "create-volume-empty-volume-source",
        lambda d, v: d.controller.CreateVolume(create_request(unique("src"), volume="")),
    ),
    ("delete-volume-no-id", lambda d, v: d.controller.DeleteVolume(csi.DeleteVolumeRequest())),
    (
        "validate-no-id",
        lambda d, v: d.controller.ValidateVolumeCapabilities(
            csi.ValidateVolumeCapabilitiesRequest(volume_capabilities=[mount()])
        ),
    ),
    (
        "validate-no-capabilities",
        lambda d, v: d.controller.ValidateVolumeCapabilities(
            csi.ValidateVolumeCapabilitiesRequest(volume_id=v.volume_id)
        ),
    ),
    (
        "expand-no-id",
        lambda d, v: d.controller.ControllerExpandVolume(
            csi.ControllerExpandVolumeRequest(
                capacity_range=csi.CapacityRange(required_bytes=GiB), volume_capability=mount()
            )
        ),
    ),
    (
        "expand-no-capacity-range",
        lambda d, v: d.controller.ControllerExpandVolume(
            csi.ControllerExpandVolumeRequest(volume_id=v.volume_id)
        ),
    ),
    (
        "get-volume-no-id",
        lambda d, v: d.controller.ControllerGetVolume(csi.ControllerGetVolumeRequest()),
    ),
    (
        "modify-no-id",
        lambda d, v: d.controller.ControllerModifyVolume(
            csi.ControllerModifyVolumeRequest(mutable_parameters={"cache": "writeback"})
        ),
    ),
    (
        "modify-no-mutable-parameters",
        lambda d, v: d.controller.ControllerModifyVolume(
            csi.ControllerModifyVolumeRequest(volume_id=v.volume_id)
        ),
    ),
    (
        "create-snapshot-no-name",
        lambda d, v: d.controller.CreateSnapshot(
            csi.CreateSnapshotRequest(source_volume_id=v.volume_id)
        ),
    ),
    (
        "create-snapshot-no-source",
        lambda d, v: d.controller.CreateSnapshot(csi.CreateSnapshotRequest(name=unique("snap"))),
    ),
    (
        "delete-snapshot-no-id",
        lambda d, v: d.controller.DeleteSnapshot(csi.DeleteSnapshotRequest()),
    ),
    ("get-snapshot-no-id", lambda d, v: d.controller.GetSnapshot(csi.GetSnapshotRequest())),
    (
        "list-volumes-negative-max-entries",
        lambda d, v: d.controller.ListVolumes(csi.ListVolumesRequest(max_entries=-1)),
    ),
    (
        "list-snapshots-negative-max-entries",
        lambda d, v: d.controller.ListSnapshots(csi.ListSnapshotsRequest(max_entries=-1)),
    ),
    # Node
    (
        "stage-no-volume-id",
        lambda d, v: d.node.NodeStageVolume(
            csi.NodeStageVolumeRequest(
                staging_target_path=str(d.root / "staging" / "x"), volume_capability=mount()
            )
        ),
    ),
    (
        "stage-no-staging-path",
        lambda d, v: d.node.NodeStageVolume(
            csi.NodeStageVolumeRequest(volume_id=v.volume_id, volume_capability=mount())
        ),
    ),
    (
        "stage-no-capability",
        lambda d, v: d.node.NodeStageVolume(
            csi.NodeStageVolumeRequest(
                volume_id=v.volume_id, staging_target_path=str(d.root / "staging" / "x")
            )
        ),
    ),
    (
        "unstage-no-volume-id",
        lambda d, v: d.node.NodeUnstageVolume(
            csi.NodeUnstageVolumeRequest(staging_target_path=str(d.root / "staging" / "x"))
        ),
    ),
    (
        "unstage-no-staging-path",
        lambda d, v: d.node.NodeUnstageVolume(
            csi.NodeUnstageVolumeRequest(volume_id=missing_volume_id())
        ),
    ),
    (
        "publish-no-volume-id",
        lambda d, v: d.node.NodePublishVolume(csi.NodePublishVolumeRequest()),
    ),
    (
        "publish-no-target-path",
        lambda d, v: d.node.NodePublishVolume(
            csi.NodePublishVolumeRequest(volume_id=missing_volume_id())
        ),
    ),
    (
        "publish-no-capability",
        lambda d, v: d.node.NodePublishVolume(
            csi.NodePublishVolumeRequest(
                volume_id=missing_volume_id(), target_path=str(d.root / "pods" / "x" / "mount")
            )
        ),
    ),
    (
        "publish-no-capability-with-staging-path",
        lambda d, v: d.node.NodePublishVolume(
            csi.NodePublishVolumeRequest(
                volume_id=v.volume_id,
                staging_target_path=str(d.root / "staging" / "x"),
                target_path=str(d.root / "pods" / "x" / "mount"),
            )
        ),
    ),
    (
        "unpublish-no-volume-id",
        lambda d, v: d.node.NodeUnpublishVolume(csi.NodeUnpublishVolumeRequest()),
    ),
    (
        "unpublish-no-target-path",
        lambda d, v: d.node.NodeUnpublishVolume(
            csi.NodeUnpublishVolumeRequest(volume_id=missing_volume_id())
        ),
    ),
    (
        "stats-no-volume-id",
        lambda d, v: d.node.NodeGetVolumeStats(
            csi.NodeGetVolumeStatsRequest(volume_path=str(d.root / "pods"))
        ),
    ),
    (
        "stats-no-volume-path",
        lambda d, v: d.node.NodeGetVolumeStats(
            csi.NodeGetVolumeStatsRequest(volume_id=missing_volume_id())
        ),
    ),
    (
        "node-expand-no-volume-id",
        lambda d, v: d.node.NodeExpandVolume(
            csi.NodeExpandVolumeRequest(volume_path=str(d.root / "pods"), volume_capability=mount())
        ),
    ),
    (
        "node-expand-no-volume-path",
        lambda d, v: d.node.NodeExpandVolume(
            csi.NodeExpandVolumeRequest(volume_id=v.volume_id, volume_capability=mount())
        ),
    ),
]


@pytest.mark.parametrize("call", [c for _, c in MISSING_FIELD], ids=[i for i, _ in MISSING_FIELD])
def test_missing_required_field(driver: Driver, shared: csi.Volume, call: Call) -> None:
    """sanity: every "should fail when no <field> is provided" case; spec (error scheme):
    Missing required field -> 3 INVALID_ARGUMENT."""
    expect(lambda: call(driver, shared), Code.INVALID_ARGUMENT)


# -- unknown objects: NOT_FOUND, or OK where deletion is idempotent ------------------------------
NOT_FOUND: list[tuple[str, Call]] = [
    (
        "validate-missing-volume",
        lambda d, v: d.controller.ValidateVolumeCapabilities(
            csi.ValidateVolumeCapabilitiesRequest(
                volume_id=missing_volume_id(), volume_capabilities=[mount()]
            )
        ),
    ),
    (
        "create-from-missing-snapshot-malformed-id",
        lambda d, v: d.controller.CreateVolume(
            create_request(unique("from"), snapshot="non-existing-snapshot-id")
        ),
    ),
    (
        "create-from-missing-snapshot",
        lambda d, v: d.controller.CreateVolume(
            create_request(unique("from"), snapshot=missing_snapshot_id())
        ),
    ),
    (
        "create-from-missing-volume",
        lambda d, v: d.controller.CreateVolume(
            create_request(unique("from"), volume=missing_volume_id())
        ),
    ),
    (
        "get-volume-missing",
        lambda d, v: d.controller.ControllerGetVolume(
            csi.ControllerGetVolumeRequest(volume_id=missing_volume_id())
        ),
    ),
    (
        "expand-missing",
        lambda d, v: d.controller.ControllerExpandVolume(
            csi.ControllerExpandVolumeRequest(
                volume_id=missing_volume_id(), capacity_range=csi.CapacityRange(required_bytes=GiB)
            )
        ),
    ),
    (
        "modify-missing-malformed-id",
        lambda d, v: d.controller.ControllerModifyVolume(
            csi.ControllerModifyVolumeRequest(
                volume_id="non-existing-volume-id", mutable_parameters={"cache": "writeback"}
            )
        ),
    ),
    (
        "modify-missing",
        lambda d, v: d.controller.ControllerModifyVolume(
            csi.ControllerModifyVolumeRequest(
                volume_id=missing_volume_id(), mutable_parameters={"cache": "writeback"}
            )
        ),
    ),
    (
        "create-snapshot-of-missing-volume",
        lambda d, v: d.controller.CreateSnapshot(
            csi.CreateSnapshotRequest(name=unique("snap"), source_volume_id=missing_volume_id())
        ),
    ),
    (
        "get-snapshot-missing",
        lambda d, v: d.controller.GetSnapshot(
            csi.GetSnapshotRequest(snapshot_id=missing_snapshot_id())
        ),
    ),
    (
        "get-snapshot-malformed-id",
        lambda d, v: d.controller.GetSnapshot(csi.GetSnapshotRequest(snapshot_id="none-exist-id")),
    ),
    (
        "stage-missing-volume",
        lambda d, v: d.node.NodeStageVolume(
            csi.NodeStageVolumeRequest(
                volume_id=missing_volume_id(),
                staging_target_path=str(d.root / "staging" / unique("missing")),
                volume_capability=mount(),
            )
        ),
    ),
    (
        "stats-missing-volume",
        lambda d, v: d.node.NodeGetVolumeStats(
            csi.NodeGetVolumeStatsRequest(
                volume_id=missing_volume_id(), volume_path=str(d.root / "pods")
            )
        ),
    ),
    (
        "node-expand-missing-volume",
        lambda d, v: d.node.NodeExpandVolume(
            csi.NodeExpandVolumeRequest(
                volume_id=missing_volume_id(), volume_path=str(d.root / "pods")
            )
        ),
    ),
]


@pytest.mark.parametrize("call", [c for _, c in NOT_FOUND], ids=[i for i, _ in NOT_FOUND])
def test_not_found(driver: Driver, shared: csi.Volume, call: Call) -> None:
    """sanity: "should fail when the volume/snapshot does not exist / is not found" cases;
    spec: Volume (source, snapshot) does not exist -> 5 NOT_FOUND."""
    expect(lambda: call(driver, shared), Code.NOT_FOUND)


IDEMPOTENT_ON_MISSING: list[tuple[str, Call]] = [
    (
        "delete-volume-malformed-id",
        lambda d, v: d.controller.DeleteVolume(csi.DeleteVolumeRequest(volume_id="invalid-id")),
    ),
    (
        "delete-volume-missing",
        lambda d, v: d.controller.DeleteVolume(
            csi.DeleteVolumeRequest(volume_id=missing_volume_id())
        ),
    ),
    (
        "delete-snapshot-malformed-id",
        lambda d, v: d.controller.DeleteSnapshot(
            csi.DeleteSnapshotRequest(snapshot_id="reallyfakesnapshotid")
        ),
    ),
    (
        "delete-snapshot-missing",
        lambda d, v: d.controller.DeleteSnapshot(
            csi.DeleteSnapshotRequest(snapshot_id=missing_snapshot_id())
        ),
    ),
    (
        "unstage-not-staged",
        lambda d, v: d.node.NodeUnstageVolume(
            csi.NodeUnstageVolumeRequest(
                volume_id=v.volume_id, staging_target_path=str(d.root / "staging" / "never")
            )
        ),
    ),
    (
        "unpublish-not-published",
        lambda d, v: d.node.NodeUnpublishVolume(
            csi.NodeUnpublishVolumeRequest(
                volume_id=v.volume_id, target_path=str(d.root / "pods" / "never")
            )
        ),
    ),
]


@pytest.mark.parametrize(
    "call", [c for _, c in IDEMPOTENT_ON_MISSING], ids=[i for i, _ in IDEMPOTENT_ON_MISSING]
)
def test_idempotent_on_missing(driver: Driver, shared: csi.Volume, call: Call) -> None:
    """sanity: DeleteVolume/DeleteSnapshot "should succeed when an invalid id is used";
    spec: Delete*/NodeUnstage/NodeUnpublish of what does not exist (or is not staged or
    published there) MUST reply 0 OK."""
    twice(lambda: call(driver, shared))


@pytest.mark.parametrize(
    "request_",
    [
        csi.ListSnapshotsRequest(snapshot_id="none-exist-id"),
        csi.ListSnapshotsRequest(snapshot_id=missing_snapshot_id()),
        csi.ListSnapshotsRequest(source_volume_id=missing_volume_id()),
    ],
    ids=["malformed-snapshot-id", "missing-snapshot-id", "missing-source-volume"],
)
def test_list_snapshots_of_nothing_is_empty(driver: Driver, request_: Any) -> None:
    """sanity: ListSnapshots "should return empty when the specified snapshot id / source
    volume id does not exist"."""
    assert list(driver.controller.ListSnapshots(request_).entries) == []


# -- CreateVolume ----------------------------------------------------------------------------------
def test_create_volume_without_capacity(r: Resources) -> None:
    """sanity: CreateVolume "should return appropriate values SingleNodeWriter NoCapacity"
    (no capacity range at all: the plugin MAY choose the size)."""
    volume = r.create_volume(
        csi.CreateVolumeRequest(name=unique("nocap"), volume_capabilities=[mount()])
    )
    assert volume.volume_id and volume.capacity_bytes > 0


@pytest.mark.parametrize("kind", ["ext4", "block"])
def test_create_volume_with_capacity(r: Resources, kind: str) -> None:
    """sanity: CreateVolume "should return appropriate values SingleNodeWriter WithCapacity";
    spec: the volume MUST be at least required_bytes, and report where it is accessible."""
    volume = r.create_volume(create_request(unique("cap"), 100 * MiB + 1, capability(kind)))
    assert volume.capacity_bytes >= 100 * MiB + 1
    info = r.node.NodeGetInfo(csi.NodeGetInfoRequest())
    assert [dict(t.segments) for t in volume.accessible_topology] == [
        dict(info.accessible_topology.segments)
    ]


def test_create_volume_exact_capacity(r: Resources) -> None:
    """spec (CapacityRange): required_bytes == limit_bytes asks for an exact size."""
    volume = r.create_volume(create_request(unique("exact"), 48 * MiB, limit=48 * MiB))
    assert volume.capacity_bytes == 48 * MiB


def test_create_volume_with_limit_only(r: Resources) -> None:
    """spec (CapacityRange): at least one of required_bytes and limit_bytes; the volume MUST
    NOT be bigger than limit_bytes. A limit alone is a valid range."""
    request = create_request(unique("limit"), 0, limit=100 * MiB)
    volume = r.create_volume(request)
    assert 0 < volume.capacity_bytes <= 100 * MiB


def test_create_volume_twice(r: Resources) -> None:
    """sanity: "should not fail when requesting to create a volume with already existing
    name and same capacity"; spec: CreateVolume MUST be idempotent."""
    request = create_request(unique("twice"), 64 * MiB)
    first, second = r.create_volume(request), r.create_volume(request)
    assert first == second


def test_create_volume_with_maximum_length_name(r: Resources) -> None:
    """sanity: "should not fail when creating volume with maximum-length name"."""
    request = create_request(unique_with_length("maxlen", MAX_NAME_LENGTH), 64 * MiB)
    assert r.create_volume(request) == r.create_volume(request)


CONFLICTS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    # (id, first request's arguments, second request's arguments) for create_request
    ("capacity", {"size": 64 * MiB, "limit": 64 * MiB}, {"size": 128 * MiB, "limit": 128 * MiB}),
    ("parameters", {}, {"parameters": {"cache": "writeback"}}),
    ("access-type", {"cap": mount()}, {"cap": block()}),
    ("content-source", {}, {"volume": "SHARED"}),
]


@pytest.mark.parametrize(
    ("first", "second"), [(a, b) for _, a, b in CONFLICTS], ids=[i for i, _, _ in CONFLICTS]
)
def test_create_volume_name_reuse_conflicts(
    r: Resources, shared: csi.Volume, first: dict[str, Any], second: dict[str, Any]
) -> None:
    """sanity: "should fail when requesting to create a volume with already existing name
    and different capacity"; spec: Volume already exists but is incompatible (capacity_range,
    volume_capabilities, parameters, volume_content_source) -> 6 ALREADY_EXISTS."""
    name = unique("conflict")
    first = {"size": 64 * MiB, **first}
    second = {"size": first["size"], **second}
    if second.get("volume") == "SHARED":
        second["volume"] = shared.volume_id
    r.create_volume(create_request(name, **first))
    expect(lambda: r.create_volume(create_request(name, **second)), Code.ALREADY_EXISTS)


def test_create_volume_name_reuse_with_inaccessible_topology(r: Resources) -> None:
    """spec (CreateVolume errors): a volume that already exists but is incompatible with the
    accessibility_requirements -> 6 ALREADY_EXISTS (the volume exists: not RESOURCE_EXHAUSTED,
    which is for a *new* volume that cannot be provisioned there)."""
    name = unique("topo")
    key = next(iter(r.node.NodeGetInfo(csi.NodeGetInfoRequest()).accessible_topology.segments))

    def requirement(node: str) -> csi.TopologyRequirement:
        return csi.TopologyRequirement(requisite=[csi.Topology(segments={key: node})])

    r.create_volume(create_request(name, accessibility_requirements=requirement("node-a")))
    expect(
        lambda: r.create_volume(
            create_request(name, accessibility_requirements=requirement("node-b"))
        ),
        Code.ALREADY_EXISTS,
    )


def test_create_volume_topology(r: Resources) -> None:
    """sanity: the volume lifecycle creates with requisite = NodeGetInfo's topology; spec:
    a requisite the SP cannot reach -> 8 RESOURCE_EXHAUSTED."""
    topology = r.node.NodeGetInfo(csi.NodeGetInfoRequest()).accessible_topology
    here = csi.TopologyRequirement(requisite=[topology], preferred=[topology])
    volume = r.create_volume(create_request(unique("here"), accessibility_requirements=here))
    assert [dict(t.segments) for t in volume.accessible_topology] == [dict(topology.segments)]
    elsewhere = csi.TopologyRequirement(
        requisite=[csi.Topology(segments={k: "node-z" for k in topology.segments})]
    )
    expect(
        lambda: r.create_volume(
            create_request(unique("there"), accessibility_requirements=elsewhere)
        ),
        Code.RESOURCE_EXHAUSTED,
    )


@pytest.mark.parametrize("source", ["snapshot", "volume"])
def test_create_volume_from_source(r: Resources, source: str) -> None:
    """sanity: "should create volume from an existing source snapshot / source volume"
    (content_source set in the answer); idempotent like any CreateVolume."""
    origin = r.volume("origin", 64 * MiB)
    if source == "snapshot":
        snapshot = r.snapshot_of(origin.volume_id)
        assert snapshot.ready_to_use
        request = create_request(unique("restored"), 64 * MiB, snapshot=snapshot.snapshot_id)
    else:
        request = create_request(unique("clone"), 64 * MiB, volume=origin.volume_id)
    made = twice(lambda: r.create_volume(request))
    assert made.HasField("content_source")
    assert made.content_source == request.volume_content_source
    assert made.capacity_bytes >= 64 * MiB


OUT_OF_RANGE: list[tuple[str, Callable[[Resources], Any]]] = [
    (
        "create-required-over-limit",
        lambda r: r.create_volume(create_request(unique("range"), 128 * MiB, limit=64 * MiB)),
    ),
    (
        "restore-smaller-than-snapshot",
        lambda r: r.create_volume(
            create_request(
                unique("small"),
                32 * MiB,
                limit=32 * MiB,
                snapshot=r.snapshot_of(r.volume("big", 64 * MiB).volume_id).snapshot_id,
            )
        ),
    ),
    (
        "clone-smaller-than-source",
        lambda r: r.create_volume(
            create_request(
                unique("small"), 32 * MiB, limit=32 * MiB, volume=r.volume("big").volume_id
            )
        ),
    ),
    (
        "expand-required-over-limit",
        lambda r: r.controller.ControllerExpandVolume(
            csi.ControllerExpandVolumeRequest(
                volume_id=r.volume("grow").volume_id,
                capacity_range=csi.CapacityRange(required_bytes=256 * MiB, limit_bytes=128 * MiB),
            )
        ),
    ),
]


@pytest.mark.parametrize("call", [c for _, c in OUT_OF_RANGE], ids=[i for i, _ in OUT_OF_RANGE])
def test_unsupported_capacity_range(r: Resources, call: Callable[[Resources], Any]) -> None:
    """spec: Unsupported capacity_range (e.g. a volume smaller than its source snapshot or
    volume) -> 11 OUT_OF_RANGE, for CreateVolume and ControllerExpandVolume."""
    expect(lambda: call(r), Code.OUT_OF_RANGE)


MULTI_NODE = Mode.MULTI_NODE_MULTI_WRITER
EXCEEDS: list[tuple[str, Call, Code]] = [
    (
        "controller-expand",
        lambda d, v: d.controller.ControllerExpandVolume(
            csi.ControllerExpandVolumeRequest(
                volume_id=v.volume_id,
                capacity_range=csi.CapacityRange(required_bytes=v.capacity_bytes),
                volume_capability=mount(mode=MULTI_NODE),
            )
        ),
        Code.INVALID_ARGUMENT,
    ),
    (
        "node-expand",
        lambda d, v: d.node.NodeExpandVolume(
            csi.NodeExpandVolumeRequest(
                volume_id=v.volume_id,
                volume_path=str(d.root / "pods"),
                volume_capability=mount(mode=MULTI_NODE),
            )
        ),
        Code.INVALID_ARGUMENT,
    ),
    (
        "node-stage",
        lambda d, v: d.node.NodeStageVolume(
            csi.NodeStageVolumeRequest(
                volume_id=v.volume_id,
                staging_target_path=str(d.root / "staging" / unique("multi")),
                volume_capability=mount(mode=MULTI_NODE),
            )
        ),
        Code.FAILED_PRECONDITION,
    ),
]


EXCEEDS_BUGS: dict[str, pytest.MarkDecorator] = {}


@pytest.mark.parametrize(
    ("call", "code"),
    [pytest.param(c, k, id=i, marks=EXCEEDS_BUGS.get(i, ())) for i, c, k in EXCEEDS],
)
def test_exceeds_capabilities(driver: Driver, shared: csi.Volume, call: Call, code: Code) -> None:
    """spec: "Exceeds capabilities" (a capability the volume does not support, here a
    multi-node access mode on a single-node volume) -> 3 INVALID_ARGUMENT for
    Controller/NodeExpandVolume, 9 FAILED_PRECONDITION for NodeStageVolume."""
    expect(lambda: call(driver, shared), code)


def test_create_volume_same_name_concurrently(r: Resources) -> None:
    """spec (concurrency): calls racing on one name either succeed with the one volume or
    are refused with 10 ABORTED (operation pending); never two volumes."""
    request = create_request(unique("race"), 64 * MiB)
    before = set(list_volume_ids(r.driver)[0])
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        calls = [pool.submit(_outcome, r.controller.CreateVolume, request) for _ in range(4)]
        outcomes = [call.result() for call in calls]
    final = r.create_volume(request)  # settles the name, and records the volume for cleanup
    for outcome in outcomes:
        if isinstance(outcome, csi.CreateVolumeResponse):
            assert outcome.volume == final
        else:
            assert outcome == Code.ABORTED, outcome
    assert set(list_volume_ids(r.driver)[0]) - before == {final.volume_id}


def _outcome(call: Callable[[Any], Any], request: Any) -> Any:
    try:
        return call(request)
    except grpc.RpcError as error:
        return error.code()  # type: ignore[attr-defined]


# -- DeleteVolume, ValidateVolumeCapabilities, GetCapacity, ControllerGetVolume -------------------
def test_delete_volume(r: Resources) -> None:
    """sanity: DeleteVolume "should return appropriate values (no optional values added)";
    spec: idempotent, and the volume is gone afterwards."""
    volume = r.volume("delete")
    twice(lambda: r.delete_volume(volume.volume_id))
    expect(
        lambda: r.controller.ControllerGetVolume(
            csi.ControllerGetVolumeRequest(volume_id=volume.volume_id)
        ),
        Code.NOT_FOUND,
    )


def test_validate_volume_capabilities(driver: Driver, shared: csi.Volume) -> None:
    """sanity: ValidateVolumeCapabilities "should return appropriate values": a confirmed
    answer carries the volume capabilities; spec: confirmed only if ALL are supported."""
    good = csi.ValidateVolumeCapabilitiesRequest(
        volume_id=shared.volume_id,
        volume_context=shared.volume_context,
        volume_capabilities=[mount(), block(), mount("xfs", Mode.SINGLE_NODE_READER_ONLY)],
    )
    answer = twice(lambda: driver.controller.ValidateVolumeCapabilities(good))
    assert list(answer.confirmed.volume_capabilities) == list(good.volume_capabilities)
    bad = csi.ValidateVolumeCapabilitiesRequest(
        volume_id=shared.volume_id,
        volume_capabilities=[mount(), mount(mode=Mode.MULTI_NODE_MULTI_WRITER)],
    )
    answer = driver.controller.ValidateVolumeCapabilities(bad)
    assert not answer.HasField("confirmed") and answer.message


@pytest.mark.parametrize(
    "request_",
    [
        csi.GetCapacityRequest(),
        csi.GetCapacityRequest(volume_capabilities=[mount(), block()], parameters={"pool": "rbd"}),
    ],
    ids=["no-optional-values", "capabilities-and-parameters"],
)
def test_get_capacity(driver: Driver, request_: Any) -> None:
    """sanity: GetCapacity "should return capacity (no optional values added)"."""
    for _ in range(2):  # free space moves between calls: no equality asked
        assert driver.controller.GetCapacity(request_).available_capacity >= 0


def test_controller_get_volume(r: Resources) -> None:
    """spec (ControllerGetVolume, GET_VOLUME + VOLUME_CONDITION): the volume as created and a
    non-empty volume_condition."""
    created = r.volume("get", 64 * MiB)
    answer = twice(
        lambda: r.controller.ControllerGetVolume(
            csi.ControllerGetVolumeRequest(volume_id=created.volume_id)
        )
    )
    assert answer.volume.volume_id == created.volume_id
    assert answer.volume.capacity_bytes == created.capacity_bytes
    assert answer.volume.volume_context == created.volume_context
    assert answer.status.HasField("volume_condition")
    assert answer.status.volume_condition.message
    assert answer.status.volume_condition.abnormal is False


# -- ControllerModifyVolume and mutable_parameters ----------------------------------------------
@pytest.mark.parametrize("with_vac", [False, True], ids=["created-plain", "created-with-vac"])
def test_modify_volume(r: Resources, with_vac: bool) -> None:
    """sanity: ModifyVolume "should modify a volume created without / with a volume attribute
    class" and "should fail (...) if specified mutable parameters are not supported"
    (-> 3 INVALID_ARGUMENT); spec: idempotent."""
    fields: dict[str, Any] = {"mutable_parameters": {"cache": "writethrough"}} if with_vac else {}
    volume = r.create_volume(create_request(unique("modify"), **fields))
    modify = csi.ControllerModifyVolumeRequest(
        volume_id=volume.volume_id, mutable_parameters={"cache": "writeback", "discard": "ignore"}
    )
    twice(lambda: r.controller.ControllerModifyVolume(modify))
    fake = csi.ControllerModifyVolumeRequest(
        volume_id=volume.volume_id, mutable_parameters={"XXX_FakeKey": "XXX_FakeValue"}
    )
    expect(lambda: r.controller.ControllerModifyVolume(fake), Code.INVALID_ARGUMENT)


def test_create_volume_with_unsupported_mutable_parameters(r: Resources) -> None:
    """sanity: CreateVolume "should not create volume with an invalid volume attribute
    class" -> 3 INVALID_ARGUMENT."""
    request = create_request(unique("badvac"), mutable_parameters={"XXX_FakeKey": "XXX_FakeValue"})
    error = code_of(lambda: r.create_volume(request))
    assert error == Code.INVALID_ARGUMENT, error.name


def test_create_volume_mutable_parameters_take_precedence(r: Resources) -> None:
    """sanity: "should create volume with a volume attribute class"; spec: values in
    mutable_parameters MUST take precedence over the values from parameters."""
    request = create_request(
        unique("vac"),
        parameters={"cache": "none", "discard": "unmap"},
        mutable_parameters={"cache": "writeback", "discard": "ignore"},
    )
    volume = r.create_volume(request)
    assert volume.volume_context["cache"] == "writeback"
    assert volume.volume_context["discard"] == "ignore"


def test_volume_context_is_immutable(r: Resources) -> None:
    """spec (Volume.volume_context): SHALL NOT be mutable; a volume uniquely identified by
    volume_id SHALL always report the same volume_context (also after ModifyVolume)."""
    request = create_request(unique("ctx"), parameters={"cache": "none"})
    volume = r.create_volume(request)
    r.controller.ControllerModifyVolume(
        csi.ControllerModifyVolumeRequest(
            volume_id=volume.volume_id, mutable_parameters={"cache": "writeback"}
        )
    )
    got = r.controller.ControllerGetVolume(
        csi.ControllerGetVolumeRequest(volume_id=volume.volume_id)
    ).volume
    listed = [
        e.volume
        for e in r.controller.ListVolumes(csi.ListVolumesRequest()).entries
        if e.volume.volume_id == volume.volume_id
    ]
    again = r.create_volume(request)
    assert got.volume_context == volume.volume_context
    assert listed[0].volume_context == volume.volume_context
    assert again.volume_context == volume.volume_context


# -- ListVolumes -----------------------------------------------------------------------------------
def list_volume_ids(driver: Driver, **fields: Any) -> tuple[list[str], str]:
    answer = driver.controller.ListVolumes(csi.ListVolumesRequest(**fields))
    return [e.volume.volume_id for e in answer.entries], answer.next_token


def list_snapshot_ids(driver: Driver, **fields: Any) -> tuple[list[str], str]:
    answer = driver.controller.ListSnapshots(csi.ListSnapshotsRequest(**fields))
    return [e.snapshot.snapshot_id for e in answer.entries], answer.next_token


def test_list_volumes(r: Resources) -> None:
    """sanity: ListVolumes "should return appropriate values" and "check the presence of new
    volumes and absence of deleted ones in the volume list"."""
    before, token = list_volume_ids(r.driver)
    assert token == "" and len(before) == len(set(before))
    volume = r.volume("listed")
    after, _ = list_volume_ids(r.driver)
    assert sorted(after) == sorted([*before, volume.volume_id])
    answer = r.controller.ListVolumes(csi.ListVolumesRequest())
    entry = next(e for e in answer.entries if e.volume.volume_id == volume.volume_id)
    assert entry.volume.capacity_bytes == volume.capacity_bytes
    r.delete_volume(volume.volume_id)
    assert sorted(list_volume_ids(r.driver)[0]) == sorted(before)


def test_list_volumes_reports_volume_condition(r: Resources) -> None:
    """spec (ListVolumesResponse.VolumeStatus.volume_condition): MUST be specified if the
    VOLUME_CONDITION controller capability is supported."""
    volume = r.volume("condition")
    answer = r.controller.ListVolumes(csi.ListVolumesRequest())
    entry = next(e for e in answer.entries if e.volume.volume_id == volume.volume_id)
    assert entry.HasField("status") and entry.status.HasField("volume_condition")
    assert entry.status.volume_condition.message


@pytest.mark.parametrize("kind", ["volumes", "snapshots"])
def test_list_pagination(r: Resources, kind: str) -> None:
    """sanity: ListSnapshots "should return next token when a limited number of entries are
    requested"; spec: no more than max_entries, next_token set while entries remain, and a
    walk of the pages sees every entry once."""
    lister = list_volume_ids if kind == "volumes" else list_snapshot_ids
    for _ in range(5):
        volume = r.volume("page")
        if kind == "snapshots":
            r.snapshot_of(volume.volume_id)
    everything, _ = lister(r.driver)
    assert len(everything) >= 5
    page, token = lister(r.driver, max_entries=2)
    assert len(page) == 2 and token
    rest, last = lister(r.driver, starting_token=token)
    assert len(rest) == len(everything) - 2 and last == ""
    seen, token = [], ""
    while True:
        page, token = lister(r.driver, max_entries=2, starting_token=token)
        assert 0 < len(page) <= 2
        seen += page
        if not token:
            break
    assert sorted(seen) == sorted(everything) and len(seen) == len(set(seen))
    exact, token = lister(r.driver, max_entries=len(everything))
    assert sorted(exact) == sorted(everything) and token == ""


@pytest.mark.parametrize("kind", ["volumes", "snapshots"])
def test_list_invalid_starting_token(driver: Driver, kind: str) -> None:
    """sanity: ListVolumes "should fail when an invalid starting_token is passed"; spec:
    Invalid starting_token -> 10 ABORTED (ListVolumes and ListSnapshots)."""
    lister = list_volume_ids if kind == "volumes" else list_snapshot_ids
    expect(lambda: lister(driver, starting_token="invalid-token"), Code.ABORTED)


@pytest.mark.parametrize("kind", ["volumes", "snapshots"])
def test_list_pagination_across_changes(r: Resources, kind: str) -> None:
    """sanity: "pagination should detect volumes added between pages and accept tokens when
    the last volume from a page is deleted"; spec: while entries are created and deleted
    between pages the CO MAY see duplicates or miss entries, but the next_token the plugin
    handed out stays a valid starting_token."""
    lister = list_volume_ids if kind == "volumes" else list_snapshot_ids
    owned = set()
    for _ in range(3):
        volume = r.volume("churn")
        owned.add(
            r.snapshot_of(volume.volume_id).snapshot_id if kind == "snapshots" else volume.volume_id
        )
    # a one-entry page whose (last) entry this test owns and may delete
    page, token = lister(r.driver, max_entries=1)
    while not (page[0] in owned and token):
        assert token, "no page ends with an entry of this test"
        page, token = lister(r.driver, max_entries=1, starting_token=token)
        assert len(page) == 1
    if kind == "snapshots":
        r.delete_snapshot(page[0])
    else:
        r.delete_volume(page[0])
    newcomer = r.volume("newcomer")
    if kind == "snapshots":
        r.snapshot_of(newcomer.volume_id)
    existing = set(lister(r.driver)[0])
    rest, _ = lister(r.driver, starting_token=token)
    assert len(rest) == len(set(rest)), "duplicates within one page"
    assert set(rest) <= existing, set(rest) - existing
    assert page[0] not in rest


# -- snapshots -------------------------------------------------------------------------------------
def check_snapshot(snapshot: csi.Snapshot, source: csi.Volume) -> None:
    """sanity's verifySnapshotInfo, plus the spec's size rule."""
    assert snapshot.snapshot_id
    assert snapshot.source_volume_id == source.volume_id
    assert snapshot.HasField("creation_time") and snapshot.creation_time.seconds > 0
    assert snapshot.ready_to_use
    assert 0 < snapshot.size_bytes <= source.capacity_bytes


def test_create_snapshot_twice(r: Resources) -> None:
    """sanity: CreateSnapshot "should succeed when requesting to create a snapshot with already
    existing name and same source volume ID"; GetSnapshot and ListSnapshots agree with it."""
    volume = r.volume("snapsrc")
    name = unique("snap")
    first = r.create_snapshot(name, volume.volume_id)
    second = r.create_snapshot(name, volume.volume_id)
    check_snapshot(first, volume)
    assert first == second
    got = twice(
        lambda: r.controller.GetSnapshot(csi.GetSnapshotRequest(snapshot_id=first.snapshot_id))
    )
    assert got.snapshot == first
    listed = r.controller.ListSnapshots(csi.ListSnapshotsRequest(snapshot_id=first.snapshot_id))
    assert [e.snapshot for e in listed.entries] == [first]


def test_create_snapshot_retry_after_source_deleted(r: Resources) -> None:
    """spec (CreateSnapshot): if a snapshot with that name is cut and ready to use, the
    Plugin MUST reply 0 OK with it -- also when the CO retries after the source volume was
    deleted (snapshots are independent of their volume)."""
    volume = r.volume("gone")
    name = unique("snap")
    snapshot = r.create_snapshot(name, volume.volume_id)
    r.delete_volume(volume.volume_id)
    assert r.create_snapshot(name, volume.volume_id) == snapshot


@pytest.mark.parametrize("source", ["snapshot", "volume"])
def test_create_volume_retry_after_source_deleted(r: Resources, source: str) -> None:
    """spec (CreateVolume): a volume that exists and is compatible MUST be answered 0 OK,
    also when its source snapshot or volume was deleted since."""
    origin = r.volume("origin")
    if source == "snapshot":
        snapshot = r.snapshot_of(origin.volume_id)
        request = create_request(unique("restored"), snapshot=snapshot.snapshot_id)
        made = r.create_volume(request)
        r.delete_snapshot(snapshot.snapshot_id)
    else:
        request = create_request(unique("clone"), volume=origin.volume_id)
        made = r.create_volume(request)
        r.delete_volume(origin.volume_id)
    assert r.create_volume(request) == made


def test_create_snapshot_name_reuse_conflicts(r: Resources) -> None:
    """sanity: "should fail when requesting to create a snapshot with already existing name
    and different source volume ID" -> 6 ALREADY_EXISTS."""
    name = unique("snap")
    r.create_snapshot(name, r.volume("one").volume_id)
    other = r.volume("two")
    expect(lambda: r.create_snapshot(name, other.volume_id), Code.ALREADY_EXISTS)


def test_create_snapshot_with_maximum_length_name(r: Resources) -> None:
    """sanity: "should succeed when creating snapshot with maximum-length name"."""
    volume = r.volume("maxsnap")
    name = unique_with_length("CreateSnapshot-snapshot-maxlen", MAX_NAME_LENGTH)
    assert r.create_snapshot(name, volume.volume_id) == r.create_snapshot(name, volume.volume_id)


def test_delete_snapshot(r: Resources) -> None:
    """sanity: DeleteSnapshot "should return appropriate values"; spec: idempotent, and the
    snapshot is gone (GetSnapshot NOT_FOUND, not listed)."""
    snapshot = r.snapshot_of(r.volume("delsnap").volume_id)
    twice(lambda: r.delete_snapshot(snapshot.snapshot_id))
    expect(
        lambda: r.controller.GetSnapshot(csi.GetSnapshotRequest(snapshot_id=snapshot.snapshot_id)),
        Code.NOT_FOUND,
    )
    assert snapshot.snapshot_id not in list_snapshot_ids(r.driver)[0]


def test_list_snapshots(r: Resources) -> None:
    """sanity: ListSnapshots "should return appropriate values", "should return snapshots that
    match the specified snapshot id / source volume id", "check the presence of new snapshots
    in the snapshot list"."""
    before, _ = list_snapshot_ids(r.driver)
    volumes = [r.volume("lsrc") for _ in range(3)]
    snapshots = [r.snapshot_of(v.volume_id) for v in volumes]
    answer = r.controller.ListSnapshots(csi.ListSnapshotsRequest())
    by_id = {e.snapshot.snapshot_id: e.snapshot for e in answer.entries}
    assert sorted(by_id) == sorted([*before, *(s.snapshot_id for s in snapshots)])
    for snapshot, volume in zip(snapshots, volumes, strict=True):
        check_snapshot(by_id[snapshot.snapshot_id], volume)
    target, source = snapshots[1], volumes[1]
    assert list_snapshot_ids(r.driver, snapshot_id=target.snapshot_id)[0] == [target.snapshot_id]
    assert list_snapshot_ids(r.driver, source_volume_id=source.volume_id)[0] == [target.snapshot_id]
    r.delete_snapshot(target.snapshot_id)
    assert len(list_snapshot_ids(r.driver)[0]) == len(before) + 2


# -- node: publish rules, paths and stats ----------------------------------------------------------
def test_publish_single_node_single_writer_twice(r: Resources) -> None:
    """sanity: NodePublishVolume "should fail when volume with single node single writer
    access mode is already mounted at a different target path" -> 9 FAILED_PRECONDITION."""
    cap = mount(mode=Mode.SINGLE_NODE_SINGLE_WRITER)
    volume = r.volume("snsw", cap=cap)
    staging, _ = r.attach(volume, cap, "snsw")
    other = r.target_path("snsw-other")
    expect(lambda: r.publish(volume, cap, staging, other), Code.FAILED_PRECONDITION)


@pytest.mark.parametrize("kind", ["ext4", "block"])
def test_publish_single_node_multi_writer_twice(r: Resources, kind: str) -> None:
    """spec (NodePublishVolume, SINGLE_NODE_MULTI_WRITER table): a second target path for the
    same volume and arguments -> OK, and the same data is visible at both."""
    cap = capability(kind, Mode.SINGLE_NODE_MULTI_WRITER)
    volume = r.volume("snmw", cap=cap)
    staging, first = r.attach(volume, cap, "snmw")
    second = r.target_path("snmw-other", kind)
    twice(lambda: r.publish(volume, cap, staging, second))
    write_payload(first, kind, b"shared between two workloads")
    assert read_payload(second, kind, 28) == b"shared between two workloads"


def test_publish_same_target_incompatible(r: Resources) -> None:
    """spec (NodePublishVolume table): same target path, other arguments (readonly) ->
    6 ALREADY_EXISTS."""
    cap = mount()
    volume = r.volume("readonly", cap=cap)
    staging, target = r.attach(volume, cap, "readonly")
    expect(lambda: r.publish(volume, cap, staging, target, readonly=True), Code.ALREADY_EXISTS)


@pytest.mark.parametrize(
    "other", [mount("xfs"), block()], ids=["other-filesystem", "other-access-type"]
)
def test_stage_same_path_incompatible(r: Resources, other: csi.VolumeCapability) -> None:
    """spec (NodeStageVolume errors): already staged at staging_target_path but incompatible
    with the volume_capability -> 6 ALREADY_EXISTS."""
    cap = mount("ext4")
    volume = r.volume("restage", cap=cap)
    staging = r.staging_path("restage")
    r.stage(volume, cap, staging)
    expect(lambda: r.stage(volume, other, staging), Code.ALREADY_EXISTS)


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(block(), id="block-on-filesystem"),
        pytest.param(mount(mode=Mode.MULTI_NODE_MULTI_WRITER), id="multi-node-mode"),
    ],
)
def test_publish_exceeds_capabilities(r: Resources, other: csi.VolumeCapability) -> None:
    """spec (NodePublishVolume errors): Exceeds capabilities (publish a staged filesystem as
    a block device, or with a multi-node access mode) -> 9 FAILED_PRECONDITION."""
    cap = mount()
    volume = r.volume("exceeds", cap=cap)
    staging, _ = r.attach(volume, cap, "exceeds")
    target = r.target_path("exceeds-other", "block" if other.HasField("block") else "mount")
    expect(lambda: r.publish(volume, other, staging, target), Code.FAILED_PRECONDITION)


@pytest.mark.parametrize("kind", ["ext4", "block"])
def test_publish_readonly(r: Resources, kind: str) -> None:
    """spec (NodePublishVolumeRequest.readonly): the SP MUST publish the volume in readonly
    mode; a writer target of the same volume keeps writing."""
    cap = capability(kind, Mode.SINGLE_NODE_MULTI_WRITER)
    volume = r.volume("ro", cap=cap)
    staging, writer = r.attach(volume, cap, "ro-writer")
    write_payload(writer, kind, b"before the read-only publish")
    reader = r.target_path("ro-reader", kind)
    twice(lambda: r.publish(volume, cap, staging, reader, readonly=True))
    assert read_payload(reader, kind, 28) == b"before the read-only publish"
    with pytest.raises(OSError):
        write_payload(reader, kind, b"must not land")
    write_payload(writer, kind, b"the writer still writes")


def test_publish_without_staging_path(r: Resources, shared: csi.Volume) -> None:
    """spec (NodePublishVolume errors): STAGE_UNSTAGE_VOLUME is set but no
    staging_target_path -> 9 FAILED_PRECONDITION."""
    target = r.target_path("nostaging")
    request = csi.NodePublishVolumeRequest(
        volume_id=shared.volume_id, target_path=str(target), volume_capability=mount()
    )
    expect(lambda: r.node.NodePublishVolume(request), Code.FAILED_PRECONDITION)


def test_publish_before_stage(r: Resources, shared: csi.Volume) -> None:
    """spec (RPC interactions): NodeStageVolume MUST succeed before NodePublishVolume; a
    staging path where nothing is staged -> 9 FAILED_PRECONDITION."""
    staging, target = r.staging_path("unstaged"), r.target_path("unstaged")
    expect(lambda: r.publish(shared, mount(), staging, target), Code.FAILED_PRECONDITION)


def test_unpublish_removes_target_path(r: Resources) -> None:
    """sanity: NodeUnpublishVolume "should remove target path"; spec: the SP MUST delete the
    file or directory it created at target_path."""
    cap = mount()
    volume = r.volume("rmtarget", cap=cap)
    _, target = r.attach(volume, cap, "rmtarget")
    assert target.is_dir()
    twice(lambda: r.unpublish(volume.volume_id, target))
    assert not os.path.lexists(target)


def test_volume_stats_on_another_path(r: Resources) -> None:
    """sanity: NodeGetVolumeStats "should fail when volume does not exist on the specified
    path" -> 5 NOT_FOUND (an absolute path; see the relative-path case below)."""
    cap = mount()
    volume = r.volume("stats", cap=cap)
    r.attach(volume, cap, "stats")
    elsewhere = r.target_path("stats-elsewhere").parent
    expect(
        lambda: r.node.NodeGetVolumeStats(
            csi.NodeGetVolumeStatsRequest(volume_id=volume.volume_id, volume_path=str(elsewhere))
        ),
        Code.NOT_FOUND,
    )


@pytest.mark.parametrize("rpc", ["NodeGetVolumeStats", "NodeExpandVolume"])
def test_relative_volume_path(driver: Driver, rpc: str) -> None:
    """sanity: NodeGetVolumeStats / NodeExpandVolume "should fail when volume is not found",
    sent with volume_path "some/path". csi-sanity expects NOT_FOUND; the spec says the path
    MUST be absolute, so INVALID_ARGUMENT (an invalid field) is within the spec too."""
    request_type = getattr(csi, f"{rpc}Request")
    request = request_type(volume_id=missing_volume_id(), volume_path="some/path")
    code = code_of(lambda: getattr(driver.node, rpc)(request))
    assert code in (Code.NOT_FOUND, Code.INVALID_ARGUMENT), code.name


# -- lifecycles ------------------------------------------------------------------------------------
def size_for(kind: str) -> int:
    return 512 * MiB if kind == "xfs" else 64 * MiB  # mkfs.xfs wants 300 MB; images are thin


def check_stats(r: Resources, volume: csi.Volume, path: Path, kind: str) -> None:
    request = csi.NodeGetVolumeStatsRequest(volume_id=volume.volume_id, volume_path=str(path))
    r.node.NodeGetVolumeStats(request)
    answer = r.node.NodeGetVolumeStats(request)  # usage moves: no equality asked
    units = {u.unit: u for u in answer.usage}
    assert units[csi.VolumeUsage.BYTES].total > 0
    assert (csi.VolumeUsage.INODES in units) == (kind != "block")
    assert answer.HasField("volume_condition")
    assert answer.volume_condition.abnormal is False and answer.volume_condition.message


@pytest.mark.parametrize("kind", ["ext4", "xfs", "block"])
def test_volume_lifecycle(r: Resources, kind: str) -> None:
    """sanity: Node Service "should work" and "should be idempotent" (create, stage, publish,
    stats, unpublish, unstage, delete; every call twice). The data outlives the unstage."""
    cap = capability(kind)
    info = r.node.NodeGetInfo(csi.NodeGetInfoRequest())
    request = create_request(
        unique(f"life-{kind}"),
        size_for(kind),
        cap,
        accessibility_requirements=csi.TopologyRequirement(requisite=[info.accessible_topology]),
    )
    volume = twice(lambda: r.create_volume(request))
    staging, target = r.staging_path(kind), r.target_path(kind, kind)
    twice(lambda: r.stage(volume, cap, staging))
    twice(lambda: r.publish(volume, cap, staging, target))
    data = os.urandom(256 * 1024)
    write_payload(target, kind, data)
    # spec (DeleteVolume errors): Volume in use -> 9 FAILED_PRECONDITION
    expect(lambda: r.delete_volume(volume.volume_id), Code.FAILED_PRECONDITION)
    check_stats(r, volume, target, kind)
    check_stats(r, volume, staging, kind)
    twice(lambda: r.unpublish(volume.volume_id, target))
    assert not os.path.lexists(target)
    twice(lambda: r.unstage(volume.volume_id, staging))
    staging, target = r.attach(volume, cap, f"{kind}-again")
    assert read_payload(target, kind, len(data)) == data
    r.detach(volume.volume_id, staging, target)
    twice(lambda: r.delete_volume(volume.volume_id))


@pytest.mark.parametrize("kind", ["ext4", "block"])
def test_snapshot_restore_lifecycle(r: Resources, kind: str) -> None:
    """sanity: "should create volume from an existing source snapshot"; spec: the restored
    volume holds the data as of the snapshot; snapshots are independent of their volume, so
    after DeleteVolume they stay listed and usable as sources."""
    cap = capability(kind)
    source = r.volume(f"snapsrc-{kind}", cap=cap)
    staging, target = r.attach(source, cap, f"snapsrc-{kind}")
    before = os.urandom(128 * 1024)
    write_payload(target, kind, before)
    name = unique("snap")
    snapshot = twice(lambda: r.create_snapshot(name, source.volume_id))
    check_snapshot(snapshot, source)
    write_payload(target, kind, os.urandom(128 * 1024))  # after the snapshot: not restored
    r.detach(source.volume_id, staging, target)
    restore = create_request(unique("restore"), 64 * MiB, cap, snapshot=snapshot.snapshot_id)
    restored = twice(lambda: r.create_volume(restore))
    assert restored.content_source.snapshot.snapshot_id == snapshot.snapshot_id
    assert restored.capacity_bytes >= snapshot.size_bytes
    twice(lambda: r.delete_volume(source.volume_id))
    assert source.volume_id not in list_volume_ids(r.driver)[0]
    assert snapshot.snapshot_id in list_snapshot_ids(r.driver)[0]
    late = r.create_volume(
        create_request(unique("late"), 64 * MiB, cap, snapshot=snapshot.snapshot_id)
    )
    for volume in (restored, late):
        staging, target = r.attach(volume, cap, "restored")
        assert read_payload(target, kind, len(before)) == before
        r.detach(volume.volume_id, staging, target)


@pytest.mark.parametrize("kind", ["ext4", "block"])
def test_clone_lifecycle(r: Resources, kind: str) -> None:
    """sanity: "should create volume from an existing source volume"; spec: the clone holds
    the source's data, and the two are independent afterwards."""
    cap = capability(kind)
    source = r.volume(f"clonesrc-{kind}", cap=cap)
    staging, target = r.attach(source, cap, f"clonesrc-{kind}")
    data = os.urandom(128 * 1024)
    write_payload(target, kind, data)
    request = create_request(unique("clone"), 64 * MiB, cap, volume=source.volume_id)
    clone = twice(lambda: r.create_volume(request))
    assert clone.content_source.volume.volume_id == source.volume_id
    clone_staging, clone_target = r.attach(clone, cap, f"clone-{kind}")
    assert read_payload(clone_target, kind, len(data)) == data
    write_payload(clone_target, kind, b"written to the clone only")
    assert read_payload(target, kind, len(data)) == data
    r.detach(clone.volume_id, clone_staging, clone_target)
    r.detach(source.volume_id, staging, target)


@pytest.mark.parametrize("kind", ["ext4", "xfs", "block"])
def test_expand_lifecycle(r: Resources, kind: str) -> None:
    """sanity: ExpandVolume "should work" and NodeExpandVolume "should work if node-expand is
    called after node-publish"; spec: ONLINE expansion of a published volume, idempotent
    (already large enough -> OK), node_expansion_required only for filesystems."""
    cap = capability(kind)
    size = size_for(kind)
    bigger = 2 * size
    volume = r.volume(f"expand-{kind}", size, cap=cap)
    staging, target = r.attach(volume, cap, f"expand-{kind}")
    data = os.urandom(64 * 1024)
    write_payload(target, kind, data)
    expand = csi.ControllerExpandVolumeRequest(
        volume_id=volume.volume_id,
        capacity_range=csi.CapacityRange(required_bytes=bigger),
        volume_capability=cap,
    )
    answer = twice(lambda: r.controller.ControllerExpandVolume(expand))
    assert answer.capacity_bytes == bigger
    assert answer.node_expansion_required == (kind != "block")
    smaller = csi.ControllerExpandVolumeRequest(
        volume_id=volume.volume_id, capacity_range=csi.CapacityRange(required_bytes=size)
    )
    assert r.controller.ControllerExpandVolume(smaller).capacity_bytes == bigger
    got = r.controller.ControllerGetVolume(
        csi.ControllerGetVolumeRequest(volume_id=volume.volume_id)
    )
    assert got.volume.capacity_bytes == bigger
    node_expand = csi.NodeExpandVolumeRequest(
        volume_id=volume.volume_id,
        volume_path=str(target),
        staging_target_path=str(staging),
        capacity_range=csi.CapacityRange(required_bytes=bigger),
        volume_capability=cap,
    )
    before = 0 if kind == "block" else os.statvfs(target).f_blocks * os.statvfs(target).f_frsize
    code = code_of(lambda: r.node.NodeExpandVolume(node_expand))
    if code == Code.FAILED_PRECONDITION and kind == "ext4":
        # Without CAP_SYS_RESOURCE ext4 cannot grow while mounted (the spec's "Volume in use",
        # caller MUST NOT retry); it grows offline at the next stage instead.
        r.detach(volume.volume_id, staging, target)
        staging, target = r.attach(volume, cap, f"expand-{kind}-again")
        node_expand.volume_path, node_expand.staging_target_path = str(target), str(staging)
    else:
        assert code == Code.OK, code.name
    answer = twice(lambda: r.node.NodeExpandVolume(node_expand))
    assert answer.capacity_bytes in (0, bigger)  # OPTIONAL field
    if kind == "block":
        assert device_size(target) == bigger
    else:
        after = os.statvfs(target)
        assert after.f_blocks * after.f_frsize > max(before, size) * 1.5
    assert read_payload(target, kind, len(data)) == data
    too_big = csi.NodeExpandVolumeRequest()
    too_big.CopyFrom(node_expand)
    too_big.capacity_range.required_bytes = 4 * bigger
    expect(lambda: r.node.NodeExpandVolume(too_big), Code.OUT_OF_RANGE)
    r.detach(volume.volume_id, staging, target)


@pytest.mark.parametrize("source", ["snapshot", "volume"])
@pytest.mark.parametrize(
    "kind",
    [
        "ext4",
        "xfs",
    ],
)
def test_larger_than_source(r: Resources, kind: str, source: str) -> None:
    """spec (CreateVolume): a volume made larger than its source snapshot or volume either
    fails with OUT_OF_RANGE or, when published, has the larger size *and* the data: the
    Plugin resizes the filesystem at (or before) NodePublish."""
    cap = capability(kind)
    size = size_for(kind)
    origin = r.volume(f"small-{kind}", size, cap=cap)
    staging, target = r.attach(origin, cap, f"small-{kind}")
    data = os.urandom(64 * 1024)
    write_payload(target, kind, data)
    r.detach(origin.volume_id, staging, target)
    fields: dict[str, Any] = {"volume": origin.volume_id}
    if source == "snapshot":
        fields = {"snapshot": r.snapshot_of(origin.volume_id).snapshot_id}
    request = create_request(unique(f"large-{kind}"), 2 * size, cap, **fields)
    code = code_of(lambda: r.create_volume(request))
    if code == Code.OUT_OF_RANGE:
        return  # refusing is allowed
    assert code == Code.OK, code.name
    large = r.create_volume(request)
    assert large.capacity_bytes >= 2 * size
    staging, target = r.attach(large, cap, f"large-{kind}")
    found = os.statvfs(target)
    assert found.f_blocks * found.f_frsize > 1.5 * size, "the filesystem was not grown"
    assert read_payload(target, kind, len(data)) == data
    r.detach(large.volume_id, staging, target)
