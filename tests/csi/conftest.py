"""Fixtures for the CSI layer: a native engine and a driver config in a temp dir.

pytest-grpc's real-server fixtures serve one servicer per test module; its
address fixture is overridden to a unix socket (no TCP port in tests).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_rbd._proto import csi_pb2 as csi
from csi_rbd.config import ClusterConfig, DriverConfig
from csi_rbd.engine.native.engine import NativeEngine

NODE = "node-a"


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="csi-rbd-test-") as directory:
        yield Path(directory)


@pytest.fixture(scope="module")
def grpc_addr(workdir: Path) -> str:
    return f"unix://{workdir}/csi.sock"


@pytest.fixture(scope="module")
def driver_config(workdir: Path) -> DriverConfig:
    return DriverConfig(
        endpoint=f"unix://{workdir}/csi.sock",
        node_id=NODE,
        clusters=(ClusterConfig("local", "native", data_dir=workdir / "data"),),
        state_dir=workdir / "node",
        allowed_roots=(workdir,),
    )


@pytest.fixture(scope="module")
def engines(driver_config: DriverConfig) -> Iterator[dict[str, NativeEngine]]:
    cluster = driver_config.default_cluster
    assert cluster.data_dir is not None
    engine = NativeEngine(cluster.id, cluster.data_dir)
    yield {cluster.id: engine}
    engine.close()


def mount_capability(
    fs_type: str = "ext4",
    mode: int = csi.VolumeCapability.AccessMode.SINGLE_NODE_WRITER,
) -> csi.VolumeCapability:
    return csi.VolumeCapability(
        mount=csi.VolumeCapability.MountVolume(fs_type=fs_type),
        access_mode=csi.VolumeCapability.AccessMode(mode=mode),
    )


def block_capability(
    mode: int = csi.VolumeCapability.AccessMode.SINGLE_NODE_WRITER,
) -> csi.VolumeCapability:
    return csi.VolumeCapability(
        block=csi.VolumeCapability.BlockVolume(),
        access_mode=csi.VolumeCapability.AccessMode(mode=mode),
    )


def expect_code(call: object, code: grpc.StatusCode) -> str:
    """Run ``call`` (a zero-argument function); assert it fails with ``code``."""
    assert callable(call)
    with pytest.raises(grpc.RpcError) as failure:
        call()
    error = failure.value
    assert error.code() == code, f"{error.code()} {error.details()}"  # type: ignore[attr-defined]
    return str(error.details())  # type: ignore[attr-defined]
