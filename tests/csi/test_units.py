"""IDs, locks, config, log sanitizing and the server's socket handling."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from csi_rbd._proto import csi_pb2 as csi
from csi_rbd._proto import csi_pb2_grpc
from csi_rbd.config import ConfigError, DriverConfig, load_clusters
from csi_rbd.csi.sanitize import sanitized
from csi_rbd.csi.server import DriverServer
from csi_rbd.ids import MAX_CLUSTER_AND_POOL, MAX_LENGTH, BadId, ResourceId
from csi_rbd.locks import OperationLocks, OperationPending

NAMES = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters="/@"),
    min_size=1,
    max_size=30,
)


@given(cluster=NAMES, pool=NAMES, uuid=st.uuids())
def test_ids_round_trip_and_stay_short(cluster: str, pool: str, uuid: object) -> None:
    rid = ResourceId(cluster, pool, str(uuid))
    text = rid.encode()
    assert len(text.encode()) <= MAX_LENGTH
    assert ResourceId.decode(text) == rid
    assert rid.volume_image() == f"csi-vol-{uuid}"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "0002-0005-local-0003-rbd-8d3f0c8e-6a52-4c57-9a43-2b0b8e9c3f11",
        "0001-0009-local-0003-rbd-8d3f0c8e-6a52-4c57-9a43-2b0b8e9c3f11",
        "0001-0005-local-0003-rbd-not-a-uuid",
        "0001-0005-local-0003-rbd-8D3F0C8E-6A52-4C57-9A43-2B0B8E9C3F11",
        "0001-zzzz-local-0003-rbd-8d3f0c8e-6a52-4c57-9a43-2b0b8e9c3f11",
        "0001-0005-local-0003-rbd-8d3f0c8e-6a52-4c57-9a43-2b0b8e9c3f11" + "x" * 100,
    ],
)
def test_foreign_ids_are_refused(text: str) -> None:
    with pytest.raises(BadId):
        ResourceId.decode(text)


def test_id_length_limit() -> None:
    uuid = "8d3f0c8e-6a52-4c57-9a43-2b0b8e9c3f11"
    assert len(ResourceId("c" * 30, "p" * (MAX_CLUSTER_AND_POOL - 30), uuid).encode()) == 128
    with pytest.raises(BadId):
        ResourceId("c" * 30, "p" * (MAX_CLUSTER_AND_POOL - 29), uuid)


def test_operation_locks_refuse_instead_of_waiting() -> None:
    locks = OperationLocks()
    with locks.hold("a", "b"):
        with pytest.raises(OperationPending, match="b"):
            with locks.hold("c", "b"):
                pass
        assert locks.held() == {"a", "b"}  # nothing of the refused call stayed held
    with locks.hold("b"):
        pass
    assert locks.held() == frozenset()


def test_operation_locks_across_threads() -> None:
    locks = OperationLocks()
    entered = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with locks.hold("vol"):
            entered.set()
            release.wait(5)

    thread = threading.Thread(target=holder)
    thread.start()
    entered.wait(5)
    with pytest.raises(OperationPending):
        with locks.hold("vol"):
            pass
    release.set()
    thread.join()


def test_secrets_never_reach_the_log() -> None:
    request = csi.NodeStageVolumeRequest(
        volume_id="v",
        secrets={"userKey": "AQD-very-secret=="},
        volume_context={"pool": "rbd"},
    )
    text = sanitized(request)
    assert "AQD-very-secret" not in text
    assert "userKey" in text and "pool" in text
    nested = csi.CreateVolumeRequest(name="n", secrets={"k": "hidden-value"})
    assert "hidden-value" not in sanitized(nested)
    assert "hidden-value" in str(nested)  # the original request is untouched


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("nope: 1\n", "expected a mapping with a 'clusters' list"),
        ("clusters: []\n", "'clusters' is empty"),
        ("clusters:\n  - id: a\n    engine: zfs\n", "engine must be 'native' or 'ceph'"),
        ("clusters:\n  - id: a\n    engine: native\n", "needs dataDir"),
        ("clusters:\n  - id: a\n    engine: ceph\n", "needs a list of monitors"),
        ("clusters:\n  - id: 'bad id!'\n    engine: native\n    dataDir: /x\n", "id must be"),
        (
            "clusters:\n  - id: a\n    engine: native\n    dataDir: /x\n    colour: 1\n",
            "unknown key",
        ),
        (
            "clusters:\n"
            "  - {id: a, engine: native, dataDir: /x}\n"
            "  - {id: a, engine: native, dataDir: /y}\n",
            "appears twice",
        ),
    ],
)
def test_bad_config_files(tmp_path: Path, document: str, message: str) -> None:
    path = tmp_path / "clusters.yaml"
    path.write_text(document)
    with pytest.raises(ConfigError, match=message):
        load_clusters(path, tmp_path)


def test_config_file_clusters(tmp_path: Path) -> None:
    path = tmp_path / "clusters.yaml"
    path.write_text(
        "clusters:\n"
        "  - {id: ceph-a, engine: ceph, monitors: ['127.0.0.1:3300'], pool: vms}\n"
        "  - {id: local, engine: native, dataDir: /var/lib/csi-rbd}\n"
    )
    ceph, native = load_clusters(path, tmp_path)
    assert (ceph.engine, ceph.monitors, ceph.pool) == ("ceph", ("127.0.0.1:3300",), "vms")
    assert (native.engine, str(native.data_dir)) == ("native", "/var/lib/csi-rbd")
    assert load_clusters(None, tmp_path)[0].id == "local"


def test_server_replaces_a_stale_socket_and_logs_calls(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, engines: dict[str, object]
) -> None:
    socket = tmp_path / "csi.sock"
    socket.write_text("left by a crashed run")
    config = DriverConfig(
        endpoint=f"unix://{socket}",
        node_id="n",
        clusters=load_clusters(None, tmp_path / "data"),
        mode="controller",
    )
    server = DriverServer(config, engines)  # type: ignore[arg-type]
    server.start()
    try:
        with caplog.at_level(logging.DEBUG, logger="csi_rbd.grpc"):
            with grpc.insecure_channel(f"unix://{socket}") as channel:
                stub = csi_pb2_grpc.ControllerStub(channel)
                with pytest.raises(grpc.RpcError):
                    stub.DeleteVolume(csi.DeleteVolumeRequest(secrets={"userKey": "s3cr3t"}))
    finally:
        server.stop(grace=5)
    assert not socket.exists()
    lines = [r.getMessage() for r in caplog.records]
    assert any("DeleteVolume INVALID_ARGUMENT in" in line for line in lines), lines
    assert not any("s3cr3t" in line for line in lines)
