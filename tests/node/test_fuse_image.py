"""The attach daemon and its FUSE file, without loop devices or mounts above it."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_rbd.engine.native import Image
from csi_rbd.node import PreconditionFailed, VolumeNotFound, mounts
from csi_rbd.node.daemons import Supervisor

from .conftest import MiB, Node, pattern

pytestmark = pytest.mark.timeout(120)


class Served:
    def __init__(self, node: Node, supervisor: Supervisor, mountpoint: Path, pid: int) -> None:
        self.node, self.supervisor, self.mountpoint, self.pid = node, supervisor, mountpoint, pid
        self.file = mountpoint / "image"

    def stop(self) -> None:
        mounts.unmount(self.mountpoint)
        assert self.supervisor.wait_exit(self.pid, 10)


def serve(node: Node, name: str, tag: str = "", **options: object) -> Served:
    supervisor = Supervisor()
    mountpoint = node.path("fuse", name + tag)
    started = supervisor.start(
        node.locator(name),
        str(mountpoint),
        read_only=bool(options.get("read_only", False)),
        discard=str(options.get("discard", "unmap")),
        ready_file=node.path(f"{name}{tag}.ready"),
        log_file=node.path(f"{name}{tag}.log"),
    )
    assert started.lock_owner is None  # native locks die with their process
    return Served(node, supervisor, mountpoint, started.pid)


@pytest.fixture
def served(node: Node) -> Iterator[Served]:
    node.create("img", 64 * MiB)
    served = serve(node, "img")
    yield served
    if mounts.is_mounted(served.mountpoint):
        served.stop()


def test_ready_file_and_mount(node: Node, served: Served) -> None:
    info = json.loads(node.path("img.ready").read_text())
    assert info["pid"] == served.pid and info["size"] == 64 * MiB
    entry = mounts.find_mount(served.mountpoint)
    assert entry is not None and entry.fstype == "fuse.csi-rbd"
    assert entry.source == "csi-rbd:rbd/img"
    assert os.listdir(served.mountpoint) == ["image"]
    assert served.file.stat().st_size == 64 * MiB


def test_unaligned_io_reaches_the_engine(node: Node, served: Served) -> None:
    data = pattern(1, 3 * MiB + 123)
    fd = os.open(served.file, os.O_RDWR)
    try:
        assert os.pwrite(fd, data, 4 * MiB - 77) == len(data)  # crosses object boundaries
        assert os.pread(fd, len(data), 4 * MiB - 77) == data
        assert os.pread(fd, 100, 64 * MiB - 50) == bytes(50)  # cut short at the end
        assert os.pread(fd, 10, 64 * MiB) == b""
        with pytest.raises(OSError) as raised:
            os.pwrite(fd, b"x" * 100, 64 * MiB - 50)  # a fixed-size file does not grow
        assert raised.value.errno in (errno.ENOSPC, errno.EFBIG)
        os.fsync(fd)
        os.ftruncate(fd, 64 * MiB)  # to the same size: fine
        with pytest.raises(OSError) as raised:
            os.ftruncate(fd, 32 * MiB)
        assert raised.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    served.stop()
    with Image(node.ioctx, "img", read_only=True) as image:
        assert image.read(4 * MiB - 77, len(data)) == data


def test_growth_shows_in_stat(node: Node, served: Served) -> None:
    # the daemon holds the write lock; growing is a metadata change any handle may make
    with Image(node.ioctx, "img", read_only=False) as image:
        image.resize(96 * MiB)
    assert served.file.stat().st_size == 96 * MiB


def test_second_writer_is_refused(node: Node, served: Served) -> None:
    with pytest.raises(PreconditionFailed, match="busy"):
        serve(node, "img", "-2")


def test_missing_image_is_not_found(node: Node) -> None:
    with pytest.raises(VolumeNotFound, match="not found"):
        serve(node, "nothing")


def test_busy_exit_code_and_one_line(node: Node, served: Served) -> None:
    mountpoint = node.path("other")
    mountpoint.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "csi_rbd.node.attach_daemon",
            "--data-dir",
            str(node.data_dir),
            "--pool",
            "rbd",
            "--image",
            "img",
            "--mountpoint",
            str(mountpoint),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 3
    assert result.stderr.count("\n") == 1 and "busy" in result.stderr


def test_read_only_refuses_writes(node: Node) -> None:
    node.create("ro", 16 * MiB)
    served = serve(node, "ro", read_only=True)
    try:
        with pytest.raises(OSError) as raised:
            os.open(served.file, os.O_RDWR)
        assert raised.value.errno == errno.EROFS
        with open(served.file, "rb") as handle:
            assert handle.read(4096) == bytes(4096)
        # a read-only daemon takes no lock: a writer may still attach
        writer = serve(node, "ro", "-writer")
        writer.stop()
    finally:
        served.stop()


def test_sigterm_flushes_unmounts_and_exits(node: Node, served: Served) -> None:
    fd = os.open(served.file, os.O_WRONLY)
    os.pwrite(fd, b"flushed on exit", 0)
    os.close(fd)
    os.kill(served.pid, signal.SIGTERM)
    assert served.supervisor.wait_exit(served.pid, 10)
    deadline = time.monotonic() + 5
    while mounts.is_mounted(served.mountpoint) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not mounts.is_mounted(served.mountpoint)
    assert not node.path("img.ready").exists()
    with Image(node.ioctx, "img", read_only=True) as image:
        assert image.read(0, 15) == b"flushed on exit"


def test_kill_9_gives_enotconn(node: Node, served: Served) -> None:
    os.kill(served.pid, signal.SIGKILL)
    assert served.supervisor.wait_exit(served.pid, 10)
    with pytest.raises(OSError) as raised:
        served.file.stat()
    assert raised.value.errno in (errno.ENOTCONN, errno.EIO)
    mounts.unmount(served.mountpoint)  # a dead FUSE mount still unmounts
    assert not mounts.is_mounted(served.mountpoint)
