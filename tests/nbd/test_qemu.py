"""``csi-rbd nbd serve`` with real NBD clients: qemu-img, qemu-io and nbdinfo."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from csi_rbd.engine.native import Image, IoCtx
from csi_rbd.node.nbd.server import LOOPBACK
from tests.nbd.conftest import (
    CLI,
    CliServer,
    MiB,
    create,
    engine_read,
    need_tools,
    run,
    start_cli,
)

pytestmark = need_tools("qemu-img", "qemu-io", "nbdinfo")
SIZE = 48 * MiB
Start = Callable[..., CliServer]


@pytest.fixture
def disk(ioctx: IoCtx) -> str:
    create(ioctx, "disk", SIZE, order=22)
    return "rbd/disk"


def qemu_io(uri: str, *commands: str, check: bool = True, read_only: bool = False) -> str:
    argv = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
    for command in commands:
        argv += ["-c", command]
    result = run(*argv, uri, check=False)
    output = result.stdout + result.stderr
    if check:
        assert result.returncode == 0, output
        assert "fail" not in output.lower(), output
    return output


def nbd_map(uri: str) -> list[tuple[int, int, int]]:
    """(offset, length, type) rows of ``nbdinfo --map`` (type 0: data, 3: hole+zero)."""
    rows = []
    for line in run("nbdinfo", "--map", uri).stdout.splitlines():
        offset, length, kind = line.split()[:3]
        rows.append((int(offset), int(length), int(kind)))
    return rows


def test_qemu_img_info_under_both_names(cli_server: Start, disk: str) -> None:
    server = cli_server(disk)
    for uri in (server.uri, f"nbd+unix:///rbd/disk?socket={server.socket}"):
        info = json.loads(run("qemu-img", "info", "--output=json", uri).stdout)
        assert info["virtual-size"] == SIZE
    failed = run("qemu-img", "info", f"nbd+unix:///rbd/other?socket={server.socket}", check=False)
    assert failed.returncode != 0
    assert server.stop() == 0


@pytest.mark.parametrize("cache", ["none", "writethrough", "writeback"])
def test_convert_a_qcow2_in_and_out(
    cli_server: Start, disk: str, ioctx: IoCtx, tmp_path: Path, cache: str
) -> None:
    source, reference, back = tmp_path / "src.qcow2", tmp_path / "ref.raw", tmp_path / "out.raw"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(source), str(SIZE))
    writes = ["write -P 0x11 0 1M", "write -P 0x22 5M 512k", "write -P 0x33 30M 4k"]
    writes += ["write -P 0x44 47M 1M", "write -P 0x55 12345 678"]
    run("qemu-io", "-f", "qcow2", *[a for w in writes for a in ("-c", w)], str(source))
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(source), str(reference))

    server = cli_server(disk, "--cache", cache)
    run("qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", str(source), server.uri)
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri, str(back))
    assert back.read_bytes() == reference.read_bytes()
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", server.uri, str(source))
    assert server.stop() == 0
    assert engine_read(ioctx, "disk", 0, SIZE) == reference.read_bytes()


@pytest.mark.parametrize("cache", ["none", "writethrough", "writeback"])
def test_qemu_io_commands(cli_server: Start, disk: str, ioctx: IoCtx, cache: str) -> None:
    server = cli_server(disk, "--cache", cache)
    uri = server.uri
    qemu_io(
        uri,
        "write -P 0xa1 0 2M",
        "write -P 0xb2 4M 64k",
        "write -P 0xc3 100000 3000",  # unaligned
        "aio_write -P 0xd4 8M 1M",
        "aio_flush",
        "flush",
        "write -P 0xe5 -f 9M 4k",  # FUA
    )
    qemu_io(
        uri,
        "read -P 0xa1 0 100000",
        "read -P 0xc3 100000 3000",
        "read -P 0xa1 103000 1994152",
        "read -P 0xb2 4M 64k",
        "read -P 0xd4 8M 1M",
        "read -P 0xe5 9M 4k",
        "read -P 0 2M 2M",
    )
    qemu_io(uri, "discard 0 1M", "write -z 4M 32k", "write -z -u 8M 512k", "flush")
    qemu_io(
        uri,
        "read -P 0 0 1M",
        "read -P 0xa1 1M 1M",
        "read -P 0 4M 32k",
        "read -P 0xb2 4128k 32k",
        "read -P 0 8M 512k",
        "read -P 0xd4 8704k 512k",
    )
    assert engine_read(ioctx, "disk", 9 * MiB, 4096) == b"\xe5" * 4096
    assert server.stop() == 0
    assert engine_read(ioctx, "disk", 1 * MiB, 1 * MiB) == b"\xa1" * MiB


def test_nbdinfo_map_shows_holes(cli_server: Start, disk: str) -> None:
    server = cli_server(disk, "--cache", "writeback")
    qemu_io(server.uri, "write -P 1 1M 64k", "write -P 2 20M 4M", "flush", "write -P 3 40M 4k")
    rows = nbd_map(server.uri)  # the last write may still be only in the cache
    assert rows == [
        (0, MiB, 3),
        (MiB, 64 << 10, 0),
        (MiB + (64 << 10), 19 * MiB - (64 << 10), 3),
        (20 * MiB, 4 * MiB, 0),
        (24 * MiB, 16 * MiB, 3),
        (40 * MiB, 4096, 0),
        (40 * MiB + 4096, SIZE - 40 * MiB - 4096, 3),
    ]
    qemu_io(server.uri, "discard 20M 2M")
    rows = nbd_map(server.uri)
    assert (MiB + (64 << 10), 21 * MiB - (64 << 10), 3) in rows  # the hole grew
    assert (22 * MiB, 2 * MiB, 0) in rows


def test_nbdinfo_list(cli_server: Start, disk: str) -> None:
    server = cli_server(disk)
    output = run("nbdinfo", "--list", server.uri).stdout
    assert 'export="rbd/disk"' in output
    assert "base:allocation" in output
    assert re.search(r"export-size:\s+50331648", output)
    assert re.search(r"can_multi_conn:\s+true", output)
    assert re.search(r"is_read_only:\s+false", output)


def test_snapshot_export_is_read_only(cli_server: Start, disk: str, ioctx: IoCtx) -> None:
    with Image(ioctx, "disk") as image:
        image.write(b"\x5a" * MiB, 0)
        image.create_snap("s1")
        image.write(b"\x6b" * MiB, 0)
    server = cli_server("rbd/disk@s1", "--cache", "writeback", name="snap")
    info = run("nbdinfo", server.uri).stdout
    assert re.search(r"is_read_only:\s+true", info)
    assert 'export="rbd/disk@s1"' in run("nbdinfo", "--list", server.uri).stdout
    qemu_io(server.uri, "read -P 0x5a 0 1M", read_only=True)
    # qemu sees the read-only flag: it refuses to open the export for writing
    output = qemu_io(server.uri, "write -P 1 0 4k", check=False)
    assert "Permission denied" in output, output
    failed = run("qemu-img", "convert", "-n", "-O", "raw", "/dev/null", server.uri, check=False)
    assert failed.returncode != 0
    assert server.stop() == 0
    assert engine_read(ioctx, "disk", 0, MiB, snap="s1") == b"\x5a" * MiB
    assert engine_read(ioctx, "disk", 0, MiB) == b"\x6b" * MiB


def test_read_only_head_and_a_second_writer(cli_server: Start, disk: str, data_dir: Path) -> None:
    writer = cli_server(disk, "--cache", "writeback")
    # the head is locked by the writer: a second writable export is refused
    with pytest.raises(AssertionError, match="being written"):
        start_cli(data_dir, disk, str(Path(writer.socket).with_name("two.sock")))
    reader = cli_server(disk, "--read-only", name="ro")
    assert re.search(r"is_read_only:\s+true", run("nbdinfo", reader.uri).stdout)
    assert "Permission denied" in qemu_io(reader.uri, "write 0 4k", check=False)
    qemu_io(reader.uri, "read 0 4k", read_only=True)
    assert reader.stop(signal.SIGINT) == 0
    assert writer.stop() == 0


def test_tcp_on_loopback(data_dir: Path, disk: str) -> None:
    process = subprocess.Popen(
        [str(CLI), "--data-dir", str(data_dir), "nbd", "serve", disk, "--bind", f"{LOOPBACK}:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        uri = line.split(" at ", 1)[1].strip()
        assert uri.startswith(f"nbd://{LOOPBACK}:")
        info = json.loads(run("qemu-img", "info", "--output=json", uri).stdout)
        assert info["virtual-size"] == SIZE
        qemu_io(uri, "write -P 7 0 64k", "read -P 7 0 64k")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
