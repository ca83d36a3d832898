"""The engine conformance suite, unchanged, on librbd against a real (throwaway) cluster.

``TestCephConformance`` runs every test of :class:`EngineConformance`. Where
librbd legitimately behaves otherwise, either a switch of the suite says so
(``removable_while_open`` and the like, set on the class below: the shared
test then expects librbd's answer), or the test of the same name is
overridden here with one that asserts librbd's behaviour, and the difference
is listed in :data:`LIBRBD_DIFFERENCES` (a test below checks that every
entry names an overridden conformance test, so none is dropped silently).
The Ceph engine smooths over the differences the driver depends on (see
:mod:`csi_rbd.engine.ceph.client`); these are the ones it leaves alone:
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.engine.conformance import EngineConformance, EngineUnderTest, pattern, user_snap_names

KiB = 1024

LIBRBD_DIFFERENCES = {
    "test_rename_parent_keeps_clones_reading": (
        "an open clone caches its parent's name: parent_info() shows the old name until "
        "the clone is reopened (reads are unaffected)"
    ),
    "test_clone_of_zero_size_snapshot": "librbd refuses to clone a snapshot of size 0 (EINVAL)",
    "test_resize_seen_by_other_handles": (
        "a read-only handle registers no watch, so it keeps the size it opened with; "
        "read-write handles and new handles see a resize"
    ),
    "test_clone_with_other_order_than_parent": (
        "librbd cannot clone into smaller objects than the parent's (EINVAL); larger is fine"
    ),
    "test_open_handles_see_through_a_deep_flatten": (
        "a snapshot handle opened before a deep flatten, and a clone of that snapshot "
        "opened before it, keep the snapshot's old object map and parent link: once the "
        "old parent snapshot is removed they may read wrong data (zeros) until reopened; "
        "handles opened after the flatten read the right data"
    ),
    "test_unprotect_with_children_is_busy": (
        "clone v2 children do not need their parent snapshot protected: unprotect succeeds "
        "with children, and removing the snapshot moves it to the trash namespace"
    ),
}


@pytest.fixture(scope="module")
def ceph_under_test(ceph_rados: Any) -> Iterator[EngineUnderTest]:
    import csi_rbd.engine.ceph as ceph

    ioctx = ceph_rados.open_ioctx("rbd")
    second = ceph_rados.open_ioctx("second")
    try:
        yield EngineUnderTest(rados=ceph_rados, ioctx=ioctx, second_ioctx=second, module=ceph)
    finally:
        ioctx.close()
        second.close()


class TestCephConformance(EngineConformance):
    # librbd refuses smaller objects than the parent's (test_clone_with_other_order_than_parent)
    clone_objects_may_be_smaller = False
    # (test_open_handles_see_through_a_deep_flatten)
    early_handles_survive_deep_flatten = False
    # an open read-write handle is a watcher: librbd's remove says ImageBusy
    removable_while_open = False

    @pytest.fixture
    def engine(self, ceph_under_test: EngineUnderTest) -> EngineUnderTest:
        return ceph_under_test

    # -- librbd's behaviour where it differs (see LIBRBD_DIFFERENCES) -----------------
    def test_rename_parent_keeps_clones_reading(self) -> None:
        name, image = self.image_with_data("p", 8 * KiB)
        image.create_snap("s")
        image.close()
        child = self.open(self.clone(name, "s", "c"))
        renamed = self.name("renamed")
        self.rbd.rename(self.ioctx, name, renamed)
        pool = self.ioctx.get_pool_name()
        assert child.parent_info() == (pool, name, "s")  # cached by the open handle
        assert self.open(child.get_name()).parent_info() == (pool, renamed, "s")
        assert self.read_all(child) == pattern(8 * KiB)
        child.write(b"x", 4096)
        expected = pattern(8 * KiB)[4095:4096] + b"x" + pattern(8 * KiB)[4097:4098]
        assert child.read(4095, 3) == expected

    def test_clone_of_zero_size_snapshot(self) -> None:
        name = self.create("a", 0)
        self.open(name).create_snap("s")
        with pytest.raises(self.m.InvalidArgument):
            self.clone(name, "s", "c")
        assert self.name("c") not in self.rbd.list(self.ioctx)

    def test_resize_seen_by_other_handles(self) -> None:
        name, image = self.image_with_data("a", 16 * KiB)
        image.flush()
        reader = self.open(name, read_only=True)
        writer = self.open(name)
        image.resize(6 * KiB)
        assert writer.size() == 6 * KiB
        assert self.read_all(writer) == pattern(6 * KiB)
        assert reader.size() == 16 * KiB  # no watch: never told
        assert self.open(name, read_only=True).size() == 6 * KiB
        image.resize(16 * KiB)
        assert self.read_all(writer) == pattern(6 * KiB) + bytes(10 * KiB)
        assert self.read_all(self.open(name, read_only=True)) == pattern(6 * KiB) + bytes(10 * KiB)

    def test_clone_with_other_order_than_parent(self) -> None:
        size = 64 * KiB + 123
        name, image = self.image_with_data("p", size, order=14)
        image.create_snap("s")
        with pytest.raises(self.m.InvalidArgument, match="smaller objects"):
            self.clone(name, "s", "c12", order=12)
        child = self.open(self.clone(name, "s", "c16", order=16))
        assert child.stat()["order"] == 16
        assert self.read_all(child) == pattern(size)
        child.write(b"hello", 5000)
        child.discard(20000, 9000)
        expected = bytearray(pattern(size))
        expected[5000:5005] = b"hello"
        expected[20000:29000] = bytes(9000)
        assert self.read_all(child) == expected
        child.flatten()
        assert self.read_all(child) == expected

    def test_open_handles_see_through_a_deep_flatten(self) -> None:
        size = 2 * 4096
        name, image = self.image_with_data("p", size)
        image.create_snap("s")
        child_name = self.clone(name, "s", "c")
        child = self.open(child_name)
        child.create_snap("cs")
        early = self.open(child_name, snapshot="cs")
        grandchild = self.open(self.clone(child_name, "cs", "g"))
        assert self.read_all(early) == pattern(size)
        child.flatten()
        assert self.read_all(early) == pattern(size)  # the parent snapshot is still there
        assert self.read_all(grandchild) == pattern(size)
        image.write(pattern(size, 3), 0)
        image.remove_snap("s")
        assert user_snap_names(image) == []
        # early and grandchild: undefined (they read through stale handles of the
        # flattened snapshot, whose old parent is gone); new handles are right
        assert self.read_all(self.open(child_name, snapshot="cs")) == pattern(size)
        grandchild_name = grandchild.get_name()
        grandchild.close()
        assert self.read_all(self.open(grandchild_name)) == pattern(size)

    def test_unprotect_with_children_is_busy(self) -> None:
        name, image = self.image_with_data("p", 8 * KiB)
        image.create_snap("s")
        image.protect_snap("s")
        child = self.open(self.clone(name, "s", "c"))
        with pytest.raises(self.m.ImageBusy):
            image.remove_snap("s")  # protected
        image.unprotect_snap("s")  # clone v2: allowed with children
        assert not image.is_protected_snap("s")
        image.remove_snap("s")  # to the trash namespace: the child keeps reading
        assert user_snap_names(image) == []
        assert self.read_all(child) == pattern(8 * KiB)


def test_every_difference_overrides_a_conformance_test() -> None:
    for test in LIBRBD_DIFFERENCES:
        assert callable(getattr(EngineConformance, test, None)), test
        assert test in TestCephConformance.__dict__, test
    overridden = {
        name
        for name in TestCephConformance.__dict__
        if name.startswith("test_") and hasattr(EngineConformance, name)
    }
    assert overridden == set(LIBRBD_DIFFERENCES)
