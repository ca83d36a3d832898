"""Volume stats and condition, plugin restarts, and daemons that die."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from csi_rbd.node import PreconditionFailed, VolumeNotFound, mounts
from csi_rbd.node.stash import load_stash

from .conftest import MiB, Node, direct_read, direct_write, pattern, write_file

pytestmark = pytest.mark.timeout(180)


def published_fs(node: Node, fstype: str = "ext4") -> tuple[Path, Path]:
    node.create("vol", 320 * MiB if fstype == "xfs" else 128 * MiB)
    staging = node.stage_fs("v1", "vol", fstype)
    target = node.path("pods", "a", "volume")
    node.stager.publish("v1", staging, target, block=False, read_only=False, mount_flags=[])
    return staging, target


def kill_daemon(node: Node, staging: Path) -> int:
    pid = node.daemon_pid("v1", staging)
    os.kill(pid, signal.SIGKILL)
    node.stager.supervisor.wait_exit(pid, 10)
    return pid


def test_stats_of_a_filesystem_volume(node: Node) -> None:
    staging, target = published_fs(node)
    before = node.stager.stats("v1", target)
    assert not before.abnormal and before.message == "healthy"
    assert 100 * MiB < before.total_bytes <= 128 * MiB
    assert before.total_inodes and before.used_inodes is not None
    write_file(target / "data", os.urandom(8 * MiB))
    after = node.stager.stats("v1", target)
    assert after.used_bytes is not None and before.used_bytes is not None
    assert after.used_bytes >= before.used_bytes + 8 * MiB
    assert node.stager.stats("v1", staging) == after  # the staging path means its mount
    with pytest.raises(VolumeNotFound):
        node.stager.stats("v1", node.path("pods"))
    with pytest.raises(VolumeNotFound):
        node.stager.stats("v9", target)
    node.stager.unpublish("v1", target)
    node.stager.unstage("v1", staging)


def test_stats_of_a_block_volume(node: Node) -> None:
    node.create("blk", 64 * MiB)
    staging = node.stage_block("b1", "blk")
    stats = node.stager.stats("b1", staging / "device")
    assert stats.total_bytes == 64 * MiB and stats.used_bytes is None
    assert stats.total_inodes is None and not stats.abnormal
    node.stager.unstage("b1", staging)


def test_killed_daemon_makes_stats_abnormal(node: Node) -> None:
    staging, target = published_fs(node)
    pid = kill_daemon(node, staging)
    stats = node.stager.stats("v1", target)
    assert stats.abnormal
    assert f"attach daemon (pid {pid}) is not running" in stats.message
    with pytest.raises(PreconditionFailed, match="not attached"):
        node.stager.expand("v1", target, None)
    # unpublish and unstage still work on the dead stack
    node.stager.unpublish("v1", target)
    node.stager.unstage("v1", staging)


def test_restarted_plugin_adopts_healthy_volumes(node: Node) -> None:
    staging, target = published_fs(node)
    write_file(target / "before", b"written by the old plugin")
    node.create("blk", 64 * MiB)
    block_staging = node.stage_block("b1", "blk")

    node.stager = node.new_stager()  # the old one is dropped: a restarted plugin
    report = node.stager.recover()
    assert len(report) == 2 and all("adopted" in line for line in report), report
    assert (target / "before").read_bytes() == b"written by the old plugin"
    write_file(target / "after", b"written by the new plugin")
    assert not node.stager.stats("v1", target).abnormal

    node.stager.unpublish("v1", target)
    node.stager.unstage("v1", staging)
    node.stager.unstage("b1", block_staging)


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_recover_reattaches_after_the_daemon_was_killed(node: Node, fstype: str) -> None:
    staging, target = published_fs(node, fstype)
    second = node.path("pods", "b", "volume")
    node.stager.publish("v1", staging, second, block=False, read_only=True, mount_flags=[])
    data = pattern(4, 3 * MiB)
    write_file(target / "flushed", data)
    old = load_stash(staging)
    held = os.open(target / "flushed", os.O_RDWR)  # a workload that keeps its file open
    pid = kill_daemon(node, staging)
    with pytest.raises(OSError):
        write_file(target / "lost", b"x")  # nothing reaches the dead daemon

    node.stager = node.new_stager()
    report = node.stager.recover()
    assert len(report) == 1 and "re-attached" in report[0], report
    assert str(pid) in report[0]
    assert (target / "flushed").read_bytes() == data
    assert (second / "flushed").read_bytes() == data
    write_file(target / "later", b"the path works again")
    new = load_stash(staging)
    assert new is not None and old is not None and new.daemon_pid != old.daemon_pid
    assert not node.stager.stats("v1", target).abnormal
    entry = mounts.find_mount(second)
    assert entry is not None and entry.read_only
    # the old descriptor still points at the dead instance: its writes never land
    # (EROFS at once after ext4 remounted itself read-only, else EIO on fsync)
    with pytest.raises(OSError):
        os.pwrite(held, b"lost", 0)
        os.fsync(held)
    os.close(held)
    assert (target / "flushed").read_bytes() == data

    node.stager.unpublish("v1", target)
    node.stager.unpublish("v1", second)
    node.stager.unstage("v1", staging)


def test_recover_reattaches_a_block_volume(node: Node) -> None:
    node.create("blk", 64 * MiB)
    staging = node.stage_block("v1", "blk")
    target = node.path("pods", "dev")
    reader = node.path("pods", "reader")
    node.stager.publish("v1", staging, target, block=True, read_only=False, mount_flags=[])
    node.stager.publish("v1", staging, reader, block=True, read_only=True, mount_flags=[])
    direct_write(target, 5 * MiB, pattern(8, MiB))
    kill_daemon(node, staging)
    assert node.stager.stats("v1", target).abnormal
    report = node.stager.recover()
    assert "re-attached" in report[0], report
    assert direct_read(target, 5 * MiB, MiB) == pattern(8, MiB)
    assert direct_read(reader, 5 * MiB, MiB) == pattern(8, MiB)
    with pytest.raises(OSError):
        direct_write(reader, 0, bytes(MiB))
    assert not node.stager.stats("v1", target).abnormal
    assert not node.stager.stats("v1", reader).abnormal
    node.stager.unpublish("v1", target)
    node.stager.unpublish("v1", reader)
    node.stager.unstage("v1", staging)


def test_staging_again_repairs_a_dead_daemon(node: Node) -> None:
    staging, target = published_fs(node)
    write_file(target / "file", b"kept")
    kill_daemon(node, staging)
    node.stage_fs("v1", "vol")  # the CO repeats NodeStage: the stack is rebuilt
    assert (target / "file").read_bytes() == b"kept"
    node.stager.unpublish("v1", target)
    node.stager.unstage("v1", staging)


def test_recover_rolls_back_an_interrupted_stage(node: Node) -> None:
    node.create("vol")
    staging = node.stage_fs("v1", "vol")
    record = load_stash(staging)
    assert record is not None
    record.state = "staging"  # as if the plugin died in the middle of NodeStage
    from csi_rbd.node.stash import save_stash

    save_stash(record)
    report = node.new_stager().recover()
    assert "rolled back" in report[0], report
    assert load_stash(staging) is None and node.stager.index.entries() == []


def test_data_path_survives_kill_9_of_the_plugin(node: Node) -> None:
    node.create("vol")
    staging = node.path("staging", "v1")
    target = node.path("pods", "volume")
    plugin = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from csi_rbd.engine.base import ImageLocator
        from csi_rbd.node import NodeStager
        stager = NodeStager(Path({str(node.root / "state")!r}), [Path({str(node.root)!r})])
        locator = ImageLocator("test", "native", "rbd", "vol", {str(node.data_dir)!r})
        stager.stage("v1", locator, Path({str(staging)!r}), block=False, fstype="ext4",
                     mkfs_options="", mount_flags=[], read_only=False)
        stager.publish("v1", Path({str(staging)!r}), Path({str(target)!r}), block=False,
                       read_only=False, mount_flags=[])
        print("published", flush=True)
        time.sleep(600)
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", plugin], stdout=subprocess.PIPE, text=True, cwd="/"
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "published"
    finally:
        process.kill()
        process.wait(10)
    write_file(target / "after-plugin-death", b"still served")
    report = node.stager.recover()
    assert "adopted" in report[0], report
    assert (target / "after-plugin-death").read_bytes() == b"still served"
    node.stager.unpublish("v1", target)
    node.stager.unstage("v1", staging)


def test_recover_removes_orphan_daemons(node: Node) -> None:
    node.create("vol")
    staging = node.stage_fs("v1", "vol")
    node.stager.unpublish("v1", staging / "nothing")  # harmless: not published there
    from csi_rbd.node import loop

    record = load_stash(staging)
    assert record is not None and record.loop_device is not None
    mounts.unmount(staging / "mount")
    loop.detach(record.loop_device, record.fuse_file)
    node.stager.index.remove("v1")  # the index entry is lost: the daemon is an orphan
    report = node.new_stager().recover()
    assert report == ["v1: orphan FUSE mount point removed"], report
    assert not mounts.is_mounted(record.fuse_mountpoint)


def test_recover_rebinds_a_lost_target_and_forgets_a_removed_one(node: Node) -> None:
    staging, target = published_fs(node)
    removed = node.path("pods", "gone", "volume")
    node.stager.publish("v1", staging, removed, block=False, read_only=False, mount_flags=[])
    write_file(target / "file", b"data")
    before = load_stash(staging)
    assert before is not None
    mounts.unmount(target)  # lost, the directory stays: bound again
    mounts.unmount(removed)
    removed.rmdir()  # unpublished but not forgotten: dropped
    report = node.new_stager().recover()
    expected = f"adopted (daemon pid {before.daemon_pid}, {before.loop_device}); re-bound {target}"
    assert report == [f"v1: {expected}"], report
    assert (target / "file").read_bytes() == b"data"
    record = load_stash(staging)
    assert record is not None and [t.path for t in record.targets] == [str(target)]
    node.stager.unpublish("v1", target)
    node.stager.unstage("v1", staging)
