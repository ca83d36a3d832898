"""Fixtures for the node data path tests: real FUSE, loop devices, mkfs and mounts.

Every test gets its own native data directory, state directory and allowed
root under ``tmp_path``. After every test, ``no_leftovers`` lists any mount
under ``tmp_path``, loop device backed by a file there, attach daemon
serving a mount point there and FUSE mount of ours, removes them by force
(so that one failing test does not poison the next) and then fails the test
if there were any.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from csi_rbd.engine.base import ImageLocator
from csi_rbd.engine.native import RBD, Image, IoCtx, Rados
from csi_rbd.engine.usage import used_size
from csi_rbd.node import loop, mounts
from csi_rbd.node.daemons import find_daemons
from csi_rbd.node.stager import NodeStager

MiB = 1 << 20
ORDER = 22

_TOOLS = ("losetup", "mkfs.ext4", "mkfs.xfs", "blkid", "wipefs", "fstrim", "blkdiscard")
_MISSING = [tool for tool in _TOOLS if not shutil.which(tool)]
if os.geteuid() != 0:
    _UNUSABLE = "needs root"
elif not os.path.exists("/dev/fuse"):
    _UNUSABLE = "needs /dev/fuse"
else:
    _UNUSABLE = f"needs {', '.join(_MISSING)}" if _MISSING else ""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip the node tests where loop devices, FUSE and mounts are out of reach."""
    if not _UNUSABLE:
        return
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents and "node" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.skip(reason=_UNUSABLE))


@dataclass
class Node:
    """One test's world: an engine data directory, a stager, and helpers."""

    root: Path
    data_dir: Path
    cluster: Rados
    ioctx: IoCtx
    stager: NodeStager

    def create(self, name: str, size: int = 128 * MiB) -> ImageLocator:
        RBD().create(self.ioctx, name, size, order=ORDER)
        return self.locator(name)

    def locator(self, name: str) -> ImageLocator:
        return ImageLocator("test", "native", "rbd", name, str(self.data_dir))

    def used(self, name: str) -> int:
        """Engine bytes allocated to ``name``.

        Retried: ``diff_iterate`` of the native engine raises FileNotFoundError
        when another handle (the daemon) unlinks an object between its scan
        and its read of that object's extents.
        """
        for _ in range(20):
            try:
                with Image(self.ioctx, name, read_only=True) as image:
                    return used_size(image, image.size())
            except FileNotFoundError:
                time.sleep(0.05)
        raise AssertionError(f"could not measure the usage of {name}")

    def resize(self, name: str, size: int) -> None:
        with Image(self.ioctx, name) as image:
            image.resize(size)

    def new_stager(self) -> NodeStager:
        """A second stager over the same state: a restarted plugin."""
        return NodeStager(self.root / "state", [self.root])

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def stage_fs(
        self, volume: str, image: str, fstype: str | None = "ext4", **options: object
    ) -> Path:
        staging = self.path("staging", volume)
        arguments: dict[str, object] = {
            "block": False,
            "fstype": fstype,
            "mkfs_options": "",
            "mount_flags": [],
            "read_only": False,
        }
        arguments.update(options)
        self.stager.stage(volume, self.locator(image), staging, **arguments)  # type: ignore[arg-type]
        return staging

    def stage_block(self, volume: str, image: str, **options: object) -> Path:
        return self.stage_fs(volume, image, None, block=True, **options)

    def daemon_pid(self, volume: str, staging: Path) -> int:
        from csi_rbd.node.stash import load_stash

        record = load_stash(staging)
        assert record is not None and record.daemon_pid is not None
        return record.daemon_pid


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    root = Path(os.path.realpath(tmp_path))
    data_dir = root / "data"
    cluster = Rados(data_dir=data_dir)
    cluster.connect()
    stager = NodeStager(root / "state", [root])
    yield Node(root, data_dir, cluster, cluster.open_ioctx("rbd"), stager)
    cluster.shutdown()


def leftovers(root: Path) -> list[str]:
    prefix = str(root)
    found = [f"mount {m.mountpoint} ({m.fstype})" for m in mounts.mounts_under(root)]
    found += [
        f"FUSE mount {m.mountpoint}"
        for m in mounts.mount_table()
        if m.fstype == "fuse.csi-rbd" and m.mountpoint.startswith(prefix + "/")
    ]
    found += [
        f"loop {dev} -> {file}"
        for dev, file in loop.list_attached().items()
        if file.startswith(prefix + "/")
    ]
    found += [f"attach daemon pid {pid}" for pid in find_daemons(under=prefix)]
    return sorted(set(found))


def force_clean(root: Path) -> None:
    prefix = str(root)
    for entry in mounts.mounts_under(root):
        if entry.fstype != "fuse.csi-rbd":
            with contextlib.suppress(Exception):
                mounts.unmount(entry.mountpoint, timeout=1, lazy_fallback=True)
    for dev, file in loop.list_attached().items():
        if file.startswith(prefix + "/"):
            with contextlib.suppress(Exception):
                loop.detach(dev, file, timeout=3)
    for pid in find_daemons(under=prefix):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for entry in mounts.mounts_under(root):
        with contextlib.suppress(Exception):
            mounts.unmount(entry.mountpoint, timeout=1, lazy_fallback=True)


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path: Path) -> Iterator[None]:
    root = Path(os.path.realpath(tmp_path))
    yield
    found = leftovers(root)
    force_clean(root)
    assert not found, f"left behind: {found}"


# -- I/O helpers ------------------------------------------------------------------------
def pattern(seed: int, size: int) -> bytes:
    block = bytes((seed * 31 + i) % 251 for i in range(4096))
    return (block * (size // len(block) + 1))[:size]


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def direct_write(device: Path, offset: int, data: bytes) -> None:
    """O_DIRECT write of page-multiple ``data`` from an aligned buffer, then fsync."""
    buffer = mmap.mmap(-1, len(data))
    buffer.write(data)
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buffer], offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)
        buffer.close()


def direct_read(device: Path, offset: int, length: int) -> bytes:
    buffer = mmap.mmap(-1, length)
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buffer], offset) == length
        return bytes(buffer)
    finally:
        os.close(fd)
        buffer.close()


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
