"""``--discard unmap`` frees engine space on TRIM; ``ignore`` drops TRIM (zeroing still zeroes).

Measured on the engine's used bytes (``csi_rbd.engine.usage.used_size``), never
on what clients report: a dropped TRIM succeeds for the client too.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from csi_rbd.engine.native import IoCtx
from tests.nbd.conftest import CliServer, MiB, create, engine_read, engine_used, need_tools, run

pytestmark = need_tools("qemu-io")
SIZE = 32 * MiB
Start = Callable[..., CliServer]


def qemu_io(uri: str, *commands: str) -> None:
    argv = ["qemu-io", "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    output = run(*argv, uri).stdout
    assert "fail" not in output.lower(), output


@pytest.mark.parametrize("cache", ["none", "writeback"])
def test_unmap_frees_space(cli_server: Start, ioctx: IoCtx, cache: str) -> None:
    create(ioctx, "disk", SIZE, order=22)
    server = cli_server("rbd/disk", "--cache", cache, "--discard", "unmap")
    qemu_io(server.uri, "write -P 9 0 16M", "flush")
    assert engine_used(ioctx, "disk") == 16 * MiB
    qemu_io(server.uri, "discard 0 8M", "write -z -u 8M 4M", "flush")
    assert engine_used(ioctx, "disk") == 4 * MiB
    qemu_io(server.uri, "read -P 0 0 12M", "read -P 9 12M 4M")
    assert server.stop() == 0


@pytest.mark.parametrize("cache", ["none", "writeback"])
def test_ignore_keeps_space_and_still_zeroes(cli_server: Start, ioctx: IoCtx, cache: str) -> None:
    create(ioctx, "disk", SIZE, order=22)
    server = cli_server("rbd/disk", "--cache", cache, "--discard", "ignore")
    qemu_io(server.uri, "write -P 9 0 16M", "flush")
    assert engine_used(ioctx, "disk") == 16 * MiB
    qemu_io(server.uri, "discard 0 8M", "flush")
    assert engine_used(ioctx, "disk") == 16 * MiB  # the TRIM was dropped
    qemu_io(server.uri, "read -P 9 0 8M")
    qemu_io(server.uri, "write -z -u 8M 4M", "write -z 12M 1M", "flush")
    qemu_io(server.uri, "read -P 0 8M 5M", "read -P 9 13M 3M")
    assert engine_used(ioctx, "disk") == 16 * MiB  # zeroed, but still allocated
    assert server.stop() == 0
    assert engine_read(ioctx, "disk", 8 * MiB, 5 * MiB) == bytes(5 * MiB)
