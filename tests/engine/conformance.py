"""Engine conformance suite: python-rbd semantics any engine must honour.

``EngineConformance`` is a test base class in the style of zarr's ``StoreTests``.
A concrete test module subclasses it and provides one fixture, ``engine``,
returning an object with these attributes:

* ``rados``        - a connected cluster handle (``rados.Rados`` shaped);
* ``ioctx``        - an open pool;
* ``second_ioctx`` - another pool of the same cluster, for cross-pool clones;
* ``module``       - the module exposing ``RBD``, ``Image``, the exception
  classes (``ImageNotFound``, ``ImageExists``, ...) and
  ``RBD_LOCK_MODE_EXCLUSIVE``.

The tests below only use that python-rbd-shaped API; they never look at an
engine's files or catalog, so a librbd-backed engine can run them unchanged.
Engine-specific checks belong in the subclass's module. Every test uses fresh,
unique image names, so pools may be shared between tests.
"""

from __future__ import annotations

import contextlib
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

KiB = 1024
MiB = 1024 * KiB


@dataclass
class EngineUnderTest:
    """What an ``engine`` fixture returns (any object with these attributes will do)."""

    rados: Any
    ioctx: Any
    second_ioctx: Any
    module: Any
    # optional: the same two pools through a second, independent connection
    # (another client or process); the model then runs image operations there too
    peer_ioctxs: tuple[Any, Any] | None = None


# -- helpers ---------------------------------------------------------------------------
_ALPHABET = bytes(range(1, 256))


