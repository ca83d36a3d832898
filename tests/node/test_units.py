"""Pieces that need no root: the mount table parser, names, the stash, paths, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from csi_rbd.engine.base import ImageLocator
from csi_rbd.node import errors
from csi_rbd.node.mounts import mounts_under, parse_mountinfo
from csi_rbd.node.stager import NodeStager
from csi_rbd.node.stash import (
    PublishTarget,
    StagedIndex,
    StageRecord,
    load_stash,
    safe_name,
    save_stash,
    stash_path,
)

MOUNTINFO = (
    "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
    "100 29 7:3 / /var/lib/k/staging/mount rw,relatime shared:5 - xfs /dev/loop3 rw,attr2\n"
    "101 29 0:5 /loop3 /var/lib/k/pods/dev ro,nosuid - devtmpfs udev rw,size=4096k\n"
)


def test_parse_mountinfo() -> None:
    first, second, third = parse_mountinfo(MOUNTINFO)
    assert first.mountpoint == "/mnt/with space" and first.root == "/mnt1"
    assert first.fstype == "ext3" and first.source == "/dev/root"
    assert "noatime" in first.options and first.super_options == ("rw", "errors=continue")
    assert second.device == "7:3" and second.fstype == "xfs" and not second.read_only
    assert third.read_only and third.root == "/loop3"


def test_safe_names_are_distinct_file_names() -> None:
    plain = "0001-0005-local-0003-rbd-8d3f0c8e-6a52-4c57-9a43-2b0b8e9c3f11"
    assert safe_name(plain) == plain
    odd = [safe_name(v) for v in ("a/b", "a_b", "../x", ".hidden", "x" * 200)]
    assert len(set(odd)) == len(odd)
    assert all("/" not in n and not n.startswith(".") and len(n) <= 100 for n in odd)


def test_stash_round_trip_and_atomic_file(tmp_path: Path) -> None:
    record = StageRecord(
        volume_id="v1",
        staging_path=str(tmp_path),
        locator=ImageLocator("c", "native", "rbd", "img", "/data"),
        block=False,
        fstype="xfs",
        mkfs_options=("-m", "crc=1"),
        mount_flags=("noatime",),
        read_only=False,
        discard="unmap",
        fuse_mountpoint="/state/fuse/v1",
        targets=[PublishTarget("/pods/a", False, True, ("nosuid",))],
    )
    save_stash(record)
    assert load_stash(tmp_path) == record
    assert [p.name for p in tmp_path.iterdir()] == [stash_path(tmp_path).name]
    data = json.loads(stash_path(tmp_path).read_text())
    data["field_from_a_newer_plugin"] = 1
    stash_path(tmp_path).write_text(json.dumps(data))
    assert load_stash(tmp_path) == record


def test_index(tmp_path: Path) -> None:
    from csi_rbd.node.stash import IndexEntry

    index = StagedIndex(tmp_path / "staged")
    index.put(IndexEntry("a/b", "/s/1"))
    index.put(IndexEntry("v2", "/s/2"))
    assert index.get("a/b") == IndexEntry("a/b", "/s/1")
    assert index.get("a_b") is None
    assert sorted(e.volume_id for e in index.entries()) == ["a/b", "v2"]
    index.remove("a/b")
    assert [e.volume_id for e in index.entries()] == ["v2"]


def test_paths_must_resolve_into_the_roots(tmp_path: Path) -> None:
    stager = NodeStager(tmp_path / "state", [tmp_path / "kubelet"])
    (tmp_path / "kubelet").mkdir()
    (tmp_path / "kubelet" / "escape").symlink_to("/etc")
    assert stager.check_path(tmp_path / "kubelet" / "a" / "b") == tmp_path / "kubelet" / "a" / "b"
    for bad in ("/etc", str(tmp_path / "kubelet" / ".." / "x"), "kubelet/a"):
        with pytest.raises(errors.PathRefused):
            stager.check_path(bad)
    with pytest.raises(errors.PathRefused):
        stager.check_path(tmp_path / "kubelet" / "escape" / "passwd")


def test_error_codes() -> None:
    assert errors.VolumeNotFound.grpc_code == "NOT_FOUND"
    assert errors.StagingConflict.grpc_code == "ALREADY_EXISTS"
    assert issubclass(errors.OnlineResizeUnsupported, errors.PreconditionFailed)
    assert errors.PathRefused.grpc_code == "INVALID_ARGUMENT"
    assert issubclass(errors.PathRefused, errors.InvalidRequest)
    assert errors.DataPathError.grpc_code == "INTERNAL"


def test_mounts_under_orders_deepest_first() -> None:
    order = [m.mountpoint for m in mounts_under("/")]
    depths = [p.count("/") for p in order]
    assert depths == sorted(depths, reverse=True)
