"""Cache modes down the FUSE/loop data path: what a flush makes durable.

The attach daemon serves the image through ``open_cached(image, mode)``. A
flush from above (fsync of the published block device, or of a file on the
staged filesystem) travels loop device -> FUSE fsync -> ``CachedImage.flush``
-> engine flush. Killing the daemon with SIGKILL right after shows what each
mode promises: flushed data is in the engine in every mode; unflushed data
is in the engine too with ``none`` and ``writethrough`` (written before the
write was acknowledged), and only in the dead daemon's memory with
``writeback``.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import time
from pathlib import Path

import pytest

from csi_rbd.engine.native import Image
from csi_rbd.node.errors import InvalidRequest, StagingConflict
from csi_rbd.node.stash import load_stash
from tests.node.conftest import (
    MiB,
    Node,
    direct_read,
    direct_write,
    pattern,
    run,
    write_file,
)
from tests.vm.conftest import needs_data_path

pytestmark = needs_data_path


def engine_read(node: Node, name: str, offset: int, length: int) -> bytes:
    with Image(node.ioctx, name, read_only=True) as image:
        return image.read(offset, length)


def publish_block(node: Node, volume: str, image: str, cache: str) -> tuple[Path, Path]:
    staging = node.stage_block(volume, image, cache=cache)
    target = node.path("pods", volume, "device")
    node.stager.publish(volume, staging, target, block=True, read_only=False, mount_flags=[])
    return staging, target


def kill_daemon(node: Node, volume: str, staging: Path) -> None:
    pid = node.daemon_pid(volume, staging)
    os.kill(pid, signal.SIGKILL)
    node.stager.supervisor.wait_exit(pid, 10)


@pytest.mark.parametrize("cache", ["none", "writethrough", "writeback"])
def test_flushed_writes_survive_a_killed_daemon(root: Path, node: Node, cache: str) -> None:
    node.create("disk", 64 * MiB)
    staging, target = publish_block(node, "vol", "disk", cache)
    record = load_stash(staging)
    assert record is not None and record.cache == cache
    ready = json.loads(node.path("state", "run", "vol.ready").read_text())
    assert ready["cache"] == cache

    first, flushed, unflushed = pattern(1, MiB), pattern(2, MiB), pattern(3, MiB)
    direct_write(target, 0, first)  # the first flush switches writeback on (librbd's
    direct_write(target, 8 * MiB, flushed)  # writethrough-until-flush), then a flushed write
    fd = os.open(target, os.O_WRONLY | os.O_DIRECT)  # and one that is never flushed
    buffer = mmap.mmap(-1, MiB)
    try:
        buffer.write(unflushed)
        assert os.pwritev(fd, [buffer], 16 * MiB) == MiB
        written_at = time.monotonic()
        pid = node.daemon_pid("vol", staging)
        os.kill(pid, signal.SIGKILL)
        killed_after = time.monotonic() - written_at
        node.stager.supervisor.wait_exit(pid, 10)
    finally:
        os.close(fd)
        buffer.close()

    assert engine_read(node, "disk", 0, MiB) == first
    assert engine_read(node, "disk", 8 * MiB, MiB) == flushed
    in_engine = engine_read(node, "disk", 16 * MiB, MiB) == unflushed
    print(f"cache={cache}: unflushed write in the engine after kill -9: {in_engine} "
          f"(killed {killed_after:.2f}s after it)")  # fmt: skip
    if cache != "writeback":
        assert in_engine  # acknowledged only once the engine had it
    elif killed_after < 0.5:  # the flusher writes back dirty data after 1 s
        assert not in_engine  # held in memory: the cache really is write-back

    # the plugin re-attaches the volume with the same cache mode; flushed data reads back
    report = node.stager.recover()
    assert any("re-attached" in line for line in report), report
    assert direct_read(target, 8 * MiB, MiB) == flushed
    record = load_stash(staging)
    assert record is not None and record.cache == cache
    node.stager.unpublish("vol", target)
    node.stager.unstage("vol", staging)


def test_fsync_of_a_file_reaches_the_writeback_cache(root: Path, node: Node) -> None:
    """fsync on ext4 -> journal commit and flush -> loop flush -> FUSE fsync -> cache flush."""
    node.create("fsdisk", 128 * MiB)
    staging = node.stage_fs("fsvol", "fsdisk", "ext4", cache="writeback")
    target = node.path("pods", "fsvol", "mnt")
    node.stager.publish("fsvol", staging, target, block=False, read_only=False, mount_flags=[])
    data = pattern(7, 4 * MiB)
    write_file(target / "warm", b"first flush")  # turns writeback on
    write_file(target / "data.bin", data)  # write + fsync
    kill_daemon(node, "fsvol", staging)
    # read the file back from the engine alone: a copy of the image, mounted read-only
    copy = node.path("copy.img")
    with Image(node.ioctx, "fsdisk", read_only=True) as image, open(copy, "wb") as out:
        for offset in range(0, image.size(), 8 * MiB):
            out.write(image.read(offset, 8 * MiB))
    replay = run("e2fsck", "-fy", str(copy))  # the journal holds the fsynced metadata
    assert replay.returncode in (0, 1), replay.stdout + replay.stderr  # 1: fixed (replayed)
    dumped = node.path("dumped.bin")
    answer = run("debugfs", "-R", f"dump /data.bin {dumped}", str(copy))
    assert dumped.exists(), answer.stderr
    assert dumped.read_bytes() == data
    node.stager.recover()
    assert (target / "data.bin").read_bytes() == data
    node.stager.unpublish("fsvol", target)
    node.stager.unstage("fsvol", staging)


def test_a_repeated_stage_must_ask_for_the_same_cache(root: Path, node: Node) -> None:
    node.create("d2", 32 * MiB)
    staging = node.stage_block("v2", "d2", cache="writethrough")
    node.stage_block("v2", "d2", cache="writethrough")  # idempotent
    with pytest.raises(StagingConflict, match="cache"):
        node.stage_block("v2", "d2", cache="writeback")
    with pytest.raises(InvalidRequest):
        node.stage_block("v3", "d2", cache="unsafe")
    node.stager.unstage("v2", staging)
