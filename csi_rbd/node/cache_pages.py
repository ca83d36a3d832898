"""The in-memory pages of the node cache (:mod:`csi_rbd.node.cache`): no locks, no I/O.

Design
------
The image is cut into 4 KiB pages, held in one of two maps (never both):

* ``clean``: pages equal to what the engine holds, as immutable ``bytes``
  (a whole-page read hit returns the object itself, no copy), in LRU order;
  evicted beyond the capacity.
* ``dirty``: pages holding bytes the engine does not have yet, as
  :class:`DirtyPage` (a ``bytearray``, the dirty byte intervals, a
  generation), in the order they became dirty (oldest first, which is the
  order of write-back and of ageing). A dirty page is *complete* (every byte
  valid) or *partial* (only its dirty intervals are valid: a small write to a
  page not cached is never preceded by a read).

Every method is called with the cache's state lock held; the cache decides
when engine I/O happens around them. Pages past the image's end are padded
with zeros, and a shrink zeroes and drops what lies past the new end.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

PAGE = 4096
Interval = tuple[int, int]
# The intervals of a wholly dirty page. Interval lists are never changed in
# place (the helpers below return new ones), so pages may share this one.
FULL: list[Interval] = [(0, PAGE)]


# -- byte intervals within a page: sorted, disjoint, not touching ----------------------
def add_interval(intervals: list[Interval], lo: int, hi: int) -> tuple[list[Interval], int]:
    """``intervals`` with [lo, hi) added, and how many bytes were new."""
    if lo == 0 and hi == PAGE:
        return FULL, PAGE - sum(e - s for s, e in intervals)
    result: list[Interval] = []
    before = 0
    for start, end in intervals:
        before += end - start
        if end < lo or start > hi:
            result.append((start, end))
        else:
            lo, hi = min(start, lo), max(end, hi)
    result.append((lo, hi))
    result.sort()
    return result, sum(e - s for s, e in result) - before


def remove_interval(intervals: list[Interval], lo: int, hi: int) -> tuple[list[Interval], int]:
    """``intervals`` without [lo, hi), and how many bytes went."""
    result: list[Interval] = []
    removed = 0
    for start, end in intervals:
        if end <= lo or start >= hi:
            result.append((start, end))
            continue
        removed += min(end, hi) - max(start, lo)
        if start < lo:
            result.append((start, lo))
        if end > hi:
            result.append((hi, end))
    return result, removed


def covers(intervals: list[Interval], lo: int, hi: int) -> bool:
    return any(start <= lo and hi <= end for start, end in intervals)


def _padded(data: bytes) -> bytes:
    return data if len(data) == PAGE else data + bytes(PAGE - len(data))


class DirtyPage:
    __slots__ = ("complete", "data", "gen", "intervals", "since")

    def __init__(self, data: bytearray, complete: bool, since: float) -> None:
        self.data = data
        self.complete = complete
        self.intervals: list[Interval] = []
        self.gen = 0
        self.since = since


Snapshot = tuple[list[tuple[int, int]], list[tuple[int, bytearray]]]


class PageStore:
    def __init__(self, capacity: int, size: int) -> None:
        self.capacity = capacity  # pages, clean and dirty
        self.size = size  # the image's size
        self.clean: OrderedDict[int, bytes] = OrderedDict()
        self.dirty: dict[int, DirtyPage] = {}
        self.dirty_bytes = 0

    def _pieces(self, offset: int, length: int) -> Iterable[tuple[int, int, int]]:
        """(page, lo, hi) pieces of [offset, offset + length)."""
        end = offset + length
        index = offset // PAGE
        pos = offset
        while pos < end:
            base = index * PAGE
            hi = min(end - base, PAGE)
            yield index, pos - base, hi
            pos = base + hi
            index += 1

    # -- reading -----------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes | None:
        """The bytes if every one of them is in memory, else None."""
        index = offset // PAGE
        base = index * PAGE
        if offset + length <= base + PAGE:  # one page: the common case
            lo, hi = offset - base, offset + length - base
            page = self.dirty.get(index)
            if page is not None:
                if page.complete or covers(page.intervals, lo, hi):
                    return memoryview(page.data)[lo:hi].tobytes()
                return None
            data = self.clean.get(index)
            if data is None:
                return None
            self.clean.move_to_end(index)
            return data if lo == 0 and hi == PAGE else data[lo:hi]
        parts: list[bytes | memoryview] = []
        for index, lo, hi in self._pieces(offset, length):
            page = self.dirty.get(index)
            if page is not None:
                if not (page.complete or covers(page.intervals, lo, hi)):
                    return None
                parts.append(memoryview(page.data)[lo:hi])
                continue
            data = self.clean.get(index)
            if data is None:
                return None
            self.clean.move_to_end(index)
            parts.append(data if lo == 0 and hi == PAGE else memoryview(data)[lo:hi])
        return b"".join(parts)

    def fill(self, fetched: bytes, start: int, keep: bool) -> bytes:
        """Engine data of whole pages from ``start``, with dirty pages laid over it.

        Partial dirty pages become complete; pages not cached are kept as clean
        ones if ``keep``. Call with the object lock held across the engine read.
        """
        first = start // PAGE
        if len(fetched) <= PAGE and first not in self.dirty:  # one page: the common case
            if keep and first not in self.clean:
                self.clean[first] = _padded(fetched)
                self.evict()
            return fetched
        count = -(-len(fetched) // PAGE)
        merged: bytearray | None = None
        for k in range(count):
            index = first + k
            page = self.dirty.get(index)
            if page is None:
                if keep and index not in self.clean:
                    chunk = fetched if count == 1 else fetched[k * PAGE : (k + 1) * PAGE]
                    self.clean[index] = _padded(chunk)
                continue
            if merged is None:
                merged = bytearray(fetched)
            at = k * PAGE
            n = min(PAGE, len(fetched) - at)
            if page.complete:
                merged[at : at + n] = page.data[:n]
            else:  # lay the dirty bytes over the engine's, and keep the whole page
                for lo, hi in page.intervals:
                    if lo < n:
                        merged[at + lo : at + min(hi, n)] = page.data[lo : min(hi, n)]
                page.data[:n] = merged[at : at + n]
                page.complete = True
        if keep:
            self.evict()
        return fetched if merged is None else bytes(merged)

    # -- writing -----------------------------------------------------------------------
    def store(self, view: memoryview, offset: int, now: float) -> None:
        """Take a write as dirty data."""
        pos = 0
        dirty, clean = self.dirty, self.clean
        for index, lo, hi in self._pieces(offset, len(view)):
            chunk = view[pos : pos + hi - lo]
            pos += hi - lo
            page = dirty.get(index)
            if hi - lo == PAGE:  # a whole page: the common case of larger writes
                if page is None:
                    clean.pop(index, None)
                    page = dirty[index] = DirtyPage(bytearray(chunk), True, now)
                    self.dirty_bytes += PAGE
                else:
                    page.data[:] = chunk
                    page.complete = True
                    if page.intervals is not FULL:
                        self.dirty_bytes += PAGE - sum(e - s for s, e in page.intervals)
                page.intervals = FULL
                page.gen += 1
                continue
            if page is None:
                old = clean.pop(index, None)
                if old is not None:
                    data = bytearray(old)
                    complete = True
                else:
                    data = bytearray(PAGE)
                    complete = lo == 0 and (hi == PAGE or index * PAGE + hi >= self.size)
                data[lo:hi] = chunk
                page = dirty[index] = DirtyPage(data, complete, now)
                page.intervals = [(lo, hi)]
                self.dirty_bytes += hi - lo
            else:
                page.data[lo:hi] = chunk
                if page.intervals is not FULL:
                    page.intervals, added = add_interval(page.intervals, lo, hi)
                    self.dirty_bytes += added
            page.gen += 1
        self.evict()

    def apply(self, view: memoryview, offset: int, keep: bool) -> None:
        """Show a write the engine just took (write-through) in the cached pages;
        with ``keep``, whole pages written are kept as clean ones."""
        if keep:
            pieces: Iterable[tuple[int, int, int]] = self._pieces(offset, len(view))
        else:  # only the pages cached already
            end = offset + len(view)
            pieces = [
                (i, max(offset - i * PAGE, 0), min(end - i * PAGE, PAGE))
                for i in self._indexes(offset, end)
            ]
        for index, lo, hi in pieces:
            chunk = view[index * PAGE + lo - offset : index * PAGE + hi - offset]
            whole = lo == 0 and (hi == PAGE or index * PAGE + hi >= self.size)
            page = self.dirty.get(index)
            if page is not None:
                page.data[lo:hi] = chunk
                self._undirty(index, page, lo, hi)
            elif index in self.clean:
                if whole:
                    self.clean[index] = _padded(chunk.tobytes())
                else:
                    data = bytearray(self.clean[index])
                    data[lo:hi] = chunk
                    self.clean[index] = bytes(data)
            elif keep and whole:
                self.clean[index] = _padded(chunk.tobytes())
        if keep:
            self.evict()

    def _undirty(self, index: int, page: DirtyPage, lo: int, hi: int) -> None:
        """[lo, hi) of a dirty page is now what the engine holds."""
        if lo == 0 and hi == PAGE:
            self.dirty_bytes -= (
                PAGE if page.intervals is FULL else sum(e - s for s, e in page.intervals)
            )
            page.intervals = []
        else:
            page.intervals, removed = remove_interval(page.intervals, lo, hi)
            self.dirty_bytes -= removed
        page.gen += 1
        if not page.intervals:
            del self.dirty[index]
            if page.complete:
                self.clean[index] = bytes(page.data)

    # -- discard, shrink, failures -----------------------------------------------------
    def _indexes(self, start: int, end: int) -> list[int]:
        """Cached pages overlapping [start, end), in order."""
        first, last = start // PAGE, (end - 1) // PAGE
        if last - first + 1 > len(self.dirty) + len(self.clean):
            found = [i for i in self.dirty if first <= i <= last]
            found += [i for i in self.clean if first <= i <= last]
            return sorted(found)
        return [i for i in range(first, last + 1) if i in self.dirty or i in self.clean]

    def forget(self, start: int, end: int) -> None:
        """The engine now reads zeros over [start, end): so do the pages."""
        for index in self._indexes(start, end):
            base = index * PAGE
            lo, hi = max(start - base, 0), min(end - base, PAGE)
            if lo == 0 and hi == PAGE:
                self.drop(index)
            else:
                self._zero(index, lo, hi)

    def drop(self, index: int) -> None:
        page = self.dirty.pop(index, None)
        if page is not None:
            self.dirty_bytes -= sum(e - s for s, e in page.intervals)
        else:
            self.clean.pop(index, None)

    def _zero(self, index: int, lo: int, hi: int) -> None:
        page = self.dirty.get(index)
        if page is not None:
            page.data[lo:hi] = bytes(hi - lo)
            self._undirty(index, page, lo, hi)
        else:
            data = bytearray(self.clean[index])
            data[lo:hi] = bytes(hi - lo)
            self.clean[index] = bytes(data)

    def invalidate(self, start: int, end: int) -> None:
        """Drop clean pages of [start, end): they may no longer match the engine."""
        for index in self._indexes(start, end):
            self.clean.pop(index, None)

    def resize(self, size: int) -> None:
        if size < self.size:  # what lies past the new end is gone
            for index in self._indexes(size, self.size):
                base = index * PAGE
                if base >= size:
                    self.drop(index)
                else:
                    self._zero(index, size - base, PAGE)
        self.size = size

    def evict(self) -> None:
        """Drop least recently used clean pages beyond the capacity."""
        clean = self.clean
        excess = len(self.dirty) + len(clean) - self.capacity
        while excess > 0 and clean:
            clean.popitem(last=False)
            excess -= 1

    # -- write-back ----------------------------------------------------------------------
    def oldest(
        self, nbytes: int, allowed: Callable[[int], bool] | None = None, scan: int | None = None
    ) -> list[int]:
        """The oldest dirty pages (``allowed`` ones) holding at least ``nbytes``;
        with ``scan``, looking at no more than that many of the oldest pages."""
        victims: list[int] = []
        for index, page in self.dirty.items():
            if allowed is not None and not allowed(index):
                if scan is not None:
                    scan -= 1
                    if scan <= 0:
                        break
                continue
            victims.append(index)
            intervals = page.intervals
            nbytes -= PAGE if intervals is FULL else sum(e - s for s, e in intervals)
            if nbytes <= 0:
                break
        return victims

    def aged(self, deadline: float, limit: int, allowed: Callable[[int], bool]) -> list[int]:
        """Up to ``limit`` ``allowed`` pages dirty since ``deadline`` or longer, oldest first."""
        victims: list[int] = []
        for index, page in self.dirty.items():
            if page.since > deadline or len(victims) >= limit:
                break
            if allowed(index):
                victims.append(index)
        return victims

    def oldest_since(self) -> float | None:
        for page in self.dirty.values():
            return page.since
        return None

    def snapshot(self, indexes: Iterable[int]) -> Snapshot:
        """(page, generation) pairs taken, and the merged extents of their dirty bytes
        (copies: the pages may change as soon as the state lock is let go)."""
        taken: list[tuple[int, int]] = []
        extents: list[tuple[int, bytearray]] = []
        size = self.size
        for index in indexes:
            page = self.dirty.get(index)
            if page is None:
                continue
            taken.append((index, page.gen))
            base = index * PAGE
            for lo, hi in page.intervals:
                hi = min(hi, size - base)  # never past the end
                if lo >= hi:
                    continue
                piece = memoryview(page.data)[lo:hi] if hi - lo < PAGE else page.data
                if extents and extents[-1][0] + len(extents[-1][1]) == base + lo:
                    extents[-1][1].extend(piece)
                else:
                    extents.append((base + lo, bytearray(piece)))
        return taken, extents

    def written(self, taken: list[tuple[int, int]]) -> None:
        """A snapshot reached the engine: pages unchanged since are clean."""
        for index, gen in taken:
            page = self.dirty.get(index)
            if page is not None and page.gen == gen:
                self._undirty(index, page, 0, PAGE)

    def dirty_in(self, first: int, last: int) -> list[int]:
        if last - first + 1 > len(self.dirty):
            return sorted(i for i in self.dirty if first <= i <= last)
        return [i for i in range(first, last + 1) if i in self.dirty]

    def dirty_ranges(self, offset: int, length: int) -> list[Interval]:
        """(offset, length) runs of [offset, offset + length) dirty, merged."""
        end = offset + length
        runs: list[Interval] = []
        for index in self.dirty_in(offset // PAGE, (end - 1) // PAGE):
            base = index * PAGE
            for lo, hi in self.dirty[index].intervals:
                start, stop = max(base + lo, offset), min(base + hi, end)
                if start >= stop:
                    continue
                if runs and runs[-1][0] + runs[-1][1] == start:
                    runs[-1] = (runs[-1][0], stop - runs[-1][0])
                else:
                    runs.append((start, stop - start))
        return runs
