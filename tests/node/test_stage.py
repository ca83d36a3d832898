"""Stage, publish, unpublish, unstage: round trips, idempotency, conflicts, failures."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from csi_rbd.engine.native import Image
from csi_rbd.node import (
    DataPathError,
    InvalidRequest,
    PathRefused,
    PreconditionFailed,
    StagingConflict,
    VolumeNotFound,
    loop,
    mounts,
)
from csi_rbd.node.stash import STASH_NAME, load_stash
from tests.threads import run_in_threads

from .conftest import MiB, Node, direct_read, direct_write, pattern, write_file

pytestmark = pytest.mark.timeout(180)


def publish(node: Node, volume: str, staging: Path, target: str, **options: object) -> Path:
    path = node.path("pods", target)
    arguments: dict[str, object] = {"block": False, "read_only": False, "mount_flags": []}
    arguments.update(options)
    node.stager.publish(volume, staging, path, **arguments)  # type: ignore[arg-type]
    return path


def teardown(node: Node, volume: str, staging: Path, *targets: Path) -> None:
    for target in targets:
        node.stager.unpublish(volume, target)
        assert not target.exists()
    node.stager.unstage(volume, staging)
    assert not (staging / STASH_NAME).exists()
    assert node.stager.index.get(volume) is None


@pytest.mark.parametrize(("fstype", "size"), [("ext4", 128 * MiB), ("xfs", 320 * MiB)])
def test_filesystem_round_trip(node: Node, fstype: str, size: int) -> None:
    # xfs needs at least 300 MiB (mkfs.xfs 6.x); the image is thin either way
    node.create("vol", size)
    staging = node.stage_fs("v1", "vol", fstype)
    entry = mounts.find_mount(staging / "mount")
    assert entry is not None and entry.fstype == fstype
    target = publish(node, "v1", staging, "pod-a")
    data = pattern(7, 5 * MiB + 3)
    write_file(target / "data.bin", data)
    teardown(node, "v1", staging, target)
    assert node.used("vol") >= len(data)

    staging = node.stage_fs("v1", "vol", fstype)
    target = publish(node, "v1", staging, "pod-b")
    assert (target / "data.bin").read_bytes() == data
    teardown(node, "v1", staging, target)


def test_block_round_trip(node: Node) -> None:
    node.create("blk", 64 * MiB)
    staging = node.stage_block("b1", "blk")
    target = publish(node, "b1", staging, "dev-a", block=True)
    assert target.is_block_device()
    data = pattern(3, 2 * MiB)
    direct_write(target, 9 * MiB, data)
    teardown(node, "b1", staging, target)

    staging = node.stage_block("b1", "blk")
    target = publish(node, "b1", staging, "dev-b", block=True)
    assert direct_read(target, 9 * MiB, len(data)) == data
    teardown(node, "b1", staging, target)
    with Image(node.ioctx, "blk", read_only=True) as image:
        assert image.read(9 * MiB, len(data)) == data


def test_idempotency_and_conflicts(node: Node) -> None:
    node.create("vol")
    node.create("other")
    staging = node.stage_fs("v1", "vol")
    node.stage_fs("v1", "vol")  # the same again: fine
    with pytest.raises(StagingConflict, match="mount_flags"):
        node.stage_fs("v1", "vol", mount_flags=["noatime"])
    with pytest.raises(StagingConflict, match="fstype"):
        node.stage_fs("v1", "vol", fstype="xfs")
    with pytest.raises(StagingConflict, match="read_only"):
        node.stage_fs("v1", "vol", read_only=True)
    with pytest.raises(StagingConflict, match="staging path of v1"):
        node.stager.stage(
            "v2",
            node.locator("other"),
            staging,
            block=False,
            fstype="ext4",
            mkfs_options="",
            mount_flags=[],
            read_only=False,
        )
    with pytest.raises(PreconditionFailed, match="already staged"):
        node.stager.stage(
            "v1",
            node.locator("vol"),
            node.path("staging", "elsewhere"),
            block=False,
            fstype="ext4",
            mkfs_options="",
            mount_flags=[],
            read_only=False,
        )

    target = publish(node, "v1", staging, "pod")
    publish(node, "v1", staging, "pod")  # again: fine
    with pytest.raises(StagingConflict, match="other options"):
        publish(node, "v1", staging, "pod", read_only=True)
    with pytest.raises(PreconditionFailed, match="filesystem volume"):
        publish(node, "v1", staging, "pod-block", block=True)
    with pytest.raises(PreconditionFailed, match="not staged"):
        publish(node, "v9", staging, "pod-9")
    with pytest.raises(PreconditionFailed, match="still published"):
        node.stager.unstage("v1", staging)

    node.stager.unpublish("v1", target)
    node.stager.unpublish("v1", target)  # again: fine
    node.stager.unstage("v1", staging)
    node.stager.unstage("v1", staging)  # again: fine
    node.stager.unpublish("v1", target)  # and after unstage too
    assert node.stager.index.entries() == []


def test_paths_outside_the_roots_are_refused(
    node: Node, tmp_path_factory: pytest.TempPathFactory
) -> None:
    node.create("vol")
    outside = tmp_path_factory.mktemp("outside")
    escape = node.path("link")
    escape.symlink_to(outside)
    for bad in (outside / "staging", escape / "staging", node.path("a", "..", "..", "x")):
        with pytest.raises(PathRefused):
            node.stager.stage(
                "v1",
                node.locator("vol"),
                bad,
                block=False,
                fstype="ext4",
                mkfs_options="",
                mount_flags=[],
                read_only=False,
            )
    with pytest.raises(PathRefused):
        node.stager.unstage("v1", "relative/path")
    assert os.listdir(outside) == []
    assert node.stager.index.entries() == []


def test_invalid_requests(node: Node) -> None:
    node.create("vol")
    with pytest.raises(InvalidRequest, match="unsupported filesystem"):
        node.stage_fs("v1", "vol", fstype="btrfs")
    with pytest.raises(InvalidRequest, match="discard"):
        node.stage_fs("v1", "vol", discard="sometimes")


def test_read_only_stage_and_publish(node: Node) -> None:
    node.create("vol")
    staging = node.stage_fs("v1", "vol")
    write_file(staging / "mount" / "file", b"written before")
    node.stager.unstage("v1", staging)

    staging = node.stage_fs("v1", "vol", read_only=True)
    target = publish(node, "v1", staging, "pod")  # published read-only since staged so
    assert (target / "file").read_bytes() == b"written before"
    with pytest.raises(OSError) as raised:
        write_file(target / "new", b"x")
    assert raised.value.errno == errno.EROFS
    record = load_stash(staging)
    assert record is not None and record.targets[0].read_only
    teardown(node, "v1", staging, target)


def test_read_only_publish_of_a_writable_stage(node: Node) -> None:
    node.create("vol")
    staging = node.stage_fs("v1", "vol")
    reader = publish(node, "v1", staging, "reader", read_only=True)
    writer = publish(node, "v1", staging, "writer", mount_flags=["noexec"])
    write_file(writer / "shared", b"both see it")
    assert (reader / "shared").read_bytes() == b"both see it"
    with pytest.raises(OSError) as raised:
        write_file(reader / "nope", b"x")
    assert raised.value.errno == errno.EROFS
    entry = mounts.find_mount(writer)
    assert entry is not None and "noexec" in entry.options
    teardown(node, "v1", staging, reader, writer)


def test_mkfs_never_reformats(node: Node) -> None:
    node.create("vol")
    staging = node.stage_fs("v1", "vol")
    write_file(staging / "mount" / "keep", b"precious")
    node.stager.unstage("v1", staging)
    with pytest.raises(PreconditionFailed, match="never reformatted"):
        node.stage_fs("v1", "vol", fstype="xfs")
    # mkfs options only matter on a blank device: ignored now
    staging = node.stage_fs("v1", "vol", mkfs_options="-b 1024 -L wiped")
    assert (staging / "mount" / "keep").read_bytes() == b"precious"
    node.stager.unstage("v1", staging)


def test_default_fstype_adopts_what_is_there(node: Node) -> None:
    node.create("vol", 320 * MiB)
    staging = node.stage_fs("v1", "vol", "xfs")
    node.stager.unstage("v1", staging)
    staging = node.stage_fs("v1", "vol", None)
    entry = mounts.find_mount(staging / "mount")
    assert entry is not None and entry.fstype == "xfs"
    node.stager.unstage("v1", staging)


def test_writer_elsewhere_makes_stage_fail_cleanly(node: Node) -> None:
    node.create("vol")
    with Image(node.ioctx, "vol") as image:
        image.lock_acquire()
        with pytest.raises(PreconditionFailed, match="busy"):
            node.stage_fs("v1", "vol")
    assert not (node.path("staging", "v1") / STASH_NAME).exists()
    assert node.stager.index.entries() == []


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"mkfs_options": "-b 999"}, "mkfs.ext4"),
        ({"mount_flags": ["no_such_mount_option"]}, "mount"),
        ({"image": "missing"}, "not found"),
    ],
    ids=["bad-mkfs-option", "bad-mount-flag", "missing-image"],
)
def test_failure_midway_leaves_nothing(node: Node, options: dict[str, object], error: str) -> None:
    node.create("vol")
    image = str(options.pop("image", "vol"))
    with pytest.raises((PreconditionFailed, VolumeNotFound, DataPathError), match=error):
        node.stage_fs("v1", image, "ext4", **options)
    staging = node.path("staging", "v1")
    assert not (staging / STASH_NAME).exists()
    assert not (staging / "mount").exists()
    assert node.stager.index.entries() == []
    assert os.listdir(node.path("state", "fuse")) == []
    # and the volume stages fine afterwards
    node.stage_fs("v1", "vol")
    node.stager.unstage("v1", staging)


def test_block_failure_midway_leaves_nothing(node: Node) -> None:
    node.create("blk", 64 * MiB)
    staging = node.path("staging", "b1")
    staging.mkdir(parents=True)
    (staging / "device").mkdir()  # a directory where the device file must go
    with pytest.raises(StagingConflict, match="not a file"):
        node.stage_block("b1", "blk")
    assert not (staging / STASH_NAME).exists()
    assert node.stager.index.entries() == []


def test_a_late_detach_never_takes_the_next_users_device(node: Node) -> None:
    """The kernel frees a detached loop device at once and the next attach may
    take the same one: a detach retried by name (a poll loop, a retried RPC)
    must not take it from its new user (that race once left mkfs a zero-size
    device when volumes were staged at the same time)."""
    first, second = node.root / "first.raw", node.root / "second.raw"
    for file in (first, second):
        file.write_bytes(bytes(MiB))
    device = loop.attach(first).path
    loop.detach(device, first)
    subprocess.run(["losetup", device, str(second)], check=True)  # the next user takes it
    try:
        loop.detach(device, first)  # late: the device now serves ``second``
        assert loop.backing_file(device) == str(second)
        assert loop.block_device_size(device) == MiB
    finally:
        loop.detach(device, second)
    assert loop.backing_file(device) is None


def test_volumes_stage_concurrently(node: Node) -> None:
    names = [f"c{i}" for i in range(4)]
    for name in names:
        node.create(name, 64 * MiB)

    def cycle(name: str) -> None:
        staging = node.stage_fs(name, name)
        write_file(staging / "mount" / "x", name.encode())
        node.stager.unstage(name, staging)

    run_in_threads(cycle, names, timeout=120)
    assert all(node.used(name) > 0 for name in names)


def test_concurrent_loop_writes_to_fresh_objects_all_land(node: Node) -> None:
    """One big O_DIRECT write becomes many concurrent 1 MiB requests, several per object."""
    node.create("blk", 256 * MiB)
    staging = node.stage_block("b1", "blk")
    device = staging / "device"
    for round_ in range(8):
        offset = round_ * 32 * MiB
        data = pattern(round_, 32 * MiB)
        direct_write(device, offset, data)
        with Image(node.ioctx, "blk", read_only=True) as image:
            lost = [
                offset + at
                for at in range(0, len(data), MiB)
                if image.read(offset + at, MiB) != data[at : at + MiB]
            ]
        assert not lost, f"round {round_}: the writes at {lost} were lost"
    node.stager.unstage("b1", staging)


def test_read_only_block_publish_refuses_writes(node: Node) -> None:
    """A read-only bind of a device node would not stop writes: it gets a read-only loop."""
    node.create("blk", 64 * MiB)
    staging = node.stage_block("b1", "blk")
    writer = publish(node, "b1", staging, "writer", block=True)
    reader = publish(node, "b1", staging, "reader", block=True, read_only=True)
    publish(node, "b1", staging, "reader", block=True, read_only=True)  # idempotent
    direct_write(writer, 0, pattern(6, MiB))
    assert direct_read(reader, 0, MiB) == pattern(6, MiB)
    with pytest.raises(OSError) as raised:
        direct_write(reader, 0, bytes(MiB))
    assert raised.value.errno in (errno.EROFS, errno.EPERM, errno.EACCES)
    record = load_stash(staging)
    assert record is not None
    target = record.target(str(reader))
    assert target is not None and target.loop_device not in (None, record.loop_device)
    teardown(node, "b1", staging, writer, reader)
