"""The CSI control plane on a Ceph cluster: VolumeService and SnapshotService end to end.

A DriverConfig with one ``engine: ceph`` cluster, the CSI user's secrets on
every call that carries them, and the driver's own identity (a conf file
with a keyring) for the calls the CSI spec gives no secrets.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_rbd.config import ClusterConfig, DriverConfig
from csi_rbd.control import errors as control
from csi_rbd.control import images
from csi_rbd.control.journal import NameJournal
from csi_rbd.control.volumes import CreateVolumeRequest, VolumeService
from csi_rbd.csi.status import code_for
from csi_rbd.engine import errors
from csi_rbd.ids import ResourceId
from csi_rbd.locks import OperationLocks
from tests.ceph.cluster import CephCluster
from tests.engine.conformance import pattern

MiB = 1 << 20
CLUSTER = "ceph-test"


@pytest.fixture
def driver(ceph_driver: Any) -> Any:
    return ceph_driver


@contextlib.contextmanager
def pool(engine: Any, secrets: dict[str, str], name: str = "rbd") -> Iterator[Any]:
    with engine.session(secrets) as cluster:
        ioctx = cluster.open_ioctx(name)
        try:
            yield ioctx
        finally:
            ioctx.close()


def write(engine: Any, secrets: dict[str, str], image: str, data: bytes, offset: int = 0) -> None:
    with pool(engine, secrets) as ioctx, engine.open_image(ioctx, image) as handle:
        handle.write(data, offset)
        handle.flush()


def read(engine: Any, secrets: dict[str, str], image: str) -> bytes:
    with pool(engine, secrets) as ioctx, engine.open_image(ioctx, image, read_only=True) as handle:
        return bytes(handle.read(0, handle.size()))


def image_of(volume_id: str) -> str:
    return ResourceId.decode(volume_id).volume_image()


def test_create_snapshot_restore_clone_expand_delete(driver: Any, csi_secrets: dict) -> None:
    volumes, snapshots, engine = driver
    params = {"clusterID": CLUSTER, "csi.storage.k8s.io/pvc/name": "data"}
    request = CreateVolumeRequest("pvc-a", 4 * MiB, parameters=params, secrets=csi_secrets)
    a = volumes.create(request)
    assert a.capacity == 4 * MiB and a.topology is None  # reachable from any node
    assert volumes.create(request).volume_id == a.volume_id  # idempotent
    with pytest.raises(control.AlreadyExists):
        volumes.create(
            CreateVolumeRequest("pvc-a", 8 * MiB, parameters=params, secrets=csi_secrets)
        )
    first = pattern(4 * MiB, 1)
    write(engine, csi_secrets, image_of(a.volume_id), first)

    snap = snapshots.create("snap-a", a.volume_id, {}, csi_secrets)
    assert snap.size == 4 * MiB and snap.source_volume_id == a.volume_id
    assert snapshots.create("snap-a", a.volume_id, {}, csi_secrets) == snap
    second = pattern(MiB, 2)
    write(engine, csi_secrets, image_of(a.volume_id), second, MiB)
    current = first[:MiB] + second + first[2 * MiB :]

    restored = volumes.create(
        CreateVolumeRequest(
            "pvc-restored",
            6 * MiB,
            parameters=params,
            source_snapshot=snap.snapshot_id,
            secrets=csi_secrets,
        )
    )
    assert restored.capacity == 6 * MiB
    assert read(engine, csi_secrets, image_of(restored.volume_id)) == first + bytes(2 * MiB)

    cloned = volumes.create(
        CreateVolumeRequest(
            "pvc-clone", 0, parameters=params, source_volume=a.volume_id, secrets=csi_secrets
        )
    )
    assert read(engine, csi_secrets, image_of(cloned.volume_id)) == current
    # the clone's temporary snapshot of the source is gone (trashed while the clone reads it)
    with pool(engine, csi_secrets) as ioctx, engine.open_image(ioctx, image_of(a.volume_id)) as h:
        assert h.user_snaps() == []

    assert volumes.expand(a.volume_id, 8 * MiB, 0, csi_secrets) == 8 * MiB
    assert read(engine, csi_secrets, image_of(a.volume_id)) == current + bytes(4 * MiB)
    assert volumes.get(a.volume_id).capacity == 8 * MiB  # own identity: no secrets
    assert a.volume_id in volumes.list_ids()
    assert snap.snapshot_id in [s.snapshot_id for s in snapshots.list()]
    volumes.modify(a.volume_id, {"cache": "writeback"})  # the image metadata the node reads
    with pool(engine, csi_secrets) as ioctx, engine.open_image(ioctx, image_of(a.volume_id)) as h:
        assert h.metadata_get("csi.cache") == "writeback"
    assert volumes.condition(a.volume_id) == (False, "the image is readable")

    # delete the source first: snapshot and clone keep reading
    volumes.delete(a.volume_id, csi_secrets)
    with pytest.raises(control.NotFound):
        volumes.get(a.volume_id)
    assert read(engine, csi_secrets, image_of(cloned.volume_id)) == current
    with pool(engine, csi_secrets) as ioctx:
        trash = engine.rbd.trash_list(ioctx)
    assert image_of(a.volume_id) in [t["name"] for t in trash]
    restored_again = volumes.create(
        CreateVolumeRequest(
            "pvc-restored-2",
            0,
            parameters=params,
            source_snapshot=snap.snapshot_id,
            secrets=csi_secrets,
        )
    )
    assert read(engine, csi_secrets, image_of(restored_again.volume_id)) == first

    snapshots.delete(snap.snapshot_id, csi_secrets)
    snapshots.delete(snap.snapshot_id, csi_secrets)  # idempotent
    with pytest.raises(control.NotFound):
        snapshots.get(snap.snapshot_id, csi_secrets)
    assert read(engine, csi_secrets, image_of(restored.volume_id)) == first + bytes(2 * MiB)
    for volume in (restored, restored_again, cloned):
        volumes.delete(volume.volume_id, csi_secrets)
        volumes.delete(volume.volume_id, csi_secrets)  # idempotent
    volumes.delete(a.volume_id, csi_secrets)

    # nothing is left behind: images, the trash (librbd removed the trashed
    # parents when their last clone went), the name journal
    with pool(engine, csi_secrets) as ioctx:
        ours = {image_of(v.volume_id) for v in (a, restored, restored_again, cloned)}
        ours.add(ResourceId.decode(snap.snapshot_id).snapshot_image())
        assert ours.isdisjoint(engine.rbd.list(ioctx))
        assert ours.isdisjoint(t["name"] for t in engine.rbd.trash_list(ioctx))
        for name in ("pvc-a", "pvc-restored", "pvc-restored-2", "pvc-clone"):
            assert NameJournal(ioctx, "volume").lookup(name) is None
        assert NameJournal(ioctx, "snapshot").lookup("snap-a") is None


def test_deep_clone_chain_is_flattened(driver: Any, csi_secrets: dict) -> None:
    """Past MAX_CLONE_DEPTH the control plane flattens the new clone (librbd flatten)."""
    volumes, _, engine = driver
    params = {"clusterID": CLUSTER}
    source = volumes.create(
        CreateVolumeRequest("chain-0", MiB, parameters=params, secrets=csi_secrets)
    )
    write(engine, csi_secrets, image_of(source.volume_id), pattern(MiB, 5))
    made = [source]
    for i in range(1, images.MAX_CLONE_DEPTH + 2):
        made.append(
            volumes.create(
                CreateVolumeRequest(
                    f"chain-{i}",
                    0,
                    parameters=params,
                    source_volume=made[-1].volume_id,
                    secrets=csi_secrets,
                )
            )
        )
    with (
        pool(engine, csi_secrets) as ioctx,
        engine.open_image(ioctx, image_of(made[-1].volume_id), read_only=True) as last,
    ):
        assert bytes(last.read(0, MiB)) == pattern(MiB, 5)
    with engine.session(csi_secrets) as cluster:
        depth = images.clone_depth(engine, cluster, "rbd", image_of(made[-1].volume_id))
    assert depth <= images.MAX_CLONE_DEPTH
    for volume in made:
        volumes.delete(volume.volume_id, csi_secrets)


def test_missing_or_wrong_credentials(driver: Any, ceph_cluster: CephCluster) -> None:
    volumes, _, _ = driver
    params = {"clusterID": CLUSTER}
    for secrets in (
        {"userID": "csi", "userKey": ceph_cluster.keys["admin"]},  # another user's key
        {"userID": "nobody", "userKey": ceph_cluster.keys["csi"]},
        {"userID": "csi"},
        {"userID": "csi", "userKey": "not a key"},
    ):
        started = time.monotonic()
        with pytest.raises(errors.PermissionError) as failure:
            volumes.create(CreateVolumeRequest("denied", MiB, parameters=params, secrets=secrets))
        assert time.monotonic() - started < 5
        assert code_for(failure.value) == grpc.StatusCode.UNAUTHENTICATED
        assert ceph_cluster.keys["csi"] not in str(failure.value)


def test_unreachable_monitor_is_unavailable_within_seconds(
    ceph_cluster: CephCluster, tmp_path: Path
) -> None:
    import socket

    from csi_rbd.engine.ceph import CephEngine

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    cluster = ClusterConfig("dead", "ceph", monitors=(f"v2:127.0.0.1:{closed}",))
    config = DriverConfig(
        endpoint="unix:///x", node_id="n", clusters=(cluster,), state_dir=tmp_path
    )
    engine = CephEngine.from_config(cluster, connect_timeout=2)
    volumes = VolumeService(config, {"dead": engine}, OperationLocks())
    started = time.monotonic()
    with pytest.raises(errors.Timeout) as failure:
        volumes.create(
            CreateVolumeRequest("v", MiB, parameters={}, secrets=ceph_cluster.csi_secrets)
        )
    assert time.monotonic() - started < 6
    assert code_for(failure.value) == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(errors.ConnectionShutdown):
        engine.probe()  # no conf: a TCP check of the monitors


def test_missing_pool(driver: Any, csi_secrets: dict) -> None:
    volumes, _, engine = driver
    with engine.session(csi_secrets) as cluster, pytest.raises(errors.ObjectNotFound):
        cluster.open_ioctx("no-such-pool")
    with pytest.raises(control.InvalidRequest, match="no-such-pool"):
        volumes.create(
            CreateVolumeRequest(
                "v",
                MiB,
                parameters={"clusterID": CLUSTER, "pool": "no-such-pool"},
                secrets=csi_secrets,
            )
        )


def test_failed_create_leaves_nothing_behind(
    driver: Any, csi_secrets: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    volumes, snapshots, engine = driver
    params = {"clusterID": CLUSTER}
    source = volumes.create(CreateVolumeRequest("src", MiB, parameters=params, secrets=csi_secrets))
    snap = snapshots.create("src-snap", source.volume_id, {}, csi_secrets)

    def before_listing() -> set[str]:
        with pool(engine, csi_secrets) as ioctx:
            return set(engine.rbd.list(ioctx))

    before = before_listing()
    # 1. librbd refuses the clone (smaller objects than the snapshot's): nothing made
    with pytest.raises(errors.InvalidArgument, match="smaller objects"):
        volumes.create(
            CreateVolumeRequest(
                "bad-order",
                MiB,
                parameters={**params, "objectSize": "64K"},
                source_snapshot=snap.snapshot_id,
                secrets=csi_secrets,
            )
        )

    # 2. a failure after the clone exists: the clone is removed again
    def failing_settle(*args: Any, **kwargs: Any) -> None:
        raise errors.NoSpace("injected failure after the image was made")

    monkeypatch.setattr(VolumeService, "_limit_depth", failing_settle)
    with pytest.raises(errors.NoSpace):
        volumes.create(
            CreateVolumeRequest(
                "late-failure",
                MiB,
                parameters=params,
                source_volume=source.volume_id,
                secrets=csi_secrets,
            )
        )
    monkeypatch.undo()
    assert before_listing() == before
    with pool(engine, csi_secrets) as ioctx:
        journal = NameJournal(ioctx, "volume")
        assert journal.lookup("bad-order") is None
        assert journal.lookup("late-failure") is None
        with engine.open_image(ioctx, image_of(source.volume_id)) as handle:
            assert handle.user_snaps() == []  # no temporary snapshot left on the source
    snapshots.delete(snap.snapshot_id, csi_secrets)
    volumes.delete(source.volume_id, csi_secrets)


def test_capacity_and_probe(driver: Any, ceph_cluster: CephCluster) -> None:
    _, _, engine = driver
    engine.probe()  # connects with the driver's own identity
    # no ceph-mgr in the test cluster: no statistics, so the pool quota (or 0)
    assert engine.free_bytes("rbd") == 0
    admin = ceph_cluster.admin()
    try:
        quota = {"prefix": "osd pool set-quota", "pool": "rbd", "field": "max_bytes"}
        ceph_cluster.command(admin, {**quota, "val": str(64 * MiB)})
        assert engine.free_bytes("rbd") == 64 * MiB
        ceph_cluster.command(admin, {**quota, "val": "0"})
    finally:
        admin.shutdown()
    with pytest.raises(errors.ObjectNotFound):
        engine.free_bytes("no-such-pool")
    locator = engine.locator("rbd", "csi-vol-x")
    assert (locator.cluster_id, locator.engine, locator.pool, locator.image) == (
        CLUSTER,
        "ceph",
        "rbd",
        "csi-vol-x",
    )
    assert locator.data_dir is None
