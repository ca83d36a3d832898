"""A small NBD client for the tests: the fixed newstyle handshake and every command.

Deliberately independent of the server's code (only the protocol constants are
shared), and able to send what a well-behaved client never would.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

from csi_rbd.node.nbd import protocol as p


class NbdError(Exception):
    def __init__(self, error: int, message: str = "") -> None:
        super().__init__(f"NBD error {error}: {message}")
        self.error = error
        self.message = message


@dataclass
class Reply:
    cookie: int
    error: int = 0
    message: str = ""
    data: bytearray = field(default_factory=bytearray)
    chunks: list[int] = field(default_factory=list)  # chunk types, in order
    extents: list[tuple[int, int]] = field(default_factory=list)


class Client:
    def __init__(self, address: str | tuple[str, int], timeout: float = 30.0) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.structured = False
        self.size = 0
        self.flags = 0
        self.context_id: int | None = None
        self._cookie = 0
        self._pending: dict[int, tuple[int, int]] = {}  # cookie -> (kind, offset)

    # -- plumbing ------------------------------------------------------------------------
    def recv_exactly(self, count: int) -> bytes:
        chunks = []
        while count:
            chunk = self.sock.recv(count)
            if not chunk:
                raise ConnectionError("server closed the connection")
            chunks.append(chunk)
            count -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- handshake -------------------------------------------------------------------
    def greet(self, client_flags: int = p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES) -> int:
        magic, opt, flags = p.GREETING.unpack(self.recv_exactly(p.GREETING.size))
        assert (magic, opt) == (p.NBDMAGIC, p.IHAVEOPT)
        self.sock.sendall(p.CLIENT_FLAGS.pack(client_flags))
        return int(flags)

    def send_option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(p.OPTION.pack(p.IHAVEOPT, option, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, kind, length = p.OPTION_REPLY.unpack(self.recv_exactly(20))
        assert magic == p.OPTION_REPLY_MAGIC
        return option, kind, self.recv_exactly(length)

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; every reply up to the final one (ACK or an error)."""
        self.send_option(option, data)
        replies = []
        while True:
            answered, kind, payload = self.option_reply()
            assert answered == option
            replies.append((kind, payload))
            if kind == p.REP_ACK or kind & (1 << 31):
                return replies

    @staticmethod
    def info_request(name: str, infos: tuple[int, ...] = ()) -> bytes:
        raw = name.encode()
        return (
            struct.pack(">I", len(raw))
            + raw
            + struct.pack(">H", len(infos))
            + b"".join(struct.pack(">H", i) for i in infos)
        )

    @staticmethod
    def meta_request(name: str, queries: tuple[str, ...]) -> bytes:
        raw = name.encode()
        data = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
        for query in queries:
            data += struct.pack(">I", len(query.encode())) + query.encode()
        return data

    def handshake(self, name: str = "", structured: bool = True, allocation: bool = True) -> Client:
        self.greet()
        if structured:
            assert self.option(p.OPT_STRUCTURED_REPLY) == [(p.REP_ACK, b"")]
            self.structured = True
        if structured and allocation:
            replies = self.option(
                p.OPT_SET_META_CONTEXT, self.meta_request(name, (p.META_BASE_ALLOCATION,))
            )
            assert replies[-1][0] == p.REP_ACK, replies
            for kind, payload in replies:
                if kind == p.REP_META_CONTEXT:
                    self.context_id = struct.unpack_from(">I", payload)[0]
        replies = self.option(p.OPT_GO, self.info_request(name, (p.INFO_BLOCK_SIZE,)))
        if replies[-1][0] != p.REP_ACK:
            raise NbdError(replies[-1][0], replies[-1][1].decode(errors="replace"))
        for kind, payload in replies:
            if kind == p.REP_INFO and struct.unpack_from(">H", payload)[0] == p.INFO_EXPORT:
                _, self.size, self.flags = p.INFO_EXPORT_PAYLOAD.unpack(payload)
        return self

    # -- transmission ------------------------------------------------------------------
    def send_request(
        self, kind: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b""
    ) -> int:
        self._cookie += 1
        cookie = self._cookie
        header = p.REQUEST.pack(p.REQUEST_MAGIC, flags, kind, cookie, offset, length)
        self._pending[cookie] = (kind, offset)
        self.sock.sendall(header + payload)
        return cookie

    def recv_reply(self) -> Reply:
        (magic,) = struct.unpack(">I", self.recv_exactly(4))
        if magic == p.SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exactly(12))
            reply = Reply(cookie, error)
            kind, offset = self._pending.pop(cookie)
            if kind == p.CMD_READ and not error and not self.structured:
                raise AssertionError("use read() for simple read replies (length unknown here)")
            return reply
        assert magic == p.STRUCTURED_REPLY_MAGIC, hex(magic)
        chunked: Reply | None = None
        while True:
            if chunked is not None:
                (magic,) = struct.unpack(">I", self.recv_exactly(4))
                assert magic == p.STRUCTURED_REPLY_MAGIC
            flags, kind, cookie, length = struct.unpack(">HHQI", self.recv_exactly(16))
            payload = self.recv_exactly(length)
            if chunked is None:
                chunked = Reply(cookie)
            assert cookie == chunked.cookie
            chunked.chunks.append(kind)
            start = self._pending[cookie][1]
            if kind == p.REPLY_TYPE_OFFSET_DATA:
                (offset,) = struct.unpack_from(">Q", payload)
                self._place(chunked, offset - start, payload[8:])
            elif kind == p.REPLY_TYPE_OFFSET_HOLE:
                offset, size = struct.unpack(">QI", payload)
                self._place(chunked, offset - start, bytes(size))
            elif kind == p.REPLY_TYPE_BLOCK_STATUS:
                count = (len(payload) - 4) // 8
                chunked.extents = [
                    struct.unpack_from(">II", payload, 4 + 8 * i) for i in range(count)
                ]
            elif kind & (1 << 15):
                error, size = struct.unpack_from(">IH", payload)
                chunked.error, chunked.message = error, payload[6 : 6 + size].decode()
            if flags & p.REPLY_FLAG_DONE:
                self._pending.pop(cookie)
                return chunked

    @staticmethod
    def _place(reply: Reply, at: int, data: bytes) -> None:
        if len(reply.data) < at + len(data):
            reply.data.extend(bytes(at + len(data) - len(reply.data)))
        reply.data[at : at + len(data)] = data

    def _checked(self, reply: Reply) -> Reply:
        if reply.error:
            raise NbdError(reply.error, reply.message)
        return reply

    def read(self, offset: int, length: int, flags: int = 0) -> bytes:
        cookie = self.send_request(p.CMD_READ, offset, length, flags)
        if not self.structured:
            (magic,) = struct.unpack(">I", self.recv_exactly(4))
            assert magic == p.SIMPLE_REPLY_MAGIC
            error, answered = struct.unpack(">IQ", self.recv_exactly(12))
            assert answered == cookie
            self._pending.pop(cookie)
            if error:
                raise NbdError(error)
            return self.recv_exactly(length)
        reply = self._checked(self.recv_reply())
        assert reply.cookie == cookie
        assert len(reply.data) == length, (len(reply.data), length)
        return bytes(reply.data)

    def write(self, data: bytes, offset: int, flags: int = 0) -> None:
        self.send_request(p.CMD_WRITE, offset, len(data), flags, data)
        self._checked(self.recv_reply())

    def flush(self) -> None:
        self.send_request(p.CMD_FLUSH)
        self._checked(self.recv_reply())

    def trim(self, offset: int, length: int, flags: int = 0) -> None:
        self.send_request(p.CMD_TRIM, offset, length, flags)
        self._checked(self.recv_reply())

    def write_zeroes(self, offset: int, length: int, flags: int = 0) -> None:
        self.send_request(p.CMD_WRITE_ZEROES, offset, length, flags)
        self._checked(self.recv_reply())

    def block_status(self, offset: int, length: int, flags: int = 0) -> list[tuple[int, int]]:
        self.send_request(p.CMD_BLOCK_STATUS, offset, length, flags)
        return self._checked(self.recv_reply()).extents

    def disconnect(self) -> None:
        self.send_request(p.CMD_DISC)
        self._pending.clear()
        self.sock.close()
