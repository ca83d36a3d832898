"""NBD wire protocol: constants and message layouts (doc/proto.md of the NBD project).

Design
------
The server speaks the *fixed newstyle* handshake only (no oldstyle, no TLS)
and serves exactly one export per server process, under two names: the
empty default name and the image's canonical ``pool/image[@snap]`` spec.

Handshake (:mod:`.handshake`)::

    S: NBDMAGIC, IHAVEOPT, u16 handshake flags (FIXED_NEWSTYLE | NO_ZEROES)
    C: u32 client flags (unknown bits: the connection is dropped)
    C: IHAVEOPT, u32 option, u32 length, data          (repeated)
    S: u64 REPLY_MAGIC, u32 option, u32 reply type, u32 length, data

Options answered: EXPORT_NAME (no reply on failure: hard disconnect, as the
protocol says), ABORT, LIST, INFO, GO (NBD_INFO_EXPORT always; NAME,
DESCRIPTION and BLOCK_SIZE when asked), STRUCTURED_REPLY, LIST_META_CONTEXT
and SET_META_CONTEXT (``base:allocation`` only). Anything else gets
``NBD_REP_ERR_UNSUP`` after its data is skipped; a name that is not ours gets
``NBD_REP_ERR_UNKNOWN``; a malformed option ``NBD_REP_ERR_INVALID``. Option
data longer than :data:`MAX_OPTION_LENGTH`, a bad magic, or a handshake
slower than the server's timeout ends the connection.

Transmission (:mod:`.transmission`)::

    C: u32 REQUEST_MAGIC, u16 flags, u16 type, u64 cookie, u64 offset, u32 length
       [length bytes for WRITE]
    S: u32 SIMPLE_REPLY_MAGIC, u32 error, u64 cookie [data for READ]
    S: u32 STRUCTURED_REPLY_MAGIC, u16 flags, u16 type, u64 cookie, u32 length, payload

Requests are served concurrently and replied to out of order, except that a
request overlapping an earlier one still in flight (either of them a write)
waits for it. With structured replies negotiated, READ is answered with one
``OFFSET_DATA`` chunk (or one ``OFFSET_HOLE`` when the range reads as zeros),
BLOCK_STATUS with one ``BLOCK_STATUS`` chunk, failures with an ``ERROR``
chunk carrying a message; other successes use simple replies. Errors are
the protocol's: EINVAL for bad flags, unknown commands and reads, trims or
status queries past the end, ENOSPC for writes past the end, EPERM for
writes to a read-only export, ENOTSUP for a FAST_ZERO that cannot be fast,
EIO for engine failures. A request with a bad magic, or a write payload above
:data:`MAX_PAYLOAD`, is a protocol violation: the connection is dropped (the
others carry on).
"""

from __future__ import annotations

import struct

# -- magic numbers ------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# -- handshake flags (server) and client flags ----------------------------------------------
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# -- transmission flags ---------------------------------------------------------------------
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# -- options ----------------------------------------------------------------------------------
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# -- option replies ---------------------------------------------------------------------------
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
_REP_ERR = 1 << 31
REP_ERR_UNSUP = _REP_ERR + 1
REP_ERR_POLICY = _REP_ERR + 2
REP_ERR_INVALID = _REP_ERR + 3
REP_ERR_PLATFORM = _REP_ERR + 4
REP_ERR_TLS_REQD = _REP_ERR + 5
REP_ERR_UNKNOWN = _REP_ERR + 6
REP_ERR_SHUTDOWN = _REP_ERR + 7
REP_ERR_BLOCK_SIZE_REQD = _REP_ERR + 8
REP_ERR_TOO_BIG = _REP_ERR + 9

# -- NBD_REP_INFO types -------------------------------------------------------------------
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# -- commands and their flags -------------------------------------------------------------
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# -- structured replies -------------------------------------------------------------------
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# -- base:allocation ------------------------------------------------------------------------
META_BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# -- error values -------------------------------------------------------------------------
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# -- limits ---------------------------------------------------------------------------------
MAX_PAYLOAD = 32 << 20  # largest READ/WRITE (the protocol's portable maximum, 2^25)
MIN_BLOCK, PREFERRED_BLOCK = 1, 4096
MAX_OPTION_LENGTH = 64 << 10  # option data beyond this is a denial of service
MAX_STRING = 4096  # names, queries and messages

# -- layouts (network byte order) -----------------------------------------------------------
GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (+124 zero bytes)
INFO_EXPORT_PAYLOAD = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, transmission flags
INFO_BLOCK_SIZE_PAYLOAD = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, min, preferred, max
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, payload length
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
HOLE_PAYLOAD = struct.Struct(">QI")  # offset, hole size
ERROR_PAYLOAD = struct.Struct(">IH")  # error, message length
EXTENT = struct.Struct(">II")  # length, status flags


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_header(cookie: int, kind: int, length: int, done: bool = True) -> bytes:
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, kind, cookie, length)


def error_chunk(cookie: int, error: int, message: str) -> bytes:
    text = message.encode("utf-8", "replace")[:MAX_STRING]
    payload = ERROR_PAYLOAD.pack(error, len(text)) + text
    return chunk_header(cookie, REPLY_TYPE_ERROR, len(payload)) + payload


def command_name(kind: int) -> str:
    return _COMMAND_NAMES.get(kind, f"command {kind}")


_COMMAND_NAMES = {
    CMD_READ: "READ",
    CMD_WRITE: "WRITE",
    CMD_DISC: "DISC",
    CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM",
    CMD_CACHE: "CACHE",
    CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
}
