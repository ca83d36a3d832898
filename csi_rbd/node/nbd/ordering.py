"""Overlapping requests of one connection run in the order they arrived.

Requests are served concurrently, so without care a read could overtake the
write before it to the same bytes, or two overlapping writes could land in
either order. :class:`Sequencer` keeps the requests still in flight; a new
request that overlaps one of them (and either is a write) waits until those
are done, then starts. Non-overlapping requests, and reads against reads,
never wait for each other. Zero-length requests (FLUSH) overlap nothing: a
flush covers what was *completed* before it, as the protocol asks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class Request:
    """One transmission request; ``run`` is what a worker calls to serve it."""

    __slots__ = (
        "blockers",
        "cookie",
        "end",
        "flags",
        "kind",
        "offset",
        "payload",
        "waiters",
        "writes",
    )

    def __init__(
        self, kind: int, flags: int, cookie: int, offset: int, length: int, writes: bool
    ) -> None:
        self.kind = kind
        self.flags = flags
        self.cookie = cookie
        self.offset = offset
        self.end = offset + length
        self.writes = writes
        self.payload: bytes | bytearray | memoryview = b""
        self.blockers = 0
        self.waiters: list[Request] = []

    @property
    def length(self) -> int:
        return self.end - self.offset

    def conflicts(self, other: Request) -> bool:
        return (self.writes or other.writes) and self.offset < other.end and other.offset < self.end


class Sequencer:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active: list[Request] = []

    def clear_for(self, request: Request) -> bool:
        """Whether nothing in flight conflicts with ``request`` (it may run inline)."""
        if not self._active:
            return True
        with self._lock:
            return not any(request.conflicts(other) for other in self._active)

    def clear(self, offset: int, end: int, writes: bool) -> bool:
        """Whether nothing in flight conflicts with an access to [offset, end)."""
        if not self._active:
            return True
        with self._lock:
            return not any(
                (writes or other.writes) and offset < other.end and other.offset < end
                for other in self._active
            )

    def admit(self, request: Request) -> bool:
        """Track ``request``; True if it may start now, else it starts from :meth:`done`."""
        with self._lock:
            for other in self._active:
                if request.conflicts(other):
                    other.waiters.append(request)
                    request.blockers += 1
            self._active.append(request)
            return request.blockers == 0

    def done(self, request: Request, start: Callable[[Request], None]) -> None:
        """``request`` finished: start the requests that waited only for it."""
        with self._lock:
            self._active.remove(request)
            ready = []
            for waiter in request.waiters:
                waiter.blockers -= 1
                if waiter.blockers == 0:
                    ready.append(waiter)
            request.waiters = []
            if not self._active:
                self._idle.notify_all()
        for waiter in ready:
            start(waiter)

    def drain(self) -> None:
        """Wait until every tracked request is done."""
        with self._lock:
            while self._active:
                self._idle.wait()
