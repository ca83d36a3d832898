"""The conformance suite on the native engine, plus checks only it can make.

``TestNativeConformance`` runs :class:`EngineConformance` unchanged. The tests
after it look at what is specific to the native engine: its files, catalog,
cross-process locks and crash safety.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import csi_rbd.engine.native as native
from csi_rbd.engine.native.image import Image as NativeImage
from tests.engine.conformance import EngineConformance, EngineUnderTest, pattern
from tests.threads import run_in_threads

KiB = 1024


def _connect(data_dir: Path) -> Any:
    cluster = native.Rados(data_dir=data_dir, lock_timeout=5.0)
    cluster.connect()
    return cluster


@pytest.fixture
def native_engine(tmp_path: Path) -> Iterator[EngineUnderTest]:
    cluster = _connect(tmp_path / "data")
    cluster.create_pool("second")
    try:
        yield EngineUnderTest(
            rados=cluster,
            ioctx=cluster.open_ioctx(native.DEFAULT_POOL),
            second_ioctx=cluster.open_ioctx("second"),
            module=native,
        )
    finally:
        cluster.shutdown()


class TestNativeConformance(EngineConformance):
    @pytest.fixture
    def engine(self, native_engine: EngineUnderTest) -> EngineUnderTest:
        return native_engine


# -- helpers for the native-only tests -------------------------------------------------
@pytest.fixture
def cluster(native_engine: EngineUnderTest) -> Any:
    return native_engine.rados


@pytest.fixture
def ioctx(native_engine: EngineUnderTest) -> Any:
    return native_engine.ioctx


def versions(ioctx: Any, name: str) -> list[str]:
    """The object-version files of an image, sorted."""
    record = ioctx.catalog.image_by_name(name)
    directory = ioctx.image_directory(record.id)
    if not directory.exists():
        return []
    return sorted(n for n in os.listdir(directory) if n != "header")


def image_directory(ioctx: Any, name: str) -> Path:
    return Path(ioctx.image_directory(ioctx.catalog.image_by_name(name).id))


def make_image(ioctx: Any, name: str, size: int, order: int = 12, seed: int = 1) -> None:
    native.RBD().create(ioctx, name, size, order=order)
    with native.Image(ioctx, name) as image:
        image.write(pattern(size, seed), 0)


# -- argument checking -----------------------------------------------------------------
def test_write_straddling_the_end_is_refused_whole(ioctx: Any) -> None:
    make_image(ioctx, "a", 8 * KiB)
    with native.Image(ioctx, "a") as image:
        with pytest.raises(native.InvalidArgument):
            image.write(b"0123456789", 8 * KiB - 5)
        assert image.read(0, 8 * KiB) == pattern(8 * KiB)


@pytest.mark.parametrize("bad", [11, 26, "12", 12.0, True])
def test_orders_out_of_range_are_invalid_argument(ioctx: Any, bad: object) -> None:
    with pytest.raises(native.InvalidArgument):
        native.RBD().create(ioctx, "a", 4 * KiB, order=bad)  # type: ignore[arg-type]
    assert native.RBD().list(ioctx) == []


@pytest.mark.parametrize("bad", [1.5, "4096", None, True, 1 << 63])
def test_sizes_that_are_not_integers_in_range(ioctx: Any, bad: object) -> None:
    with pytest.raises(native.InvalidArgument):
        native.RBD().create(ioctx, "a", bad, order=12)  # type: ignore[arg-type]


def test_long_names(ioctx: Any) -> None:
    native.RBD().create(ioctx, "n" * 250, 4 * KiB, order=12)
    with pytest.raises(native.InvalidArgument):
        native.RBD().create(ioctx, "n" * 251, 4 * KiB, order=12)
    with pytest.raises(native.InvalidArgument):
        native.RBD().create(ioctx, "..", 4 * KiB, order=12)


def test_features(ioctx: Any) -> None:
    rbd = native.RBD()
    with pytest.raises(native.InvalidArgument):
        rbd.create(ioctx, "journaled", 4 * KiB, order=12, features=64)  # journaling
    with pytest.raises(native.InvalidArgument):
        rbd.create(ioctx, "old", 4 * KiB, order=12, old_format=True)
    rbd.create(ioctx, "flat", 4 * KiB, order=12, features=native.RBD_FEATURE_EXCLUSIVE_LOCK)
    with native.Image(ioctx, "flat") as image:
        assert image.features() == native.RBD_FEATURE_EXCLUSIVE_LOCK
        image.create_snap("s")
    with pytest.raises(native.InvalidArgument):
        rbd.clone(ioctx, "flat", "s", ioctx, "child")
    assert "child" not in rbd.list(ioctx)


def test_shared_lock_mode_is_refused(ioctx: Any) -> None:
    make_image(ioctx, "a", 4 * KiB)
    with native.Image(ioctx, "a") as image, pytest.raises(native.InvalidArgument):
        image.lock_acquire(native.RBD_LOCK_MODE_SHARED)


def test_pools(cluster: Any) -> None:
    assert cluster.list_pools() == ["rbd", "second"]
    with pytest.raises(native.ObjectExists):
        cluster.create_pool("second")
    with pytest.raises(native.ObjectNotFound):
        cluster.open_ioctx("missing")
    cluster.create_pool("third")
    ioctx = cluster.open_ioctx("third")
    native.RBD().create(ioctx, "a", 4 * KiB, order=12)
    cluster.delete_pool("third")
    assert not cluster.pool_exists("third")
    with pytest.raises(native.ObjectNotFound):
        cluster.delete_pool("third")


# -- persistence and the files on disk -------------------------------------------------
def test_everything_survives_reconnecting(tmp_path: Path) -> None:
    first = _connect(tmp_path)
    first.create_pool("other")
    ioctx = first.open_ioctx("rbd")
    make_image(ioctx, "p", 5 * 4096 + 3)
    with native.Image(ioctx, "p") as image:
        image.create_snap("s")
        image.metadata_set("k", "v")
        image.write(b"head", 0)
    native.RBD().clone(ioctx, "p", "s", first.open_ioctx("other"), "c")
    first.shutdown()

    second = _connect(tmp_path)
    try:
        ioctx = second.open_ioctx("rbd")
        with native.Image(ioctx, "p") as image:
            assert image.read(0, 4) == b"head"
            assert image.metadata_get("k") == "v"
            assert [s["name"] for s in image.list_snaps()] == ["s"]
        with native.Image(ioctx, "p", snapshot="s") as snap:
            assert snap.read(0, 5 * 4096 + 3) == pattern(5 * 4096 + 3)
        with native.Image(second.open_ioctx("other"), "c") as child:
            assert child.read(0, 5 * 4096 + 3) == pattern(5 * 4096 + 3)
            assert child.parent_info() == ("rbd", "p", "s")
    finally:
        second.shutdown()


def test_overwritten_versions_are_collected(ioctx: Any) -> None:
    make_image(ioctx, "a", 4 * 4096)
    with native.Image(ioctx, "a") as image:
        image.create_snap("s")
        image.write(pattern(4 * 4096, 2), 0)
        assert len(versions(ioctx, "a")) == 8  # the snapshot's and head's
        image.remove_snap("s")
        assert len(versions(ioctx, "a")) == 4
        image.discard(0, 2 * 4096)
        assert len(versions(ioctx, "a")) == 2
        image.create_snap("t")
        image.discard(2 * 4096, 2 * 4096)  # markers hide the snapshot's objects
        image.remove_snap("t")
        assert versions(ioctx, "a") == []
        assert image.read(0, 4 * 4096) == bytes(4 * 4096)


def test_rollback_and_shrink_leave_no_garbage(ioctx: Any) -> None:
    make_image(ioctx, "a", 6 * 4096)
    with native.Image(ioctx, "a") as image:
        image.create_snap("s")
        image.write(pattern(6 * 4096, 2), 0)
        image.rollback_to_snap("s")
        image.resize(4096 + 10)
        image.remove_snap("s")
        assert image.read(0, 4096 + 10) == pattern(4096 + 10)
        assert len(versions(ioctx, "a")) == 2


def test_removing_an_image_removes_its_directory(ioctx: Any) -> None:
    make_image(ioctx, "a", 4 * 4096)
    directory = image_directory(ioctx, "a")
    assert directory.exists()
    native.RBD().remove(ioctx, "a")
    assert not directory.exists()


def test_trashed_snapshot_is_purged_with_its_last_child(ioctx: Any) -> None:
    rbd = native.RBD()
    make_image(ioctx, "p", 4 * 4096)
    with native.Image(ioctx, "p") as image:
        image.create_snap("s")
        image.write(pattern(4 * 4096, 2), 0)
        rbd.clone(ioctx, "p", "s", ioctx, "c")
        image.remove_snap("s")
        parent_id = image.id()
        trashed = ioctx.catalog.snapshots(parent_id, include_trashed=True)
        assert [(s.name, s.trashed) for s in trashed] == [("s", True)]
        assert len(versions(ioctx, "p")) == 8
        rbd.remove(ioctx, "c")
        assert ioctx.catalog.snapshots(parent_id, include_trashed=True) == []
        assert ioctx.catalog.children(parent_id) == []
        assert len(versions(ioctx, "p")) == 4


def test_versions_of_a_purged_snapshot_are_collected(ioctx: Any) -> None:
    # The handle that removed the snapshot (trashed: a clone used it) still
    # counts it when it retires an old version after the clone went.
    rbd = native.RBD()
    rbd.create(ioctx, "p", 4096, order=12)
    with native.Image(ioctx, "p") as image:
        image.write(b"old", 0)  # this handle holds the write lock from now on
        image.create_snap("s")
        rbd.clone(ioctx, "p", "s", ioctx, "c")
        image.remove_snap("s")  # trashed: c still uses it
        rbd.remove(ioctx, "c")  # purges the trashed snapshot
        image.write(b"new", 0)  # copy-up; the old version is read by nothing now
        assert len(versions(ioctx, "p")) == 1, versions(ioctx, "p")


def test_discarding_a_whole_object_leaves_no_useless_marker(ioctx: Any) -> None:
    # The snapshot that needed the old version is gone: an absent marker with
    # nothing below it is garbage (gc removes exactly those).
    make_image(ioctx, "a", 4096)
    with native.Image(ioctx, "a") as image:
        image.create_snap("s")
        image.remove_snap("s")
        image.discard(0, 4096)
        assert versions(ioctx, "a") == []


def test_trashed_image_goes_with_its_last_clone(ioctx: Any) -> None:
    # RBD.trash_move: "it is removed once its last clone goes"
    rbd = native.RBD()
    make_image(ioctx, "p", 4096)
    with native.Image(ioctx, "p") as image:
        image.create_snap("s")
        parent_id = image.id()
    rbd.clone(ioctx, "p", "s", ioctx, "c")
    rbd.trash_move(ioctx, "p")
    assert [e["id"] for e in rbd.trash_list(ioctx)] == [parent_id]
    with pytest.raises(native.ImageBusy):
        rbd.trash_remove(ioctx, parent_id)
    rbd.remove(ioctx, "c")
    assert rbd.trash_list(ioctx) == []
    assert parent_id not in ioctx.catalog.image_ids()


def test_trashed_image_with_trashed_snapshot_goes_with_its_last_clone(ioctx: Any) -> None:
    rbd = native.RBD()
    make_image(ioctx, "p", 4096)
    with native.Image(ioctx, "p") as image:
        image.create_snap("s")
    rbd.clone(ioctx, "p", "s", ioctx, "c")
    with native.Image(ioctx, "p") as image:
        image.remove_snap("s")
    rbd.trash_move(ioctx, "p")
    with native.Image(ioctx, "c") as child:
        assert child.read(0, 4096) == pattern(4096)
        child.flatten()
    assert rbd.trash_list(ioctx) == []


def test_trash_move_without_clones_removes_at_once(ioctx: Any) -> None:
    rbd = native.RBD()
    make_image(ioctx, "p", 4096)
    directory = image_directory(ioctx, "p")
    rbd.trash_move(ioctx, "p")
    assert rbd.trash_list(ioctx) == []
    assert not directory.exists()


def test_list_children_at_head_lists_every_snapshot(ioctx: Any) -> None:
    rbd = native.RBD()
    make_image(ioctx, "p", 4096)
    with native.Image(ioctx, "p") as image:
        image.create_snap("s1")
        image.create_snap("s2")
        rbd.clone(ioctx, "p", "s1", ioctx, "c1")
        rbd.clone(ioctx, "p", "s2", ioctx, "c2")
        assert image.list_children() == [("rbd", "c1"), ("rbd", "c2")]


def test_removing_a_parent_with_trashed_snapshots_in_use_is_busy(ioctx: Any) -> None:
    rbd = native.RBD()
    make_image(ioctx, "p", 4096)
    with native.Image(ioctx, "p") as image:
        image.create_snap("s")
        rbd.clone(ioctx, "p", "s", ioctx, "c")
        image.remove_snap("s")
    with pytest.raises(native.ImageBusy):
        rbd.remove(ioctx, "p")


# -- locks across processes ------------------------------------------------------------
def test_two_connections_behave_like_two_processes(tmp_path: Path) -> None:
    one, two = _connect(tmp_path), _connect(tmp_path)
    try:
        io1, io2 = one.open_ioctx("rbd"), two.open_ioctx("rbd")
        native.RBD().create(io1, "a", 4 * 4096, order=12)
        with native.Image(io1, "a") as writer, native.Image(io2, "a") as other:
            writer.write(pattern(4 * 4096, 1), 0)
            writer.flush()
            with pytest.raises(native.ImageBusy):
                other.write(b"x", 0)
            assert other.read(0, 4 * 4096) == pattern(4 * 4096, 1)
            other.create_snap("s")  # a snapshot taken by the other "process"
            writer.write(pattern(4 * 4096, 2), 0)
            writer.flush()
            assert other.read(0, 4 * 4096) == pattern(4 * 4096, 2)
            other.resize(2 * 4096)
            assert writer.size() == 2 * 4096
            writer.write(b"w", 2 * 4096 - 1)
            with pytest.raises(native.InvalidArgument):
                writer.write(b"w", 2 * 4096)
        with native.Image(io2, "a", snapshot="s") as snap:
            assert snap.read(0, 4 * 4096) == pattern(4 * 4096, 1)
    finally:
        one.shutdown()
        two.shutdown()


_HOLDER = """
import sys, time
import csi_rbd.engine.native as native
cluster = native.Rados(data_dir=sys.argv[1])
cluster.connect()
image = native.Image(cluster.open_ioctx("rbd"), "a")
image.write(b"child", 0)
image.flush()
print("ready", flush=True)
time.sleep(60)
"""


def test_a_killed_writer_releases_the_lock(tmp_path: Path, cluster: Any, ioctx: Any) -> None:
    native.RBD().create(ioctx, "a", 4 * 4096, order=12)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_HOLDER), str(cluster.data_dir)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        with native.Image(ioctx, "a") as image:
            assert image.read(0, 5) == b"child"
            with pytest.raises(native.ImageBusy):
                image.write(b"parent", 0)
            with pytest.raises(native.ImageBusy):
                native.RBD().remove(ioctx, "a")
            holder.kill()
            holder.wait(10)
            image.write(b"parent", 0)
            assert image.read(0, 6) == b"parent"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()


# -- crash safety (simulated by failing in the middle of an operation) -----------------
class _Crash(Exception):
    pass


@pytest.mark.parametrize("operation", ["shrink", "rollback"])
def test_interrupted_multi_object_operation_is_abandoned(
    ioctx: Any, monkeypatch: pytest.MonkeyPatch, operation: str
) -> None:
    size = 6 * 4096
    make_image(ioctx, "a", size)
    with native.Image(ioctx, "a") as image:
        image.create_snap("s")
        image.write(pattern(size, 2), 0)
        before = sorted(versions(ioctx, "a"))

    def crash(*args: object, **kwargs: object) -> None:
        raise _Crash

    monkeypatch.setattr(NativeImage, "_commit_pending", crash)
    with native.Image(ioctx, "a") as image, pytest.raises(_Crash):
        if operation == "shrink":
            image.resize(4096 + 1)
        else:
            image.rollback_to_snap("s")
    monkeypatch.undo()
    with native.Image(ioctx, "a") as image:
        assert image.size() == size
        assert image.read(0, size) == pattern(size, 2)
        image.create_snap("t")  # the next operation cleans up after the dead one
        assert ioctx.catalog.image_by_name("a").pending_seq is None
        assert image.read(0, size) == pattern(size, 2)
        with native.Image(ioctx, "a", snapshot="s") as snap:
            assert snap.read(0, size) == pattern(size)
    assert sorted(versions(ioctx, "a")) == before


def test_stale_temp_files_of_dead_processes_are_removed(ioctx: Any) -> None:
    make_image(ioctx, "a", 4096)
    directory = image_directory(ioctx, "a")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    stale = directory / f".tmp.{int(dead.stdout)}.abcdef"
    stale.write_bytes(b"junk")
    mine = directory / f".tmp.{os.getpid()}.abcdef"
    mine.write_bytes(b"in progress")
    with native.Image(ioctx, "a") as image:
        image.write(b"x", 0)  # the first write takes the write lock, which sweeps
    assert not stale.exists()
    assert mine.exists()
    mine.unlink()


# -- threads -----------------------------------------------------------------------------
def test_snapshots_taken_during_writes_are_consistent(ioctx: Any) -> None:
    """Sequential one-object writes: every snapshot must show a prefix of them."""
    blocks = 32
    native.RBD().create(ioctx, "a", blocks * 4096, order=12)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            with native.Image(ioctx, "a") as image:
                for round_ in range(1, 1000):
                    for block in range(blocks):
                        if stop.is_set():
                            return
                        image.write(bytes([round_ % 250 + 1]) * 4096, block * 4096)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        with native.Image(ioctx, "a") as other:
            for i in range(15):
                other.create_snap(f"s{i}")
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors
    for i in range(15):
        with native.Image(ioctx, "a", snapshot=f"s{i}") as snap:
            values = [snap.read(b * 4096, 4096) for b in range(blocks)]
        for value in values:
            assert value == bytes([value[0]]) * 4096, "torn block"
        marks = [v[0] for v in values]
        # a prefix has the newer round, the rest the older one (or nothing yet)
        changes = sum(1 for a, b in itertools.pairwise(marks) if a != b)
        assert changes <= 1, marks


def test_flatten_while_writing(ioctx: Any) -> None:
    size = 64 * 4096
    make_image(ioctx, "p", size)
    with native.Image(ioctx, "p") as parent:
        parent.create_snap("s")
    native.RBD().clone(ioctx, "p", "s", ioctx, "c")
    expected = bytearray(pattern(size))
    with native.Image(ioctx, "c") as child:
        errors: list[BaseException] = []

        def flatten() -> None:
            try:
                child.flatten()
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        thread = threading.Thread(target=flatten)
        thread.start()
        for i in range(0, size, 4096 * 3):
            child.write(b"during", i + 100)
            expected[i + 100 : i + 106] = b"during"
        thread.join(30)
        assert not errors, errors
        assert child.read(0, size) == expected
        with pytest.raises(native.ImageNotFound):
            child.parent_info()
    with native.Image(ioctx, "c") as child:
        assert child.read(0, size) == expected


def test_concurrent_reads_and_writes_on_one_handle(ioctx: Any) -> None:
    blocks = 16
    native.RBD().create(ioctx, "a", blocks * 4096, order=12)
    with native.Image(ioctx, "a") as image:

        def work(block: int) -> None:
            for round_ in range(1, 30):
                data = bytes([round_]) * 4096
                image.write(data, block * 4096)
                assert image.read(block * 4096, 4096) == data

        run_in_threads(work, range(blocks), timeout=30)
        assert image.read(0, blocks * 4096) == bytes([29]) * (blocks * 4096)
