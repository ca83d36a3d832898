"""Unit tests of the node cache (csi_rbd.node.cache) over real native images."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from csi_rbd.engine import errors
from csi_rbd.engine.native import Image, IoCtx
from csi_rbd.node.cache import MODES, PAGE, CachedImage, open_cached
from tests.nbd.conftest import MiB, create, engine_read, pattern, wait_for
from tests.threads import run_in_threads

SIZE = 4 * MiB
SMALL: dict[str, Any] = {"max_dirty": 64 << 10, "target_dirty": 32 << 10, "cache_size": 128 << 10}


@pytest.fixture
def image(ioctx: IoCtx) -> Iterator[Image]:
    create(ioctx, "disk", SIZE, order=16)
    with Image(ioctx, "disk") as handle:
        yield handle


def cached(image: Image, mode: str, *, flushed: bool = True, **options: Any) -> CachedImage:
    cache = open_cached(image, mode, **options)
    if flushed:
        cache.flush()  # writeback proper starts after the first flush
    return cache


def on_disk(ioctx: IoCtx, offset: int, length: int) -> bytes:
    return engine_read(ioctx, "disk", offset, length)


# -- arguments ----------------------------------------------------------------------------
def test_rejects_bad_mode_and_limits(image: Image) -> None:
    with pytest.raises(ValueError, match="cache mode"):
        open_cached(image, "always")
    with pytest.raises(ValueError):
        open_cached(image, "writeback", max_dirty=10, target_dirty=20)
    with pytest.raises(ValueError):
        open_cached(image, "writeback", max_dirty=1 << 30)  # more than cache_size
    with pytest.raises(ValueError):
        open_cached(image, "writeback", max_dirty_age=0)


@pytest.mark.parametrize("mode", MODES)
def test_engine_rules_for_ranges(image: Image, mode: str) -> None:
    with cached(image, mode) as cache:
        assert cache.size() == SIZE
        assert cache.read(SIZE - 10, 100) == bytes(10)  # cut short at the end
        assert cache.read(SIZE, 0) == b""
        with pytest.raises(errors.InvalidArgument):
            cache.read(SIZE, 1)
        with pytest.raises(errors.InvalidArgument):
            cache.write(b"x" * 11, SIZE - 10)  # refused whole
        with pytest.raises(errors.InvalidArgument):
            cache.read(-1, 10)
        assert cache.discard(SIZE - 10, 100) == 10
        assert cache.write(b"", SIZE) == 0


# -- reads and writes ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_reads_see_writes_unaligned(image: Image, mode: str) -> None:
    model = bytearray(SIZE)
    rng = random.Random(7)
    with cached(image, mode, **SMALL) as cache:
        for i in range(300):
            offset = rng.randrange(SIZE - 20000)
            data = pattern(i, rng.randrange(1, 20000))
            cache.write(data, offset)
            model[offset : offset + len(data)] = data
            start = rng.randrange(SIZE - 30000)
            assert cache.read(start, 30000) == model[start : start + 30000]
        assert cache.dirty_bytes <= SMALL["max_dirty"]
    assert image.read(0, SIZE) == model  # closing flushed everything


def test_writethrough_reaches_the_engine_before_returning(image: Image, ioctx: IoCtx) -> None:
    with cached(image, "writethrough") as cache:
        cache.write(pattern(1, 10000), 5000)
        assert on_disk(ioctx, 5000, 10000) == pattern(1, 10000)
        assert cache.dirty_bytes == 0
        assert cache.read(5000, 10000) == pattern(1, 10000)
        cache.write(pattern(2, 2 * PAGE), PAGE)
        hits = cache.hits
        assert cache.read(PAGE, 2 * PAGE) == pattern(2, 2 * PAGE)
        assert cache.hits == hits + 1  # whole pages written are kept for reading


def test_writeback_holds_writes_until_flush(image: Image, ioctx: IoCtx) -> None:
    with cached(image, "writeback", max_dirty_age=60) as cache:
        cache.write(pattern(2, 3 * PAGE), PAGE)
        assert cache.dirty_bytes == 3 * PAGE
        assert on_disk(ioctx, PAGE, 3 * PAGE) == bytes(3 * PAGE)  # only in memory
        assert cache.read(PAGE, 3 * PAGE) == pattern(2, 3 * PAGE)
        flushes = cache.flushes
        cache.flush()
        assert cache.flushes == flushes + 1
        assert cache.dirty_bytes == 0
        assert on_disk(ioctx, PAGE, 3 * PAGE) == pattern(2, 3 * PAGE)


def test_writeback_is_writethrough_until_the_first_flush(image: Image, ioctx: IoCtx) -> None:
    with cached(image, "writeback", flushed=False, max_dirty_age=60) as cache:
        cache.write(b"a" * 100, 0)
        assert cache.dirty_bytes == 0
        assert on_disk(ioctx, 0, 100) == b"a" * 100
        cache.flush()
        cache.write(b"b" * 100, 0)
        assert cache.dirty_bytes == 100
        assert on_disk(ioctx, 0, 100) == b"a" * 100


def test_fua_write_is_on_disk_at_once(image: Image, ioctx: IoCtx) -> None:
    with cached(image, "writeback", max_dirty_age=60) as cache:
        cache.write(b"k" * 8192, 0)
        cache.write(b"f" * 100, 3 * PAGE, fua=True)
        assert on_disk(ioctx, 3 * PAGE, 100) == b"f" * 100
        assert cache.dirty_bytes == 8192  # only the FUA write's range was written back


def test_partial_pages_never_read_the_engine_first(image: Image, ioctx: IoCtx) -> None:
    image.write(b"o" * PAGE, 0)
    with cached(image, "writeback", max_dirty_age=60) as cache:
        cache.write(b"n" * 10, 100)
        assert cache.dirty_bytes == 10
        # a read of the page fills in the rest from the engine
        assert cache.read(0, PAGE) == b"o" * 100 + b"n" * 10 + b"o" * (PAGE - 110)
        cache.flush()
    assert image.read(0, PAGE) == b"o" * 100 + b"n" * 10 + b"o" * (PAGE - 110)


def test_large_write_goes_straight_through(image: Image, ioctx: IoCtx) -> None:
    with cached(image, "writeback", **SMALL) as cache:
        cache.write(pattern(3, 256 << 10), 0)  # more than max_dirty
        assert cache.dirty_bytes == 0
        assert on_disk(ioctx, 0, 256 << 10) == pattern(3, 256 << 10)
    with cached(image, "writeback") as cache:
        cache.write(pattern(4, 2 * MiB), MiB)  # streaming: more than 1 MiB
        assert cache.dirty_bytes == 0
        assert on_disk(ioctx, MiB, 2 * MiB) == pattern(4, 2 * MiB)
        cache.write(pattern(5, MiB), 3 * MiB)
        assert cache.dirty_bytes == MiB


def test_dirty_data_is_bounded_and_aged_out(image: Image, ioctx: IoCtx) -> None:
    with cached(image, "writeback", max_dirty_age=0.2, **SMALL) as cache:
        peak = 0
        for i in range(100):
            cache.write(pattern(i, PAGE), i * 3 * PAGE)
            peak = max(peak, cache.dirty_bytes)
        assert peak <= SMALL["max_dirty"]
        assert wait_for(lambda: cache.dirty_bytes == 0, 5)  # by age, without a flush
        for i in range(100):
            assert on_disk(ioctx, i * 3 * PAGE, PAGE) == pattern(i, PAGE)


def test_flusher_writes_back_above_target(image: Image) -> None:
    with cached(image, "writeback", max_dirty_age=60, **SMALL) as cache:
        for i in range(15):  # 60 KiB: above the 32 KiB target, below the 64 KiB limit
            cache.write(pattern(i, PAGE), i * PAGE * 2)
        assert wait_for(lambda: cache.dirty_bytes <= SMALL["target_dirty"], 5)
        assert cache.written_back > 0


def test_cache_size_bounds_clean_pages(image: Image) -> None:
    data = pattern(4, SIZE)
    image.write(data, 0)
    with cached(image, "writethrough", **SMALL) as cache:
        for offset in range(0, SIZE, PAGE):
            assert cache.read(offset, PAGE) == data[offset : offset + PAGE]
        pages = cache._pages
        assert len(pages.clean) + len(pages.dirty) <= SMALL["cache_size"] // PAGE
        assert cache.read(SIZE - PAGE, PAGE) == data[-PAGE:]
        assert cache.hits >= 1


# -- discard and write-zeroes ---------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("zeroes", [False, True])
def test_discard_drops_cached_and_dirty_data(
    image: Image, ioctx: IoCtx, mode: str, zeroes: bool
) -> None:
    with cached(image, mode, max_dirty_age=60) as cache:
        cache.write(pattern(5, 10 * PAGE), 0)
        assert cache.read(0, 10 * PAGE) == pattern(5, 10 * PAGE)
        zero = cache.write_zeroes if zeroes else cache.discard
        zero(PAGE + 100, 5 * PAGE)  # unaligned: partial pages at both ends
        expected = bytearray(pattern(5, 10 * PAGE))
        expected[PAGE + 100 : 6 * PAGE + 100] = bytes(5 * PAGE)
        assert cache.read(0, 10 * PAGE) == expected
        cache.flush()
        assert on_disk(ioctx, 0, 10 * PAGE) == expected
        if mode == "writeback":
            assert cache.dirty_bytes == 0


def test_discard_of_dirty_pages_is_not_undone_by_write_back(image: Image, ioctx: IoCtx) -> None:
    image.write(b"e" * (8 * PAGE), 0)
    with cached(image, "writeback", max_dirty_age=60) as cache:
        cache.write(b"d" * (8 * PAGE), 0)
        cache.discard(0, 8 * PAGE)
        assert cache.dirty_bytes == 0
        cache.flush()
        assert on_disk(ioctx, 0, 8 * PAGE) == bytes(8 * PAGE)


def test_dirty_ranges(image: Image) -> None:
    with cached(image, "writeback", max_dirty_age=60) as cache:
        cache.write(b"x" * 100, 50)
        cache.write(b"y" * (2 * PAGE), PAGE)
        assert cache.dirty_ranges(0, SIZE) == [(50, 100), (PAGE, 2 * PAGE)]
        assert cache.dirty_ranges(PAGE + 10, 20) == [(PAGE + 10, 20)]


# -- ownership and failures ------------------------------------------------------------------
def test_writeback_refuses_writes_to_a_snapshot_at_once(ioctx: IoCtx) -> None:
    create(ioctx, "disk", SIZE, order=16)
    with Image(ioctx, "disk") as head:
        head.create_snap("s")
    with Image(ioctx, "disk", snapshot="s") as snap, cached(snap, "writeback") as cache:
        with pytest.raises(errors.ReadOnlyImage):
            cache.write(b"x", 0)
        assert cache.dirty_bytes == 0


def test_writeback_takes_the_write_lock_before_acknowledging(image: Image, ioctx: IoCtx) -> None:
    with Image(ioctx, "disk") as other:
        other.lock_acquire()
        with cached(image, "writeback") as cache, pytest.raises(errors.ImageBusy):
            cache.write(b"x", 0)


class FailingImage:
    """An image whose writes fail while ``fail`` is set."""

    def __init__(self, image: Image) -> None:
        self.image = image
        self.fail = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.image, name)

    def write(self, data: bytes, offset: int, fadvise_flags: int = 0) -> int:
        if self.fail:
            raise errors.IOError("injected")
        return self.image.write(data, offset)


def test_failed_write_back_keeps_data_dirty_and_flush_reports_it(image: Image) -> None:
    failing = FailingImage(image)
    cache = cached(failing, "writeback", max_dirty_age=60)  # type: ignore[arg-type]
    cache.write(b"w" * PAGE, 0)
    failing.fail = True
    with pytest.raises(errors.IOError):
        cache.flush()
    assert cache.dirty_bytes == PAGE
    assert cache.read(0, PAGE) == b"w" * PAGE
    failing.fail = False
    cache.close()
    assert image.read(0, PAGE) == b"w" * PAGE


def test_failed_write_through_forgets_stale_pages(image: Image) -> None:
    failing = FailingImage(image)
    cache = cached(failing, "writethrough")  # type: ignore[arg-type]
    assert cache.read(0, PAGE) == bytes(PAGE)  # now cached
    failing.fail = True
    with pytest.raises(errors.IOError):
        cache.write(b"z" * PAGE, 0)
    assert 0 not in cache._pages.clean
    failing.fail = False
    cache.close()


def test_closed_cache_refuses_io(image: Image) -> None:
    cache = cached(image, "writeback")
    cache.write(b"c" * 10, 0)
    cache.close()
    cache.close()  # idempotent
    assert image.read(0, 10) == b"c" * 10
    with pytest.raises(errors.InvalidArgument):
        cache.read(0, 10)


def test_resize_shows_and_shrink_drops_pages(image: Image) -> None:
    with cached(image, "writeback", max_dirty_age=60) as cache:
        cache.write(b"t" * (2 * PAGE), SIZE - 2 * PAGE)
        cache.flush()
        image.resize(SIZE * 2)
        assert cache.size() == SIZE * 2
        cache.write(b"g" * 10, SIZE + 5)  # past the old end
        image.resize(SIZE - PAGE - 100)
        assert cache.size() == SIZE - PAGE - 100
        assert cache.read(SIZE - 2 * PAGE, 2 * PAGE) == b"t" * (PAGE - 100)
        image.resize(SIZE)
        cache.size()
        assert cache.read(SIZE - 2 * PAGE, 2 * PAGE) == b"t" * (PAGE - 100) + bytes(PAGE + 100)


# -- threads ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_concurrent_writers_and_readers(image: Image, mode: str) -> None:
    """Threads write their own regions (and read them back) while others flush."""
    with cached(image, mode, **SMALL) as cache:

        def worker(n: int) -> None:
            rng = random.Random(n)
            base = n * (SIZE // 8)
            mine = bytearray(SIZE // 8)
            for i in range(150):
                offset = rng.randrange(len(mine) - 9000)
                data = pattern(n * 1000 + i, rng.randrange(1, 9000))
                cache.write(data, base + offset)
                mine[offset : offset + len(data)] = data
                if i % 10 == 0:
                    cache.flush()
                if i % 7 == 0:
                    cache.discard(base + offset, 3000)
                    mine[offset : offset + 3000] = bytes(3000)
                assert cache.read(base, len(mine)) == mine

        run_in_threads(worker, range(8))


def test_overlapping_writers_leave_one_write_per_page(image: Image) -> None:
    """Racing whole-page writes: every page ends as exactly one writer's data."""
    with cached(image, "writeback", **SMALL) as cache:

        def worker(n: int) -> None:
            for _ in range(40):
                cache.write(bytes([n]) * (8 * PAGE), 0)

        run_in_threads(worker, range(1, 7))  # a failing writer fails the test
        data = cache.read(0, 8 * PAGE)
    for page in range(8):
        chunk = data[page * PAGE : (page + 1) * PAGE]
        assert chunk == chunk[:1] * PAGE
    assert image.read(0, 8 * PAGE) == data


