"""``snap create|ls|rm|purge|rollback|protect|unprotect`` and ``pool create|ls|rm``."""

from __future__ import annotations

import time

import pytest

from csi_rbd.engine.native import RBD, Image, Rados
from tests.cli.conftest import MiB, Runner, read, write


def _snaps(cluster: Rados, spec: str) -> list[tuple[str, bool]]:
    pool, _, name = spec.rpartition("/")
    with Image(cluster.open_ioctx(pool or "rbd"), name) as image:
        return [(s["name"], image.is_protected_snap(s["name"])) for s in image.list_snaps()]


@pytest.mark.parametrize("command", ["create", "add"])
def test_snap_create(populated: Rados, ok: Runner, command: str) -> None:
    write(populated, "rbd/b", b"before", 0)
    assert ok("snap", command, "rbd/b@first").out == ""
    write(populated, "rbd/b", b"after!", 0)
    assert _snaps(populated, "rbd/b") == [("first", False)]
    assert read(populated, "rbd/b@first", 0, 6) == b"before"
    assert read(populated, "rbd/b", 0, 6) == b"after!"


def test_snap_ls(populated: Rados, ok: Runner) -> None:
    with Image(populated.open_ioctx("rbd"), "a") as image:
        stamps = [
            time.ctime(image.get_snap_timestamp(s["id"]).timestamp()) for s in image.list_snaps()
        ]
    assert ok("snap", "ls", "a").lines == [
        "SNAPID  NAME  SIZE    PROTECTED  TIMESTAMP",
        f"     1  s1    16 MiB  yes        {stamps[0]}",
        f"     2  s2    16 MiB             {stamps[1]}",
    ]
    assert ok("snap", "ls", "b").out == ""


def test_snap_ls_json(populated: Rados, ok: Runner) -> None:
    snaps = ok("snap", "list", "--format", "json", "rbd/a").json()
    assert [(s["id"], s["name"], s["size"], s["protected"]) for s in snaps] == [
        (1, "s1", 16 * MiB, "true"),
        (2, "s2", 16 * MiB, "false"),
    ]
    assert set(snaps[0]) == {"id", "name", "size", "protected", "timestamp"}
    year = time.strftime("%Y")
    assert snaps[0]["timestamp"].endswith(year)
    assert ok("snap", "ls", "--format", "json", "b").json() == []


@pytest.mark.parametrize("command", ["rm", "remove"])
def test_snap_rm(populated: Rados, ok: Runner, command: str) -> None:
    ok("snap", command, "a@s2")
    assert _snaps(populated, "rbd/a") == [("s1", True)]


def test_snap_rollback(populated: Rados, ok: Runner) -> None:
    write(populated, "rbd/a", b"Z" * 4096, 0)
    ok("image", "resize", "--size", "4M", "--allow-shrink", "a")
    ok("snap", "rollback", "a@s1")
    assert read(populated, "rbd/a", 0, 4) == b"AAAA"
    assert read(populated, "rbd/a", 12 * MiB, 4) == bytes(4)  # written after s1
    with Image(populated.open_ioctx("rbd"), "a") as image:
        assert image.size() == 16 * MiB
    ok("snap", "revert", "a@s2")
    assert read(populated, "rbd/a", 12 * MiB, 4) == b"CCCC"


def test_snap_protect_unprotect(populated: Rados, ok: Runner) -> None:
    ok("snap", "protect", "a@s2")
    assert _snaps(populated, "rbd/a") == [("s1", True), ("s2", True)]
    ok("snap", "unprotect", "a@s2")
    assert _snaps(populated, "rbd/a") == [("s1", True), ("s2", False)]


def test_snap_purge(populated: Rados, ok: Runner) -> None:
    ok("snap", "create", "b@one")
    ok("snap", "create", "b@two")
    ok("snap", "purge", "b")
    assert _snaps(populated, "rbd/b") == []
    ok("snap", "purge", "b")  # nothing to purge is fine


def test_snap_of_clone(populated: Rados, ok: Runner) -> None:
    ok("snap", "create", "c@cs")
    ok("snap", "protect", "c@cs")
    ok("image", "clone", "c@cs", "p2/grandchild")
    assert read(populated, "p2/grandchild", 5 * MiB, 4) == b"BBBB"
    info = ok("image", "info", "--format", "json", "c@cs").json()
    assert info["parent"]["image"] == "a" and info["protected"] == "true"


def test_pool_create_ls_rm(cluster: Rados, ok: Runner) -> None:
    ok("pool", "create", "fast")
    ok("pool", "create", "with space")
    assert ok("pool", "ls").out == "fast\nrbd\nwith space\n"
    assert ok("pool", "list", "--format", "json").json() == ["fast", "rbd", "with space"]
    ok("image", "create", "-s", "1M", "with space/img")
    ok("pool", "rm", "fast")
    ok("pool", "delete", "--force", "with space")
    assert cluster.list_pools() == ["rbd"]


def test_pool_rm_force_removes_images(populated: Rados, ok: Runner) -> None:
    ok("pool", "rm", "--force", "p2")
    assert populated.list_pools() == ["rbd"]
    ok("pool", "create", "p2")
    assert ok("image", "ls", "p2").out == ""


def test_pool_rm_force_refuses_cross_pool_clones(populated: Rados, run: Runner) -> None:
    assert run("image", "clone", "a@s2", "p2/k").code == 0
    result = run("pool", "rm", "--force", "rbd")
    assert result.code == 16
    assert result.err == (
        "csi-rbd: error: pool rbd has images cloned into other pools (p2/k); "
        "flatten or remove those clones first\n"
    )
    assert RBD().list(populated.open_ioctx("rbd")) == ["a", "b", "c"]
    assert read(populated, "p2/k", 12 * MiB, 4) == b"CCCC"


def test_pool_rm_default_pool(cluster: Rados, ok: Runner, run: Runner) -> None:
    ok("pool", "rm", "rbd")
    result = run("image", "ls")
    assert (result.code, result.err) == (2, "csi-rbd: error: pool rbd does not exist\n")
    assert ok("pool", "ls").out == ""
