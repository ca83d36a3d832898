"""One block cache in front of an engine image, for the NBD server and the FUSE/loop path.

Design
------
``open_cached(image, mode)`` wraps an ``rbd.Image``-shaped object (the native
engine's or librbd's) in a :class:`CachedImage` with the same data methods.
The modes mean what librbd's settings mean:

* ``none`` (``rbd_cache=false``): pass-through; nothing is kept.
* ``writethrough`` (``rbd_cache=true, rbd_cache_max_dirty=0``): reads are
  cached; every write reaches the engine before it is acknowledged ("durable"
  means *in the engine*; ``flush`` still makes it durable on disk).
* ``writeback`` (``rbd_cache=true``): writes are held in memory, up to
  ``max_dirty`` bytes, and written back on ``flush``, on a FUA write
  (:meth:`CachedImage.flush_range`), when they are older than
  ``max_dirty_age`` seconds, or when more than ``target_dirty`` bytes are
  dirty: a background *flusher* thread does the last two, in parallel with
  the writers (the kernel's share of a write runs outside the GIL). A writer
  that would go over ``max_dirty`` first writes back the oldest dirty data
  itself, so memory stays bounded (librbd blocks such a writer the same way);
  a single write larger than ``max_dirty``, or than 1 MiB (streaming, as
  ``qemu-img convert`` writes: copying it into pages would only delay it),
  goes straight through. A caller that can acknowledge such a write early
  (``write(..., acknowledge=...)``, the NBD server) has it *written behind*:
  acknowledged once it is ordered against every other access (its object
  locks held, cached pages updated), then written to the engine while the
  client sends the next one (``qemu-img convert`` waits for each write
  before sending the next). A flush waits for writes behind; one that
  failed is raised by the next flush. As with
  librbd's ``rbd_cache_writethrough_until_flush=true``, the cache behaves as
  writethrough until the first ``flush``: a client that never flushes never
  has acknowledged data only in memory.

Store. 4 KiB pages, clean (immutable bytes, LRU, evicted beyond
``cache_size``) or dirty (never evicted: ``max_dirty <= cache_size``); a
dirty page may be partial, holding only what was written to it. See
:mod:`.cache_pages`. Reads larger than 256 KiB (streaming) are served but not
kept.

Ordering. Two kinds of locks, always taken in this order:

1. *object locks*, striped over the image's objects: every engine call (read
   miss, write-through, write-back, discard, write-zeroes) holds the locks of
   the objects it touches. So engine I/O to one object is serial, in the
   order the cache decided: two write-backs of one page cannot land out of
   order, a read miss cannot insert data older than a write-through that
   overtook it, and a discard cannot be undone by a write-back that started
   before it. (It also serialises first accesses to an object, which the
   native engine's object lookup cache needs; see ``ObjectLocks`` in
   :mod:`.fuse_image`.)
2. the *state lock*, held for in-memory work only, never across engine I/O.

A write-back takes the object lock, snapshots the dirty intervals of the
object's pages under the state lock, writes them, and marks each page clean
only if its generation did not move meanwhile. A read miss takes the object
lock, reads whole pages from the engine, and merges under the state lock
(dirty pages win: they are newer). Discard and write-zeroes go to the engine
first (inside the object lock), then drop the pages inside the range and zero
the edges, dirty data included, so a failed engine call loses nothing.

Durability. ``flush()`` writes back every page dirty when it started, waits
for the writes behind in flight, then calls the engine's ``flush()``
(serialised: the native engine lets a second concurrent flush return before
the first one's fsyncs are done). What a
completed flush covered is on disk, so killing the process right after it
loses nothing acknowledged by it; dirty data of later writes may be lost,
but a page is written to the engine in one call, never torn by the cache.
Write-back errors leave the data dirty and are raised by the next flush; a
write behind that failed has nothing left to keep, and the next flush raises
that it was lost.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

from csi_rbd.engine import errors
from csi_rbd.engine.native.image import Image as NativeImage
from csi_rbd.node.cache_pages import PAGE, Interval, PageStore

__all__ = ["MODES", "PAGE", "CacheableImage", "CachedImage", "open_cached"]

log = logging.getLogger(__name__)

MODES = ("none", "writethrough", "writeback")
POPULATE_MAX = 256 << 10  # larger reads are served without being kept
STREAM_MIN = (1 << 20) + 1  # writes from this size up go straight through (streaming)
_FLUSHERS = 2  # background write-back threads: the kernel's share of writes overlaps
_FLUSHER_BATCH = 256  # pages written back per flusher round
_RETRY_DELAY = 0.1  # after a failed background write-back
_WRITER_SCAN = 64  # claimed pages a writer over the limit skips before it waits instead

Buffer = bytes | bytearray | memoryview


class CacheableImage(Protocol):
    """The part of ``rbd.Image`` (native or librbd) the cache uses."""

    def size(self) -> int: ...

    def read(self, offset: int, length: int, fadvise_flags: int = ...) -> bytes: ...

    def write(self, data: bytes, offset: int, fadvise_flags: int = ...) -> int: ...

    def discard(self, offset: int, length: int) -> int: ...

    def write_zeroes(self, offset: int, length: int, zero_flags: int = ...) -> int: ...

    def flush(self) -> None: ...

    def stat(self) -> dict[str, Any]: ...


class ObjectLocks:
    """Striped mutexes over the image's objects (see the design note)."""

    def __init__(self, object_size: int, stripes: int = 256) -> None:
        self._shift = max(object_size, PAGE).bit_length() - 1
        self._locks = [threading.Lock() for _ in range(stripes)]

    def acquire(self, offset: int, length: int) -> list[threading.Lock]:
        """Take the locks of the objects [offset, offset + length) touches, in order."""
        first = offset >> self._shift
        last = (offset + max(length, 1) - 1) >> self._shift
        count = len(self._locks)
        if first == last:  # the common case: one object
            lock = self._locks[first % count]
            lock.acquire()
            return [lock]
        if last - first + 1 >= count:
            held = self._locks
        else:
            held = [self._locks[i] for i in sorted({n % count for n in range(first, last + 1)})]
        for lock in held:
            lock.acquire()
        return held

    @staticmethod
    def release(held: list[threading.Lock]) -> None:
        for lock in reversed(held):
            lock.release()

    @contextlib.contextmanager
    def hold(self, offset: int, length: int) -> Iterator[None]:
        held = self.acquire(offset, length)
        try:
            yield
        finally:
            self.release(held)

    @property
    def shift(self) -> int:
        return self._shift

    def object_of(self, offset: int) -> int:
        return offset >> self._shift