def test_flush_covers_writes_completed_before_it(image: Image, ioctx: IoCtx) -> None:
    """A flush racing a stream of writes covers every write that returned before it began."""
    stop = threading.Event()
    done: list[int] = []
    with cached(image, "writeback", max_dirty_age=60, **SMALL) as cache:

        def writer() -> None:
            i = 0
            while not stop.is_set():
                cache.write(pattern(i, PAGE), (i % 200) * PAGE)
                done.append(i)
                i += 1

        thread = threading.Thread(target=writer)
        thread.start()
        time.sleep(0.05)
        for _ in range(5):
            finished = list(done)
            cache.flush()
            disk = on_disk(ioctx, 0, 200 * PAGE)
            latest: dict[int, int] = {}
            for i in finished:
                latest[i % 200] = i
            for slot, i in latest.items():
                # that write, or a later one to the same slot
                got = disk[slot * PAGE : (slot + 1) * PAGE]
                later = [j for j in range(i, i + 2000, 200)]
                assert any(got == pattern(j, PAGE) for j in later), slot
        stop.set()
        thread.join()


# -- writing behind (streaming writes acknowledged before the engine has them) -------------
class GatedImage:
    """An image whose writes wait for ``gate`` while it is closed."""

    def __init__(self, image: Image) -> None:
        self.image = image
        self.gate = threading.Event()
        self.writing = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.image, name)

    def write(self, data: bytes, offset: int, fadvise_flags: int = 0) -> int:
        self.writing.set()
        assert self.gate.wait(10), "the test never opened the gate"
        return self.image.write(data, offset)


