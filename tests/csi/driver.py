"""A `csi-rbd serve` process for end-to-end tests, on either engine.

By default the driver runs one native cluster (``local``) in ``<root>/data``.
Given a cluster (a config file entry, e.g. a Ceph cluster) it runs that one
from a config file instead, and ``secrets`` are put into every request that
has a ``secrets`` field, as the external-provisioner and kubelet do with a
StorageClass's secret.
"""

from __future__ import annotations

import base64
import contextlib
import mmap
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import yaml

from csi_rbd._proto import csi_pb2 as csi
from csi_rbd._proto import csi_pb2_grpc
from csi_rbd.config import ClusterConfig, cluster_from_mapping
from csi_rbd.ids import ResourceId
from tests.csi import engine_probe
from tests.node.conftest import force_clean, leftovers

DEADLINE = 120.0  # seconds; a hung RPC fails its test instead of the whole run


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


class _Deadline(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Give every call without a timeout the default deadline."""

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        if details.timeout is None:
            details = _CallDetails(
                details.method,
                DEADLINE,
                details.metadata,
                details.credentials,
                getattr(details, "wait_for_ready", None),
                getattr(details, "compression", None),
            )
        return continuation(details, request)


class _SecretsInterceptor(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Adds the StorageClass secret to every request that carries secrets."""

    def __init__(self, secrets: Mapping[str, str]) -> None:
        self.secrets = dict(secrets)

    def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Any], details: Any, request: Any
    ) -> Any:
        if "secrets" in request.DESCRIPTOR.fields_by_name and not request.secrets:
            copy = type(request)()
            copy.CopyFrom(request)
            copy.secrets.update(self.secrets)
            request = copy
        return continuation(details, request)


