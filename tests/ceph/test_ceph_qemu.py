"""QEMU interop: volumes made by the control plane are plain RBD images to QEMU.

``qemu-img`` (qemu-utils) with its ``rbd:`` driver (qemu-block-extra) sees a
volume created through VolumeService, writes a qcow2 disk into it, grows it,
and the engine reads back the same bytes (and the other way round); a volume
QEMU wrote is read back through the node's data path.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from csi_rbd._proto import csi_pb2 as csi
from csi_rbd.control.volumes import CreateVolumeRequest
from csi_rbd.ids import ResourceId
from csi_rbd.vm.drive import ceph_spec
from csi_rbd.vm.rbd_spec import format_spec
from tests.ceph.cluster import CephCluster
from tests.csi.conftest import block_capability
from tests.csi.driver import direct_io
from tests.engine.conformance import pattern

MiB = 1 << 20


def _qemu_rbd_missing() -> str | None:
    if shutil.which("qemu-img") is None:
        return "qemu-img not installed (apt-get install qemu-utils qemu-block-extra)"
    formats = subprocess.run(["qemu-img", "--help"], capture_output=True, text=True).stdout
    if " rbd" not in formats:
        return "qemu-img has no rbd driver (apt-get install qemu-block-extra)"
    return None


pytestmark = pytest.mark.skipif(_qemu_rbd_missing() is not None, reason=str(_qemu_rbd_missing()))


def rbd_filename(pool: str, image: str, user: str, conf: Path) -> str:
    """The filename QEMU opens, made by the product's own formatter."""
    return format_spec(ceph_spec(pool, image, user=user, conf=conf))


def qemu_img(*args: str) -> str:
    done = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"qemu-img {' '.join(args)}: {done.stderr}"
    return done.stdout


def test_qemu_img_reads_writes_and_grows_a_volume(
    ceph_driver: Any, ceph_cluster: CephCluster, csi_secrets: dict[str, str], tmp_path: Path
) -> None:
    volumes, _, engine = ceph_driver
    volume = volumes.create(
        CreateVolumeRequest(
            "vm-disk", 8 * MiB, parameters={"clusterID": "ceph-test"}, secrets=csi_secrets
        )
    )
    image = ResourceId.decode(volume.volume_id).volume_image()
    target = rbd_filename("rbd", image, "csi", ceph_cluster.client_conf("csi"))

    info = json.loads(qemu_img("info", "--output=json", target))
    assert info["format"] == "raw"
    assert info["virtual-size"] == 8 * MiB

    # a qcow2 disk: 6 MiB virtual, data at 1..4 MiB and in the last sector
    raw = bytearray(6 * MiB)
    raw[MiB : 4 * MiB] = pattern(3 * MiB, 7)
    raw[-512:] = pattern(512, 9)
    (tmp_path / "disk.raw").write_bytes(raw)
    qemu_img(
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        str(tmp_path / "disk.raw"),
        str(tmp_path / "disk.qcow2"),
    )
    qemu_img("convert", "-n", "-f", "qcow2", "-O", "raw", str(tmp_path / "disk.qcow2"), target)

    def engine_bytes() -> bytes:
        with engine.session(csi_secrets) as cluster:
            ioctx = cluster.open_ioctx("rbd")
            try:
                with engine.open_image(ioctx, image, read_only=True) as handle:
                    return bytes(handle.read(0, handle.size()))
            finally:
                ioctx.close()

    assert engine_bytes() == bytes(raw) + bytes(2 * MiB)

    qemu_img("resize", "-f", "raw", target, str(16 * MiB))
    assert volumes.get(volume.volume_id).capacity == 16 * MiB
    assert engine_bytes() == bytes(raw) + bytes(10 * MiB)

    # and QEMU reads what the engine writes
    with engine.session(csi_secrets) as cluster:
        ioctx = cluster.open_ioctx("rbd")
        try:
            with engine.open_image(ioctx, image) as handle:
                handle.write(pattern(MiB, 11), 12 * MiB)
                handle.flush()
        finally:
            ioctx.close()
    qemu_img("convert", "-f", "raw", "-O", "raw", target, str(tmp_path / "back.raw"))
    assert (tmp_path / "back.raw").read_bytes() == engine_bytes()

    volumes.delete(volume.volume_id, csi_secrets)
    done = subprocess.run(["qemu-img", "info", target], capture_output=True, text=True)
    assert done.returncode != 0  # gone


def test_qemu_written_volume_reads_the_same_on_the_node(
    ceph_csi_driver: Any, ceph_cluster: CephCluster, tmp_path: Path
) -> None:
    """CreateVolume (CSI), ``qemu-img convert`` of a qcow2 disk into it and ``qemu-img
    resize``, then NodeStage/NodePublish as a block volume: the device holds the
    same bytes, at the new size."""
    driver = ceph_csi_driver
    capability = block_capability()
    volume = driver.create("vm-disk-node", 8 * MiB, capability)
    image = ResourceId.decode(volume.volume_id).volume_image()
    target = rbd_filename("rbd", image, "csi", ceph_cluster.client_conf("csi"))
    raw = bytearray(6 * MiB)
    raw[512 * 1024 : 3 * MiB] = pattern(3 * MiB - 512 * 1024, 21)
    (tmp_path / "disk.raw").write_bytes(raw)
    qcow2 = str(tmp_path / "disk.qcow2")
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(tmp_path / "disk.raw"), qcow2)
    qemu_img("convert", "-n", "-f", "qcow2", "-O", "raw", qcow2, target)
    qemu_img("resize", "-f", "raw", target, str(12 * MiB))

    device = driver.stage_and_publish(volume, capability, "vm")
    with open(device, "rb") as handle:
        assert handle.seek(0, 2) == 12 * MiB
    assert direct_io(device, 0, length=12 * MiB) == bytes(raw) + bytes(6 * MiB)
    driver.unpublish_and_unstage(volume, "vm", device)
    driver.controller.DeleteVolume(csi.DeleteVolumeRequest(volume_id=volume.volume_id))
