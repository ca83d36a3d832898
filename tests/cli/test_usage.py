"""``image du`` (rbd du's JSON shape), ``image diff``, and csi_rbd.engine.usage itself."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from csi_rbd.engine import errors, usage
from csi_rbd.engine.native import RBD, Image, Rados
from tests.cli.conftest import MiB, Runner, write


def _ids(cluster: Rados) -> dict[str, str]:
    ioctx = cluster.open_ioctx("rbd")
    ids = {}
    for name in ("a", "b", "c"):
        with Image(ioctx, name) as image:
            ids[name] = image.id()
    return ids


def test_du_pool_json_shape(populated: Rados, ok: Runner) -> None:
    ids = _ids(populated)
    # a clone's own data: the copy-up of the parent's object writes 64 KiB (engine detail)
    write(populated, "rbd/c", b"x" * 5000, 0)
    assert ok("image", "du", "--format", "json").json() == {
        "images": [
            {
                "name": "a",
                "id": ids["a"],
                "snapshot": "s1",
                "snapshot_id": 1,
                "provisioned_size": 16 * MiB,
                "used_size": 4096 + 8192,
            },
            {
                "name": "a",
                "id": ids["a"],
                "snapshot": "s2",
                "snapshot_id": 2,
                "provisioned_size": 16 * MiB,
                "used_size": 4096,  # written between s1 and s2
            },
            {"name": "a", "id": ids["a"], "provisioned_size": 16 * MiB, "used_size": 0},
            {"name": "b", "id": ids["b"], "provisioned_size": 8 * MiB, "used_size": 0},
            {"name": "c", "id": ids["c"], "provisioned_size": 16 * MiB, "used_size": 65536},
        ],
        # like rbd, snapshots add to the used total but not to the provisioned one
        "total_provisioned_size": 40 * MiB,
        "total_used_size": 4096 + 8192 + 4096 + 65536,
    }


def test_du_plain(populated: Rados, ok: Runner) -> None:
    write(populated, "rbd/a", b"y" * MiB, 8 * MiB)
    assert ok("image", "du").lines == [
        "NAME     PROVISIONED  USED",
        "a@s1          16 MiB    12 KiB",
        "a@s2          16 MiB     4 KiB",
        "a             16 MiB     1 MiB",
        "b              8 MiB       0 B",
        "c             16 MiB       0 B",
        "<TOTAL>       40 MiB  1.02 MiB",
    ]


@pytest.mark.parametrize(
    ("target", "rows"),
    [
        ("rbd/a", [("a", "s1"), ("a", "s2"), ("a", None)]),
        ("a", [("a", "s1"), ("a", "s2"), ("a", None)]),  # a bare image name, as rbd du IMAGE
        ("a@s1", [("a", "s1")]),
        ("rbd/a@s2", [("a", "s1"), ("a", "s2")]),
        ("rbd/b", [("b", None)]),
        ("p2", [("x", None)]),
        ("p2/x", [("x", None)]),
    ],
)
def test_du_targets(
    populated: Rados, ok: Runner, target: str, rows: list[tuple[str, str | None]]
) -> None:
    result = ok("image", "du", "--format", "json", target).json()
    assert [(i["name"], i.get("snapshot")) for i in result["images"]] == rows
    assert set(result) == {"images", "total_provisioned_size", "total_used_size"}
    assert result["total_used_size"] == sum(i["used_size"] for i in result["images"])


def test_du_single_image_plain_has_no_total(populated: Rados, ok: Runner) -> None:
    assert ok("image", "du", "b").lines == ["NAME  PROVISIONED  USED", "b           8 MiB   0 B"]


def test_du_empty_pool(populated: Rados, ok: Runner) -> None:
    ok("pool", "create", "empty")
    assert ok("image", "du", "empty").out == ""
    assert ok("image", "du", "--format", "json", "empty").json() == {
        "images": [],
        "total_provisioned_size": 0,
        "total_used_size": 0,
    }


def test_diff_plain_and_json(populated: Rados, ok: Runner) -> None:
    assert ok("image", "diff", "a").lines == [
        "Offset    Length  Type",
        "0         4096    data",
        "5242880   8192    data",
        "12582912  4096    data",
    ]
    assert ok("image", "diff", "--format", "json", "a@s1").json() == [
        {"offset": 0, "length": 4096, "exists": "true"},
        {"offset": 5 * MiB, "length": 8192, "exists": "true"},
    ]


def test_diff_from_snap_and_whole_object(populated: Rados, ok: Runner) -> None:
    ioctx = populated.open_ioctx("rbd")
    with Image(ioctx, "a") as image:
        image.discard(12 * MiB, 4096)
    diff = ok("image", "diff", "--format", "json", "--from-snap", "s1", "a").json()
    assert diff == []  # the 12 MiB block came after s1 and is gone again
    diff = ok("image", "diff", "--format", "json", "--from-snap", "s2", "a").json()
    assert diff == [{"offset": 12 * MiB, "length": 4096, "exists": "false"}]
    whole = ok("image", "diff", "--whole-object", "--format", "json", "a@s2").json()
    assert whole == [
        {"offset": 0, "length": 4 * MiB, "exists": "true"},
        {"offset": 4 * MiB, "length": 4 * MiB, "exists": "true"},
        {"offset": 12 * MiB, "length": 4 * MiB, "exists": "true"},
    ]


def test_diff_of_clone_includes_parent(populated: Rados, ok: Runner) -> None:
    assert ok("image", "diff", "--format", "json", "c").json() == [
        {"offset": 0, "length": 4096, "exists": "true"},
        {"offset": 5 * MiB, "length": 8192, "exists": "true"},
    ]
    assert ok("image", "diff", "b").out == ""


# -- the usage module on its own: only the python-rbd image API -----------------------------
class FakeImage:
    """Just the methods python-rbd's Image has that usage needs; extents per snapshot."""

    def __init__(self, layers: dict[str | None, list[tuple[int, int]]], snap: str | None) -> None:
        self.layers, self.snap = layers, snap
        self.calls: list[tuple[Any, ...]] = []

    def size(self) -> int:
        return 1 << 30

    def id(self) -> str:
        return "fake-id"

    def list_snaps(self) -> Iterator[dict[str, Any]]:
        names = [n for n in self.layers if n is not None]
        yield from (
            {"id": i + 10, "name": n, "size": 1 << 30} for i, n in reversed(list(enumerate(names)))
        )

    def diff_iterate(
        self,
        offset: int,
        length: int,
        from_snapshot: str | None,
        iterate_cb: Callable[[int, int, bool], Any],
        include_parent: bool = True,
        whole_object: bool = False,
    ) -> None:
        self.calls.append((offset, length, from_snapshot, include_parent, whole_object))
        for start, count in self.layers[self.snap]:
            iterate_cb(start, count, True)
        iterate_cb(999, 1, False)  # a discarded extent never counts


