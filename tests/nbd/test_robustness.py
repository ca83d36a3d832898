"""Misbehaving clients are dropped alone: the server, other clients and the data carry on."""

from __future__ import annotations

import random
import socket
import struct
import threading
from collections.abc import Callable

import pytest

from csi_rbd.engine.native import IoCtx
from csi_rbd.node.nbd import protocol as p
from tests.nbd.client import Client, NbdError
from tests.nbd.conftest import CliServer, MiB, create, engine_read, pattern

SIZE = 16 * MiB
Start = Callable[..., CliServer]


@pytest.fixture
def server(ioctx: IoCtx, cli_server: Start) -> CliServer:
    create(ioctx, "disk", SIZE)
    return cli_server("rbd/disk", "--cache", "writeback")


def closed(sock: socket.socket) -> bool:
    """Whether the server hung up (reading whatever it sent first)."""
    sock.settimeout(10)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def attacker(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def test_bad_clients_are_dropped_and_a_good_one_is_not(server: CliServer, ioctx: IoCtx) -> None:
    good = Client(server.socket).handshake()
    good.write(pattern(1, MiB), 0)

    # garbage instead of client flags and options
    with attacker(server.socket) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10)
        assert closed(sock)
    # a valid handshake, then a request with a bad magic
    with Client(server.socket).handshake() as bad:
        bad.write(b"before", MiB)
        bad.sock.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, p.CMD_WRITE, 1, 0, 4))
        assert closed(bad.sock)
    # a write claiming a 1 GiB payload
    with Client(server.socket).handshake() as bad:
        bad.sock.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, 1, 0, 1 << 30))
        assert closed(bad.sock)
    # a write cut short: nothing of it may land
    with Client(server.socket).handshake() as bad:
        bad.sock.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, 1, 2 * MiB, 65536))
        bad.sock.sendall(b"\xff" * 1000)
    # reads out of range are answered with errors, not by dropping the client
    with Client(server.socket).handshake() as odd:
        for offset, length in ((SIZE, 1), (SIZE - 1, 2), ((1 << 64) - 4096, 4096)):
            with pytest.raises(NbdError) as failure:
                odd.read(offset, length)
            assert failure.value.error == p.EINVAL
        assert odd.read(0, 16) == pattern(1, MiB)[:16]
    # random bytes after a valid handshake
    with Client(server.socket).handshake() as bad:
        bad.sock.sendall(random.Random(5).randbytes(100000))
        assert closed(bad.sock)

    good.write(pattern(2, MiB), 3 * MiB)
    good.flush()
    assert good.read(0, MiB) == pattern(1, MiB)
    assert good.read(MiB, 6) == b"before"
    assert good.read(2 * MiB, 65536) == bytes(65536)
    good.disconnect()
    assert server.stop() == 0
    assert engine_read(ioctx, "disk", 3 * MiB, MiB) == pattern(2, MiB)
    assert engine_read(ioctx, "disk", 2 * MiB, 65536) == bytes(65536)


def test_fuzzing_clients_beside_a_working_one(server: CliServer, ioctx: IoCtx) -> None:
    """Thirty clients send random bytes (some after a valid greeting) while one works."""
    failures: list[BaseException] = []

    def fuzz(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with attacker(server.socket) as sock:
                sock.recv(18)
                if seed % 2:
                    sock.sendall(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE))
                    sock.sendall(struct.pack(">QII", p.IHAVEOPT, rng.randrange(20), 8))
                    sock.sendall(rng.randbytes(8))
                sock.sendall(rng.randbytes(rng.randrange(1, 5000)))
                sock.shutdown(socket.SHUT_WR)
                closed(sock)
        except OSError:
            pass  # the server may hang up while we still send: that is fine
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=fuzz, args=(seed,)) for seed in range(30)]
    with Client(server.socket).handshake() as good:
        for thread in threads:
            thread.start()
        for i in range(64):
            good.write(pattern(i, 65536), i * 65536)
        good.flush()
        for thread in threads:
            thread.join()
        for i in range(64):
            assert good.read(i * 65536, 65536) == pattern(i, 65536)
    assert not failures, failures[0]
    assert server.stop() == 0
    assert engine_read(ioctx, "disk", 63 * 65536, 65536) == pattern(63, 65536)
