"""``image create|ls|info|resize|rm|rename|clone|flatten|children``."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from csi_rbd import __version__, cli
from csi_rbd.admin.command import add_command
from csi_rbd.engine import errors
from csi_rbd.engine.native import RBD, Image, Rados
from tests.cli.conftest import CLI, MiB, Runner, fingerprint, read, run_script, write

GiB = 1 << 30
ALL_FEATURES = ["layering", "exclusive-lock", "object-map", "fast-diff", "deep-flatten"]


@pytest.mark.parametrize(
    ("options", "size", "order", "features"),
    [
        (["--size", "10G"], 10 * GiB, 22, ALL_FEATURES),
        (["-s", "100"], 100 * MiB, 22, ALL_FEATURES),  # MiB by default, as rbd
        (["--size", "4096B"], 4096, 22, ALL_FEATURES),
        (["--size", "0"], 0, 22, ALL_FEATURES),
        (["--size", "1T", "--order", "12"], 1 << 40, 12, ALL_FEATURES),
        (["--size", "64M", "--object-size", "8M"], 64 * MiB, 23, ALL_FEATURES),
        (["--size", "1G", "--object-size", "65536"], GiB, 16, ALL_FEATURES),
        (["--size", "1M", "--image-feature", "layering"], MiB, 22, ["layering"]),
        (
            [
                "-s",
                "1M",
                "--image-feature",
                "layering,exclusive-lock",
                "--image-feature",
                "object-map",
            ],
            MiB,
            22,
            ["layering", "exclusive-lock", "object-map"],
        ),
    ],
)
def test_create(
    cluster: Rados, ok: Runner, options: list[str], size: int, order: int, features: list[str]
) -> None:
    ok("image", "create", *options, "rbd/img")
    info = ok("image", "info", "--format", "json", "img").json()
    assert (info["size"], info["order"], info["features"]) == (size, order, features)
    assert info["objects"] == -(-size // (1 << order))
    assert info["object_size"] == 1 << order


def test_create_in_other_pool_and_default_pool(cluster: Rados, ok: Runner) -> None:
    ok("pool", "create", "p2")
    ok("image", "create", "--size", "1M", "p2/img")
    ok("image", "create", "--size", "2M", "img")  # no pool: rbd
    assert RBD().list(cluster.open_ioctx("p2")) == ["img"]
    with Image(cluster.open_ioctx("rbd"), "img") as image:
        assert image.size() == 2 * MiB


def test_create_prints_nothing(cluster: Rados, ok: Runner) -> None:
    assert ok("image", "create", "-s", "1M", "img").out == ""


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["image", "ls"], "a\nb\nc\n"),
        (["image", "list", "rbd"], "a\nb\nc\n"),
        (["image", "ls", "p2"], "x\n"),
        (["image", "ls", "-p", "p2"], "x\n"),
        (["image", "ls", "--format", "json"], '["a", "b", "c"]\n'),
        (["--format", "json", "image", "ls", "p2"], '["x"]\n'),
    ],
)
def test_ls(populated: Rados, ok: Runner, args: list[str], expected: str) -> None:
    assert ok(*args).out == expected


def test_ls_empty_pool(populated: Rados, ok: Runner) -> None:
    ok("pool", "create", "empty")
    assert ok("image", "ls", "empty").out == ""
    assert ok("image", "ls", "--format", "json", "empty").json() == []
    assert ok("image", "ls", "-l", "empty").out == ""


def test_ls_long(populated: Rados, ok: Runner) -> None:
    assert ok("image", "ls", "-l").lines == [
        "NAME  SIZE    PARENT    FMT  PROT",
        "a     16 MiB              2",
        "a@s1  16 MiB              2  yes",
        "a@s2  16 MiB              2",
        "b      8 MiB              2",
        "c     16 MiB  rbd/a@s1    2",
    ]


def test_ls_long_json(populated: Rados, ok: Runner) -> None:
    rows = ok("image", "ls", "-l", "--format", "json").json()
    a_id = rows[0]["id"]
    assert [(r["image"], r.get("snapshot"), r["size"]) for r in rows] == [
        ("a", None, 16 * MiB),
        ("a", "s1", 16 * MiB),
        ("a", "s2", 16 * MiB),
        ("b", None, 8 * MiB),
        ("c", None, 16 * MiB),
    ]
    assert rows[1] == {
        "image": "a",
        "id": a_id,
        "snapshot": "s1",
        "snapshot_id": rows[1]["snapshot_id"],
        "size": 16 * MiB,
        "format": 2,
        "protected": "true",
    }
    assert rows[2]["protected"] == "false"
    assert rows[4]["parent"] == {
        "pool": "rbd",
        "pool_namespace": "",
        "image": "a",
        "id": a_id,
        "snapshot": "s1",
        "overlap": 16 * MiB,
    }


def test_info_plain(populated: Rados, ok: Runner) -> None:
    with Image(populated.open_ioctx("rbd"), "c") as image:
        image_id = image.id()
    assert ok("image", "info", "rbd/c").out == (
        "rbd image 'c':\n"
        "\tsize 16 MiB in 4 objects\n"
        "\torder 22 (4 MiB objects)\n"
        "\tsnapshot_count: 0\n"
        f"\tid: {image_id}\n"
        f"\tblock_name_prefix: rbd_data.{image_id}\n"
        "\tformat: 2\n"
        "\tfeatures: layering, exclusive-lock, object-map, fast-diff, deep-flatten\n"
        "\tparent: rbd/a@s1\n"
        "\toverlap: 16 MiB\n"
    )


def test_info_snapshot_json(populated: Rados, ok: Runner) -> None:
    info = ok("image", "info", "--format", "json", "a@s1").json()
    assert info == {
        "name": "a",
        "id": info["id"],
        "size": 16 * MiB,
        "objects": 4,
        "order": 22,
        "object_size": 4 * MiB,
        "snapshot_count": 2,
        "block_name_prefix": f"rbd_data.{info['id']}",
        "format": 2,
        "features": ALL_FEATURES,
        "protected": "true",
    }
    assert ok("image", "info", "a@s2").lines[-1] == "\tprotected: False"


def test_info_other_order(populated: Rados, ok: Runner) -> None:
    lines = ok("image", "info", "p2/x").lines
    assert lines[1:3] == ["\tsize 4 MiB in 4 objects", "\torder 20 (1 MiB objects)"]


@pytest.mark.parametrize(
    ("options", "size"),
    [
        (["--size", "32M"], 32 * MiB),
        (["--size", "16M"], 16 * MiB),
        (["--size", "6M", "--allow-shrink"], 6 * MiB),
        (["--size", "0", "--allow-shrink"], 0),
        (["-s", "1T"], 1 << 40),
    ],
)
def test_resize(populated: Rados, ok: Runner, options: list[str], size: int) -> None:
    ok("image", "resize", *options, "a")
    with Image(populated.open_ioctx("rbd"), "a") as image:
        assert image.size() == size
        for offset, data in ((5 * MiB, b"BBBB"), (12 * MiB, b"CCCC")):
            if offset < size:
                assert image.read(offset, 4) == data
        if 0 < size < 16 * MiB:  # what was cut off reads as zeros after growing back
            image.resize(16 * MiB)
            assert image.read(12 * MiB, 4) == bytes(4)
    # the snapshots keep their size and data
    assert read(populated, "rbd/a@s2", 12 * MiB, 4) == b"CCCC"


def test_rm(populated: Rados, ok: Runner) -> None:
    ok("image", "rm", "b")
    ok("image", "remove", "p2/x")
    assert RBD().list(populated.open_ioctx("rbd")) == ["a", "c"]
    assert RBD().list(populated.open_ioctx("p2")) == []


def test_rm_after_purge(populated: Rados, ok: Runner) -> None:
    ok("image", "flatten", "c")
    ok("snap", "unprotect", "a@s1")
    ok("snap", "purge", "a")
    ok("image", "rm", "a")
    assert RBD().list(populated.open_ioctx("rbd")) == ["b", "c"]
    assert read(populated, "rbd/c", 0, 4) == b"AAAA"


@pytest.mark.parametrize(
    ("command", "source", "dest", "pool", "name"),
    [
        ("rename", "b", "b2", "rbd", "b2"),
        ("mv", "rbd/b", "rbd/b3", "rbd", "b3"),
        ("rename", "p2/x", "y", "p2", "y"),  # the destination's pool defaults to the source's
    ],
)
def test_rename(
    populated: Rados, ok: Runner, command: str, source: str, dest: str, pool: str, name: str
) -> None:
    before = RBD().list(populated.open_ioctx(pool))
    ok("image", command, source, dest)
    after = RBD().list(populated.open_ioctx(pool))
    assert name in after and len(after) == len(before)
    assert source.rpartition("/")[2] not in after


def test_rename_keeps_data_and_snapshots(populated: Rados, ok: Runner) -> None:
    ok("image", "rename", "a", "renamed")
    assert read(populated, "rbd/renamed@s1", 0, 4) == b"AAAA"
    assert ok("image", "info", "c").lines[-2] == "\tparent: rbd/renamed@s1"


@pytest.mark.parametrize(
    ("extra", "dest", "features", "order"),
    [
        ([], "rbd/k", ALL_FEATURES, 22),
        ([], "p2/k", ALL_FEATURES, 22),
        (["--image-feature", "layering"], "k", ["layering"], 22),
        (["--order", "20"], "k", ALL_FEATURES, 20),
    ],
)
def test_clone(
    populated: Rados, ok: Runner, extra: list[str], dest: str, features: list[str], order: int
) -> None:
    ok("image", "clone", *extra, "a@s2", dest)
    pool, _, name = dest.rpartition("/")
    info = ok("image", "info", "--format", "json", dest).json()
    assert info["features"] == features
    assert info["order"] == order
    assert info["parent"]["image"] == "a" and info["parent"]["snapshot"] == "s2"
    assert read(populated, f"{pool or 'rbd'}/{name}", 12 * MiB, 4) == b"CCCC"
    children = ok("image", "children", "a@s2").out
    assert children == f"{pool or 'rbd'}/{name}\n"


def test_flatten(populated: Rados, ok: Runner) -> None:
    write(populated, "rbd/c", b"own", 100)
    ok("image", "flatten", "c")
    info = ok("image", "info", "--format", "json", "c").json()
    assert "parent" not in info
    assert read(populated, "rbd/c", 0, 4) == b"AAAA"
    assert read(populated, "rbd/c", 100, 3) == b"own"
    assert read(populated, "rbd/c", 5 * MiB, 4) == b"BBBB"
    assert ok("image", "children", "a").out == ""
    ok("snap", "unprotect", "a@s1")  # no clones left


def test_children(populated: Rados, ok: Runner) -> None:
    ok("image", "clone", "a@s2", "p2/k")
    assert ok("image", "children", "a").lines == ["p2/k", "rbd/c"]
    assert ok("image", "children", "a@s1").lines == ["rbd/c"]
    assert ok("image", "children", "--format", "json", "a@s2").json() == [
        {"pool": "p2", "pool_namespace": "", "image": "k"}
    ]
    assert ok("image", "children", "b").out == ""
    assert ok("image", "children", "--format", "json", "b").json() == []


def test_global_and_command_options(populated: Rados, ok: Runner, data_dir: Path) -> None:
    """--format and --data-dir work before the group and after the command."""
    assert ok("--format", "json", "image", "ls").json() == ["a", "b", "c"]
    assert ok("--format", "json", "image", "ls", "--format", "plain").out == "a\nb\nc\n"
    pretty = ok("image", "ls", "--pretty-format").out
    assert pretty == '[\n    "a",\n    "b",\n    "c"\n]\n'
    other = data_dir.parent / "other"
    ok("image", "create", "-s", "1M", "--data-dir", str(other), "z")
    assert RBD().list(populated.open_ioctx("rbd")) == ["a", "b", "c"]
    with Rados(data_dir=other) as cluster:
        assert RBD().list(cluster.open_ioctx("rbd")) == ["z"]


def test_data_dir_from_environment(tmp_path: Path) -> None:
    target, flag = tmp_path / "from-env", tmp_path / "from-flag"

    def csi_rbd(*args: str) -> subprocess.CompletedProcess[bytes]:
        env = {**os.environ, "CSI_RBD_DATA_DIR": str(target)}
        return subprocess.run(
            [str(CLI), *args], env=env, capture_output=True, check=False, timeout=60
        )

    assert csi_rbd("image", "create", "-s", "1M", "envimg").returncode == 0
    assert (
        csi_rbd("--data-dir", str(flag), "image", "create", "-s", "1M", "flagimg").returncode == 0
    )
    assert csi_rbd("image", "ls").stdout == b"envimg\n"
    with Rados(data_dir=flag) as cluster:
        assert RBD().list(cluster.open_ioctx("rbd")) == ["flagimg"]


def test_new_data_dir_gets_pool_rbd(data_dir: Path, ok: Runner) -> None:
    assert not data_dir.exists()
    assert ok("pool", "ls").out == "rbd\n"
    assert ok("image", "ls").out == ""


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"csi-rbd {__version__}\n"


def test_version_console_script(tmp_path: Path) -> None:
    proc = run_script(tmp_path, "--version")
    assert (proc.returncode, proc.stdout) == (0, f"csi-rbd {__version__}\n".encode())


def test_help_lists_groups(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for group in ("image", "snap", "pool"):
        assert group in out


def test_engine_error_fallback(populated: Rados, run: Runner) -> None:
    """An engine error the CLI does not pre-check still gives one line and its errno."""
    ioctx = populated.open_ioctx("rbd")
    with Image(ioctx, "b") as writer:
        writer.write(b"x", 0)  # holds the exclusive write lock
        result = run("image", "rm", "b")
    assert result.code == errors.ImageBusy.errno_value
    assert result.err == "csi-rbd: error: image b is open for writing elsewhere\n"
    assert RBD().list(ioctx) == ["a", "b", "c"]


def test_fingerprint_sees_changes(populated: Rados, ok: Runner, data_dir: Path) -> None:
    """The oracle of the bad-input tests notices catalog and data changes."""
    before: dict[str, Any] = fingerprint(data_dir)
    ok("snap", "create", "b@new")
    after_snap = fingerprint(data_dir)
    assert after_snap != before
    write(populated, "rbd/b", b"x", 0)
    assert fingerprint(data_dir)["files"] != after_snap["files"]


def test_top_level_command_hook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Room for `serve`: a registrar in cli.COMMANDS adds a top-level command whose
    handler gets the parsed arguments; the engine is not opened unless it asks."""
    seen: list[tuple[str, str]] = []

    def serve(ctx: Any, args: Any) -> int:
        seen.append((args.data_dir, args.endpoint))
        return 7

    def register(top: Any) -> None:
        add_command(top, "serve", serve, "run the driver").add_argument("--endpoint")

    monkeypatch.setattr(cli, "COMMANDS", [register])
    data_dir = tmp_path / "never-created"
    assert cli.main(["--data-dir", str(data_dir), "serve", "--endpoint", "unix:///s"]) == 7
    assert seen == [(str(data_dir), "unix:///s")]
    assert not data_dir.exists()
    assert cli.main(["--help"]) == 0
    assert "serve" in capsys.readouterr().out