STREAM = 2 * MiB


def test_streaming_write_is_acknowledged_before_the_engine_has_it(
    image: Image, ioctx: IoCtx
) -> None:
    """Acknowledged once ordered: cached pages show it, a reader that misses and a
    flush both wait for the engine write, and the flush then covers it."""
    gated = GatedImage(image)
    gated.gate.set()
    cache = cached(gated, "writeback")  # type: ignore[arg-type]
    assert cache.read(0, PAGE) == bytes(PAGE)  # page 0 cached (clean)
    gated.gate.clear()
    acknowledged = threading.Event()
    writer = threading.Thread(
        target=cache.write, args=(pattern(7, STREAM), 0), kwargs={"acknowledge": acknowledged.set}
    )
    writer.start()
    assert acknowledged.wait(10) and gated.writing.wait(10)
    assert on_disk(ioctx, 0, PAGE) == bytes(PAGE)  # not in the engine yet...
    assert cache.read(0, PAGE) == pattern(7, STREAM)[:PAGE]  # ...but the cached page shows it
    results: dict[str, Any] = {}
    miss = threading.Thread(target=lambda: results.update(miss=cache.read(MiB, PAGE)))
    flush = threading.Thread(target=lambda: results.update(flush=cache.flush()))
    miss.start()
    flush.start()
    time.sleep(0.2)
    assert miss.is_alive() and flush.is_alive()  # both wait for the write behind
    gated.gate.set()
    for thread in (writer, miss, flush):
        thread.join(10)
    assert results["miss"] == pattern(7, STREAM)[MiB : MiB + PAGE]
    assert "flush" in results
    assert on_disk(ioctx, 0, STREAM) == pattern(7, STREAM)
    cache.close()


