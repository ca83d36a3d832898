"""Kill -9 of a writeback server right after a flush reply: flushed data survives.

Each round starts ``csi-rbd nbd serve --cache writeback``, writes 4 KiB blocks
whose bytes name (block, generation), waits for the replies, then pipelines
more writes, a FLUSH and more writes, and kills the server the moment the
FLUSH reply arrives. After the kill, read straight from the engine:

* a block acknowledged before the FLUSH was sent holds exactly that write, or
  one of the writes sent later;
* any other block holds one of the writes sent to it, or what it held before:
  unflushed data may be lost, but nothing is ever torn or garbage.

The next round starts a new server on the same image (the dead one's write
lock went away with it). Odd rounds first write 100 more blocks and wait for
their replies before the kill: acknowledged, never flushed, so most are lost
(the test checks that some are: the cache did hold data back).
"""

from __future__ import annotations

import random
import signal
import struct
from collections.abc import Callable
from pathlib import Path

from csi_rbd.engine.native import RBD, Image, IoCtx
from csi_rbd.node.nbd import protocol as p
from tests.nbd.client import Client
from tests.nbd.conftest import CliServer, MiB, create, engine_read

SIZE = 64 * MiB
BLOCK = 4096
BLOCKS = SIZE // BLOCK
Start = Callable[..., CliServer]


def block_data(block: int, generation: int) -> bytes:
    return struct.pack(">QQ", block, generation) * (BLOCK // 16)


def decode(block: int, data: bytes) -> int:
    """The generation a block holds (0: never written); AssertionError for garbage."""
    if data == bytes(BLOCK):
        return 0
    found, generation = struct.unpack_from(">QQ", data)
    assert found == block and data == block_data(block, generation), f"block {block} is garbage"
    return int(generation)


def test_flushed_writes_survive_kill_9(cli_server: Start, ioctx: IoCtx, sock_dir: Path) -> None:
    create(ioctx, "disk", SIZE, order=22)
    rng = random.Random(1234)
    durable: dict[int, int] = {}  # block -> generation a completed flush covered
    generation = lost = 0
    for round_ in range(4):
        server = cli_server("rbd/disk", "--cache", "writeback", name=f"r{round_}")
        client = Client(server.socket).handshake()
        client.flush()  # writeback proper from now on
        acknowledged: dict[int, int] = {}
        for _ in range(300):  # written and acknowledged before the FLUSH is sent
            generation += 1
            block = rng.randrange(BLOCKS)
            client.send_request(p.CMD_WRITE, block * BLOCK, BLOCK, 0, block_data(block, generation))
            acknowledged[block] = generation
        for _ in range(300):
            assert client.recv_reply().error == 0
        later: dict[int, set[int]] = {}  # writes sent afterwards, maybe lost
        for phase in ("before", "flush", "after"):
            if phase == "flush":
                flush = client.send_request(p.CMD_FLUSH)
                continue
            for _ in range(200):
                generation += 1
                block = rng.randrange(BLOCKS)
                data = block_data(block, generation)
                client.send_request(p.CMD_WRITE, block * BLOCK, BLOCK, 0, data)
                later.setdefault(block, set()).add(generation)
        pending = 401
        while True:
            reply = client.recv_reply()
            pending -= 1
            assert reply.error == 0
            if reply.cookie == flush and round_ % 2 == 0:
                server.process.send_signal(signal.SIGKILL)  # right after the reply
                break
            if not pending:  # odd rounds: acknowledged writes after the flush, then kill
                for _ in range(100):
                    generation += 1
                    block = rng.randrange(BLOCKS)
                    data = block_data(block, generation)
                    client.write(data, block * BLOCK)
                    later.setdefault(block, set()).add(generation)
                server.process.send_signal(signal.SIGKILL)
                break
        assert server.process.wait(30) == -signal.SIGKILL
        client.close()

        durable.update(acknowledged)
        disk = engine_read(ioctx, "disk", 0, SIZE)
        for block in range(BLOCKS):
            held = decode(block, disk[block * BLOCK : (block + 1) * BLOCK])
            allowed = later.get(block, set())
            if block in durable:
                assert held == durable[block] or held in allowed, (round_, block, held)
            else:
                assert held == 0 or held in allowed, (round_, block, held)
            if held:
                durable[block] = held  # what the next round starts from
            lost += bool(allowed) and held not in allowed
    assert generation > 2000
    assert lost, "no unflushed write was lost: the cache did not hold any back"


def test_streaming_writes_survive_kill_9_after_flush(
    cli_server: Start, ioctx: IoCtx, sock_dir: Path
) -> None:
    """2 MiB writes (what ``qemu-img convert`` sends) are acknowledged before the
    engine has them (written behind): a FLUSH sent after their replies covers them.
    The image is a clone and each write the first to its object, so in the first
    round each copies its object up (with an fsync) and is still being written
    when its reply has gone; the later rounds overwrite in place."""
    create(ioctx, "parent", SIZE, order=22)
    with Image(ioctx, "parent") as parent:
        parent.write(b"p" * SIZE, 0)
        parent.create_snap("s")
    RBD().clone(ioctx, "parent", "s", ioctx, "disk")
    chunk = 2 * MiB
    for round_ in range(3):
        server = cli_server("rbd/disk", "--cache", "writeback", name=f"s{round_}")
        client = Client(server.socket).handshake()
        client.flush()  # writeback proper from now on
        blocks = range(0, SIZE // chunk, 2)  # one per object: each write copies it up
        for block in blocks:
            data = struct.pack(">QQ", block, round_ + 1) * (chunk // 16)
            client.send_request(p.CMD_WRITE, block * chunk, chunk, 0, data)
        for _ in blocks:
            assert client.recv_reply().error == 0
        client.send_request(p.CMD_FLUSH)
        assert client.recv_reply().error == 0
        server.process.send_signal(signal.SIGKILL)  # right after the reply
        assert server.process.wait(30) == -signal.SIGKILL
        client.close()
        disk = engine_read(ioctx, "disk", 0, SIZE)
        for block in blocks:
            expected = struct.pack(">QQ", block, round_ + 1) * (chunk // 16)
            assert disk[block * chunk : (block + 1) * chunk] == expected, (round_, block)
