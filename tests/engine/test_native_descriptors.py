"""The native engine's per-I/O fast paths: kept object descriptors and the barrier's gate.

A handle that holds the write lock, and a snapshot view, keep the descriptors
of the object versions they use open. A kept descriptor must never serve a
version that is no longer the one its name means: one this handle replaced or
unlinked (copy-up, discard), one that another process's rollback, snapshot or
garbage collection made obsolete. The barrier skips GATE while no metadata
operation holds it; a metadata operation must still exclude I/O, and a closing
byte left by a killed process must only cost speed. Other processes are the
agents of :mod:`tests.engine.test_multiprocess`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from csi_rbd.engine.native import RBD, Image, ImageBusy, ImageNotFound, Rados
from csi_rbd.engine.native import header as header_module
from tests.engine.test_multiprocess import Agent, new_agent, pat, payload, sha
from tests.threads import run_in_threads

ORDER = 12
OBJ = 1 << ORDER


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _writer(local: Any, objects: int = 8) -> Image:
    RBD().create(local, "img", objects * OBJ, order=ORDER)
    image = Image(local, "img")
    image.lock_acquire()
    return image


# -- descriptors: this handle's own changes ---------------------------------------------------


def test_writer_keeps_descriptors_and_close_closes_them(local: Any) -> None:
    before = _open_fds()
    image = _writer(local)
    for objno in range(8):
        image.write(payload(objno + 1, OBJ), objno * OBJ)
    for objno in range(8):
        assert image.read(objno * OBJ, OBJ) == payload(objno + 1, OBJ)
    assert image._store.cached_descriptors == 8
    image.close()
    assert _open_fds() == before


def test_descriptor_cache_is_bounded(local: Any) -> None:
    image = _writer(local, objects=32)
    image._store.cache_descriptors(writable=True, limit=4)
    for objno in range(32):
        image.write(payload(objno + 1, 512), objno * OBJ)
    assert image._store.cached_descriptors <= 4
    for objno in range(32):
        assert image.read(objno * OBJ, 512) == payload(objno + 1, 512)
    assert image._store.cached_descriptors <= 4
    image.close()


def test_lock_release_drops_descriptors(local: Any) -> None:
    image = _writer(local)
    image.write(payload(1, OBJ), 0)
    assert image._store.cached_descriptors == 1
    image.lock_release()
    assert image._store.cached_descriptors == 0
    assert image.read(0, OBJ) == payload(1, OBJ)
    assert image._store.cached_descriptors == 0  # not the writer any more: no caching
    image.close()


def test_discard_and_rewrite_never_read_the_old_file(local: Any) -> None:
    image = _writer(local)
    image.write(payload(1, OBJ), 0)
    assert image.read(0, OBJ) == payload(1, OBJ)
    image.discard(0, OBJ)  # unlinks the version this handle keeps open
    assert image.read(0, OBJ) == bytes(OBJ)
    image.write(payload(2, 512), 512)
    assert image.read(0, OBJ) == bytes(512) + payload(2, 512) + bytes(OBJ - 1024)
    image.create_snap("s")
    image.discard(0, OBJ)  # an absent marker now: the snapshot keeps the old version
    assert image.read(0, OBJ) == bytes(OBJ)
    image.write(payload(3, 512), 0)  # an empty version renamed over the marker
    assert image.read(0, OBJ) == payload(3, 512) + bytes(OBJ - 512)
    with Image(local, "img", snapshot="s") as snap:
        assert snap.read(0, OBJ) == bytes(512) + payload(2, 512) + bytes(OBJ - 1024)
    image.close()


def test_copy_up_after_snapshot_and_removal_of_the_snapshot(local: Any) -> None:
    image = _writer(local)
    image.write(payload(1, 4 * OBJ), 0)
    assert image.read(0, 4 * OBJ) == payload(1, 4 * OBJ)
    image.create_snap("s")
    snap = Image(local, "img", snapshot="s")
    assert snap.read(0, 4 * OBJ) == payload(1, 4 * OBJ)
    image.write(payload(2, 2 * OBJ), 0)  # copy-up of objects 0 and 1
    assert image.read(0, 4 * OBJ) == payload(2, 2 * OBJ) + payload(1, 4 * OBJ)[2 * OBJ :]
    assert snap.read(0, 4 * OBJ) == payload(1, 4 * OBJ)
    image.remove_snap("s")  # garbage collection unlinks what only s read
    with pytest.raises(ImageNotFound):
        snap.read(0, 4 * OBJ)
    with pytest.raises(ImageNotFound):
        snap.read(0, OBJ)  # a failed reload leaves the view stale: it must fail again
    assert image.read(0, 4 * OBJ) == payload(2, 2 * OBJ) + payload(1, 4 * OBJ)[2 * OBJ :]
    snap.close()
    image.close()


def test_rollback_from_another_handle_replaces_what_the_writer_reads(local: Any) -> None:
    image = _writer(local)
    image.write(payload(1, 4 * OBJ), 0)
    image.create_snap("s")
    image.write(payload(2, 4 * OBJ), 0)
    image.flush()
    assert image.read(0, 4 * OBJ) == payload(2, 4 * OBJ)  # descriptors of the new versions
    with Image(local, "img") as other:  # not the writer: a rollback needs no write lock
        other.rollback_to_snap("s")
    assert image.read(0, 4 * OBJ) == payload(1, 4 * OBJ)
    image.write(payload(3, OBJ), OBJ)
    assert image.read(0, 4 * OBJ) == payload(1, OBJ) + payload(3, OBJ) + payload(1, 2 * OBJ)
    image.close()
    with Image(local, "img", read_only=True) as reader:
        assert reader.read(0, 4 * OBJ) == payload(1, OBJ) + payload(3, OBJ) + payload(1, 2 * OBJ)


def test_shrink_and_grow_from_another_handle(local: Any) -> None:
    image = _writer(local)
    image.write(payload(1, 4 * OBJ), 0)
    assert image.read(0, 4 * OBJ) == payload(1, 4 * OBJ)
    with Image(local, "img") as other:
        other.resize(OBJ + 100)
        other.resize(8 * OBJ)
    expected = payload(1, OBJ + 100) + bytes(3 * OBJ - 100)
    assert image.read(0, 4 * OBJ) == expected
    image.close()


# -- descriptors: other processes --------------------------------------------------------------


@pytest.mark.timeout(120)
def test_snapshot_by_another_process_while_this_handle_writes(
    data_dir: Path, local: Any, agents: list[Agent]
) -> None:
    """A snapshot another process takes between two writes of this handle holds the
    first write; the second lands only in head, though the handle keeps the version open."""
    image = _writer(local)
    image.write(payload(1, 8 * OBJ), 0)
    image.flush()
    assert image.read(0, 8 * OBJ) == payload(1, 8 * OBJ)
    other = new_agent(agents, data_dir)
    other.open("h", "img")
    other.do("h", "create_snap", "s")
    image.write(payload(2, 8 * OBJ), 0)
    image.flush()
    other.open("snap", "img", snapshot="s")
    assert other.do("snap", "read", 0, 8 * OBJ)["sha"] == sha(payload(1, 8 * OBJ))
    with Image(local, "img", snapshot="s") as snap:
        assert snap.read(0, 8 * OBJ) == payload(1, 8 * OBJ)
    assert image.read(0, 8 * OBJ) == payload(2, 8 * OBJ)
    assert other.do("h", "read", 0, 8 * OBJ)["sha"] == sha(payload(2, 8 * OBJ))
    image.close()


@pytest.mark.timeout(120)
def test_rollback_by_another_process_and_its_garbage_collection(
    data_dir: Path, local: Any, agents: list[Agent]
) -> None:
    image = _writer(local)
    image.write(payload(1, 8 * OBJ), 0)
    image.flush()
    image.create_snap("s")
    image.write(payload(2, 8 * OBJ), 0)
    image.flush()
    assert image.read(0, 8 * OBJ) == payload(2, 8 * OBJ)
    other = new_agent(agents, data_dir)
    other.open("h", "img")
    other.do("h", "rollback_to_snap", "s")  # and collects the versions of write 2
    other.do("h", "remove_snap", "s")
    assert image.read(0, 8 * OBJ) == payload(1, 8 * OBJ)
    image.write(payload(3, OBJ), 2 * OBJ)
    image.flush()
    expected = payload(1, 2 * OBJ) + payload(3, OBJ) + payload(1, 8 * OBJ)[3 * OBJ :]
    assert image.read(0, 8 * OBJ) == expected
    assert other.do("h", "read", 0, 8 * OBJ)["sha"] == sha(expected)
    image.close()


@pytest.mark.timeout(120)
def test_kept_snapshot_descriptors_never_outlive_the_snapshot(
    data_dir: Path, local: Any, agents: list[Agent]
) -> None:
    """This process reads a snapshot (descriptors kept); another removes it and its
    versions are collected: the next read fails, never returns the collected data."""
    RBD().create(local, "img", 8 * OBJ, order=ORDER)
    other = new_agent(agents, data_dir)
    other.open("w", "img")
    for tag in (1, 2):
        other.do("w", "write", pat(tag, 8 * OBJ), 0)
        other.do("w", "flush")
        other.do("w", "create_snap", f"s{tag}")
    other.do("w", "write", pat(3, 8 * OBJ), 0)
    other.do("w", "flush")
    snap = Image(local, "img", snapshot="s2")
    assert snap.read(0, 8 * OBJ) == payload(2, 8 * OBJ)
    assert snap._store.cached_descriptors == 8
    other.do("w", "remove_snap", "s2")
    with pytest.raises(ImageNotFound):
        snap.read(0, 8 * OBJ)
    snap.close()


# -- the barrier -------------------------------------------------------------------------------


def test_a_metadata_operation_still_excludes_io(data_dir: Path) -> None:
    cluster = Rados(data_dir=data_dir, lock_timeout=0.3)
    cluster.connect()
    ioctx = cluster.open_ioctx("rbd")
    try:
        image = _writer(ioctx)
        image.write(payload(1, OBJ), 0)
        holder = header_module.ImageHeader(image._header.path, 5.0)
        entered, leave = threading.Event(), threading.Event()

        def hold() -> None:
            with holder.exclusive_section():
                entered.set()
                leave.wait(10)

        thread = threading.Thread(target=hold)
        thread.start()
        try:
            assert entered.wait(10)
            with pytest.raises(ImageBusy):
                image.read(0, OBJ)
            with pytest.raises(ImageBusy):
                image.write(payload(2, OBJ), 0)
        finally:
            leave.set()
            thread.join()
            holder.close()
        assert image.read(0, OBJ) == payload(1, OBJ)
        assert image._header._map[header_module._CLOSING] == 0
        image.close()
    finally:
        cluster.shutdown()


def test_io_waiting_at_the_barrier_goes_on_after_the_operation(local: Any) -> None:
    image = _writer(local)
    image.write(payload(1, OBJ), 0)
    holder = header_module.ImageHeader(image._header.path, 5.0)
    entered = threading.Event()
    results: list[bytes] = []

    def hold() -> None:
        with holder.exclusive_section():
            entered.set()
            reader = threading.Thread(target=lambda: results.append(image.read(0, OBJ)))
            reader.start()
            reader.join(0.2)
            assert not results  # still waiting: the operation holds the barrier
            holder.bump_generation()
        reader.join(10)

    thread = threading.Thread(target=hold)
    thread.start()
    thread.join(20)
    holder.close()
    assert results == [payload(1, OBJ)]
    image.close()


def test_a_closing_byte_left_by_a_killed_process_heals(local: Any) -> None:
    image = _writer(local)
    image.write(payload(1, OBJ), 0)
    image._header._map[header_module._CLOSING] = 1  # as if an operation died holding GATE
    assert image.read(0, OBJ) == payload(1, OBJ)
    assert image._header._map[header_module._CLOSING] == 0
    image.write(payload(2, OBJ), 0)
    assert image.read(0, OBJ) == payload(2, OBJ)
    image.close()


def test_io_descriptors_do_not_grow_with_threads(local: Any) -> None:
    """One I/O descriptor per I/O in flight at once, not per thread that ever did I/O."""
    image = _writer(local)
    image.write(payload(1, OBJ), 0)
    before = _open_fds()
    for _ in range(40):
        thread = threading.Thread(target=lambda: image.read(0, OBJ))
        thread.start()
        thread.join()
    assert _open_fds() <= before + 1
    assert len(image._header._free_fds) <= 2
    image.close()


def test_parallel_io_on_one_handle(local: Any) -> None:
    image = _writer(local, objects=16)

    def work(slot: int) -> None:
        for n in range(50):
            data = payload(slot * 1000 + n + 1, 512)
            image.write(data, slot * OBJ + (n % 8) * 512)
            assert image.read(slot * OBJ + (n % 8) * 512, 512) == data

    run_in_threads(work, range(8))
    image.close()


def test_first_writes_of_many_threads_at_once(data_dir: Path) -> None:
    """Writes racing the write lock's set-up (its exclusive section) never deadlock:
    none gets into the barrier before the set-up is done."""
    cluster = Rados(data_dir=data_dir, lock_timeout=5.0)
    cluster.connect()
    ioctx = cluster.open_ioctx("rbd")
    try:
        RBD().create(ioctx, "img", 16 * OBJ, order=ORDER)
        for attempt in range(15):
            _race_first_writes(Image(ioctx, "img"), attempt * 10)
    finally:
        cluster.shutdown()


def _race_first_writes(image: Image, tag: int) -> None:
    start = threading.Barrier(8)

    def work(n: int) -> None:
        start.wait()
        image.write(payload(tag + n + 1, 512), n * OBJ + 512)

    run_in_threads(work, range(8), timeout=30)
    for n in range(8):
        assert image.read(n * OBJ + 512, 512) == payload(tag + n + 1, 512)
    image.close()
