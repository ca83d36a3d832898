"""The FUSE read/write fast path over the node cache, called directly (no mount).

``ImageFile`` takes no object locks of its own over a ``CachedImage`` (the
cache holds them around every engine call), and writers over ``max_dirty``
claim the pages they write back. These tests hold the invariants that rely
on: engine I/O to one object is still serial, concurrent overlapping writers
leave whole writes, readers see their own writes, and a flush covers every
write acknowledged before it.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import random
import threading
import time
from typing import Any

import pytest

from csi_rbd.engine import errors as engine_errors
from csi_rbd.node.cache import PAGE, CachedImage, open_cached
from tests.threads import run_in_threads

fuse_image = pytest.importorskip("csi_rbd.node.fuse_image", reason="libfuse3 is not installed")
mfusepy = fuse_image.mfusepy

OBJECT = 1 << 16  # 16 pages per object
SIZE = 1 << 20
TIGHT: dict[str, Any] = {"max_dirty": 32 << 10, "target_dirty": 16 << 10, "cache_size": 64 << 10}


class SerialCheckingImage:
    """An in-memory engine image that fails the test if two calls touching one
    object overlap in time (the native engine needs them serial), and that
    remembers what a flush made durable."""

    def __init__(self, size: int = SIZE) -> None:
        self.data = bytearray(size)
        self.durable = bytes(size)
        self._active: dict[int, int] = {}
        self._guard = threading.Lock()
        self.overlaps = 0
        self.engine_writes = 0

    def size(self) -> int:
        return len(self.data)

    def stat(self) -> dict[str, Any]:
        return {"obj_size": OBJECT}

    def _enter(self, offset: int, length: int) -> list[int]:
        objects = list(range(offset // OBJECT, (offset + max(length, 1) - 1) // OBJECT + 1))
        with self._guard:
            for objno in objects:
                if self._active.get(objno):
                    self.overlaps += 1
                self._active[objno] = self._active.get(objno, 0) + 1
        time.sleep(0)  # let another thread in, if it could enter
        return objects

    def _exit(self, objects: list[int]) -> None:
        with self._guard:
            for objno in objects:
                self._active[objno] -= 1

    def read(self, offset: int, length: int, fadvise_flags: int = 0) -> bytes:
        if offset >= len(self.data):
            raise engine_errors.InvalidArgument("past the end")
        held = self._enter(offset, length)
        try:
            return bytes(self.data[offset : offset + length])
        finally:
            self._exit(held)

    def write(self, data: bytes, offset: int, fadvise_flags: int = 0) -> int:
        if offset + len(data) > len(self.data):
            raise engine_errors.InvalidArgument("past the end")
        held = self._enter(offset, len(data))
        try:
            view = memoryview(data).cast("B")
            half = len(view) // 2  # two steps: a concurrent call could tear it
            self.data[offset : offset + half] = view[:half]
            time.sleep(0)
            self.data[offset + half : offset + len(view)] = view[half:]
            self.engine_writes += 1
            return len(view)
        finally:
            self._exit(held)

    def discard(self, offset: int, length: int) -> int:
        held = self._enter(offset, length)
        try:
            self.data[offset : offset + length] = bytes(length)
            return length
        finally:
            self._exit(held)

    def write_zeroes(self, offset: int, length: int, zero_flags: int = 0) -> int:
        return self.discard(offset, length)

    def flush(self) -> None:
        self.durable = bytes(self.data)


def stamp(writer: int, seq: int, page: int) -> bytes:
    """A page of content naming who wrote it, which write, and which page."""
    return f"w{writer:02d}s{seq:06d}p{page:04d}.".encode().ljust(32, b"-") * (PAGE // 32)


def wrote_whole(page_data: bytes, page: int) -> bool:
    """The page holds one writer's stamp for this page, never a mix."""
    head = page_data[:32]
    return (
        head.startswith(b"w")
        and f"p{page:04d}.".encode() in head
        and page_data == head * (PAGE // 32)
    )


def test_image_file_leaves_locking_to_the_cache() -> None:
    cache = open_cached(SerialCheckingImage(), "writeback")
    assert fuse_image.ImageFile(cache)._own_locks is False
    assert fuse_image.ImageFile(SerialCheckingImage())._own_locks is True
    assert CachedImage.locks_objects is True


@pytest.mark.parametrize("mode", ["none", "writethrough", "writeback"])
def test_overlapping_writers_through_the_file(mode: str) -> None:
    """Many threads write 1-3 page runs over a small, shared window through
    ``ImageFile`` (no locks of its own) with a tight dirty limit: engine calls
    to one object never overlap, every page ends as one whole write, and the
    engine holds exactly what the cache shows after a flush."""
    engine = SerialCheckingImage()
    cache = open_cached(engine, mode, **TIGHT)
    cache.flush()  # writeback proper starts after the first flush
    ops = fuse_image.ImageFile(cache)
    window = 48  # pages: three objects, heavy overlap

    def writer(number: int) -> None:
        rng = random.Random(number)
        for seq in range(150):
            first = rng.randrange(window - 2)
            count = rng.randint(1, 3)
            data = b"".join(stamp(number, seq, first + k) for k in range(count))
            assert ops.write(None, data, first * PAGE, 0) == len(data)
            if rng.random() < 0.3:
                got = ops.read(None, PAGE, rng.randrange(window) * PAGE, 0)
                assert len(got) == PAGE

    run_in_threads(writer, range(8))
    shown = ops.read(None, window * PAGE, 0, 0)
    for page in range(window):
        assert wrote_whole(shown[page * PAGE : (page + 1) * PAGE], page), page
    ops.fsync(None, 0, 0)
    assert engine.durable[: window * PAGE] == shown  # a flush covers everything before it
    assert engine.overlaps == 0
    cache.close()


def test_readers_see_their_own_writes_under_write_back_pressure() -> None:
    """Each thread owns its pages; with the dirty limit far below what is
    written, writers keep writing back each other's pages, and a read right
    after a write still returns that write."""
    engine = SerialCheckingImage()
    cache = open_cached(engine, "writeback", **TIGHT)
    cache.flush()
    ops = fuse_image.ImageFile(cache)

    def worker(number: int) -> None:
        rng = random.Random(100 + number)
        pages = list(range(number, SIZE // PAGE, 8))
        for seq in range(200):
            page = rng.choice(pages)
            data = stamp(number, seq, page)
            ops.write(None, data, page * PAGE, 0)
            assert ops.read(None, PAGE, page * PAGE, 0) == data

    run_in_threads(worker, range(8))
    assert cache.dirty_bytes <= TIGHT["max_dirty"]
    assert engine.overlaps == 0
    cache.close()


def test_writers_over_the_limit_write_back_distinct_pages() -> None:
    """Writers over ``max_dirty`` claim what they write back: no page is written
    to the engine twice for one dirtying (no flusher is allowed to run here)."""
    engine = SerialCheckingImage()
    cache = open_cached(engine, "writeback", max_dirty=16 * PAGE, target_dirty=16 * PAGE)
    cache.flush()
    cache._wake_flusher = lambda: None  # type: ignore[method-assign]  # writers alone
    ops = fuse_image.ImageFile(cache)
    pages = iter(range(SIZE // PAGE))
    take = threading.Lock()

    def writer(_: int) -> None:
        while True:
            with take:
                page = next(pages, None)
            if page is None:
                return
            ops.write(None, stamp(0, 0, page), page * PAGE, 0)

    run_in_threads(writer, range(8))
    written_back = engine.engine_writes
    assert written_back == SIZE // PAGE - len(cache._pages.dirty)  # each page once
    ops.fsync(None, 0, 0)
    assert engine.durable == b"".join(stamp(0, 0, p) for p in range(SIZE // PAGE))
    assert engine.overlaps == 0
    cache.close()


def callbacks(ops: Any) -> tuple[Any, Any]:
    """The C callbacks libfuse would call for read and write, as serve() builds them."""
    fuse = object.__new__(fuse_image._FUSE)
    fuse.operations = ops
    fuse.raw_fi = False
    fuse.encoding, fuse.errors = "utf-8", "surrogateescape"
    prototypes = {field[0]: field[1] for field in mfusepy.fuse_operations._fields_}
    read = prototypes["read"](functools.partial(fuse._wrapper, fuse.read))
    write = prototypes["write"](functools.partial(fuse._wrapper, fuse.write))
    return read, write


def test_lean_callbacks_move_the_bytes_and_map_errors() -> None:
    engine = SerialCheckingImage()
    cache = open_cached(engine, "writeback")
    read, write = callbacks(fuse_image.ImageFile(cache))
    info = ctypes.pointer(mfusepy.fuse_file_info())
    payload = bytes(range(256)) * 32  # 8 KiB, unaligned below
    source = ctypes.create_string_buffer(payload, len(payload))
    as_bytes = ctypes.POINTER(ctypes.c_byte)
    assert write(None, ctypes.cast(source, as_bytes), len(payload), 1000, info) == len(payload)
    target = ctypes.create_string_buffer(len(payload))
    assert read(None, ctypes.cast(target, as_bytes), len(payload), 1000, info) == len(payload)
    assert target.raw == payload
    # a short read at the end, and EOF past it
    assert read(None, ctypes.cast(target, as_bytes), 100, SIZE - 10, info) == 10
    assert read(None, ctypes.cast(target, as_bytes), 100, SIZE, info) == 0
    # errors become negative errnos, as with mfusepy's own callbacks
    assert write(None, ctypes.cast(source, as_bytes), 100, SIZE - 10, info) == -errno.ENOSPC
    _, refused = callbacks(fuse_image.ImageFile(cache, read_only=True))
    assert refused(None, ctypes.cast(source, as_bytes), 10, 0, info) == -errno.EROFS
    cache.close()


def test_writers_over_the_limit_wait_for_a_running_flush() -> None:
    """While a flush writes back, a writer over ``max_dirty`` waits for the room
    it frees instead of writing back pages itself (racing the flush for the
    objects would delay the flush); then its write is kept as usual."""

    class Gated(SerialCheckingImage):
        def __init__(self) -> None:
            super().__init__()
            self.gate = threading.Event()
            self.writers: list[str] = []

        def write(self, data: bytes, offset: int, fadvise_flags: int = 0) -> int:
            self.writers.append(threading.current_thread().name)
            self.gate.wait(10)
            return super().write(data, offset, fadvise_flags)

    engine = Gated()
    cache = open_cached(engine, "writeback", max_dirty=4 * PAGE, target_dirty=4 * PAGE)
    engine.gate.set()
    cache.flush()
    cache._wake_flusher = lambda: None  # type: ignore[method-assign]  # no flushers here
    for page in range(4):  # four objects, at the dirty limit
        cache.write(stamp(0, 0, page), page * OBJECT)
    engine.gate.clear()
    flusher = threading.Thread(target=cache.flush, name="flush")
    flusher.start()
    while not engine.writers:  # the flush is inside its first write-back
        time.sleep(0.01)
    writer = threading.Thread(target=cache.write, args=(stamp(1, 0, 99), 99 * PAGE), name="writer")
    writer.start()
    time.sleep(0.2)
    assert writer.is_alive()  # waiting for room
    assert set(engine.writers) == {"flush"}
    engine.gate.set()
    flusher.join(10)
    writer.join(10)
    assert not writer.is_alive() and not flusher.is_alive()
    assert set(engine.writers) == {"flush"}  # the flush freed the room
    assert cache.read(99 * PAGE, PAGE) == stamp(1, 0, 99)
    cache.flush()
    assert engine.durable[99 * PAGE : 100 * PAGE] == stamp(1, 0, 99)
    cache.close()
