"""The fixed newstyle handshake: option haggling up to the transmission phase.

See :mod:`.protocol` for the messages. :func:`negotiate` returns the
:class:`Session` the client chose, or None when it aborted; a client that
breaks the protocol raises :class:`ProtocolError` and is dropped.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from dataclasses import dataclass

from csi_rbd.node.nbd import protocol as p
from csi_rbd.node.nbd.export import Export
from csi_rbd.node.nbd.stream import SocketReader

log = logging.getLogger(__name__)

ALLOCATION_ID = 1  # our metadata context id for base:allocation


class ProtocolError(Exception):
    """The peer broke the protocol (or went away); the connection is dropped."""


@dataclass
class Session:
    """What the handshake settled for the transmission phase."""

    export: Export
    size: int
    flags: int
    structured: bool
    allocation: bool  # base:allocation selected: BLOCK_STATUS is allowed


class _Haggler:
    def __init__(self, sock: socket.socket, reader: SocketReader, export: Export) -> None:
        self.sock = sock
        self.reader = reader
        self.export = export
        self.structured = False
        self.allocation = False
        self.no_zeroes = False

    def reply(self, option: int, kind: int, data: bytes = b"") -> None:
        self.sock.sendall(p.option_reply(option, kind, data))

    def error(self, option: int, kind: int, message: str) -> None:
        self.reply(option, kind, message.encode()[: p.MAX_STRING])

    def run(self) -> Session | None:
        self.sock.sendall(
            p.GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES)
        )
        (client,) = p.CLIENT_FLAGS.unpack(self.reader.read_exactly(4))
        if client & ~p.KNOWN_CLIENT_FLAGS:
            raise ProtocolError(f"unknown client flags {client:#x}")
        self.no_zeroes = bool(client & p.FLAG_C_NO_ZEROES)
        while True:
            magic, option, length = p.OPTION.unpack(self.reader.read_exactly(p.OPTION.size))
            if magic != p.IHAVEOPT:
                raise ProtocolError(f"bad option magic {magic:#x}")
            if length > p.MAX_OPTION_LENGTH:
                raise ProtocolError(f"option {option} carries {length} bytes")
            data = bytes(self.reader.read_exactly(length))
            finished, session = self.option(option, data)
            if finished:
                return session

    def option(self, option: int, data: bytes) -> tuple[bool, Session | None]:
        """Answer one option: (whether haggling is over, the session if one was chosen)."""
        if option == p.OPT_EXPORT_NAME:
            return True, self.export_name(data)
        if option == p.OPT_ABORT:
            with contextlib.suppress(OSError):  # the client may close without waiting
                self.reply(option, p.REP_ACK)
            return True, None
        if option in (p.OPT_INFO, p.OPT_GO):
            session = self.info(option, data)
            return session is not None, session
        if option == p.OPT_LIST:
            if data:
                self.error(option, p.REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            else:
                name = self.export.name.encode()
                self.reply(option, p.REP_SERVER, p.U32.pack(len(name)) + name)
                self.reply(option, p.REP_ACK)
        elif option == p.OPT_STRUCTURED_REPLY:
            if data:
                self.error(option, p.REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            elif self.structured:
                self.error(option, p.REP_ERR_INVALID, "structured replies already negotiated")
            else:
                self.structured = True
                self.reply(option, p.REP_ACK)
        elif option in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
            self.meta_context(option, data)
        else:
            self.error(option, p.REP_ERR_UNSUP, f"option {option} is not supported")
        return False, None

    # -- entering transmission -----------------------------------------------------------
    def session(self) -> Session:
        return Session(
            self.export,
            self.export.size(),
            self.export.flags(self.structured),
            self.structured,
            self.allocation,
        )

    def export_name(self, data: bytes) -> Session:
        name = _text(data)
        if name is None or not self.export.matches(name):
            raise ProtocolError(f"unknown export {data[:256]!r} (NBD_OPT_EXPORT_NAME)")
        session = self.session()
        reply = p.EXPORT_NAME_REPLY.pack(session.size, session.flags)
        self.sock.sendall(reply if self.no_zeroes else reply + bytes(124))
        return session

    def info(self, option: int, data: bytes) -> Session | None:
        """Answer INFO or GO; the session when GO succeeded."""
        if len(data) < 6:
            self.error(option, p.REP_ERR_INVALID, "option data too short")
            return None
        (name_length,) = p.U32.unpack_from(data)
        if name_length > len(data) - 6:
            self.error(option, p.REP_ERR_INVALID, "export name runs past the option")
            return None
        (count,) = p.U16.unpack_from(data, 4 + name_length)
        if len(data) != 4 + name_length + 2 + 2 * count:
            self.error(option, p.REP_ERR_INVALID, "information requests do not match the length")
            return None
        name = _text(data[4 : 4 + name_length])
        if name is None:
            self.error(option, p.REP_ERR_INVALID, "export name is not UTF-8")
            return None
        if not self.export.matches(name):
            self.error(option, p.REP_ERR_UNKNOWN, f"no export named {name!r}")
            return None
        asked = {p.U16.unpack_from(data, 6 + name_length + 2 * i)[0] for i in range(count)}
        session = self.session()
        infos = [p.INFO_EXPORT_PAYLOAD.pack(p.INFO_EXPORT, session.size, session.flags)]
        if p.INFO_NAME in asked:
            infos.append(p.U16.pack(p.INFO_NAME) + self.export.name.encode())
        if p.INFO_DESCRIPTION in asked:
            infos.append(p.U16.pack(p.INFO_DESCRIPTION) + self.export.description.encode())
        if p.INFO_BLOCK_SIZE in asked:
            infos.append(
                p.INFO_BLOCK_SIZE_PAYLOAD.pack(
                    p.INFO_BLOCK_SIZE, p.MIN_BLOCK, p.PREFERRED_BLOCK, p.MAX_PAYLOAD
                )
            )
        for info in infos:
            self.reply(option, p.REP_INFO, info)
        self.reply(option, p.REP_ACK)
        return session if option == p.OPT_GO else None

    # -- metadata contexts -------------------------------------------------------------
    def meta_context(self, option: int, data: bytes) -> None:
        setting = option == p.OPT_SET_META_CONTEXT
        if setting:
            self.allocation = False  # replaced even when the option fails
        if not self.structured:
            self.error(option, p.REP_ERR_INVALID, "negotiate structured replies first")
            return
        parsed = _parse_meta_request(data)
        if parsed is None:
            self.error(option, p.REP_ERR_INVALID, "malformed metadata context request")
            return
        name, queries = parsed
        if not self.export.matches(name):
            self.error(option, p.REP_ERR_UNKNOWN, f"no export named {name!r}")
            return
        if any(":" not in q or q.startswith(":") for q in queries):
            self.error(option, p.REP_ERR_INVALID, "a query must start with a namespace")
            return
        if setting:
            found = p.META_BASE_ALLOCATION in queries
            context_id = ALLOCATION_ID
        else:
            found = not queries or bool({"base:", p.META_BASE_ALLOCATION} & set(queries))
            context_id = 0  # reserved in list replies
        if found:
            payload = p.U32.pack(context_id) + p.META_BASE_ALLOCATION.encode()
            self.reply(option, p.REP_META_CONTEXT, payload)
        self.reply(option, p.REP_ACK)
        if setting:
            self.allocation = found


def _text(data: bytes) -> str | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\0" in text or len(data) > p.MAX_STRING else text


def _parse_meta_request(data: bytes) -> tuple[str, list[str]] | None:
    """(export name, queries) of a LIST/SET_META_CONTEXT option, or None if malformed."""
    strings: list[str] = []
    at = 0

    def string() -> bool:
        nonlocal at
        if at + 4 > len(data):
            return False
        (length,) = p.U32.unpack_from(data, at)
        text = _text(data[at + 4 : at + 4 + length])
        at += 4 + length
        if text is None or at > len(data):
            return False
        strings.append(text)
        return True

    if not string() or at + 4 > len(data):
        return None
    (count,) = p.U32.unpack_from(data, at)
    at += 4
    if count > len(data):  # each query takes at least 4 bytes
        return None
    for _ in range(count):
        if not string():
            return None
    if at != len(data):
        return None
    return strings[0], strings[1:]


def negotiate(sock: socket.socket, reader: SocketReader, export: Export) -> Session | None:
    """Run the handshake on a fresh connection: a Session, or None if the client aborted."""
    return _Haggler(sock, reader, export).run()
