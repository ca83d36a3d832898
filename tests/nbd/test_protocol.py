"""The NBD server against the tests' own client: handshake, commands, errors, ordering."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest

from csi_rbd.engine.native import Image, IoCtx
from csi_rbd.node.nbd import protocol as p
from tests.nbd.client import Client, NbdError
from tests.nbd.conftest import MiB, create, engine_read, pattern
from tests.threads import run_in_threads

SIZE = 8 * MiB
Serve = Callable[..., Any]


@pytest.fixture
def disk(ioctx: IoCtx) -> str:
    create(ioctx, "disk", SIZE)
    return "disk"


# -- handshake ------------------------------------------------------------------------------
def test_greeting_and_go(serve: Serve, disk: str) -> None:
    with serve(disk) as served, Client(served.socket) as client:
        flags = client.greet()
        assert flags == p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES
        replies = client.option(
            p.OPT_GO, client.info_request("rbd/disk", (p.INFO_NAME, p.INFO_DESCRIPTION))
        )
        kinds = [kind for kind, _ in replies]
        assert kinds[-1] == p.REP_ACK and kinds.count(p.REP_INFO) == 3
        infos = {struct.unpack_from(">H", data)[0]: data[2:] for _, data in replies[:-1]}
        size, flags = struct.unpack(">QH", infos[p.INFO_EXPORT])
        assert size == SIZE
        assert flags & p.FLAG_SEND_FLUSH and flags & p.FLAG_SEND_FUA
        assert flags & p.FLAG_SEND_TRIM and flags & p.FLAG_SEND_WRITE_ZEROES
        assert flags & p.FLAG_SEND_FAST_ZERO and flags & p.FLAG_CAN_MULTI_CONN
        assert not flags & (p.FLAG_READ_ONLY | p.FLAG_SEND_DF)  # no structured replies
        assert infos[p.INFO_NAME] == b"rbd/disk"
        assert b"rbd/disk" in infos[p.INFO_DESCRIPTION]
        # transmission: simple replies
        client.write(b"hello", 0)
        assert client.read(0, 5) == b"hello"


def test_both_names_reach_the_image_and_others_are_unknown(serve: Serve, disk: str) -> None:
    with serve(disk) as served:
        for name in ("", "rbd/disk"):
            with served.connect(name) as client:
                assert client.size == SIZE
        with Client(served.socket) as client:
            client.greet()
            for option in (p.OPT_INFO, p.OPT_GO):
                [(kind, message)] = client.option(option, client.info_request("rbd/other"))
                assert kind == p.REP_ERR_UNKNOWN and b"rbd/other" in message
            # the session goes on after errors
            assert client.option(p.OPT_STRUCTURED_REPLY) == [(p.REP_ACK, b"")]


def test_list_abort_and_unsupported_options(serve: Serve, disk: str) -> None:
    with serve(disk) as served, Client(served.socket) as client:
        client.greet()
        replies = client.option(p.OPT_LIST)
        assert replies[0][0] == p.REP_SERVER
        (length,) = struct.unpack_from(">I", replies[0][1])
        assert replies[0][1][4 : 4 + length] == b"rbd/disk"
        assert replies[-1] == (p.REP_ACK, b"")
        assert client.option(p.OPT_LIST, b"junk")[-1][0] == p.REP_ERR_INVALID
        for option in (p.OPT_STARTTLS, p.OPT_PEEK_EXPORT, p.OPT_EXTENDED_HEADERS, 99):
            assert client.option(option, b"some data")[-1][0] == p.REP_ERR_UNSUP
        assert client.option(p.OPT_ABORT) == [(p.REP_ACK, b"")]
        assert client.sock.recv(1) == b""  # and the server hangs up


def test_malformed_info_requests(serve: Serve, disk: str) -> None:
    with serve(disk) as served, Client(served.socket) as client:
        client.greet()
        for data in (b"", b"\0\0\0\x10rbd", client.info_request("rbd/disk") + b"\0"):
            assert client.option(p.OPT_INFO, data)[-1][0] == p.REP_ERR_INVALID
        assert client.option(p.OPT_INFO, client.info_request(""))[-1][0] == p.REP_ACK


def test_export_name_option(serve: Serve, disk: str) -> None:
    with serve(disk) as served:
        with Client(served.socket) as client:
            client.greet(p.FLAG_C_FIXED_NEWSTYLE)  # no NO_ZEROES: 124 zero bytes follow
            client.send_option(p.OPT_EXPORT_NAME, b"rbd/disk")
            size, flags = struct.unpack(">QH", client.recv_exactly(10))
            assert size == SIZE and flags & p.FLAG_HAS_FLAGS
            assert client.recv_exactly(124) == bytes(124)
            client.write(b"x", 0)
        with Client(served.socket) as client:
            client.greet()
            client.send_option(p.OPT_EXPORT_NAME, b"nope")
            assert client.sock.recv(1) == b""  # no way to report it: hard disconnect


def test_meta_contexts(serve: Serve, disk: str) -> None:
    with serve(disk) as served, Client(served.socket) as client:
        client.greet()
        request = client.meta_request("", (p.META_BASE_ALLOCATION,))
        # structured replies first
        assert client.option(p.OPT_SET_META_CONTEXT, request)[-1][0] == p.REP_ERR_INVALID
        client.option(p.OPT_STRUCTURED_REPLY)
        listed = client.option(p.OPT_LIST_META_CONTEXT, client.meta_request("", ()))
        assert listed[0] == (p.REP_META_CONTEXT, b"\0\0\0\0base:allocation")
        listed = client.option(p.OPT_LIST_META_CONTEXT, client.meta_request("", ("base:",)))
        assert listed[0][1].endswith(b"base:allocation")
        unknown = client.option(p.OPT_LIST_META_CONTEXT, client.meta_request("", ("qemu:x",)))
        assert unknown == [(p.REP_ACK, b"")]
        bad = client.option(p.OPT_SET_META_CONTEXT, client.meta_request("", ("nocolon",)))
        assert bad[-1][0] == p.REP_ERR_INVALID
        assert client.option(p.OPT_SET_META_CONTEXT, b"\0\0")[-1][0] == p.REP_ERR_INVALID
        other = client.option(p.OPT_SET_META_CONTEXT, client.meta_request("x", ("base:",)))
        assert other[-1][0] == p.REP_ERR_UNKNOWN
        chosen = client.option(p.OPT_SET_META_CONTEXT, request)
        assert chosen[-1][0] == p.REP_ACK and chosen[0][0] == p.REP_META_CONTEXT
        assert client.option(p.OPT_GO, client.info_request(""))[-1][0] == p.REP_ACK
        client.structured = True
        assert client.block_status(0, SIZE) == [(SIZE, p.STATE_HOLE | p.STATE_ZERO)]


def test_bad_client_flags_and_option_magic_drop_the_connection(serve: Serve, disk: str) -> None:
    with serve(disk) as served:
        with Client(served.socket) as client:
            client.greet(client_flags=1 << 5)
            assert client.sock.recv(1) == b""
        with Client(served.socket) as client:
            client.greet()
            client.sock.sendall(struct.pack(">QII", 0x1234, p.OPT_GO, 0))
            assert client.sock.recv(1) == b""
        with Client(served.socket) as client:  # an option of 1 GiB is not read
            client.greet()
            client.sock.sendall(struct.pack(">QII", p.IHAVEOPT, p.OPT_INFO, 1 << 30))
            assert client.sock.recv(1) == b""
        with served.connect() as client:  # the server is fine
            client.write(b"ok", 0)


def test_silent_client_times_out_in_the_handshake(serve: Serve, disk: str) -> None:
    with serve(disk, handshake_timeout=1.0) as served, socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(15)
        sock.connect(served.socket)
        assert len(sock.recv(18)) == 18  # the greeting, then nothing from us
        assert sock.recv(1) == b""  # dropped after the handshake timeout


# -- transmission ------------------------------------------------------------------------
@pytest.mark.parametrize("cache", ["none", "writethrough", "writeback"])
def test_commands(serve: Serve, disk: str, ioctx: IoCtx, cache: str) -> None:
    with serve(disk, cache=cache) as served, served.connect() as client:
        assert client.flags & p.FLAG_SEND_DF
        data = pattern(1, 3 * MiB)
        client.write(data, MiB)
        client.flush()
        assert engine_read(ioctx, disk, MiB, 3 * MiB) == data
        assert client.read(MiB, 3 * MiB) == data
        assert client.read(MiB + 1, 1000) == data[1:1001]
        client.write(b"fua" * 100, 100, p.CMD_FLAG_FUA)
        assert engine_read(ioctx, disk, 100, 300) == b"fua" * 100
        client.trim(MiB, MiB)
        assert client.read(MiB, MiB) == bytes(MiB)
        client.write_zeroes(2 * MiB, 4096)
        client.write_zeroes(2 * MiB + 8192, 4096, p.CMD_FLAG_NO_HOLE | p.CMD_FLAG_FUA)
        client.write_zeroes(3 * MiB, 4096, p.CMD_FLAG_FAST_ZERO)
        expected = bytearray(data[MiB : 2 * MiB])
        for at in (0, 8192):
            expected[at : at + 4096] = bytes(4096)
        assert client.read(2 * MiB, MiB) == expected
        expected = bytearray(data[2 * MiB :])
        expected[:4096] = bytes(4096)
        assert client.read(3 * MiB, MiB) == expected
        client.flush()
        client.disconnect()
    assert engine_read(ioctx, disk, 2 * MiB + 8192, 4096) == bytes(4096)


def test_structured_reads_use_holes_and_honour_df(serve: Serve, disk: str) -> None:
    with serve(disk) as served, served.connect() as client:
        client.write(b"d" * 4096, 0)
        cookie = client.send_request(p.CMD_READ, 0, 8192, p.CMD_FLAG_DF)
        reply = client.recv_reply()
        assert reply.cookie == cookie and reply.chunks == [p.REPLY_TYPE_OFFSET_DATA]
        assert bytes(reply.data) == b"d" * 4096 + bytes(4096)
        client.send_request(p.CMD_READ, MiB, MiB)
        assert client.recv_reply().chunks == [p.REPLY_TYPE_OFFSET_HOLE]
        client.send_request(p.CMD_READ, 0, 0)
        assert client.recv_reply().chunks == [p.REPLY_TYPE_NONE]


def test_block_status(serve: Serve, disk: str) -> None:
    hole = p.STATE_HOLE | p.STATE_ZERO
    with serve(disk, cache="writeback") as served, served.connect() as client:
        assert client.block_status(0, SIZE) == [(SIZE, hole)]
        client.flush()  # writeback proper from here on: the next write stays in memory
        client.write(b"a" * 4096, MiB)
        assert served.server.export.cache.dirty_bytes == 4096
        client.write(b"b" * 8192, 4 * MiB)
        client.flush()
        assert client.block_status(0, SIZE) == [
            (MiB, hole),
            (4096, 0),
            (3 * MiB - 4096, hole),
            (8192, 0),
            (SIZE - 4 * MiB - 8192, hole),
        ]
        assert client.block_status(0, SIZE, p.CMD_FLAG_REQ_ONE) == [(MiB, hole)]
        assert client.block_status(MiB + 100, 50) == [(50, 0)]
        client.trim(MiB, 4096)
        assert client.block_status(MiB - 4096, 3 * 4096) == [(3 * 4096, hole)]


def test_block_status_needs_a_context(serve: Serve, disk: str) -> None:
    with serve(disk) as served, served.connect(allocation=False) as client:
        with pytest.raises(NbdError) as failure:
            client.block_status(0, 4096)
        assert failure.value.error == p.EINVAL


@pytest.mark.parametrize("structured", [True, False])
def test_error_replies(serve: Serve, disk: str, structured: bool) -> None:
    cases = [
        (p.CMD_READ, SIZE - 10, 20, 0, p.EINVAL),
        (p.CMD_READ, 0, 64 * MiB, 0, p.EINVAL),
        (p.CMD_WRITE, SIZE - 10, 20, 0, p.ENOSPC),
        (p.CMD_WRITE_ZEROES, SIZE, 4096, 0, p.ENOSPC),
        (p.CMD_TRIM, SIZE - 10, 20, 0, p.EINVAL),
        (p.CMD_BLOCK_STATUS, SIZE, 1, 0, p.EINVAL),
        (p.CMD_FLUSH, 0, 10, 0, p.EINVAL),
        (p.CMD_READ, 0, 10, p.CMD_FLAG_NO_HOLE, p.EINVAL),
        (p.CMD_WRITE, 0, 10, p.CMD_FLAG_REQ_ONE, p.EINVAL),
        (p.CMD_WRITE_ZEROES, 0, 10, p.CMD_FLAG_FAST_ZERO | p.CMD_FLAG_NO_HOLE, p.ENOTSUP),
        (42, 0, 0, 0, p.EINVAL),
    ]
    with serve(disk) as served, served.connect(structured=structured) as client:
        for kind, offset, length, flags, error in cases:
            payload = bytes(length) if kind == p.CMD_WRITE else b""
            client.send_request(kind, offset, length, flags, payload)
            if kind == p.CMD_READ and not structured:
                raw = client.recv_exactly(16)
                reply_error = struct.unpack(">IIQ", raw)[1]
                client._pending.clear()
            else:
                reply = client.recv_reply()
                reply_error = reply.error
                if structured:
                    assert reply.message
            assert reply_error == error, (kind, offset, length, flags)
        client.write(b"still fine", 0)
        assert client.read(0, 10) == b"still fine"


def test_read_only_exports(serve: Serve, disk: str, ioctx: IoCtx) -> None:
    with Image(ioctx, disk) as image:
        image.write(b"snapshot data", 0)
        image.create_snap("s1")
        image.write(b"head data", 0)
    for options in ({"snap": "s1"}, {"read_only": True}):
        with serve(disk, cache="writeback", **options) as served, served.connect() as client:
            assert client.flags & p.FLAG_READ_ONLY
            assert not client.flags & p.FLAG_SEND_TRIM
            expected = b"snapshot data" if options.get("snap") else b"head data"
            assert client.read(0, len(expected)) == expected
            for kind in (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES):
                payload = b"x" * 10 if kind == p.CMD_WRITE else b""
                client.send_request(kind, 0, 10, 0, payload)
                assert client.recv_reply().error == p.EPERM
            client.flush()  # harmless
    assert engine_read(ioctx, disk, 0, 9) == b"head data"
    assert engine_read(ioctx, disk, 0, 13, snap="s1") == b"snapshot data"


def test_pipelined_requests_keep_order_for_overlaps(serve: Serve, disk: str) -> None:
    """Many requests in flight at once: a read after a write to the same bytes sees it."""
    with serve(disk, cache="writethrough") as served, served.connect() as client:
        cookies: dict[int, int | None] = {}
        for i in range(64):
            at = (i % 8) * 4096
            cookies[client.send_request(p.CMD_WRITE, at, 4096, 0, pattern(i, 4096))] = None
            cookies[client.send_request(p.CMD_READ, at, 4096)] = i
            if i % 16 == 15:
                cookies[client.send_request(p.CMD_FLUSH)] = None
        for _ in cookies:
            reply = client.recv_reply()
            assert not reply.error
            written = cookies[reply.cookie]
            if written is not None:
                assert bytes(reply.data) == pattern(written, 4096), written


@pytest.mark.parametrize("cache", ["none", "writeback"])
def test_several_connections_at_once(serve: Serve, disk: str, ioctx: IoCtx, cache: str) -> None:
    with serve(disk, cache=cache) as served:

        def worker(n: int) -> None:
            with served.connect() as client:
                base = n * MiB
                for i in range(16):  # 1 MiB each
                    client.write(pattern(n * 100 + i, 65536), base + i * 65536)
                client.flush()
                for i in range(16):
                    assert client.read(base + i * 65536, 65536) == pattern(n * 100 + i, 65536)

        run_in_threads(worker, range(6))
    for n in range(6):
        assert engine_read(ioctx, disk, n * MiB + 65536, 65536) == pattern(n * 100 + 1, 65536)


def test_stop_answers_in_flight_requests(serve: Serve, disk: str, ioctx: IoCtx) -> None:
    with serve(disk, cache="writeback") as served:
        client = served.connect()
        client.flush()
        for i in range(32):
            client.send_request(p.CMD_WRITE, i * 65536, 65536, 0, pattern(i, 65536))
        for _ in range(32):
            assert not client.recv_reply().error
        served.server.stop()
        assert client.sock.recv(1) == b""
        client.close()
        served.server.stop = lambda: None  # already stopped
    # the cache was closed (flushed) after the server stopped
    assert engine_read(ioctx, disk, 31 * 65536, 65536) == pattern(31, 65536)


def test_stop_does_not_hang_on_a_client_that_never_reads(ioctx: IoCtx, disk: str) -> None:
    from csi_rbd.node.cache import open_cached
    from csi_rbd.node.nbd import Address, Export, NbdServer

    with Image(ioctx, disk) as image:
        cache = open_cached(image, "none")
        server = NbdServer(Export(cache, "rbd/disk"), Address(port=0), stop_grace=0.5)
        server.start()
        assert server.bound_port
        client = Client(("127.0.0.1", server.bound_port)).handshake()
        client.write(pattern(9, MiB), 0)  # data: a hole would make small replies
        for _ in range(64):  # 64 MiB of replies nobody reads
            client.send_request(p.CMD_READ, 0, MiB)
        time.sleep(0.5)
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 10
        client.close()
        cache.close()


def test_many_connections_do_not_leak_descriptors(serve: Serve, disk: str) -> None:
    """Connection threads are reused: the engine keeps a descriptor per OS thread."""
    with serve(disk, cache="writethrough") as served:
        with served.connect() as client:
            client.read(0, 4096)
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(40):
            with served.connect() as client:
                client.read(0, 4096)
                client.disconnect()
        assert len(os.listdir("/proc/self/fd")) - before < 5
