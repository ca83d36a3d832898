"""Per-image header file: a change counter and the cross-process locks.

Design
------
Every image directory holds a small ``header`` file. Its first eight bytes are
a *generation* counter, mapped into memory by every open handle; the file also
carries three advisory byte-range locks taken with open-file-description (OFD)
locks, which belong to one open file, so two threads or two processes with
their own descriptors conflict as expected, and a killed process drops its
locks with its descriptors:

* ``OWNER`` - the exclusive write lock (librbd's exclusive-lock feature). One
  handle in the whole node holds it while it writes data; a second writer gets
  ``ImageBusy``.
* ``GATE`` and ``BARRIER`` - a readers/writer barrier between head I/O and the
  operations that change what head I/O means (snapshot create, rollback,
  resize, flatten). Each I/O takes GATE shared, BARRIER shared, releases GATE,
  does its work and releases BARRIER. A metadata operation takes GATE
  exclusive (new I/O stops at the gate) and then BARRIER exclusive (in-flight
  I/O drains), so it cannot starve behind a steady stream of overlapping I/O.

GATE only keeps a metadata operation from starving; BARRIER alone keeps head
I/O and metadata operations apart. So an I/O skips GATE while no operation
holds it: a metadata operation, once it holds GATE exclusive, sets the
*closing* byte in the mapped header (and clears it before letting go), and an
I/O that finds the byte clear takes BARRIER shared directly, without waiting.
Should that fail (an operation holds BARRIER, or is draining the I/O that
slipped past the byte as it was set), the I/O takes the full path through
GATE. Only I/O that read the byte before it was set can pass that way, so an
operation still drains in bounded time; and exclusion itself never depended
on GATE. A byte left set by a killed process costs only the fast path: an I/O
holding GATE shared (so no operation holds it) clears it.

Each I/O locks with a descriptor of its own, taken from a pool (OFD locks
belong to the descriptor: two I/O in flight on one descriptor would share one
lock), so a handle keeps as many descriptors as it ever had I/O in flight at
once, whatever the number of threads that did I/O.

A metadata operation bumps the generation *before* committing to the catalog
and while it holds the barrier. An I/O that then finds a new generation
re-reads the image row, so it never writes with a stale snapshot context, even
if the operation's process died between the bump and the commit.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from csi_rbd.engine import errors

_HEADER_SIZE = 4096
_GENERATION = struct.Struct("<Q")
_CLOSING = 16  # header byte: set while a metadata operation holds GATE (see above)
_GATE, _BARRIER, _OWNER, _WAITERS = 64, 65, 66, 67
_FLOCK = "hhqqi4x"  # struct flock on Linux x86_64/aarch64: type, whence, start, len, pid
_POLL_START, _POLL_MAX = 0.0001, 0.002
_REQUESTS: dict[tuple[int, int], bytes] = {
    (kind, offset): struct.pack(_FLOCK, kind, os.SEEK_SET, offset, 1, 0)
    for kind in (fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK)
    for offset in (_GATE, _BARRIER, _OWNER, _WAITERS)
}
_SHARE_BARRIER = _REQUESTS[fcntl.F_RDLCK, _BARRIER]
_FREE_BARRIER = _REQUESTS[fcntl.F_UNLCK, _BARRIER]


def _flock(fd: int, kind: int, offset: int, wait: bool) -> bool:
    """Set or clear an OFD lock on one byte; False when ``wait`` is off and it is taken."""
    request = _REQUESTS[kind, offset]
    command = fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK
    try:
        fcntl.fcntl(fd, command, request)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _lock_within(fd: int, kind: int, offset: int, timeout: float, what: str) -> None:
    """Take a lock, polling until ``timeout`` so that no caller waits forever.

    While it polls, the caller holds WAITERS shared, so that a long series of
    exclusive sections (a flatten) can see it and step aside.
    """
    if _flock(fd, kind, offset, wait=False):
        return
    _flock(fd, fcntl.F_RDLCK, _WAITERS, wait=False)
    try:
        deadline = time.monotonic() + timeout
        delay = _POLL_START
        while time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, _POLL_MAX)
            if _flock(fd, kind, offset, wait=False):
                return
        raise errors.ImageBusy(f"timed out after {timeout:g}s waiting for {what}")
    finally:
        _flock(fd, fcntl.F_UNLCK, _WAITERS, wait=False)


def _try_share_barrier(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _SHARE_BARRIER)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class ImageHeader:
    """The header file of one image as seen by one open handle."""

    def __init__(self, path: Path, lock_timeout: float = 30.0) -> None:
        self.path = path
        self.lock_timeout = lock_timeout
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if os.fstat(fd).st_size < _HEADER_SIZE:
            os.ftruncate(fd, _HEADER_SIZE)
        self._map_fd = fd
        self._map = mmap.mmap(fd, _HEADER_SIZE)
        self._owner_fd: int | None = None
        # Descriptors for I/O sections, none of them holding a lock while here
        # (see the design note); list.pop and list.append are atomic.
        self._free_fds: list[int] = []
        self._closed = False

    # -- generation --------------------------------------------------------
    def generation(self) -> int:
        return int(_GENERATION.unpack_from(self._map, 0)[0])

    def layout_generation(self) -> int:
        """A second counter, moved only by changes that rewrite which version an
        object's head shows wholesale (rollback, shrink)."""
        return int(_GENERATION.unpack_from(self._map, 8)[0])

    def bump_generation(self, layout: bool = False) -> None:
        """Advance the counter(s); call only inside :meth:`exclusive_section`."""
        _GENERATION.pack_into(self._map, 0, self.generation() + 1)
        if layout:
            _GENERATION.pack_into(self._map, 8, self.layout_generation() + 1)

    # -- I/O barrier -------------------------------------------------------
    def enter_io(self) -> int:
        """Take the barrier shared for one head I/O; give the result to :meth:`exit_io`."""
        try:
            fd = self._free_fds.pop()
        except IndexError:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            if not self._map[_CLOSING] and _try_share_barrier(fd):
                return fd
            _lock_within(fd, fcntl.F_RDLCK, _GATE, self.lock_timeout, "a snapshot or resize")
            try:
                if self._map[_CLOSING]:
                    # holding GATE shared: no operation holds it, so the byte is a
                    # leftover of a killed process
                    self._map[_CLOSING] = 0
                _lock_within(fd, fcntl.F_RDLCK, _BARRIER, self.lock_timeout, "a snapshot or resize")
            finally:
                _flock(fd, fcntl.F_UNLCK, _GATE, wait=False)
        except BaseException:
            self._give_back(fd)  # it holds no lock
            raise
        return fd

    def exit_io(self, fd: int) -> None:
        """End an I/O section begun by :meth:`enter_io`."""
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FREE_BARRIER)
        except BaseException:
            os.close(fd)  # closing drops the lock for sure
            raise
        self._give_back(fd)

    def _give_back(self, fd: int) -> None:
        self._free_fds.append(fd)
        if self._closed:  # closed while this I/O ran
            self._close_free_fds()

    def _close_free_fds(self) -> None:
        while True:
            try:
                fd = self._free_fds.pop()
            except IndexError:
                return
            os.close(fd)

    def io_section(self) -> _IoSection:
        """Hold the barrier shared for one head I/O (a context manager)."""
        return _IoSection(self)

    @contextmanager
    def exclusive_section(self) -> Iterator[None]:
        """Hold the barrier exclusively: no head I/O runs on any handle meanwhile."""
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        closing = False
        try:
            _lock_within(fd, fcntl.F_WRLCK, _GATE, self.lock_timeout, "another image operation")
            self._map[_CLOSING] = 1  # new I/O goes through GATE from now on
            closing = True
            _lock_within(fd, fcntl.F_WRLCK, _BARRIER, self.lock_timeout, "in-flight I/O")
            yield
        finally:
            if closing:
                self._map[_CLOSING] = 0  # still holding GATE: no other operation set it
            os.close(fd)  # closing the descriptor drops both locks

    def yield_to_waiters(self, longest: float = 0.2) -> None:
        """Before another exclusive section of a long series, let waiting handles in."""
        deadline = time.monotonic() + longest
        while self._others_waiting() and time.monotonic() < deadline:
            time.sleep(_POLL_START)

    def _others_waiting(self) -> bool:
        request = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, _WAITERS, 1, 0)
        answer = fcntl.fcntl(self._map_fd, fcntl.F_OFD_GETLK, request)
        return bool(struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK)

    # -- exclusive write lock ----------------------------------------------
    def owns_write_lock(self) -> bool:
        return self._owner_fd is not None

    def try_acquire_write_lock(self) -> bool:
        if self._owner_fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        if not _flock(fd, fcntl.F_WRLCK, _OWNER, wait=False):
            os.close(fd)
            return False
        self._owner_fd = fd
        return True

    def release_write_lock(self) -> None:
        if self._owner_fd is not None:
            os.close(self._owner_fd)
            self._owner_fd = None

    def write_lock_held_elsewhere(self) -> bool:
        """True when another handle (any process) holds the write lock."""
        if self._owner_fd is not None:
            return False
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            request = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, _OWNER, 1, 0)
            answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, request)
            return bool(struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.release_write_lock()
        self._closed = True
        self._close_free_fds()
        self._map.close()
        os.close(self._map_fd)


class _IoSection:
    __slots__ = ("_fd", "_header")

    def __init__(self, header: ImageHeader) -> None:
        self._header = header
        self._fd = -1

    def __enter__(self) -> None:
        self._fd = self._header.enter_io()

    def __exit__(self, *exc_info: object) -> None:
        self._header.exit_io(self._fd)
