"""QEMU's own RBD driver on a throwaway Ceph cluster, given what the formatter writes.

The image and snapshot names hold every character the ``rbd:`` syntax
escapes; if QEMU opened another image, or none, the sizes and data would
not match. Needs Debian's Ceph daemons and qemu-block-extra; skipped (with
the reason) without them.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from csi_rbd import cli
from csi_rbd.vm.drive import DiskSettings, ceph_spec, rbd_drive
from tests.vm import guest
from tests.vm.conftest import QEMU_IMG, QEMU_IO, needs_qemu_system, needs_qemu_tools

pytestmark = [needs_qemu_tools, needs_qemu_system]
MiB = 1 << 20
NAME = "vm:1@x=y\\z,w"
SNAP = "base@1:a=b"


@pytest.fixture(scope="module")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    try:
        from tests.ceph.cluster import CephCluster, ClusterUnavailable, missing
    except ImportError as exc:  # the Ceph test helpers are not in this tree
        pytest.skip(f"no Ceph test cluster helper: {exc}")
    reason = missing()
    if reason is not None:
        pytest.skip(f"Ceph cluster: {reason}")
    try:
        cluster = CephCluster.start(tmp_path_factory.mktemp("ceph") / "cluster")
    except ClusterUnavailable as exc:
        pytest.skip(f"Ceph cluster: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def rbd_image(ceph: Any) -> Iterator[Any]:
    """(ioctx, rbd module): NAME with 1 MiB of b'a' at 0 and snapshot SNAP."""
    from csi_rbd.engine.ceph import bindings

    _, rbd = bindings.load()
    handle = ceph.admin()
    ioctx = handle.open_ioctx("rbd")
    rbd.RBD().create(ioctx, NAME, 16 * MiB)
    with rbd.Image(ioctx, NAME) as image:
        image.write(b"a" * MiB, 0)
        image.create_snap(SNAP)
        image.write(b"c" * MiB, 0)
    yield ioctx, rbd
    ioctx.close()
    handle.shutdown()


def qemu(*argv: str) -> str:
    answer = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert answer.returncode == 0, answer.stderr + answer.stdout
    return answer.stdout


def test_qemu_opens_the_image_and_snapshot(ceph: Any, rbd_image: Any) -> None:
    ioctx, rbd = rbd_image
    spec = ceph_spec("rbd", NAME, user="admin", conf=ceph.conf, keyring=ceph.admin_keyring)
    drive = rbd_drive(spec, DiskSettings("writeback", "unmap"))
    info = json.loads(qemu(str(QEMU_IMG), "info", "--output=json", "--image-opts",
                           drive.image_opts()))  # fmt: skip
    assert info["virtual-size"] == 16 * MiB
    opened = guest.query_drive(drive.value())["inserted"]
    assert opened["cache"] == {"writeback": True, "direct": False, "no-flush": False}
    # data through QEMU's driver, checked through librbd
    qemu(str(QEMU_IO), "--image-opts", "-t", "writeback", "-d", "unmap",
         "-c", "read -P 0x63 0 1M", "-c", "write -P 0x62 4M 1M", "-c", "discard 0 1M",
         "-c", "flush", drive.image_opts())  # fmt: skip
    with rbd.Image(ioctx, NAME, read_only=True) as image:
        assert image.read(4 * MiB, MiB) == b"b" * MiB
        assert image.read(0, MiB) == bytes(MiB)
    # the snapshot: read-only, with the data it was taken with
    snap = rbd_drive(
        ceph_spec("rbd", NAME, SNAP, user="admin", conf=ceph.conf, keyring=ceph.admin_keyring),
        DiskSettings(),
    )
    assert snap.read_only
    qemu(str(QEMU_IO), "--image-opts", "-r", "-c", "read -P 0x61 0 1M", snap.image_opts())
    assert guest.query_drive(snap.value())["inserted"]["ro"]


def test_command_prints_a_drive_qemu_opens(
    ceph: Any, rbd_image: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ioctx, rbd = rbd_image
    rbd.RBD().create(ioctx, "plain", 8 * MiB)
    config = tmp_path / "clusters.yaml"
    config.write_text(
        f"clusters:\n  - id: test\n    engine: ceph\n    monitors: ['{ceph.monitor}']\n"
        f"    conf: {ceph.conf}\n"
    )
    code = cli.main(
        ["qemu", "drive", "rbd/plain", "--config", str(config), "--id", "admin",
         "--keyring", str(ceph.admin_keyring), "--cache", "none", "--discard", "unmap"]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    opened = guest.query_drive(out.strip())["inserted"]
    assert opened["image"]["virtual-size"] == 8 * MiB
    assert opened["cache"] == {"writeback": True, "direct": True, "no-flush": False}