def test_failed_write_behind_is_raised_by_the_next_flush(image: Image, ioctx: IoCtx) -> None:
    failing = FailingImage(image)
    cache = cached(failing, "writeback")  # type: ignore[arg-type]
    failing.fail = True
    acknowledged = threading.Event()
    cache.write(pattern(8, STREAM), 0, acknowledge=acknowledged.set)  # no error: acknowledged
    assert acknowledged.is_set()
    failing.fail = False
    with pytest.raises(errors.IOError, match="acknowledged before this flush failed"):
        cache.flush()
    cache.flush()  # said once
    assert cache.read(0, PAGE) == bytes(PAGE)  # what the engine holds, not the lost write
    cache.close()


@pytest.mark.parametrize("case", ["before the first flush", "fua", "writethrough"])
def test_no_write_behind_where_the_client_must_wait(image: Image, ioctx: IoCtx, case: str) -> None:
    """Writethrough until the first flush, FUA and writethrough mode: in the engine
    when the write returns, and never acknowledged early."""
    mode = "writethrough" if case == "writethrough" else "writeback"
    cache = cached(image, mode, flushed=case != "before the first flush")
    early: list[bool] = []
    cache.write(pattern(9, STREAM), 0, fua=case == "fua", acknowledge=lambda: early.append(True))
    assert not early
    assert on_disk(ioctx, 0, STREAM) == pattern(9, STREAM)
    cache.close()