def test_usage_uses_only_the_rbd_api() -> None:
    layers: dict[str | None, list[tuple[int, int]]] = {
        "first": [(0, 4096)],
        "second": [(8192, 100), (65536, 4096)],
        None: [(1 << 20, 512)],
    }
    opened: list[FakeImage] = []

    @contextmanager
    def open_image(name: str, snap: str | None) -> Iterator[FakeImage]:
        assert name == "img"
        image = FakeImage(layers, snap)
        opened.append(image)
        yield image

    rows = usage.image_usage(open_image, "img")
    assert [(r.snapshot, r.snapshot_id, r.used_size) for r in rows] == [
        ("first", 10, 4096),
        ("second", 11, 4196),
        (None, None, 512),
    ]
    calls = [call for image in opened for call in image.calls]
    assert sorted(calls, key=str) == sorted(
        [
            (0, 1 << 30, None, False, False),
            (0, 1 << 30, "first", False, False),
            (0, 1 << 30, "second", False, False),
        ],
        key=str,
    )
    assert usage.image_usage(open_image, "img", "first")[-1].snapshot == "first"
    with pytest.raises(errors.ImageNotFound):
        usage.image_usage(open_image, "img", "missing")


def test_usage_with_native_engine(cluster: Rados) -> None:
    ioctx = cluster.open_ioctx("rbd")
    RBD().create(ioctx, "img", 8 * MiB)
    with Image(ioctx, "img") as image:
        image.write(b"z" * 3000, 4 * MiB - 1000)
        # allocation is per file-system block: the 4 KiB ending object 0, 2000 bytes of object 1
        assert usage.used_size(image, image.size()) == 4096 + 2000

    def open_image(name: str, snap: str | None) -> Image:
        return Image(ioctx, name, snapshot=snap, read_only=True)

    result = usage.pool_usage(open_image, ["img", "gone"])  # "gone" vanished: skipped
    assert result.to_json() == {
        "images": [
            {
                "name": "img",
                "id": result.images[0].id,
                "provisioned_size": 8 * MiB,
                "used_size": 6096,
            }
        ],
        "total_provisioned_size": 8 * MiB,
        "total_used_size": 6096,
    }