class Driver:
    """A `csi-rbd serve` process (``mode``: all, controller or node) and stubs for its
    three services; every call without a timeout gets :data:`DEADLINE`."""

    def __init__(
        self,
        root: Path,
        mode: str = "all",
        node_id: str = "node-a",
        cluster: Mapping[str, Any] | None = None,
        secrets: Mapping[str, str] | None = None,
    ) -> None:
        self.root = root
        self.mode = mode
        self.node_id = node_id
        self.data_dir = root / "data"
        self.socket = root / "csi.sock"
        self.log_path = root / "driver.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.secrets = dict(secrets or {})
        self.config_file: Path | None = None
        if cluster is None:
            self.cluster = ClusterConfig("local", "native", data_dir=self.data_dir)
        else:
            self.cluster = cluster_from_mapping(dict(cluster), "test cluster")
            self.config_file = root / "config.yaml"
            self.config_file.write_text(yaml.safe_dump({"clusters": [dict(cluster)]}))
        self.cluster_id = self.cluster.id
        self.baseline: tuple[list[str], list[str]] | None = None

    def start(self, timeout: float = 30.0) -> None:
        argv = [
            sys.executable,
            "-m",
            "csi_rbd.cli",
            "--data-dir",
            str(self.data_dir),
            "serve",
            "--endpoint",
            f"unix://{self.socket}",
            "--node-id",
            self.node_id,
            "--mode",
            self.mode,
            "--state-dir",
            str(self.root / "state"),
            "--allowed-root",
            str(self.root),
        ]
        if self.config_file is not None:
            argv += ["--config", str(self.config_file)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        interceptors: list[Any] = [_Deadline()]
        if self.secrets:
            interceptors.append(_SecretsInterceptor(self.secrets))
        self.channel = grpc.intercept_channel(
            grpc.insecure_channel(f"unix://{self.socket}"), *interceptors
        )
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            try:
                if self.identity.Probe(csi.ProbeRequest(), timeout=1).ready.value:
                    if self.baseline is None and self.mode != "node":
                        self.baseline = self.pool_contents()
                    return
            except grpc.RpcError:
                time.sleep(0.1)
        raise AssertionError(f"the driver did not become ready:\n{self.log()}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.channel.close()

    def stop(self) -> None:
        """SIGTERM, as kubelet stops a plugin; it must exit 0 and remove its socket."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=60)
        finally:
            self.channel.close()
        assert code == 0, f"the driver exited with {code}:\n{self.log()}"
        assert not self.socket.exists(), "the socket outlived a clean stop"

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except FileNotFoundError:
            return ""

    # -- helpers ------------------------------------------------------------------
    def create(self, name: str, size: int, capability: Any, **fields: Any) -> csi.Volume:
        return self.controller.CreateVolume(
            csi.CreateVolumeRequest(
                name=name,
                capacity_range=csi.CapacityRange(required_bytes=size),
                volume_capabilities=[capability],
                **fields,
            )
        ).volume

    def stage_and_publish(self, volume: csi.Volume, capability: Any, name: str) -> Path:
        staging = self.root / "staging" / name
        target = self.root / "pods" / name / ("device" if capability.HasField("block") else "mnt")
        self.node.NodeStageVolume(
            csi.NodeStageVolumeRequest(
                volume_id=volume.volume_id,
                staging_target_path=str(staging),
                volume_capability=capability,
                volume_context=volume.volume_context,
            )
        )
        self.node.NodePublishVolume(
            csi.NodePublishVolumeRequest(
                volume_id=volume.volume_id,
                staging_target_path=str(staging),
                target_path=str(target),
                volume_capability=capability,
                volume_context=volume.volume_context,
            )
        )
        return target

    def unpublish_and_unstage(self, volume: csi.Volume, name: str, target: Path) -> None:
        self.node.NodeUnpublishVolume(
            csi.NodeUnpublishVolumeRequest(volume_id=volume.volume_id, target_path=str(target))
        )
        self.node.NodeUnstageVolume(
            csi.NodeUnstageVolumeRequest(
                volume_id=volume.volume_id,
                staging_target_path=str(self.root / "staging" / name),
            )
        )

    # -- the engine, looked at from a child process (see engine_probe) ---------------
    def probe(self, op: str, **fields: Any) -> Any:
        request = {
            "cluster": self.cluster.to_mapping(),
            "secrets": self.secrets,
            "pool": self.cluster.pool,
            "op": op,
            **fields,
        }
        return engine_probe.ask(request)

    def used_bytes(self, volume_id: str) -> int:
        rid = ResourceId.decode(volume_id)
        return int(self.probe("used", pool=rid.pool, image=rid.volume_image())["used"])

    def read_image(self, volume_id: str, offset: int, length: int) -> bytes:
        rid = ResourceId.decode(volume_id)
        answer = self.probe(
            "read", pool=rid.pool, image=rid.volume_image(), offset=offset, length=length
        )
        return base64.b64decode(answer["data"])

    def pool_contents(self) -> tuple[list[str], list[str]]:
        """(images, trash entries) of the cluster's default pool."""
        answer = self.probe("contents")
        return answer["images"], answer["trash"]


@contextlib.contextmanager
def running_driver(root: Path, **options: Any) -> Iterator[Driver]:
    """A started driver (``options`` as for :class:`Driver`). When it stops, nothing
    may be left on the node under ``root``: no mount, loop device, FUSE mount or
    attach daemon (checked, then cleaned up either way)."""
    driver = Driver(root, **options)
    driver.start()
    try:
        yield driver
    finally:
        try:
            driver.stop()
        finally:
            found = leftovers(root)
            force_clean(root)
        assert not found, f"left behind on the node: {found}"


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def direct_io(device: Path, offset: int, data: bytes | None = None, length: int = 0) -> bytes:
    """O_DIRECT write (then fsync) or read of page-aligned data on a block device."""
    size = len(data) if data is not None else length
    buffer = mmap.mmap(-1, size)
    fd = os.open(device, (os.O_RDWR if data is not None else os.O_RDONLY) | os.O_DIRECT)
    try:
        if data is not None:
            buffer.write(data)
            assert os.pwritev(fd, [buffer], offset) == size
            os.fsync(fd)
            return data
        assert os.preadv(fd, [buffer], offset) == size
        return bytes(buffer)
    finally:
        os.close(fd)
        buffer.close()