def pattern(length: int, seed: int = 1) -> bytes:
    """Deterministic bytes without a single zero; different seeds differ at every byte."""
    start = seed % 255
    turn = _ALPHABET[start:] + _ALPHABET[:start]
    return (turn * (length // 255 + 1))[:length]


def user_snap_names(image: Any) -> list[str]:
    """Names of the snapshots a user sees (librbd also lists trash-namespace ones)."""
    return [s["name"] for s in image.list_snaps() if s.get("namespace", 0) == 0]


def diff_extents(image: Any, offset: int, length: int, from_snapshot: str | None = None, **kw: Any):
    extents: list[tuple[int, int, bool]] = []
    image.diff_iterate(
        offset, length, from_snapshot, lambda o, n, e: extents.append((o, n, bool(e))), **kw
    )
    return extents


def merge(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of (offset, length) runs as sorted, disjoint (start, end) intervals."""
    out: list[list[int]] = []
    for start, end in sorted((o, o + n) for o, n in runs if n > 0):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


def covers(runs: list[tuple[int, int]], start: int, end: int) -> bool:
    """True when [start, end) lies inside the union of ``runs``."""
    if start >= end:
        return True
    return any(s <= start and end <= e for s, e in merge(runs))


def nonzero_runs(data: bytes | bytearray) -> list[tuple[int, int]]:
    """(start, end) runs of non-zero bytes."""
    runs = []
    i, n = 0, len(data)
    while i < n:
        if data[i]:
            j = i
            while j < n and data[j]:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    return runs


def differing_runs(a: bytes | bytearray, b: bytes | bytearray) -> list[tuple[int, int]]:
    """(start, end) runs where ``a`` and ``b`` differ (over the shorter length)."""
    n = min(len(a), len(b))
    runs = []
    i = 0
    while i < n:
        if a[i] != b[i]:
            j = i
            while j < n and a[j] != b[j]:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    return runs


class EngineConformance:
    """python-rbd behaviour every engine must provide. Subclass and add an ``engine`` fixture."""

    # Where an engine may legitimately differ, shared tests ask (a subclass says False):
    # - a clone may have smaller objects than its parent;
    clone_objects_may_be_smaller = True
    # - snapshot handles opened before a deep flatten keep reading right once the
    #   old parent snapshot is gone (see test_open_handles_see_through_a_deep_flatten);
    early_handles_survive_deep_flatten = True
    # - an image may be removed while a read-write handle has it open (librbd:
    #   ImageBusy while any has, a watcher; the native engine only while a writer
    #   holds its lock).
    removable_while_open = True

    # -- plumbing ----------------------------------------------------------------------
    @pytest.fixture(autouse=True)
    def _bind_engine(self, engine: Any) -> Iterator[None]:
        self.engine = engine
        self.m = engine.module
        self.rbd = engine.module.RBD()
        self.ioctx = engine.ioctx
        self.ioctx2 = engine.second_ioctx
        self._prefix = "t" + uuid.uuid4().hex[:10] + "-"
        self._handles: list[Any] = []
        yield
        for handle in reversed(self._handles):
            with contextlib.suppress(Exception):
                handle.close()

    def name(self, label: str) -> str:
        return self._prefix + label

    def create(self, label: str, size: int, order: int | None = 12, ioctx: Any = None) -> str:
        name = self.name(label)
        self.rbd.create(ioctx or self.ioctx, name, size, order=order)
        return name

    def open(self, name: str, ioctx: Any = None, **kw: Any) -> Any:
        image = self.m.Image(ioctx or self.ioctx, name, **kw)
        self._handles.append(image)
        return image

    def clone(
        self, parent: str, snap: str, label: str, p_ioctx: Any = None, c_ioctx: Any = None, **kw
    ) -> str:
        child = self.name(label)
        self.rbd.clone(p_ioctx or self.ioctx, parent, snap, c_ioctx or self.ioctx, child, **kw)
        return child

    def remove_open(self, name: str, *handles: Any, ioctx: Any = None) -> None:
        """Remove an image these (read-write, lock-free) handles have open; an engine
        that refuses that must say ImageBusy, and removes it once they are closed."""
        if not self.removable_while_open:
            with pytest.raises(self.m.ImageBusy):
                self.rbd.remove(ioctx or self.ioctx, name)
            for handle in handles:
                handle.close()
        self.rbd.remove(ioctx or self.ioctx, name)

    def read_all(self, image: Any) -> bytes:
        return image.read(0, image.size())

    def image_with_data(self, label: str, size: int, order: int = 12, seed: int = 1):
        name = self.create(label, size, order)
        image = self.open(name)
        image.write(pattern(size, seed), 0)
        return name, image

    # ==================================================================================
    # image management
    # ==================================================================================
    def test_create_list_remove(self) -> None:
        a = self.create("a", 64 * KiB)
        b = self.create("b", 0)
        names = self.rbd.list(self.ioctx)
        assert a in names and b in names
        assert a not in self.rbd.list(self.ioctx2)
        self.rbd.remove(self.ioctx, a)
        names = self.rbd.list(self.ioctx)
        assert a not in names and b in names
        with pytest.raises(self.m.ImageNotFound):
            self.open(a)

    def test_create_existing_name_raises_image_exists(self) -> None:
        a = self.create("a", 64 * KiB)
        with pytest.raises(self.m.ImageExists):
            self.rbd.create(self.ioctx, a, 4 * KiB, order=12)
        # the same name in another pool is a different image
        self.rbd.create(self.ioctx2, a, 4 * KiB, order=12)
        assert self.open(a).size() == 64 * KiB
        assert self.open(a, ioctx=self.ioctx2).size() == 4 * KiB

    def test_missing_images_raise_image_not_found(self) -> None:
        missing = self.name("missing")
        with pytest.raises(self.m.ImageNotFound):
            self.open(missing)
        with pytest.raises(self.m.ImageNotFound):
            self.open(missing, read_only=True)
        with pytest.raises(self.m.ImageNotFound):
            self.rbd.remove(self.ioctx, missing)
        with pytest.raises(self.m.ImageNotFound):
            self.rbd.rename(self.ioctx, missing, self.name("other"))

    def test_rename_keeps_data(self) -> None:
        a, image = self.image_with_data("a", 16 * KiB)
        image.close()
        b = self.name("b")
        self.rbd.rename(self.ioctx, a, b)
        names = self.rbd.list(self.ioctx)
        assert b in names and a not in names
        with pytest.raises(self.m.ImageNotFound):
            self.open(a)
        assert self.read_all(self.open(b)) == pattern(16 * KiB)

    def test_rename_parent_keeps_clones_reading(self) -> None:
        name, image = self.image_with_data("p", 8 * KiB)
        image.create_snap("s")
        image.close()
        child = self.open(self.clone(name, "s", "c"))
        renamed = self.name("renamed")
        self.rbd.rename(self.ioctx, name, renamed)
        assert child.parent_info() == (self.ioctx.get_pool_name(), renamed, "s")
        assert self.read_all(child) == pattern(8 * KiB)
        child.write(b"x", 4096)
        assert (
            child.read(4095, 3) == pattern(8 * KiB)[4095:4096] + b"x" + pattern(8 * KiB)[4097:4098]
        )

    def test_missing_pool_raises_object_not_found(self) -> None:
        with pytest.raises(self.m.ObjectNotFound):
            self.engine.rados.open_ioctx(self.name("no-such-pool"))

    def test_rename_onto_existing_raises_image_exists(self) -> None:
        a = self.create("a", 4 * KiB)
        b = self.create("b", 8 * KiB)
        with pytest.raises(self.m.ImageExists):
            self.rbd.rename(self.ioctx, a, b)
        assert self.open(a).size() == 4 * KiB
        assert self.open(b).size() == 8 * KiB

    @pytest.mark.parametrize("bad", ["", "a/b", "a@b"])
    def test_invalid_image_names(self, bad: str) -> None:
        with pytest.raises(self.m.InvalidArgument):
            self.rbd.create(self.ioctx, bad, 4 * KiB, order=12)
        a = self.create("a", 4 * KiB)
        with pytest.raises(self.m.InvalidArgument):
            self.rbd.rename(self.ioctx, a, bad)
        assert a in self.rbd.list(self.ioctx)

    @pytest.mark.parametrize("bad", [-1, -(1 << 20)])
    def test_invalid_sizes(self, bad: int) -> None:
        name = self.name("a")
        with pytest.raises(self.m.InvalidArgument):
            self.rbd.create(self.ioctx, name, bad, order=12)
        assert name not in self.rbd.list(self.ioctx)

    @pytest.mark.parametrize("bad", [1, 11, 26, 64])
    def test_invalid_orders(self, bad: int) -> None:
        # librbd reports EDOM (ArgumentOutOfRange) for an order out of 12..25;
        # the native engine InvalidArgument. Both are "invalid argument".
        name = self.name("a")
        errors = (self.m.InvalidArgument, getattr(self.m, "ArgumentOutOfRange", ()))
        with pytest.raises(errors):
            self.rbd.create(self.ioctx, name, 64 * KiB, order=bad)
        assert name not in self.rbd.list(self.ioctx)

    def test_default_order_is_22(self) -> None:
        name = self.create("a", 10 * MiB, order=None)
        info = self.open(name).stat()
        assert info["order"] == 22
        assert info["obj_size"] == 4 * MiB
        assert info["num_objs"] == 3
        assert info["size"] == 10 * MiB

    @pytest.mark.parametrize("order", [12, 16, 25])
    def test_stat(self, order: int) -> None:
        size = 5 * (1 << order) + 7
        info = self.open(self.create("a", size, order=order)).stat()
        assert info["size"] == size
        assert info["order"] == order
        assert info["obj_size"] == 1 << order
        assert info["num_objs"] == 6

    def test_closed_image_refuses_io(self) -> None:
        image = self.open(self.create("a", 8 * KiB))
        image.close()
        image.close()  # closing twice is harmless
        with pytest.raises(self.m.InvalidArgument):
            image.read(0, 1)
        with pytest.raises(self.m.InvalidArgument):
            image.write(b"x", 0)

    def test_image_survives_closing_and_reopening(self) -> None:
        name, image = self.image_with_data("a", 20 * KiB)
        image.flush()
        image.close()
        assert self.read_all(self.open(name)) == pattern(20 * KiB)
        assert self.read_all(self.open(name, read_only=True)) == pattern(20 * KiB)

    # ==================================================================================
    # data path
    # ==================================================================================
    @pytest.mark.parametrize(
        ("offset", "length"),
        [
            (0, 1),
            (0, 4096),
            (1, 4095),
            (4095, 1),
            (4095, 2),
            (4093, 8200),
            (12287, 4098),
            (1, 5 * 4096),
            (7 * 4096 - 3, 3),
            (3 * 4096, 4096),
        ],
    )
    def test_write_read_at_odd_offsets(self, offset: int, length: int) -> None:
        size = 7 * 4096
        image = self.open(self.create("a", size, order=12))
        data = pattern(length, offset)
        assert image.write(data, offset) == length
        assert image.read(offset, length) == data
        expected = bytearray(size)
        expected[offset : offset + length] = data
        assert self.read_all(image) == expected
        # a few reads that start or end inside the written range
        for start, n in [(offset - 1, 3), (offset + length - 2, 5), (0, offset + 1)]:
            start = max(0, start)
            n = min(n, size - start)
            assert image.read(start, n) == bytes(expected[start : start + n])

    def test_unwritten_areas_read_zeros(self) -> None:
        size = 1 * MiB
        image = self.open(self.create("a", size, order=14))
        assert image.read(0, size) == bytes(size)
        image.write(b"abc", 100 * KiB)
        assert image.read(0, 100 * KiB) == bytes(100 * KiB)
        assert image.read(100 * KiB, 3) == b"abc"
        assert image.read(100 * KiB + 3, 200 * KiB) == bytes(200 * KiB)
        assert image.read(size - 1, 1) == b"\0"

    def test_overwrites_are_visible(self) -> None:
        image = self.open(self.create("a", 32 * KiB, order=12))
        image.write(pattern(10000, 1), 1000)
        image.write(pattern(3000, 2), 4000)
        expected = bytearray(32 * KiB)
        expected[1000:11000] = pattern(10000, 1)
        expected[4000:7000] = pattern(3000, 2)
        assert self.read_all(image) == expected

    def test_read_past_end_is_cut_short(self) -> None:
        size = 10 * KiB + 5
        name, image = self.image_with_data("a", size)
        data = pattern(size)
        assert image.read(size - 3, 100) == data[-3:]
        assert image.read(4090, 1 << 20) == data[4090:]
        assert image.read(0, size + 1) == data
        assert image.read(size, 0) == b""
        # read-only handles cut short as well
        assert self.open(name, read_only=True).read(size - 1, 10) == data[-1:]

    def test_read_starting_past_end_is_invalid(self) -> None:
        # librbd: "can't start past end" (EINVAL); only empty requests are always valid.
        size = 8 * KiB
        image = self.open(self.create("a", size))
        with pytest.raises(self.m.InvalidArgument):
            image.read(size + 1, 1)
        with pytest.raises(self.m.InvalidArgument):
            image.read(size + 4096, 4096)

    def test_read_starting_at_end_is_invalid(self) -> None:
        # librbd's clip_io: a non-empty request with offset >= size is EINVAL.
        size = 8 * KiB
        image = self.open(self.create("a", size))
        with pytest.raises(self.m.InvalidArgument):
            image.read(size, 1)

    def test_empty_request_past_end_is_valid(self) -> None:
        # librbd's clip_io: "len == 0" requests are always valid, wherever they start.
        size = 8 * KiB
        image = self.open(self.create("a", size))
        assert image.read(size + 100, 0) == b""

    def test_write_starting_past_end_is_invalid(self) -> None:
        size = 8 * KiB
        image = self.open(self.create("a", size))
        with pytest.raises(self.m.InvalidArgument):
            image.write(b"x", size)
        with pytest.raises(self.m.InvalidArgument):
            image.write(b"xyz", size + 4096)
        assert self.read_all(image) == bytes(size)

    @pytest.mark.parametrize("how", ["discard", "write_zeroes"])
    @pytest.mark.parametrize(
        ("offset", "length"),
        [
            (0, 4096),  # exactly one object
            (0, 3 * 4096),  # several whole objects
            (1, 4094),  # inside one object
            (4000, 200),  # across a boundary
            (4096 + 17, 2 * 4096),  # partial, whole, partial
            (5 * 4096, 2 * 4096 + 100),  # whole objects to the (unaligned) end
            (7 * 4096 + 50, 1000),  # the tail of the last, partial object
        ],
    )
    def test_discard_and_write_zeroes(self, how: str, offset: int, length: int) -> None:
        size = 7 * 4096 + 100
        name, image = self.image_with_data("a", size)
        assert getattr(image, how)(offset, length) in (None, length, min(length, size - offset))
        expected = bytearray(pattern(size))
        end = min(size, offset + length)
        expected[offset:end] = bytes(end - offset)
        assert self.read_all(image) == expected
        image.close()
        assert self.read_all(self.open(name)) == expected
        # discarded ranges are writable again
        image = self.open(name)
        image.write(b"again", offset)
        expected[offset : offset + 5] = b"again"
        assert self.read_all(image) == expected

    def test_discard_past_end_is_cut_short(self) -> None:
        size = 6 * 4096 + 10
        _, image = self.image_with_data("a", size)
        image.discard(size - 20, 1 << 20)
        expected = bytearray(pattern(size))
        expected[size - 20 :] = bytes(20)
        assert self.read_all(image) == expected
        assert image.size() == size

    def test_discard_of_unwritten_area(self) -> None:
        image = self.open(self.create("a", 64 * KiB, order=12))
        image.discard(0, 64 * KiB)
        image.write_zeroes(5, 9000)
        image.discard(4095, 2)
        assert self.read_all(image) == bytes(64 * KiB)

    @pytest.mark.parametrize("order", [12, 13, 16])
    def test_random_io_matches_bytearray(self, order: int) -> None:
        rng = random.Random(order)
        size = 11 * (1 << order) + 333
        image = self.open(self.create("a", size, order=order))
        model = bytearray(size)
        for step in range(150):
            op = rng.choice(["write", "write", "discard", "write_zeroes", "read"])
            offset = rng.randrange(size)
            length = rng.choice([1, 2, 511, 4095, 4096, 4097, rng.randrange(1, 3 << order)])
            length = min(length, size - offset)
            if op == "write":
                data = pattern(length, step)
                image.write(data, offset)
                model[offset : offset + length] = data
            elif op == "read":
                assert image.read(offset, length) == bytes(model[offset : offset + length])
            else:
                getattr(image, op)(offset, length)
                model[offset : offset + length] = bytes(length)
        assert self.read_all(image) == model

    @pytest.mark.parametrize("order", [12, 25])
    def test_order_extremes(self, order: int) -> None:
        obj = 1 << order
        size = 3 * obj
        name = self.create("a", size, order=order)
        image = self.open(name)
        image.write(pattern(10, 3), obj - 5)
        image.write(pattern(7, 4), 3 * obj - 7)
        assert image.read(obj - 6, 12) == b"\0" + pattern(10, 3) + b"\0"
        assert image.read(3 * obj - 8, 100) == b"\0" + pattern(7, 4)
        image.discard(obj - 2, 4)
        before = pattern(3, 3) + bytes(4) + pattern(10, 3)[7:]
        assert image.read(obj - 5, 10) == before
        image.create_snap("s")
        image.write(b"new", obj - 1)
        assert image.read(obj - 5, 10) == before[:4] + b"new" + before[7:]
        assert self.open(name, snapshot="s").read(obj - 5, 10) == before
        assert image.stat()["order"] == order

    # ==================================================================================
    # images of size 0
    # ==================================================================================
    def test_zero_size_image(self) -> None:
        name = self.create("a", 0)
        image = self.open(name)
        assert image.size() == 0
        assert image.stat()["num_objs"] == 0
        assert image.read(0, 0) == b""
        image.discard(0, 0)
        image.create_snap("empty")
        image.resize(10 * KiB)
        assert self.read_all(image) == bytes(10 * KiB)
        image.write(b"data", 5000)
        snap = self.open(name, snapshot="empty")
        assert snap.size() == 0
        assert snap.read(0, 0) == b""
        image.rollback_to_snap("empty")
        assert image.size() == 0

    def test_clone_of_zero_size_snapshot(self) -> None:
        name = self.create("a", 0)
        self.open(name).create_snap("s")
        child = self.open(self.clone(name, "s", "c"))
        assert child.size() == 0
        child.resize(8 * KiB)
        assert self.read_all(child) == bytes(8 * KiB)
        child.write(b"abc", 4095)
        assert child.read(4094, 5) == b"\0abc\0"

    # ==================================================================================
    # resize
    # ==================================================================================
    def test_grow_keeps_data_and_new_area_reads_zeros(self) -> None:
        size = 5 * 4096 + 123
        name, image = self.image_with_data("a", size)
        image.resize(40 * KiB)
        assert image.size() == 40 * KiB
        assert self.read_all(image) == pattern(size) + bytes(40 * KiB - size)
        image.write(b"tail", 40 * KiB - 4)
        assert image.read(40 * KiB - 8, 8) == b"\0\0\0\0tail"
        # another handle sees the new size too
        assert self.open(name, read_only=True).size() == 40 * KiB

    @pytest.mark.parametrize("new_size", [0, 1, 4095, 4096, 4097, 2 * 4096 + 3000])
    def test_shrink_drops_data(self, new_size: int) -> None:
        size = 6 * 4096 + 100
        name, image = self.image_with_data("a", size)
        image.resize(new_size)
        assert image.size() == new_size
        assert self.read_all(image) == pattern(size)[:new_size]
        image.resize(size)
        expected = pattern(size)[:new_size] + bytes(size - new_size)
        assert self.read_all(image) == expected
        image.close()
        assert self.read_all(self.open(name)) == expected

    def test_shrink_needs_allow_shrink(self) -> None:
        _, image = self.image_with_data("a", 16 * KiB)
        with pytest.raises(self.m.InvalidArgument):
            image.resize(8 * KiB, allow_shrink=False)
        assert image.size() == 16 * KiB
        image.resize(32 * KiB, allow_shrink=False)
        assert image.size() == 32 * KiB

    def test_resize_seen_by_other_handles(self) -> None:
        name, image = self.image_with_data("a", 16 * KiB)
        image.flush()
        other = self.open(name, read_only=True)
        assert other.size() == 16 * KiB
        image.resize(6 * KiB)
        assert other.size() == 6 * KiB
        assert self.read_all(other) == pattern(6 * KiB)
        image.resize(16 * KiB)
        assert self.read_all(other) == pattern(6 * KiB) + bytes(10 * KiB)

    # ==================================================================================
    # snapshots
    # ==================================================================================
    def test_snapshot_create_list_remove(self) -> None:
        name, image = self.image_with_data("a", 16 * KiB)
        image.create_snap("one")
        image.resize(20 * KiB)
        image.create_snap("two")
        snaps = [s for s in image.list_snaps() if s.get("namespace", 0) == 0]
        assert [s["name"] for s in snaps] == ["one", "two"]
        assert [s["size"] for s in snaps] == [16 * KiB, 20 * KiB]
        assert snaps[0]["id"] < snaps[1]["id"]
        image.remove_snap("one")
        assert user_snap_names(image) == ["two"]
        with pytest.raises(self.m.ImageNotFound):
            self.open(name, snapshot="one")
        # a removed name can be taken again
        image.create_snap("one")
        assert user_snap_names(image) == ["two", "one"]

    def test_snapshot_errors(self) -> None:
        name, image = self.image_with_data("a", 16 * KiB)
        image.create_snap("s")
        with pytest.raises(self.m.ImageExists):
            image.create_snap("s")
        with pytest.raises(self.m.ImageNotFound):
            image.remove_snap("missing")
        with pytest.raises(self.m.ImageNotFound):
            image.rollback_to_snap("missing")
        with pytest.raises(self.m.ImageNotFound):
            image.protect_snap("missing")
        with pytest.raises(self.m.ImageNotFound):
            self.open(name, snapshot="missing")
        with pytest.raises(self.m.ImageNotFound):
            self.rbd.clone(self.ioctx, name, "missing", self.ioctx, self.name("c"))
        assert user_snap_names(image) == ["s"]

    @pytest.mark.parametrize("bad", ["", "a/b", "a@b"])
    def test_invalid_snapshot_names(self, bad: str) -> None:
        image = self.open(self.create("a", 4 * KiB))
        with pytest.raises(self.m.InvalidArgument):
            image.create_snap(bad)
        assert user_snap_names(image) == []

    def test_remove_image_with_snapshots_raises(self) -> None:
        name, image = self.image_with_data("a", 8 * KiB)
        image.create_snap("s")
        image.close()
        with pytest.raises(self.m.ImageHasSnapshots):
            self.rbd.remove(self.ioctx, name)
        image = self.open(name)
        assert self.read_all(image) == pattern(8 * KiB)
        image.remove_snap("s")
        image.close()
        self.rbd.remove(self.ioctx, name)
        assert name not in self.rbd.list(self.ioctx)

    def test_protect_unprotect(self) -> None:
        _, image = self.image_with_data("a", 8 * KiB)
        image.create_snap("s")
        assert image.is_protected_snap("s") is False
        image.protect_snap("s")
        assert image.is_protected_snap("s") is True
        with pytest.raises(self.m.ImageBusy):
            image.remove_snap("s")
        assert user_snap_names(image) == ["s"]
        image.unprotect_snap("s")
        assert image.is_protected_snap("s") is False
        image.remove_snap("s")
        assert user_snap_names(image) == []
        with pytest.raises(self.m.ImageNotFound):
            image.is_protected_snap("s")

    def test_protect_twice_is_busy(self) -> None:
        # librbd SnapshotProtectRequest: "snapshot is already protected" -> EBUSY
        image = self.open(self.create("a", 8 * KiB))
        image.create_snap("s")
        image.protect_snap("s")
        with pytest.raises(self.m.ImageBusy):
            image.protect_snap("s")
        assert image.is_protected_snap("s") is True

    def test_unprotect_unprotected_is_invalid(self) -> None:
        # librbd SnapshotUnprotectRequest: "snapshot is already unprotected" -> EINVAL
        image = self.open(self.create("a", 8 * KiB))
        image.create_snap("s")
        with pytest.raises(self.m.InvalidArgument):
            image.unprotect_snap("s")

    def test_snapshot_is_immutable(self) -> None:
        size = 6 * 4096 + 500
        name, image = self.image_with_data("a", size)
        image.create_snap("s")
        early = self.open(name, snapshot="s")  # opened before the changes
        assert self.read_all(early) == pattern(size)
        image.write(pattern(5000, 9), 3000)
        image.discard(0, 4096)  # a whole object
        image.discard(2 * 4096 + 10, 100)  # a hole
        image.write_zeroes(4 * 4096 - 5, 10)
        image.resize(3 * 4096 + 7)
        image.resize(10 * 4096)
        image.write(b"more", 9 * 4096)
        image.create_snap("t")
        image.write(pattern(10 * 4096, 5), 0)
        late = self.open(name, snapshot="s")
        for snap in (early, late):
            assert snap.size() == size
            assert self.read_all(snap) == pattern(size)
            assert snap.stat()["size"] == size
        assert self.read_all(image) == pattern(10 * 4096, 5)

    def test_snapshot_of_each_generation(self) -> None:
        name = self.create("a", 32 * KiB)
        image = self.open(name)
        expected = {}
        model = bytearray(32 * KiB)
        rng = random.Random(7)
        for i in range(6):
            offset = rng.randrange(32 * KiB - 6000)
            data = pattern(rng.randrange(1, 6000), i)
            image.write(data, offset)
            model[offset : offset + len(data)] = data
            image.discard(rng.randrange(32 * KiB - 5000), rng.randrange(5000))
            image.flush()
            model[:] = self.read_all(image)  # trust the head; check the snapshots
            image.create_snap(f"s{i}")
            expected[f"s{i}"] = bytes(model)
        for snap, data in expected.items():
            assert self.read_all(self.open(name, snapshot=snap)) == data

    def test_rollback(self) -> None:
        size = 5 * 4096 + 99
        name, image = self.image_with_data("a", size)
        image.create_snap("s")
        image.write(pattern(9000, 3), 100)
        image.discard(3 * 4096, 2 * 4096 + 99)
        image.resize(2 * size)
        image.write(b"grown", size + 10)
        image.rollback_to_snap("s")
        assert image.size() == size
        assert self.read_all(image) == pattern(size)
        # the head is writable after a rollback and the snapshot stays intact
        image.write(b"after", 4094)
        expected = bytearray(pattern(size))
        expected[4094:4099] = b"after"
        assert self.read_all(image) == expected
        assert self.read_all(self.open(name, snapshot="s")) == pattern(size)
        # growing after the rollback does not resurrect data written before it
        image.resize(2 * size)
        assert image.read(size, size) == bytes(size)

    def test_rollback_to_larger_snapshot(self) -> None:
        size = 4 * 4096 + 10
        name, image = self.image_with_data("a", size)
        image.create_snap("s")
        image.resize(4096 + 1)
        image.write(b"x", 4096)
        image.rollback_to_snap("s")
        assert image.size() == size
        assert self.read_all(image) == pattern(size)
        image.close()
        assert self.read_all(self.open(name)) == pattern(size)

    def test_rollback_to_older_snapshot_then_newer(self) -> None:
        size = 4 * 4096
        name = self.create("a", size)
        image = self.open(name)
        image.write(pattern(size, 1), 0)
        image.create_snap("one")
        image.write(pattern(size, 2), 0)
        image.create_snap("two")
        image.discard(0, size)
        image.rollback_to_snap("one")
        assert self.read_all(image) == pattern(size, 1)
        image.rollback_to_snap("two")
        assert self.read_all(image) == pattern(size, 2)
        image.rollback_to_snap("one")
        image.write(b"z", 0)
        assert self.read_all(self.open(name, snapshot="two")) == pattern(size, 2)
        assert self.read_all(self.open(name, snapshot="one")) == pattern(size, 1)

    def test_remove_snapshot_keeps_other_snapshots_and_head(self) -> None:
        size = 4 * 4096
        name = self.create("a", size)
        image = self.open(name)
        data = {}
        for i in range(4):
            image.write(pattern(4096, i), i * 4096)
            image.create_snap(f"s{i}")
            data[f"s{i}"] = self.read_all(image)
        head = self.read_all(image)
        for victim in ("s1", "s0", "s3"):
            image.remove_snap(victim)
            del data[victim]
            for snap, expected in data.items():
                assert self.read_all(self.open(name, snapshot=snap)) == expected
            assert self.read_all(image) == head

    def test_snapshot_handles_are_read_only(self) -> None:
        name, image = self.image_with_data("a", 8 * KiB)
        image.create_snap("s")
        snap = self.open(name, snapshot="s")
        assert snap.read(0, 10) == pattern(10)
        for call in (
            lambda: snap.write(b"x", 0),
            lambda: snap.discard(0, 10),
            lambda: snap.write_zeroes(0, 10),
            lambda: snap.resize(16 * KiB),
            lambda: snap.create_snap("t"),
        ):
            with pytest.raises(self.m.ReadOnlyImage):
                call()
        assert self.read_all(snap) == pattern(8 * KiB)

    def test_read_only_handles_refuse_writes(self) -> None:
        name, image = self.image_with_data("a", 8 * KiB)
        image.create_snap("s")
        image.metadata_set("k", "v")
        image.close()
        ro = self.open(name, read_only=True)
        for call in (
            lambda: ro.write(b"x", 0),
            lambda: ro.discard(0, 10),
            lambda: ro.write_zeroes(0, 10),
            lambda: ro.resize(16 * KiB),
            lambda: ro.create_snap("t"),
            lambda: ro.remove_snap("s"),
            lambda: ro.rollback_to_snap("s"),
            lambda: ro.protect_snap("s"),
            lambda: ro.metadata_set("k", "w"),
            lambda: ro.metadata_remove("k"),
        ):
            with pytest.raises(self.m.ReadOnlyImage):
                call()
        assert self.read_all(ro) == pattern(8 * KiB)
        assert ro.size() == 8 * KiB
        assert user_snap_names(ro) == ["s"]
        assert ro.metadata_get("k") == "v"

    def test_read_only_clone_refuses_flatten(self) -> None:
        name, image = self.image_with_data("a", 8 * KiB)
        image.create_snap("s")
        child = self.clone(name, "s", "c")
        with pytest.raises(self.m.ReadOnlyImage):
            self.open(child, read_only=True).flatten()

    # ==================================================================================
    # clones
    # ==================================================================================
    def test_clone_reads_through_to_the_parent_snapshot(self) -> None:
        size = 5 * 4096 + 77
        name, image = self.image_with_data("p", size)
        image.create_snap("s")
        child = self.open(self.clone(name, "s", "c"))
        assert child.size() == size
        assert self.read_all(child) == pattern(size)
        assert child.read(4090, 20) == pattern(size)[4090:4110]
        # the parent's head moving on is not seen by the clone
        image.write(pattern(size, 8), 0)
        image.resize(4096)
        assert self.read_all(child) == pattern(size)
        assert child.parent_info() == (self.ioctx.get_pool_name(), name, "s")

    def test_copy_up_keeps_the_rest_of_the_parent_object(self) -> None:
        size = 4 * 4096
        name, image = self.image_with_data("p", size)
        image.create_snap("s")
        child_name = self.clone(name, "s", "c")
        child = self.open(child_name)
        child.write(b"XY", 4096 + 100)
        child.write(b"Z", 3 * 4096 - 1)  # last byte of an object
        expected = bytearray(pattern(size))
        expected[4196:4198] = b"XY"
        expected[3 * 4096 - 1] = ord("Z")
        assert self.read_all(child) == expected
        child.close()
        assert self.read_all(self.open(child_name)) == expected
        assert self.read_all(self.open(name, snapshot="s")) == pattern(size)

    @pytest.mark.parametrize("how", ["discard", "write_zeroes"])
    def test_discard_in_clone_hides_parent_data(self, how: str) -> None:
        size = 6 * 4096
        name, image = self.image_with_data("p", size)
        image.create_snap("s")
        child_name = self.clone(name, "s", "c")
        child = self.open(child_name)
        zero = getattr(child, how)
        zero(4096, 4096)  # one whole object never copied up
        zero(2 * 4096 + 10, 20)  # a piece of an object never copied up
        child.write(b"w", 4 * 4096 + 1)
        zero(4 * 4096, 4096)  # a whole object already copied up
        zero(5 * 4096 - 1, 2)  # across a boundary into an untouched object
        expected = bytearray(pattern(size))
        expected[4096:8192] = bytes(4096)
        expected[2 * 4096 + 10 : 2 * 4096 + 30] = bytes(20)
        expected[4 * 4096 : 5 * 4096 + 1] = bytes(4096 + 1)
        assert self.read_all(child) == expected
        child.close()
        assert self.read_all(self.open(child_name)) == expected
        assert self.read_all(self.open(name, snapshot="s")) == pattern(size)

    def test_discard_in_clone_past_the_overlap(self) -> None:
        size = 2 * 4096 + 100
        name, image = self.image_with_data("p", size)
        image.create_snap("s")
        child = self.open(self.clone(name, "s", "c"))
        child.resize(5 * 4096)
        child.write(b"far", 4 * 4096)
        child.discard(2 * 4096, 3 * 4096)
        expected = pattern(2 * 4096) + bytes(3 * 4096)
        assert self.read_all(child) == expected

    def test_grow_clone(self) -> None:
        size = 3 * 4096 + 10
        name, image = self.image_with_data("p", size)
        image.create_snap("s")
        child_name = self.clone(name, "s", "c")
        child = self.open(child_name)
        child.resize(10 * 4096)
        expected = bytearray(pattern(size) + bytes(10 * 4096 - size))
        assert self.read_all(child) == expected
        child.write(b"abc", 3 * 4096 + 5)  # in the object that straddles the overlap
        expected[3 * 4096 + 5 : 3 * 4096 + 8] = b"abc"
        child.write(b"far", 8 * 4096)
        expected[8 * 4096 : 8 * 4096 + 3] = b"far"
        assert self.read_all(child) == expected

    @pytest.mark.parametrize("cut", [0, 100, 4096, 4096 + 100, 3 * 4096 - 1])
    def test_shrink_then_grow_clone_does_not_re_expose_parent(self, cut: int) -> None:
        size = 4 * 4096
        name, image = self.image_with_data("p", size)
        image.create_snap("s")
        child_name = self.clone(name, "s", "c")
        child = self.open(child_name)
        child.write(b"copied", 3 * 4096 + 1)  # one object copied up, the others not
        child.resize(cut)
        assert self.read_all(child) == pattern(size)[:cut]
        child.resize(size)
        expected = pattern(size)[:cut] + bytes(size - cut)
        assert self.read_all(child) == expected
        child.close()
        assert self.read_all(self.open(child_name)) == expected
        # writing into the re-grown area copies nothing up from the parent
        child = self.open(child_name)
        child.write(b"q", size - 1)
        assert self.read_all(child) == expected[:-1] + b"q"

    def test_clone_of_clone_chain(self) -> None:
        size = 6 * 4096
        base, image = self.image_with_data("p0", size, seed=1)
        image.create_snap("s")
        expected = bytearray(pattern(size, 1))
        parent = base
        images = [(base, "s", bytes(expected))]
        for depth in range(1, 5):
            child = self.clone(parent, "s", f"p{depth}")
            handle = self.open(child)
            assert self.read_all(handle) == expected
            # each level changes a different object, partially, and discards another
            handle.write(pattern(100, depth + 10), depth * 4096 - 50)
            expected[depth * 4096 - 50 : depth * 4096 + 50] = pattern(100, depth + 10)
            handle.discard(((depth + 2) % 6) * 4096 + 1000, 500)
            at = ((depth + 2) % 6) * 4096 + 1000
            expected[at : at + 500] = bytes(500)
            assert self.read_all(handle) == expected
            handle.create_snap("s")
            images.append((child, "s", bytes(expected)))
            parent = child
        for name, snap, data in images:
            assert self.read_all(self.open(name, snapshot=snap)) == data
        # the deepest clone still reads correctly after reopening everything
        assert self.read_all(self.open(parent)) == expected

    def test_clone_with_other_order_than_parent(self) -> None:
        size = 64 * KiB + 123
        for parent_order, child_order in [(14, 12), (12, 16)]:
            label = f"{parent_order}-{child_order}"
            name, image = self.image_with_data("p" + label, size, order=parent_order)
            image.create_snap("s")
            child = self.open(self.clone(name, "s", "c" + label, order=child_order))
            assert child.stat()["order"] == child_order
            assert self.read_all(child) == pattern(size)
            child.write(b"hello", 5000)
            child.discard(20000, 9000)
            expected = bytearray(pattern(size))
            expected[5000:5005] = b"hello"
            expected[20000:29000] = bytes(9000)
            assert self.read_all(child) == expected
            child.flatten()
            assert self.read_all(child) == expected

    def test_clone_errors(self) -> None:
        name, image = self.image_with_data("p", 8 * KiB)
        image.create_snap("s")
        existing = self.create("taken", 4 * KiB)
        with pytest.raises(self.m.ImageExists):
            self.rbd.clone(self.ioctx, name, "s", self.ioctx, existing)
        with pytest.raises(self.m.ImageNotFound):
            self.rbd.clone(self.ioctx, self.name("missing"), "s", self.ioctx, self.name("c"))
        with pytest.raises(self.m.InvalidArgument):
            self.rbd.clone(self.ioctx, name, "s", self.ioctx, "")
        assert self.open(existing).size() == 4 * KiB
        assert self.open(name, snapshot="s").list_children() == []

    def test_parent_info_of_plain_image_raises(self) -> None:
        image = self.open(self.create("a", 4 * KiB))
        with pytest.raises(self.m.ImageNotFound):
            image.parent_info()

    def test_flatten(self) -> None:
        size = 5 * 4096 + 300
        name, image = self.image_with_data("p", size)
        image.create_snap("s")
        image.protect_snap("s")
        child_name = self.clone(name, "s", "c")
        child = self.open(child_name)
        child.write(b"mine", 4096 - 2)
        child.discard(3 * 4096, 4096)
        child.resize(size + 5000)
        expected = bytearray(pattern(size) + bytes(5000))
        expected[4094:4098] = b"mine"
        expected[3 * 4096 : 4 * 4096] = bytes(4096)
        progress: list[tuple[int, int]] = []
        child.flatten(on_progress=lambda done, total: progress.append((done, total)))
        assert self.read_all(child) == expected
        with pytest.raises(self.m.ImageNotFound):
            child.parent_info()
        with pytest.raises(self.m.InvalidArgument):
            child.flatten()
        # the parent snapshot has no children any more and can go for good
        snap = self.open(name, snapshot="s")
        assert snap.list_children() == []
        snap.close()
        image.unprotect_snap("s")
        image.remove_snap("s")
        assert user_snap_names(image) == []
        image.close()
        self.rbd.remove(self.ioctx, name)
        child.close()
        assert self.read_all(self.open(child_name)) == expected

    def test_flatten_middle_of_chain(self) -> None:
        size = 4 * 4096
        base, image = self.image_with_data("a", size)
        image.create_snap("s")
        mid = self.open(self.clone(base, "s", "b"))
        mid.write(b"mid", 4096)
        mid.create_snap("s")
        leaf_name = self.clone(mid.get_name(), "s", "c")
        leaf = self.open(leaf_name)
        leaf.write(b"leaf", 2 * 4096)
        expected = bytearray(pattern(size))
        expected[4096:4099] = b"mid"
        expected[8192:8196] = b"leaf"
        mid.flatten()
        assert self.read_all(leaf) == expected
        mid.remove_snap("s")  # the leaf still uses it
        assert self.read_all(leaf) == expected
        leaf.flatten()
        assert self.read_all(leaf) == expected
        with pytest.raises(self.m.ImageNotFound):
            leaf.parent_info()

    def test_flatten_clone_that_has_snapshots(self) -> None:
        # With deep-flatten (in the default features) librbd detaches the clone
        # completely, snapshots included: the parent snapshot has no children left.
        size = 4 * 4096
        name, image = self.image_with_data("p", size)
        image.create_snap("s")
        image.protect_snap("s")
        child_name = self.clone(name, "s", "c")
        child = self.open(child_name)
        child.write(b"before", 100)
        child.create_snap("cs")
        before = self.read_all(child)
        child.write(b"after", 200)
        child.flatten()
        assert self.read_all(self.open(child_name, snapshot="cs")) == before
        assert self.open(name, snapshot="s").list_children() == []
        image.unprotect_snap("s")
        image.remove_snap("s")
        image.close()
        self.rbd.remove(self.ioctx, name)
        assert self.read_all(self.open(child_name, snapshot="cs")) == before

    def test_flatten_keeps_what_a_shrink_cut_off_hidden(self) -> None:
        # Deep flatten gives the clone's snapshots the parent data they read; the
        # head (and snapshots) whose overlap a shrink cut must not see that data.
        size = 6 * 4096
        name, image = self.image_with_data("p", size)
        image.create_snap("s")
        child_name = self.clone(name, "s", "c")
        child = self.open(child_name)
        child.create_snap("full")
        child.resize(2 * 4096)
        child.resize(3 * 4096)
        child.create_snap("cut")
        expected = pattern(2 * 4096) + bytes(4096)
        child.flatten()
        assert self.read_all(child) == expected
        assert self.read_all(self.open(child_name, snapshot="cut")) == expected
        assert self.read_all(self.open(child_name, snapshot="full")) == pattern(size)
        image.remove_snap("s")
        child.close()
        assert self.read_all(self.open(child_name)) == expected

    def test_flatten_after_rollback_past_a_shrink(self) -> None:
        size = 6 * 4096
        name, image = self.image_with_data("p", size)
        image.create_snap("s")
        child_name = self.clone(name, "s", "c")
        child = self.open(child_name)
        child.create_snap("full")
        child.resize(4096)
        child.resize(2 * 4096)
        child.create_snap("cut")
        child.rollback_to_snap("full")
        child.flatten()
        assert self.read_all(child) == pattern(size)
        assert self.read_all(self.open(child_name, snapshot="cut")) == pattern(4096) + bytes(4096)
        assert self.read_all(self.open(child_name, snapshot="full")) == pattern(size)

    @pytest.mark.parametrize("seed", range(8))
    def test_flatten_after_random_history(self, seed: int) -> None:
        """Random writes, discards, resizes, snapshots and rollbacks of a clone, then a
        (deep) flatten: head and every snapshot read as before, through handles opened
        before and after, also once the parent snapshot is gone."""
        for round_ in range(6):
            rng = random.Random(seed * 1000 + round_)
            label = f"{round_}"
            psize = rng.randrange(1, 8) * 4096 + rng.choice([0, 1, 100, 4095])
            parent_order = rng.choice([12, 13])
            name, image = self.image_with_data("p" + label, psize, order=parent_order)
            image.create_snap("s")
            order = rng.choice([None, 12, 13])
            if order is not None and not self.clone_objects_may_be_smaller:
                order = max(order, parent_order)
            child_name = self.clone(name, "s", "c" + label, order=order)
            child = self.open(child_name)
            model = bytearray(pattern(psize))
            snaps: dict[str, bytes] = {}
            for step in range(rng.randrange(1, 15)):
                op = rng.choice(["write", "discard", "resize", "snap", "snap", "rollback", "rm"])
                size = len(model)
                if op in ("write", "discard") and size:
                    offset = rng.randrange(size)
                    length = min(rng.randrange(1, 9000), size - offset)
                    data = pattern(length, step + 3) if op == "write" else bytes(length)
                    getattr(child, op)(*((data, offset) if op == "write" else (offset, length)))
                    model[offset : offset + length] = data
                elif op == "resize":
                    new_size = rng.randrange(0, 10 * 4096)
                    child.resize(new_size)
                    del model[new_size:]
                    model.extend(bytes(new_size - len(model)))
                elif op == "snap":
                    child.create_snap(f"x{step}")
                    snaps[f"x{step}"] = bytes(model)
                elif op == "rollback" and snaps:
                    snap = rng.choice(sorted(snaps))
                    child.rollback_to_snap(snap)
                    model = bytearray(snaps[snap])
                elif op == "rm" and snaps:
                    snap = rng.choice(sorted(snaps))
                    child.remove_snap(snap)
                    del snaps[snap]
            early = {snap: self.open(child_name, snapshot=snap) for snap in snaps}
            for snap, handle in early.items():
                assert self.read_all(handle) == snaps[snap], (round_, snap)
            if not self.early_handles_survive_deep_flatten:
                for handle in early.values():
                    handle.close()
                early = {}
            child.flatten()
            for snap, data in snaps.items():  # before the parent snapshot goes
                assert self.read_all(self.open(child_name, snapshot=snap)) == data, (round_, snap)
            image.write(pattern(psize, 99), 0)
            image.remove_snap("s")
            assert user_snap_names(image) == []
            assert self.read_all(child) == model, round_
            for snap, data in snaps.items():
                if snap in early:
                    assert self.read_all(early[snap]) == data, (round_, snap, "early handle")
                assert self.read_all(self.open(child_name, snapshot=snap)) == data, (round_, snap)

    def test_open_handles_see_through_a_deep_flatten(self) -> None:
        # A snapshot handle of a clone, and a clone of that snapshot, both opened
        # before the clone is deep-flattened, keep reading the right data after the
        # grandparent snapshot is gone for good.
        size = 2 * 4096
        name, image = self.image_with_data("p", size)
        image.create_snap("s")
        child_name = self.clone(name, "s", "c")
        child = self.open(child_name)
        child.create_snap("cs")
        snap = self.open(child_name, snapshot="cs")
        grandchild = self.open(self.clone(child_name, "cs", "g"))
        assert self.read_all(snap) == pattern(size)
        assert self.read_all(grandchild) == pattern(size)
        child.flatten()
        image.write(pattern(size, 3), 0)
        image.remove_snap("s")
        assert user_snap_names(image) == []
        assert self.read_all(snap) == pattern(size)
        assert self.read_all(grandchild) == pattern(size)

    def test_unprotect_with_children_is_busy(self) -> None:
        name, image = self.image_with_data("p", 8 * KiB)
        image.create_snap("s")
        image.protect_snap("s")
        child = self.clone(name, "s", "c")
        with pytest.raises(self.m.ImageBusy):
            image.unprotect_snap("s")
        with pytest.raises(self.m.ImageBusy):
            image.remove_snap("s")
        assert image.is_protected_snap("s")
        self.rbd.remove(self.ioctx, child)
        image.unprotect_snap("s")
        image.remove_snap("s")

    def test_removed_parent_snapshot_lives_on_for_its_children(self) -> None:
        # clone v2: a snapshot removed while it has clones goes to the trash
        size = 4 * 4096
        name, image = self.image_with_data("p", size)
        image.create_snap("s")
        image.write(pattern(size, 2), 0)
        c1 = self.clone(name, "s", "c1")
        c2 = self.clone(name, "s", "c2", c_ioctx=self.ioctx2)
        image.remove_snap("s")
        assert "s" not in user_snap_names(image)
        with pytest.raises(self.m.ImageNotFound):
            self.open(name, snapshot="s")
        with pytest.raises(self.m.ImageNotFound):
            self.rbd.clone(self.ioctx, name, "s", self.ioctx, self.name("c3"))
        reader = self.open(c1)
        assert self.read_all(reader) == pattern(size)
        assert self.read_all(self.open(c2, ioctx=self.ioctx2, read_only=True)) == pattern(size)
        # the name is free again; the new snapshot is a different one
        image.create_snap("s")
        assert self.read_all(self.open(name, snapshot="s")) == pattern(size, 2)
        image.remove_snap("s")
        # the parent cannot go while a trashed snapshot still has clones
        image.close()
        with pytest.raises((self.m.ImageBusy, self.m.ImageHasSnapshots)):
            self.rbd.remove(self.ioctx, name)
        self.remove_open(c1, reader)
        assert self.read_all(self.open(c2, ioctx=self.ioctx2, read_only=True)) == pattern(size)
        with pytest.raises((self.m.ImageBusy, self.m.ImageHasSnapshots)):
            self.rbd.remove(self.ioctx, name)
        child = self.open(c2, ioctx=self.ioctx2)
        child.flatten()
        assert self.read_all(child) == pattern(size)
        # the last child is flattened: the trashed snapshot is gone for good
        self.rbd.remove(self.ioctx, name)
        assert name not in self.rbd.list(self.ioctx)
        assert self.read_all(child) == pattern(size)

    def test_trashed_parent_snapshot_of_a_chain(self) -> None:
        size = 3 * 4096
        a, image = self.image_with_data("a", size)
        image.create_snap("s")
        b = self.open(self.clone(a, "s", "b"))
        b.write(b"bb", 4096)
        b.create_snap("s")
        c = self.open(self.clone(b.get_name(), "s", "c"))
        expected = bytearray(pattern(size))
        expected[4096:4098] = b"bb"
        image.remove_snap("s")
        b.remove_snap("s")
        assert self.read_all(c) == expected
        b.write(b"changed", 0)
        b.flatten()
        assert self.read_all(c) == expected
        c.write(b"c", 2 * 4096)
        expected[2 * 4096] = ord("c")
        assert self.read_all(c) == expected
        c.flatten()
        b_name, c_name = b.get_name(), c.get_name()
        c.close()
        b.close()
        image.close()
        self.rbd.remove(self.ioctx, b_name)
        self.rbd.remove(self.ioctx, a)
        assert self.read_all(self.open(c_name)) == expected

    def test_cross_pool_clone(self) -> None:
        size = 4 * 4096 + 1
        name, image = self.image_with_data("p", size)
        image.create_snap("s")
        child_name = self.clone(name, "s", "c", c_ioctx=self.ioctx2)
        assert child_name in self.rbd.list(self.ioctx2)
        assert child_name not in self.rbd.list(self.ioctx)
        child = self.open(child_name, ioctx=self.ioctx2)
        assert child.parent_info() == (self.ioctx.get_pool_name(), name, "s")
        assert self.read_all(child) == pattern(size)
        child.write(b"x", 4095)
        child.discard(2 * 4096, 4096)
        expected = bytearray(pattern(size))
        expected[4095] = ord("x")
        expected[8192:12288] = bytes(4096)
        assert self.read_all(child) == expected
        assert self.open(name, snapshot="s").list_children() == [
            (self.ioctx2.get_pool_name(), child_name)
        ]
        # a clone of the cross-pool clone, back in the first pool
        child.create_snap("cs")
        grandchild = self.open(self.clone(child_name, "cs", "g", p_ioctx=self.ioctx2))
        assert self.read_all(grandchild) == expected
        assert grandchild.parent_info() == (self.ioctx2.get_pool_name(), child_name, "cs")
        child.flatten()
        assert self.read_all(child) == expected
        assert self.read_all(grandchild) == expected
        grandchild.flatten()
        assert self.read_all(grandchild) == expected

    def test_list_children(self) -> None:
        name, image = self.image_with_data("p", 8 * KiB)
        image.create_snap("s1")
        image.create_snap("s2")
        c1 = self.clone(name, "s1", "c1")
        c2 = self.clone(name, "s1", "c2", c_ioctx=self.ioctx2)
        c3 = self.clone(name, "s2", "c3")
        pool1, pool2 = self.ioctx.get_pool_name(), self.ioctx2.get_pool_name()
        assert sorted(self.open(name, snapshot="s1").list_children()) == sorted(
            [(pool1, c1), (pool2, c2)]
        )
        assert self.open(name, snapshot="s2").list_children() == [(pool1, c3)]
        # grandchildren are not children
        self.open(c3).create_snap("g")
        self.clone(c3, "g", "g1")
        assert self.open(name, snapshot="s2").list_children() == [(pool1, c3)]
        self.rbd.remove(self.ioctx, c1)
        assert self.open(name, snapshot="s1").list_children() == [(pool2, c2)]

    def test_rollback_clone_restores_parent_data(self) -> None:
        size = 4 * 4096
        name, image = self.image_with_data("p", size)
        image.create_snap("s")
        child_name = self.clone(name, "s", "c")
        child = self.open(child_name)
        child.create_snap("fresh")
        child.write(b"changed", 4096 + 5)
        child.discard(2 * 4096, 2 * 4096)
        child.resize(4096 + 10)
        child.resize(size)
        child.rollback_to_snap("fresh")
        assert self.read_all(child) == pattern(size)
        child.write(b"w", 3 * 4096)
        expected = bytearray(pattern(size))
        expected[3 * 4096] = ord("w")
        assert self.read_all(child) == expected
        assert self.read_all(self.open(child_name, snapshot="fresh")) == pattern(size)

    def test_rollback_flattened_clone_to_snapshot_from_before(self) -> None:
        size = 4 * 4096
        name, image = self.image_with_data("p", size)
        image.create_snap("s")
        child_name = self.clone(name, "s", "c")
        child = self.open(child_name)
        child.write(b"one", 10)
        child.create_snap("cs")
        child.flatten()
        child.write(pattern(size, 9), 0)
        child.rollback_to_snap("cs")
        expected = bytearray(pattern(size))
        expected[10:13] = b"one"
        assert self.read_all(child) == expected
        child.close()
        assert self.read_all(self.open(child_name)) == expected

    def test_clone_snapshot_keeps_parent_data_after_shrink(self) -> None:
        size = 4 * 4096
        name, image = self.image_with_data("p", size)
        image.create_snap("s")
        child_name = self.clone(name, "s", "c")
        child = self.open(child_name)
        child.create_snap("full")
        child.resize(4096)
        child.create_snap("small")
        child.resize(size)
        assert self.read_all(self.open(child_name, snapshot="full")) == pattern(size)
        assert self.read_all(self.open(child_name, snapshot="small")) == pattern(4096)
        assert self.read_all(child) == pattern(4096) + bytes(3 * 4096)
        child.rollback_to_snap("full")
        assert self.read_all(child) == pattern(size)
        child.rollback_to_snap("small")
        assert self.read_all(child) == pattern(4096)

    def test_trash_move(self) -> None:
        size = 2 * 4096
        name, image = self.image_with_data("p", size)
        image.create_snap("s")
        child = self.clone(name, "s", "c")
        image.close()
        self.rbd.trash_move(self.ioctx, name)
        assert name not in self.rbd.list(self.ioctx)
        assert name in [entry["name"] for entry in self.rbd.trash_list(self.ioctx)]
        with pytest.raises(self.m.ImageNotFound):
            self.open(name)
        assert self.read_all(self.open(child)) == pattern(size)
        # the name is free for a new image
        self.rbd.create(self.ioctx, name, 4096, order=12)
        assert self.read_all(self.open(name)) == bytes(4096)
        assert self.read_all(self.open(child)) == pattern(size)

    def test_trash_move_of_an_image_open_by_a_writer_is_busy(self) -> None:
        name = self.create("a", 4096)
        writer = self.open(name)
        writer.lock_acquire(self.m.RBD_LOCK_MODE_EXCLUSIVE)
        writer.write(b"x", 0)
        with pytest.raises(self.m.ImageBusy):
            self.rbd.trash_move(self.ioctx, name)
        assert name in self.rbd.list(self.ioctx)

    # ==================================================================================
    # diff_iterate
    # ==================================================================================
    def test_diff_iterate_reports_allocated_data(self) -> None:
        size = 16 * 4096
        image = self.open(self.create("a", size, order=12))
        writes = [(100, 50), (4096 * 3 - 10, 20), (9 * 4096, 4096), (size - 1, 1)]
        for offset, length in writes:
            image.write(pattern(length), offset)
        extents = diff_extents(image, 0, size)
        for offset, length, exists in extents:
            assert exists
            assert offset >= 0 and offset + length <= size
        data_runs = [(o, n) for o, n, _ in extents]
        for offset, length in writes:
            assert covers(data_runs, offset, offset + length)
        # objects never written are never reported
        touched = {o // 4096 for o, n in writes} | {(o + n - 1) // 4096 for o, n in writes}
        for offset, length, _ in extents:
            for objno in range(offset // 4096, (offset + length - 1) // 4096 + 1):
                assert objno in touched
        # a sub-range only reports within the sub-range
        for offset, length, _ in diff_extents(image, 4096 * 3 - 5, 6 * 4096):
            assert offset >= 4096 * 3 - 5 and offset + length <= 9 * 4096 - 5

    def test_diff_iterate_empty_image(self) -> None:
        image = self.open(self.create("a", 64 * KiB))
        assert diff_extents(image, 0, 64 * KiB) == []
        assert diff_extents(image, 0, 64 * KiB, whole_object=True) == []

    def test_diff_iterate_since_snapshot(self) -> None:
        size = 16 * 4096
        name = self.create("a", size)
        image = self.open(name)
        image.write(pattern(size), 0)
        image.create_snap("s")
        image.write(b"new", 5 * 4096 + 7)
        image.discard(8 * 4096, 2 * 4096)  # whole objects
        image.discard(12 * 4096 + 100, 100)  # a hole
        extents = diff_extents(image, 0, size, "s")
        assert extents, "changes since the snapshot must be reported"
        changed = [(o, n) for o, n, e in extents if e]
        gone = [(o, n) for o, n, e in extents if not e]
        assert covers(changed, 5 * 4096 + 7, 5 * 4096 + 10)
        assert covers(gone, 8 * 4096, 10 * 4096)
        assert covers([(o, n) for o, n, _ in extents], 12 * 4096 + 100, 12 * 4096 + 200)
        # untouched objects are not reported
        for offset, length, _ in extents:
            for objno in range(offset // 4096, (offset + length - 1) // 4096 + 1):
                assert objno in {5, 8, 9, 12}
        # nothing changed since a snapshot of the current state
        image.create_snap("t")
        assert diff_extents(image, 0, size, "t") == []
        # from a snapshot handle, relative to an older snapshot
        snap = self.open(name, snapshot="t")
        assert {o // 4096 for o, _, _ in diff_extents(snap, 0, size, "s")} <= {5, 8, 9, 12}
        assert diff_extents(self.open(name, snapshot="s"), 0, size, "s") == []

    def test_diff_iterate_whole_object(self) -> None:
        size = 8 * 4096
        name = self.create("a", size)
        image = self.open(name)
        image.write(b"a", 10)
        image.write(b"b", 3 * 4096 + 4000)
        image.create_snap("s")
        image.write(b"c", 5 * 4096 + 1)
        image.discard(3 * 4096, 4096)
        extents = diff_extents(image, 0, size, None, whole_object=True)
        objects = {o // 4096 for o, _, e in extents if e}
        assert objects == {0, 5}
        for offset, length, _ in extents:
            assert offset % 4096 == 0 and length == 4096
        extents = diff_extents(image, 0, size, "s", whole_object=True)
        assert {(o // 4096, e) for o, _, e in extents} == {(5, True), (3, False)}

    def test_diff_iterate_clone_include_parent(self) -> None:
        size = 8 * 4096
        name = self.create("p", size)
        parent = self.open(name)
        parent.write(b"parent", 2 * 4096)
        parent.create_snap("s")
        child = self.open(self.clone(name, "s", "c"))
        child.write(b"child", 6 * 4096)
        with_parent = diff_extents(child, 0, size)
        runs = [(o, n) for o, n, e in with_parent if e]
        assert covers(runs, 2 * 4096, 2 * 4096 + 6)
        assert covers(runs, 6 * 4096, 6 * 4096 + 5)
        without = diff_extents(child, 0, size, include_parent=False)
        assert covers([(o, n) for o, n, e in without if e], 6 * 4096, 6 * 4096 + 5)
        assert all(o // 4096 == 6 for o, _, _ in without)

    def test_diff_iterate_clone_discard_since_snapshot(self) -> None:
        size = 4 * 4096
        name, image = self.image_with_data("p", size)
        image.create_snap("s")
        child = self.open(self.clone(name, "s", "c"))
        child.create_snap("cs")
        child.discard(4096, 4096)  # hides parent data
        extents = diff_extents(child, 0, size, "cs")
        assert covers([(o, n) for o, n, _ in extents], 4096, 2 * 4096)
        assert all(o // 4096 == 1 for o, _, _ in extents)

    def test_diff_iterate_clone_shrink_and_grow_since_snapshot(self) -> None:
        # the shrink hid the parent's data past the new end: that is a change
        size = 4 * 4096
        name, image = self.image_with_data("p", size)
        image.create_snap("s")
        child = self.open(self.clone(name, "s", "c"))
        child.create_snap("cs")
        child.resize(4096)
        child.resize(size)
        assert self.read_all(child) == pattern(4096) + bytes(3 * 4096)
        extents = diff_extents(child, 0, size, "cs")
        assert covers([(o, n) for o, n, _ in extents], 4096, size)

    def test_diff_iterate_after_rollback(self) -> None:
        size = 6 * 4096
        name = self.create("a", size)
        image = self.open(name)
        image.write(pattern(4096), 0)
        image.create_snap("one")
        image.write(pattern(4096, 2), 2 * 4096)
        image.create_snap("two")
        image.rollback_to_snap("one")
        extents = diff_extents(image, 0, size, "two")
        assert covers([(o, n) for o, n, e in extents if not e], 2 * 4096, 3 * 4096)
        assert diff_extents(image, 0, size, "one") == []

    # ==================================================================================
    # metadata
    # ==================================================================================
    def test_metadata(self) -> None:
        name = self.create("a", 4 * KiB)
        image = self.open(name)
        assert list(image.metadata_list()) == []
        with pytest.raises(KeyError):
            image.metadata_get("missing")
        with pytest.raises(KeyError):
            image.metadata_remove("missing")
        image.metadata_set("b", "2")
        image.metadata_set("a", "1")
        image.metadata_set("b", "two")
        image.metadata_set("unicode", "\u00e9t\u00e9")
        assert image.metadata_get("a") == "1"
        assert image.metadata_get("b") == "two"
        assert dict(image.metadata_list()) == {"a": "1", "b": "two", "unicode": "\u00e9t\u00e9"}
        image.metadata_remove("a")
        with pytest.raises(KeyError):
            image.metadata_get("a")
        image.close()
        other = self.open(name, read_only=True)
        assert dict(other.metadata_list()) == {"b": "two", "unicode": "\u00e9t\u00e9"}
        # metadata belongs to its image
        assert list(self.open(self.create("b", 4 * KiB)).metadata_list()) == []

    def test_metadata_follows_rename_and_goes_with_the_image(self) -> None:
        name = self.create("a", 4 * KiB)
        image = self.open(name)
        image.metadata_set("k", "v")
        image.close()
        renamed = self.name("b")
        self.rbd.rename(self.ioctx, name, renamed)
        handle = self.open(renamed)
        assert handle.metadata_get("k") == "v"
        self.remove_open(renamed, handle)
        self.rbd.create(self.ioctx, renamed, 4 * KiB, order=12)
        assert list(self.open(renamed).metadata_list()) == []

    # ==================================================================================
    # the exclusive write lock
    # ==================================================================================
    def test_second_writer_is_busy(self) -> None:
        name = self.create("a", 16 * KiB)
        first = self.open(name)
        first.lock_acquire(self.m.RBD_LOCK_MODE_EXCLUSIVE)
        first.write(b"first", 0)
        second = self.open(name)
        with pytest.raises(self.m.ImageBusy):
            second.write(b"second", 0)
        with pytest.raises(self.m.ImageBusy):
            second.discard(0, 4096)
        with pytest.raises(self.m.ImageBusy):
            second.lock_acquire(self.m.RBD_LOCK_MODE_EXCLUSIVE)
        first.flush()
        assert second.read(0, 5) == b"first"
        assert first.is_exclusive_lock_owner()
        assert not second.is_exclusive_lock_owner()
        first.close()
        second.write(b"second", 0)
        assert second.read(0, 6) == b"second"

    def test_readers_and_snapshots_work_while_a_writer_holds_the_lock(self) -> None:
        name = self.create("a", 16 * KiB)
        writer = self.open(name)
        writer.lock_acquire(self.m.RBD_LOCK_MODE_EXCLUSIVE)
        writer.write(pattern(16 * KiB, 1), 0)
        writer.flush()
        reader = self.open(name, read_only=True)
        assert self.read_all(reader) == pattern(16 * KiB, 1)
        other = self.open(name)
        other.create_snap("s")
        assert user_snap_names(writer) == ["s"]
        # the writer's next writes must not leak into the snapshot it did not take
        writer.write(pattern(16 * KiB, 2), 0)
        writer.discard(4096, 4096)
        writer.flush()
        expected = bytearray(pattern(16 * KiB, 2))
        expected[4096:8192] = bytes(4096)
        assert self.read_all(self.open(name, snapshot="s")) == pattern(16 * KiB, 1)
        assert self.read_all(reader) == expected
        assert self.read_all(writer) == expected
        other.remove_snap("s")
        writer.write(b"still", 0)
        assert writer.read(0, 5) == b"still"

    def test_remove_image_open_by_a_writer_is_busy(self) -> None:
        name = self.create("a", 16 * KiB)
        writer = self.open(name)
        writer.lock_acquire(self.m.RBD_LOCK_MODE_EXCLUSIVE)
        writer.write(b"x", 0)
        with pytest.raises(self.m.ImageBusy):
            self.rbd.remove(self.ioctx, name)
        assert writer.read(0, 1) == b"x"
        writer.close()
        self.rbd.remove(self.ioctx, name)
