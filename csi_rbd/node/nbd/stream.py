"""Buffered socket input that can say whether more is already buffered.

The transmission loop serves every request already received before it sends
the replies it collected in one system call (:mod:`.transmission`); for that
it must know when the next read would block, which ``socket.makefile`` cannot
tell. The handshake reads through the same buffer, so nothing a client sends
early is lost between the two phases.
"""

from __future__ import annotations

import collections
import socket

_LARGE_MIN = 512 << 10  # payloads from here up come in recycled buffers
_FREE_PER_SIZE = 4


class ConnectionClosed(Exception):
    """The peer closed the connection (in the middle of a message, if ``partial``)."""

    def __init__(self, partial: bool) -> None:
        super().__init__("connection closed inside a message" if partial else "connection closed")
        self.partial = partial


class SocketReader:
    def __init__(self, sock: socket.socket, capacity: int = 256 << 10) -> None:
        self.sock = sock
        self.buffer = bytearray(capacity)
        self._view = memoryview(self.buffer)
        self.start = 0  # unread bytes are buffer[start:end]
        self.end = 0
        # free large buffers by size; giving one back may happen on any thread
        self._free: dict[int, collections.deque[bytearray]] = {}

    @property
    def buffered(self) -> int:
        return self.end - self.start

    def _fill(self) -> bool:
        """Receive what is there (blocking if nothing is); False at EOF."""
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.buffer):  # move the unread tail to the front
            count = self.end - self.start
            self.buffer[:count] = self._view[self.start : self.end]
            self.start, self.end = 0, count
        received = self.sock.recv_into(self._view[self.end :])
        self.end += received
        return received > 0

    def ensure(self, count: int) -> bool:
        """Make ``count`` (<= capacity) bytes readable at ``start``; False at a clean EOF."""
        while self.end - self.start < count:
            if self.start + count > len(self.buffer) and self.start:
                unread = self.end - self.start
                self.buffer[:unread] = self._view[self.start : self.end]
                self.start, self.end = 0, unread
            if not self._fill():
                if self.end == self.start:
                    return False
                raise ConnectionClosed(partial=True)
        return True

    def read_exactly(self, count: int) -> bytes | bytearray:
        """Exactly ``count`` bytes (any size); ConnectionClosed if the peer goes first."""
        if count <= len(self.buffer):
            if not self.ensure(count):
                raise ConnectionClosed(partial=False)
            data = bytes(self._view[self.start : self.start + count])
            self.start += count
            return data
        out = bytearray(count)
        self._receive_into(memoryview(out))
        return out  # a bytearray: no second copy of a large payload

    def read_large(self, count: int) -> memoryview:
        """``count`` bytes (more than the buffer holds) in a recycled buffer; hand it
        back with :meth:`recycle` once done with it (dropping it is fine too).

        Allocating a fresh buffer for every large write would zero it and fault
        its pages in while holding the GIL: most of the cost of a 2 MiB write.
        """
        size = max(_LARGE_MIN, 1 << (count - 1).bit_length())
        free = self._free.get(size)
        buffer = free.pop() if free else bytearray(size)
        view = memoryview(buffer)[:count]
        self._receive_into(view)
        return view

    def recycle(self, view: memoryview) -> None:
        buffer = view.obj
        view.release()
        if isinstance(buffer, bytearray) and len(buffer) >= _LARGE_MIN:
            free = self._free.setdefault(len(buffer), collections.deque())
            if len(free) < _FREE_PER_SIZE:
                free.append(buffer)

    def _receive_into(self, view: memoryview) -> None:
        have = self.end - self.start
        view[:have] = self._view[self.start : self.end]
        self.start = self.end = 0
        count = len(view)
        while have < count:
            received = self.sock.recv_into(view[have:])
            if not received:
                raise ConnectionClosed(partial=True)
            have += received
