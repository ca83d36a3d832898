"""Helpers for the CSI conformance suite (``test_sanity.py``).

``Driver`` (from :mod:`tests.csi.driver`) runs ``csi-rbd serve`` as a
subprocess on a unix socket, the way Kubernetes runs the plugin;
``Resources`` records what a test provisioned and tears it down in the order
a CO would (unpublish, unstage, delete), the role csi-sanity's
``Resources.Cleanup`` plays.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from csi_rbd._proto import csi_pb2 as csi
from csi_rbd.ids import ResourceId
from tests.csi.driver import Driver

MiB = 1 << 20
Code = grpc.StatusCode
Mode = csi.VolumeCapability.AccessMode.Mode


# -- requests ------------------------------------------------------------------------------
def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def unique_with_length(prefix: str, length: int) -> str:
    """A unique name of exactly ``length`` characters (csi-sanity's maximum-length names)."""
    name = unique(prefix)
    return (name + "x" * length)[:length] if len(name) < length else name[-length:]


def missing_volume_id() -> str:
    """A well-formed volume ID of this driver that names no volume."""
    return ResourceId("local", "rbd", str(uuid.uuid4())).encode()


def missing_snapshot_id() -> str:
    return ResourceId("local", "rbd", str(uuid.uuid4())).encode()


def mount(fs_type: str = "ext4", mode: int = Mode.SINGLE_NODE_WRITER) -> csi.VolumeCapability:
    return csi.VolumeCapability(
        mount=csi.VolumeCapability.MountVolume(fs_type=fs_type),
        access_mode=csi.VolumeCapability.AccessMode(mode=mode),
    )


def block(mode: int = Mode.SINGLE_NODE_WRITER) -> csi.VolumeCapability:
    return csi.VolumeCapability(
        block=csi.VolumeCapability.BlockVolume(),
        access_mode=csi.VolumeCapability.AccessMode(mode=mode),
    )


def capability(kind: str, mode: int = Mode.SINGLE_NODE_WRITER) -> csi.VolumeCapability:
    """``block``, or a mount capability with filesystem ``kind``."""
    return block(mode) if kind == "block" else mount(kind, mode)


def create_request(
    name: str,
    size: int = 64 * MiB,
    cap: csi.VolumeCapability | None = None,
    *,
    limit: int = 0,
    snapshot: str | None = None,
    volume: str | None = None,
    **fields: Any,
) -> csi.CreateVolumeRequest:
    request = csi.CreateVolumeRequest(
        name=name,
        capacity_range=csi.CapacityRange(required_bytes=size, limit_bytes=limit),
        volume_capabilities=[cap or mount()],
        **fields,
    )
    if snapshot is not None:
        request.volume_content_source.snapshot.snapshot_id = snapshot
    if volume is not None:
        request.volume_content_source.volume.volume_id = volume
    return request


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError | None:
    """The RpcError ``call`` raised, or None if it succeeded."""
    try:
        call()
    except grpc.RpcError as error:
        return error
    return None


def code_of(call: Callable[[], Any]) -> Code:
    error = rpc_error(call)
    return Code.OK if error is None else error.code()  # type: ignore[attr-defined]


def expect(call: Callable[[], Any], code: Code) -> str:
    """Run ``call``; assert it ends with ``code`` (OK included); the status details."""
    error = rpc_error(call)
    if error is None:
        assert code == Code.OK, f"expected {code.name}, the call succeeded"
        return ""
    got, details = error.code(), str(error.details())  # type: ignore[attr-defined]
    assert got == code, f"expected {code.name}, got {got.name}: {details}"
    return details


# -- resources ---------------------------------------------------------------------------
class Resources:
    """What one test provisioned on the driver, torn down in CO order at the end."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.controller = driver.controller
        self.node = driver.node
        self.volumes: list[str] = []
        self.snapshots: list[str] = []
        self.staged: list[tuple[str, str]] = []  # (volume id, staging path)
        self.published: list[tuple[str, str]] = []  # (volume id, target path)

    # paths, made as kubelet makes them: the staging directory and the target's parent
    def staging_path(self, name: str) -> Path:
        path = self.driver.root / "staging" / unique(name)
        path.mkdir(parents=True)
        return path

    def target_path(self, name: str, kind: str = "mount") -> Path:
        parent = self.driver.root / "pods" / unique(name)
        parent.mkdir(parents=True)
        return parent / ("device" if kind == "block" else "mount")

    # provisioning
    def create_volume(self, request: csi.CreateVolumeRequest) -> csi.Volume:
        volume = self.controller.CreateVolume(request).volume
        if volume.volume_id not in self.volumes:
            self.volumes.append(volume.volume_id)
        return volume

    def volume(self, prefix: str = "vol", size: int = 64 * MiB, **fields: Any) -> csi.Volume:
        return self.create_volume(create_request(unique(prefix), size, **fields))

    def create_snapshot(self, name: str, source: str, **fields: Any) -> csi.Snapshot:
        request = csi.CreateSnapshotRequest(name=name, source_volume_id=source, **fields)
        snapshot = self.controller.CreateSnapshot(request).snapshot
        if snapshot.snapshot_id not in self.snapshots:
            self.snapshots.append(snapshot.snapshot_id)
        return snapshot

    def snapshot_of(self, source: str, prefix: str = "snap") -> csi.Snapshot:
        return self.create_snapshot(unique(prefix), source)

    def stage(
        self, volume: csi.Volume, cap: csi.VolumeCapability, staging: Path, **fields: Any
    ) -> csi.NodeStageVolumeResponse:
        entry = (volume.volume_id, str(staging))
        if entry not in self.staged:
            self.staged.append(entry)
        return self.node.NodeStageVolume(
            csi.NodeStageVolumeRequest(
                volume_id=volume.volume_id,
                staging_target_path=str(staging),
                volume_capability=cap,
                volume_context=volume.volume_context,
                **fields,
            )
        )

    def publish(
        self,
        volume: csi.Volume,
        cap: csi.VolumeCapability,
        staging: Path,
        target: Path,
        **fields: Any,
    ) -> csi.NodePublishVolumeResponse:
        entry = (volume.volume_id, str(target))
        if entry not in self.published:
            self.published.append(entry)
        return self.node.NodePublishVolume(
            csi.NodePublishVolumeRequest(
                volume_id=volume.volume_id,
                staging_target_path=str(staging),
                target_path=str(target),
                volume_capability=cap,
                volume_context=volume.volume_context,
                **fields,
            )
        )

    def unpublish(self, volume_id: str, target: Path) -> None:
        self.node.NodeUnpublishVolume(
            csi.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target))
        )
        with contextlib.suppress(ValueError):
            self.published.remove((volume_id, str(target)))

    def unstage(self, volume_id: str, staging: Path) -> None:
        self.node.NodeUnstageVolume(
            csi.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=str(staging))
        )
        with contextlib.suppress(ValueError):
            self.staged.remove((volume_id, str(staging)))

    def attach(self, volume: csi.Volume, cap: csi.VolumeCapability, name: str) -> tuple[Path, Path]:
        """Stage and publish (once each); (staging path, target path)."""
        staging = self.staging_path(name)
        target = self.target_path(name, "block" if cap.HasField("block") else "mount")
        self.stage(volume, cap, staging)
        self.publish(volume, cap, staging, target)
        return staging, target

    def detach(self, volume_id: str, staging: Path, target: Path) -> None:
        self.unpublish(volume_id, target)
        self.unstage(volume_id, staging)

    def delete_volume(self, volume_id: str) -> None:
        self.controller.DeleteVolume(csi.DeleteVolumeRequest(volume_id=volume_id))
        with contextlib.suppress(ValueError):
            self.volumes.remove(volume_id)

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.controller.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=snapshot_id))
        with contextlib.suppress(ValueError):
            self.snapshots.remove(snapshot_id)

    def cleanup(self) -> list[str]:
        """Undo everything still recorded; the failures, one line each."""
        failures = []
        steps: list[tuple[str, Callable[[], None]]] = []
        for volume_id, target in reversed(self.published):
            steps.append((f"unpublish {target}", _bind(self.unpublish, volume_id, Path(target))))
        for volume_id, staging in reversed(self.staged):
            steps.append((f"unstage {staging}", _bind(self.unstage, volume_id, Path(staging))))
        for snapshot_id in reversed(self.snapshots):
            steps.append(
                (f"delete snapshot {snapshot_id}", _bind(self.delete_snapshot, snapshot_id))
            )
        for volume_id in reversed(self.volumes):
            steps.append((f"delete volume {volume_id}", _bind(self.delete_volume, volume_id)))
        for what, step in steps:
            try:
                step()
            except grpc.RpcError as error:
                failures.append(f"{what}: {error.code().name} {error.details()}")  # type: ignore[attr-defined]
        return failures


def _bind(function: Callable[..., None], *args: Any) -> Callable[[], None]:
    return lambda: function(*args)


# -- data on volumes ---------------------------------------------------------------------
def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_device(device: Path, offset: int, data: bytes) -> None:
    fd = os.open(device, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_device(device: Path, offset: int, length: int) -> bytes:
    fd = os.open(device, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def device_size(device: Path) -> int:
    with open(device, "rb") as handle:
        return handle.seek(0, os.SEEK_END)


def write_payload(target: Path, kind: str, data: bytes) -> None:
    """Put ``data`` on a published volume: a file on a filesystem, offset 1 MiB on a device."""
    if kind == "block":
        write_device(target, MiB, data)
    else:
        write_file(target / "payload.bin", data)


def read_payload(target: Path, kind: str, length: int) -> bytes | None:
    if kind == "block":
        return read_device(target, MiB, length)
    path = target / "payload.bin"
    return path.read_bytes() if path.exists() else None