def open_cached(image: CacheableImage, mode: str, **bounds: Any) -> CachedImage:
    """Wrap ``image`` in a cache of ``mode`` (none, writethrough, writeback);
    ``bounds`` as for :class:`CachedImage` (librbd's defaults otherwise)."""
    return CachedImage(image, mode, **bounds)


class CachedImage:
    """An image behind the cache; thread-safe. Closing it flushes; the image stays open."""

    # Every engine call made here holds the object locks of its range (see the
    # design note): callers need no locks of their own around reads and writes.
    locks_objects = True

    def __init__(
        self,
        image: CacheableImage,
        mode: str,
        *,
        max_dirty: int = 24 << 20,
        target_dirty: int = 16 << 20,
        max_dirty_age: float = 1.0,
        cache_size: int = 32 << 20,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"cache mode must be one of {MODES}, not {mode!r}")
        if not 0 <= target_dirty <= max_dirty <= cache_size:
            raise ValueError("need 0 <= target_dirty <= max_dirty <= cache_size")
        if max_dirty_age <= 0:
            raise ValueError("max_dirty_age must be positive")
        self.image = image
        self.mode = mode
        self.max_dirty = max_dirty
        self.target_dirty = target_dirty
        self.max_dirty_age = max_dirty_age
        self.cache_size = cache_size
        self._size = image.size()
        # librbd's binding takes bytes only; the native engine any buffer (no copy)
        self._any_buffer = isinstance(image, NativeImage)
        self._write_pieces = image.write_pieces if isinstance(image, NativeImage) else None
        self._objects = ObjectLocks(int(image.stat()["obj_size"]))
        self._lock = threading.Lock()  # the state lock: in-memory work only
        # Writers over the limit and flushes wait on _wake (objects written back,
        # writes behind done); the flushers on _flusher_wake (new dirty data, a
        # closer deadline, the other flusher done), so that a flush writing back
        # object after object does not wake them for nothing each time (measured:
        # a flush of 4096 pages over 256 objects took twice as long).
        self._wake = threading.Condition(self._lock)
        self._flusher_wake = threading.Condition(self._lock)
        self._flush_lock = threading.Lock()
        self._writer_lock = threading.Lock()
        self._pages = PageStore(cache_size // PAGE, self._size)
        self._flush_seen = False
        self._writer = False
        self._closed = False
        self._flushers: list[threading.Thread] = []
        self._busy: set[int] = set()  # objects a flusher, a flush or a writer is writing back
        self._flushing = 0  # flushes writing back now
        self._failure: BaseException | None = None
        self._behind = 0  # writes acknowledged and being written behind now
        self._lost: BaseException | None = None  # a write behind failed: the next flush says
        # counters, for metrics
        self.flushes = 0
        self.hits = 0
        self.misses = 0
        self.written_back = 0

    @property
    def dirty_bytes(self) -> int:
        """Bytes written to the cache and not yet to the engine."""
        return self._pages.dirty_bytes

    # -- lifecycle --------------------------------------------------------------------
    def close(self) -> None:
        """Flush and stop; the wrapped image stays open (its owner closes it)."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            with self._lock:
                self._closed = True
                self._wake.notify_all()
                self._flusher_wake.notify_all()
            for flusher in self._flushers:
                flusher.join()

    def __enter__(self) -> CachedImage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _require_open(self) -> None:
        if self._closed:
            raise errors.InvalidArgument("the cached image is closed")

    # -- size and ranges --------------------------------------------------------------
    def size(self) -> int:
        """The image's size, read from the engine (a resize shows)."""
        self._require_open()
        size = self.image.size()
        if size != self._size:
            with self._lock:
                self._pages.resize(size)
                self._size = size
        return size

    def stat(self) -> dict[str, Any]:
        return self.image.stat()

    @staticmethod
    def _check_range(offset: int, length: int) -> None:
        if not isinstance(offset, int) or not isinstance(length, int):
            raise errors.InvalidArgument("offset and length must be integers")
        if offset < 0 or length < 0:
            raise errors.InvalidArgument(f"negative offset or length ({offset}, {length})")

    def _clip(self, offset: int, length: int) -> tuple[int, int]:
        """librbd's clip_io, as the engine applies it to reads and discards."""
        self._check_range(offset, length)
        if length == 0:
            return offset, 0
        if offset >= self._size and offset >= self.size():
            raise errors.InvalidArgument(
                f"offset {offset} is at or past the end of the {self._size}-byte image"
            )
        return offset, min(length, self._size - offset)

    def _check_write(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        if offset + length > self._size and offset + length > self.size():
            raise errors.InvalidArgument(
                f"write of {length} bytes at {offset} runs past the end of the "
                f"{self._size}-byte image"
            )

    # -- reads -------------------------------------------------------------------------
    def read(self, offset: int, length: int, fadvise_flags: int = 0) -> bytes:
        """Read bytes; a range past the end is cut short, as librbd does."""
        if self._closed:
            self._require_open()
        if (
            type(offset) is not int
            or type(length) is not int
            or offset < 0
            or length <= 0
            or offset + length > self._size
        ):
            offset, length = self._clip(offset, length)
            if length == 0:
                return b""
        if self.mode == "none":
            held = self._objects.acquire(offset, length)
            try:
                return self.image.read(offset, length)
            finally:
                self._objects.release(held)
        with self._lock:
            data = self._pages.read(offset, length)
        if data is not None:
            self.hits += 1
            return data
        self.misses += 1
        return self._read_miss(offset, length)

    def _read_miss(self, offset: int, length: int) -> bytes:
        start = offset - offset % PAGE
        stop = min(-(-(offset + length) // PAGE) * PAGE, self._size)
        held = self._objects.acquire(start, stop - start)
        try:
            fetched = self.image.read(start, stop - start)
            if len(fetched) < stop - start:  # the image shrank under us
                fetched += bytes(stop - start - len(fetched))
            with self._lock:
                fetched = self._pages.fill(fetched, start, keep=stop - start <= POPULATE_MAX)
        finally:
            self._objects.release(held)
        if start == offset and len(fetched) == length:
            return fetched
        return fetched[offset - start : offset - start + length]

    # -- writes ------------------------------------------------------------------------
    def write(
        self,
        data: Buffer,
        offset: int,
        fadvise_flags: int = 0,
        *,
        fua: bool = False,
        acknowledge: Callable[[], None] | None = None,
    ) -> int:
        """Write bytes at ``offset``; writing past the end is refused whole (as the engine).

        ``fua``: the data is on disk when this returns (an NBD FUA write).
        ``acknowledge``: may be called before this returns, once the write may be
        acknowledged to the client (a streaming write in writeback mode, written
        behind: see the design note); when it was, this raises no engine error.
        """
        self._require_open()
        view = memoryview(data).cast("B")
        length = len(view)
        self._check_write(offset, length)
        if length == 0:
            return 0
        if self.mode == "none":
            with self._objects.hold(offset, length):
                self.image.write(self._engine_data(data, view), offset)
        elif not self._writeback_active() or not self._fits_alone(offset, length):
            behind = None if fua or not self._writeback_active() else acknowledge
            self._write_through(self._engine_data(data, view), offset, behind)
        else:
            self._claim_writer()
            self._write_to_cache(view, offset)
        if fua:
            self.flush_range(offset, length)
        return length

    def _engine_data(self, data: Buffer, view: memoryview) -> bytes:
        if type(data) is bytes:
            return data
        # a buffer the native engine reads in place (typed as bytes, as it is used)
        return view if self._any_buffer else view.tobytes()  # type: ignore[return-value]

    def buffers(self, offset: int, length: int) -> bool:
        """Whether a write of this range would (normally) be kept in memory rather
        than written to the engine before returning: a caller may run it inline."""
        return self._writeback_active() and self._fits_alone(offset, length)

    def _writeback_active(self) -> bool:
        return self.mode == "writeback" and self._flush_seen and self.max_dirty > 0

    @staticmethod
    def _pages_of(offset: int, length: int) -> int:
        return (offset + length - 1) // PAGE - offset // PAGE + 1

    def _fits_alone(self, offset: int, length: int) -> bool:
        """Whether the write is one to keep in memory at all, else it goes straight
        through: one larger than the dirty limit, or a streaming one (larger than
        1 MiB, as an image copy sends: copying it into pages would only delay it)."""
        if length >= STREAM_MIN:
            return False
        return max(length, self._pages_of(offset, length) * PAGE) <= self.max_dirty

    def _overload(self, offset: int, length: int) -> int:
        """Bytes over ``max_dirty`` if this write joined the dirty data; state lock held.

        Memory is counted per page too, so small scattered writes cannot hold
        many times ``max_dirty`` in mostly empty pages.
        """
        pages = (len(self._pages.dirty) + self._pages_of(offset, length)) * PAGE
        return max(self._pages.dirty_bytes + length, pages) - self.max_dirty

    def _claim_writer(self) -> None:
        """Take the image's exclusive write lock before holding writes only in memory.

        Otherwise a read-only or busy image would refuse them only at write-back,
        after they were acknowledged.
        """
        if self._writer:
            return
        with self._writer_lock:
            if not self._writer:
                acquire = getattr(self.image, "lock_acquire", None)
                if acquire is not None:
                    acquire()
                self._writer = True

    def _write_to_cache(self, view: memoryview, offset: int) -> None:
        """Keep a write as dirty data; over ``max_dirty``, write back the oldest
        pages first. Writers (and flushers) claim the objects they write back in
        ``_busy``, so that concurrent writers free distinct pages instead of
        queueing on the object lock of the same oldest page and finding it clean;
        when the oldest dirty pages are all claimed, a writer waits for a
        write-back to end (looking further would cost a scan of the dirty pages
        per write, for pages younger than those about to be freed). While a
        flush writes back, writers over the limit wait for it to free room (as
        librbd's do) rather than compete with it, which would delay the flush."""
        length = len(view)
        while True:
            with self._lock:
                over = self._overload(offset, length)
                if over <= 0:
                    was_clean = not self._pages.dirty
                    self._pages.store(view, offset, time.monotonic())
                    if was_clean or self._pages.dirty_bytes > self.target_dirty:
                        self._wake_flusher()  # it has work, or its next deadline changed
                    return
                victims = (
                    []
                    if self._flushing
                    else self._pages.oldest(over, self._unclaimed, _WRITER_SCAN)
                )
                if not victims and (self._flushing or self._busy) and not self._closed:
                    # a flush frees room as it goes, and is not slowed by writers
                    # racing it for the objects (and the GIL); or every dirty page
                    # is being written back already
                    self._wake.wait()
                    continue
                objects = self._claim(victims)
            if not victims:  # nothing left to free (cannot happen if it fits alone)
                self._write_through(self._engine_data(view, view), offset)
                return
            try:
                self._write_back(victims)
            finally:
                with self._lock:
                    self._busy -= objects
                    self._wake.notify_all()
                    self._flusher_wake.notify_all()

    def _unclaimed(self, index: int) -> bool:
        """Whether no one is writing back the object of this page; state lock held."""
        return (index * PAGE) >> self._objects.shift not in self._busy

    def _claim(self, victims: list[int]) -> set[int]:
        """Mark the objects of these pages as being written back; state lock held."""
        shift = self._objects.shift
        objects = {(index * PAGE) >> shift for index in victims}
        self._busy |= objects
        return objects

    def _write_through(
        self, data: bytes, offset: int, acknowledge: Callable[[], None] | None = None
    ) -> None:
        """Write to the engine (bytes: librbd's binding takes nothing else), then the
        pages; with ``acknowledge``, behind it."""
        length = len(data)
        held = self._objects.acquire(offset, length)
        try:
            if acknowledge is not None:
                self._write_behind(data, offset, acknowledge)
                return
            try:
                self.image.write(data, offset)
            except BaseException:
                self._invalidate(offset, offset + length)
                raise
            with self._lock:
                self._pages.apply(memoryview(data), offset, keep=length <= POPULATE_MAX)
        finally:
            self._objects.release(held)

    def _write_behind(self, data: bytes, offset: int, acknowledge: Callable[[], None]) -> None:
        """The object locks held: show the write in the cached pages, acknowledge it,
        then write it to the engine. A reader that misses waits on the object locks;
        a flush waits for ``_behind`` to drop."""
        with self._lock:
            self._pages.apply(memoryview(data), offset, keep=False)
            self._behind += 1
        try:
            acknowledge()
        finally:
            try:
                self.image.write(data, offset)
            except Exception as exc:  # acknowledged already: the next flush reports it
                self._invalidate(offset, offset + len(data))
                log.warning("a write acknowledged at %d+%d failed: %s", offset, len(data), exc)
                with self._lock:
                    self._lost = self._lost or exc
            finally:
                with self._lock:
                    self._behind -= 1
                    if not self._behind:
                        self._wake.notify_all()

    def _invalidate(self, start: int, end: int) -> None:
        """After a failed engine call: forget clean pages of [start, end), which may
        no longer match the engine (dirty ones are newer and will be written back)."""
        with self._lock:
            self._pages.invalidate(start, end)

    # -- discard and write-zeroes ------------------------------------------------------
    def discard(self, offset: int, length: int) -> int:
        """Deallocate a range; it reads back as zeros."""
        return self._zero_range(offset, length, unmap=True)

    def write_zeroes(self, offset: int, length: int, zero_flags: int = 0) -> int:
        """Zero a range (the engine deallocates it too)."""
        return self._zero_range(offset, length, unmap=False)

    def _zero_range(self, offset: int, length: int, unmap: bool) -> int:
        self._require_open()
        offset, length = self._clip(offset, length)
        if length == 0:
            return 0
        with self._objects.hold(offset, length):
            try:
                if unmap:
                    done = self.image.discard(offset, length)
                else:
                    done = self.image.write_zeroes(offset, length)
            except BaseException:
                self._invalidate(offset, offset + length)
                raise
            with self._lock:
                self._pages.forget(offset, offset + length)
        return done

    # -- write-back and flush ----------------------------------------------------------
    def flush(self) -> None:
        """Write back everything dirty, then make the engine durable (fsync)."""
        self._require_open()
        self._flush_seen = True
        if self.mode == "writeback":
            self._write_back_all()
            with self._lock:
                while self._behind:
                    self._wake.wait()
        with self._flush_lock:
            self.image.flush()
        with self._lock:
            lost, self._lost = self._lost, None
        if lost is not None:
            raise errors.IOError(f"a write acknowledged before this flush failed: {lost}") from lost
        self.flushes += 1

    def _write_back_all(self) -> None:
        """Write back every page dirty now, object by object; an object a flusher
        is writing back is waited for, then taken (its pages may be clean by then).
        Every page is snapshotted by this thread once, or found clean, so a flush
        ends even under a stream of writes. (Letting the flushers join in, on
        other objects, was measured: it wrote re-dirtied pages twice and cost a
        third more CPU per write.)"""
        shift = self._objects.shift
        with self._lock:
            pending: dict[int, list[int]] = {}
            for index in sorted(self._pages.dirty):
                pending.setdefault((index * PAGE) >> shift, []).append(index)
            self._flushing += 1  # writers over the limit wait for it (see _write_to_cache)
        try:
            while pending:
                with self._lock:
                    while True:
                        objno = next((o for o in pending if o not in self._busy), None)
                        if objno is not None:
                            break
                        self._wake.wait()  # every object left is being written back
                    self._busy.add(objno)
                try:
                    self._write_back(pending.pop(objno))
                finally:
                    with self._lock:
                        self._busy.discard(objno)
                        self._wake.notify_all()
        finally:
            with self._lock:
                self._flushing -= 1
                self._wake.notify_all()
                self._flusher_wake.notify_all()  # due pages it waited for may be clean

    def flush_range(self, offset: int, length: int) -> None:
        """Make one range durable (an NBD FUA): write back its dirty pages, then flush."""
        self._require_open()
        if self.mode == "writeback" and length > 0:
            with self._lock:
                pending = self._pages.dirty_in(offset // PAGE, (offset + length - 1) // PAGE)
            self._write_back(pending)
        with self._flush_lock:
            self.image.flush()

    def dirty_ranges(self, offset: int, length: int) -> list[Interval]:
        """(offset, length) runs of [offset, offset + length) dirty in memory, merged."""
        with self._lock:
            return self._pages.dirty_ranges(offset, length) if self._pages.dirty else []

    def _write_back(self, indexes: Iterable[int]) -> None:
        """Write the dirty bytes of these pages to the engine, one object at a time."""
        by_object: dict[int, list[int]] = {}
        for index in sorted(indexes):
            by_object.setdefault(self._objects.object_of(index * PAGE), []).append(index)
        for pages in by_object.values():
            start = pages[0] * PAGE
            held = self._objects.acquire(start, pages[-1] * PAGE + PAGE - start)
            try:
                with self._lock:
                    taken, extents = self._pages.snapshot(pages)
                if not taken:
                    continue
                self._write_extents(extents)
                with self._lock:
                    self._pages.written(taken)
                    self.written_back += sum(len(data) for _, data in extents)
            finally:
                self._objects.release(held)

    def _write_extents(self, extents: Sequence[tuple[int, Buffer]]) -> None:
        """Write (offset, data) extents to the engine, in one call where it takes them
        so (the native engine: one I/O instead of one per page)."""
        if self._write_pieces is not None:
            self._write_pieces(extents)
            return
        for at, data in extents:
            self.image.write(self._engine_data(data, memoryview(data)), at)

    # -- the flusher thread ------------------------------------------------------------
    def _wake_flusher(self) -> None:
        """Start the flushers, or wake them; state lock held."""
        if self._closed:
            return
        if not self._flushers:
            for n in range(_FLUSHERS):
                thread = threading.Thread(
                    target=self._flusher_loop, name=f"cache-flusher-{n}", daemon=True
                )
                self._flushers.append(thread)
                thread.start()
        else:
            self._flusher_wake.notify_all()

    def _flusher_loop(self) -> None:
        """Write back aged pages, and the oldest while over target. Flushers claim
        the objects they write back, so that two never pick the same pages."""
        while True:
            with self._lock:
                while True:
                    if self._closed:
                        return
                    victims, objects = self._due()
                    if victims:
                        self._busy |= objects
                        break
                    delay = self._next_due()
                    # pages due but claimed by someone else: they wake us when done
                    self._flusher_wake.wait(None if delay == 0 else delay)
            try:
                self._write_back(victims)
                self._failure = None
            except Exception as exc:  # kept dirty; retried, and raised by the next flush
                if self._failure is None:
                    log.warning("cache write-back failed, will retry: %s", exc)
                self._failure = exc
                with self._lock:
                    self._flusher_wake.wait(_RETRY_DELAY)
            finally:
                with self._lock:
                    self._busy -= objects
                    self._wake.notify_all()
                    self._flusher_wake.notify_all()

    def _due(self) -> tuple[list[int], set[int]]:
        """Pages to write back now, and their objects (state lock held): aged ones,
        else the oldest while over target; none of objects another flusher has."""
        pages = self._pages
        if not pages.dirty:
            return [], set()
        shift, busy = self._objects.shift, self._busy

        def free(index: int) -> bool:
            return (index * PAGE) >> shift not in busy

        # while a flush waits, everything is due
        deadline = time.monotonic() - self.max_dirty_age
        victims = pages.aged(deadline, _FLUSHER_BATCH, free)
        if not victims and pages.dirty_bytes > self.target_dirty:
            excess = min(pages.dirty_bytes - self.target_dirty, _FLUSHER_BATCH * PAGE)
            victims = pages.oldest(excess, free)
        return victims, {(index * PAGE) >> shift for index in victims}

    def _next_due(self) -> float | None:
        """Seconds until the oldest dirty page ages; None when nothing is dirty."""
        since = self._pages.oldest_since()
        if since is None:
            return None
        return max(0.0, since + self.max_dirty_age - time.monotonic())
