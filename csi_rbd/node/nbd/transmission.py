"""The transmission phase of one connection: read requests, serve them, reply.

One thread per connection reads requests. It checks each one (bad flags,
ranges, read-only: an error reply at once) and serves *inline*, on this
thread, what only reads or stays in memory: reads (hits and misses), status
queries, and writes the cache keeps dirty. With the GIL, a hand-off to another
thread costs more than such a request (measured: a pool made 4 KiB reads
two to three times slower). Everything that writes to the engine, or may wait
on the disk (FLUSH, FUA, TRIM, WRITE_ZEROES, write-through writes), goes to
the server's worker pool: there the kernel's share of a write runs outside
the GIL, in parallel. A request overlapping one still in flight (either of
them a write) waits for it (:mod:`.ordering`), so overlapping requests take
effect in the order they arrived.

Replies of inline requests are collected and sent in one system call when
the input buffer runs dry (:mod:`.stream`), before the thread would block;
replies from the pool are sent at once. A per-connection lock keeps replies
whole on the wire.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import struct
import threading
from collections.abc import Callable

from csi_rbd.engine import errors as engine_errors
from csi_rbd.node.nbd import protocol as p
from csi_rbd.node.nbd.handshake import ALLOCATION_ID, ProtocolError, Session
from csi_rbd.node.nbd.ordering import Request, Sequencer
from csi_rbd.node.nbd.stream import SocketReader
from csi_rbd.node.nbd.workers import WorkerPool

log = logging.getLogger(__name__)

_ZEROS = bytes(p.MAX_PAYLOAD)  # untouched zero pages: costs no memory
_ZERO_CHUNK = 1 << 20
_WRITES = frozenset({p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES})
_ALLOWED_FLAGS = {
    p.CMD_READ: p.CMD_FLAG_FUA | p.CMD_FLAG_DF,
    p.CMD_WRITE: p.CMD_FLAG_FUA,
    p.CMD_FLUSH: p.CMD_FLAG_FUA,
    p.CMD_TRIM: p.CMD_FLAG_FUA,
    p.CMD_CACHE: p.CMD_FLAG_FUA,
    p.CMD_WRITE_ZEROES: p.CMD_FLAG_FUA | p.CMD_FLAG_NO_HOLE | p.CMD_FLAG_FAST_ZERO,
    p.CMD_BLOCK_STATUS: p.CMD_FLAG_FUA | p.CMD_FLAG_REQ_ONE,
}
_NOSPC = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_HOLD_LIMIT = 256 << 10  # held replies beyond this are sent at once
_JOIN_LIMIT = 64 << 10  # smaller replies are joined into one buffer, larger ones not
_IOV_MAX = 1024
# a structured read reply: chunk header and offset (and the hole size), in one go
_DATA_CHUNK = struct.Struct(">IHHQIQ")
_DATA_HEAD = (p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_OFFSET_DATA)
_HOLE_CHUNK = struct.Struct(">IHHQIQI")
_HOLE_HEAD = (p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_OFFSET_HOLE)


class RequestError(Exception):
    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error = error


def nbd_error(exc: BaseException) -> int:
    """The NBD error value for an engine or OS failure."""
    if isinstance(exc, engine_errors.ReadOnlyImage | engine_errors.PermissionError):
        return p.EPERM
    if isinstance(exc, engine_errors.InvalidArgument):
        return p.EINVAL
    code = getattr(exc, "errno", None)
    if isinstance(exc, engine_errors.NoSpace) or code in _NOSPC:
        return p.ENOSPC
    return p.EIO


Send = Callable[..., None]


class Connection:
    def __init__(
        self,
        sock: socket.socket,
        reader: SocketReader,
        session: Session,
        pool: WorkerPool,
        peer: str,
    ) -> None:
        self.sock = sock
        self.reader = reader
        self.session = session
        self.export = session.export
        self.cache = session.export.cache
        self.pool = pool
        self.peer = peer
        self._sequencer = Sequencer()
        self._send_lock = threading.Lock()
        self._broken = False
        self._held: list[bytes] = []  # replies of inline requests, sent in one go
        self._held_bytes = 0

    # -- the reading loop --------------------------------------------------------------
    def serve(self) -> None:
        """Serve until NBD_CMD_DISC, EOF or a protocol violation; in-flight requests finish."""
        try:
            self._loop()
        finally:
            self._release()
            self._sequencer.drain()

    def _loop(self) -> None:
        header = p.REQUEST
        size = header.size
        reader = self.reader
        buffer = reader.buffer
        while True:
            if reader.end - reader.start < size:
                self._release()  # about to wait for the client: send what is ready
                if not reader.ensure(size):
                    return  # EOF: the client went away without NBD_CMD_DISC
            magic, flags, kind, cookie, offset, length = header.unpack_from(buffer, reader.start)
            reader.start += size
            if magic != p.REQUEST_MAGIC:
                raise ProtocolError(f"bad request magic {magic:#x}")
            if kind == p.CMD_READ and not flags and self._read_now(cookie, offset, length):
                continue
            request = Request(kind, flags, cookie, offset, length, kind in _WRITES)
            if kind == p.CMD_WRITE:
                if length > p.MAX_PAYLOAD:
                    raise ProtocolError(f"write payload of {length} bytes")
                if reader.end - reader.start < length:
                    self._release()
                if length > len(buffer):
                    request.payload = reader.read_large(length)
                else:
                    request.payload = reader.read_exactly(length)
            elif kind == p.CMD_DISC:
                return
            try:
                self._check(request)
            except RequestError as exc:
                self._reply_error(request, exc.error, str(exc), self._hold)
                continue
            if not self._slow(request) and self._sequencer.clear_for(request):
                try:
                    self._execute(request, self._hold)
                except Exception as exc:
                    self._failed(request, exc, self._hold)
            elif self._sequencer.admit(request):
                self._start(request)

    def _read_now(self, cookie: int, offset: int, length: int) -> bool:
        """The common case, served without a Request: a plain read, in range, with
        nothing in flight over it. False: take the general path."""
        if not 0 < length <= p.MAX_PAYLOAD or offset + length > self.session.size:
            return False
        if not self._sequencer.clear(offset, offset + length, writes=False):
            return False
        try:
            data = self.cache.read(offset, length)
        except Exception:
            return False  # the general path reports it
        if len(data) < length:  # the image shrank since the handshake
            data += bytes(length - len(data))
        if not self.session.structured:
            self._held += (p.simple_reply(cookie), data)
        elif length >= 512 and _ZEROS.startswith(data):
            self._held.append(_HOLE_CHUNK.pack(*_HOLE_HEAD, cookie, 12, offset, length))
        else:
            self._held += (_DATA_CHUNK.pack(*_DATA_HEAD, cookie, 8 + length, offset), data)
        self._held_bytes += length
        if self._held_bytes >= _HOLD_LIMIT:
            self._release()
        return True

    def _check(self, request: Request) -> None:
        kind, flags, size = request.kind, request.flags, self.session.size
        allowed = _ALLOWED_FLAGS.get(kind)
        if allowed is None:
            raise RequestError(p.EINVAL, f"unknown command {kind}")
        if kind == p.CMD_READ and not self.session.structured:
            allowed &= ~p.CMD_FLAG_DF
        if flags & ~allowed:
            raise RequestError(p.EINVAL, f"flags {flags:#x} not valid for {p.command_name(kind)}")
        past_end = request.end > size
        if kind == p.CMD_FLUSH:
            if request.offset or request.length:
                raise RequestError(p.EINVAL, "FLUSH takes no offset or length")
            return
        if kind in _WRITES and self.export.read_only:
            raise RequestError(p.EPERM, "the export is read-only")
        if kind in (p.CMD_WRITE, p.CMD_WRITE_ZEROES) and past_end:
            raise RequestError(p.ENOSPC, f"{request.end} is past the end of the export ({size})")
        if past_end:
            raise RequestError(p.EINVAL, f"{request.end} is past the end of the export ({size})")
        if kind == p.CMD_READ and request.length > p.MAX_PAYLOAD:
            raise RequestError(p.EINVAL, f"reads are limited to {p.MAX_PAYLOAD} bytes")
        if kind == p.CMD_BLOCK_STATUS:
            if not self.session.allocation:
                raise RequestError(p.EINVAL, "no metadata context was negotiated")
            if request.length == 0:
                raise RequestError(p.EINVAL, "BLOCK_STATUS of zero bytes")
        if (
            kind == p.CMD_WRITE_ZEROES
            and flags & p.CMD_FLAG_FAST_ZERO
            and (flags & p.CMD_FLAG_NO_HOLE or self.export.discard != "unmap")
        ):
            raise RequestError(p.ENOTSUP, "zeroing without unmapping is not faster than a write")

    # -- serving ---------------------------------------------------------------------
    def _slow(self, request: Request) -> bool:
        """Whether a request goes to the pool: anything that writes to the engine
        (the kernel's share of a write runs outside the GIL, so writes in parallel
        gain) or may wait on the disk (FLUSH, FUA). Reads, status queries and
        writes the cache keeps in memory run right here: for them a thread
        switch would cost more than it saves."""
        kind = request.kind
        if kind == p.CMD_READ or kind == p.CMD_BLOCK_STATUS:
            return bool(request.flags & p.CMD_FLAG_FUA)
        if kind == p.CMD_WRITE:
            return bool(request.flags & p.CMD_FLAG_FUA) or not self.cache.buffers(
                request.offset, request.length
            )
        return True

    def _start(self, request: Request) -> None:
        self.pool.submit(lambda: self._run(request))

    def _run(self, request: Request) -> None:
        try:
            self._execute(request, self._send)
        except Exception as exc:
            self._failed(request, exc, self._send)
        finally:
            if isinstance(request.payload, memoryview):
                self.reader.recycle(request.payload)
            request.payload = b""
            self._sequencer.done(request, self._start)

    def _failed(self, request: Request, exc: Exception, send: Send) -> None:
        error = nbd_error(exc)
        if error == p.EIO:
            log.warning(
                "%s: %s at %d+%d failed: %s",
                self.peer,
                p.command_name(request.kind),
                request.offset,
                request.length,
                exc,
            )
        self._reply_error(request, error, str(exc) or type(exc).__name__, send)

    def _execute(self, request: Request, send: Send) -> None:
        kind, flags, cache = request.kind, request.flags, self.cache
        fua = bool(flags & p.CMD_FLAG_FUA)
        if kind == p.CMD_READ:
            data = cache.read(request.offset, request.length) if request.length else b""
            if len(data) < request.length:  # the image shrank since the handshake
                data += bytes(request.length - len(data))
            self._reply_read(request, data, send)
            return
        if kind == p.CMD_WRITE:
            replied = False

            def acknowledge() -> None:  # written behind (see the cache): reply now
                nonlocal replied
                replied = True
                send(p.simple_reply(request.cookie))

            cache.write(request.payload, request.offset, fua=fua, acknowledge=acknowledge)
            if replied:
                return
        elif kind == p.CMD_FLUSH:
            cache.flush()
        elif kind == p.CMD_TRIM:
            if self.export.discard == "unmap" and request.length:
                cache.discard(request.offset, request.length)
                if fua:
                    cache.flush_range(request.offset, request.length)
        elif kind == p.CMD_WRITE_ZEROES:
            if flags & p.CMD_FLAG_NO_HOLE or self.export.discard != "unmap":
                self._write_zero_buffers(request.offset, request.end)
            elif request.length:
                cache.write_zeroes(request.offset, request.length)
            if fua and request.length:
                cache.flush_range(request.offset, request.length)
        elif kind == p.CMD_BLOCK_STATUS:
            self._reply_status(request, send)
            return
        # CMD_CACHE: a hint; nothing to do
        send(p.simple_reply(request.cookie))

    def _write_zero_buffers(self, offset: int, end: int) -> None:
        """Zeros that stay allocated (NO_HOLE, or discard mode ``ignore``)."""
        while offset < end:
            count = min(_ZERO_CHUNK, end - offset)
            self.cache.write(_ZEROS[:count], offset)
            offset += count

    # -- replies ---------------------------------------------------------------------
    def _reply_read(self, request: Request, data: bytes, send: Send) -> None:
        if not self.session.structured:
            send(p.simple_reply(request.cookie), data)
        elif not data:
            send(p.chunk_header(request.cookie, p.REPLY_TYPE_NONE, 0))
        elif len(data) >= 512 and _ZEROS.startswith(data):
            send(_HOLE_CHUNK.pack(*_HOLE_HEAD, request.cookie, 12, request.offset, len(data)))
        else:
            header = _DATA_CHUNK.pack(*_DATA_HEAD, request.cookie, 8 + len(data), request.offset)
            send(header, data)

    def _reply_status(self, request: Request, send: Send) -> None:
        extents = self.export.block_status(
            request.offset, request.length, bool(request.flags & p.CMD_FLAG_REQ_ONE)
        )
        payload = p.U32.pack(ALLOCATION_ID) + b"".join(p.EXTENT.pack(n, f) for n, f in extents)
        send(p.chunk_header(request.cookie, p.REPLY_TYPE_BLOCK_STATUS, len(payload)), payload)

    def _reply_error(self, request: Request, error: int, message: str, send: Send) -> None:
        if self.session.structured:
            send(p.error_chunk(request.cookie, error, message))
        else:
            send(p.simple_reply(request.cookie, error))

    def _hold(self, *parts: bytes) -> None:
        """Queue a reply (reading thread only); sent before the next wait for input."""
        self._held += parts
        for part in parts:
            self._held_bytes += len(part)
        if self._held_bytes >= _HOLD_LIMIT:
            self._release()

    def _release(self) -> None:
        if self._held:
            held, self._held, self._held_bytes = self._held, [], 0
            self._send(*held)

    def _send(self, *parts: bytes) -> None:
        """Send one or more whole replies (any thread)."""
        if self._broken:
            return
        try:
            with self._send_lock:
                if sum(len(part) for part in parts) < _JOIN_LIMIT:
                    self.sock.sendall(b"".join(parts))
                else:
                    _sendmsg_all(self.sock, parts)
        except OSError as exc:  # the client went away: stop reading too
            self._broken = True
            log.info("%s: send failed (%s); closing", self.peer, exc)
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)


def _sendmsg_all(sock: socket.socket, parts: tuple[bytes, ...]) -> None:
    views = [memoryview(part) for part in parts]
    while views:
        sent = sock.sendmsg(views[:_IOV_MAX])
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]
