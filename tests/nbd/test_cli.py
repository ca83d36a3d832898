"""``csi-rbd nbd serve``: arguments, refusals, and a clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import errno
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from csi_rbd import cli
from csi_rbd.engine.native import IoCtx
from tests.nbd.client import Client
from tests.nbd.conftest import CLI, CliServer, MiB, create, engine_read, pattern

Start = Callable[..., CliServer]


def serve_exit(data_dir: Path, *args: str) -> tuple[int, str]:
    result = subprocess.run(
        [str(CLI), "--data-dir", str(data_dir), "nbd", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.returncode, result.stderr


def test_help_lists_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["nbd", "--help"]) == 0
    assert "serve" in capsys.readouterr().out
    assert cli.main(["nbd", "serve", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--socket", "--bind", "--cache", "--discard", "--read-only"):
        assert option in out


def test_usage_errors(data_dir: Path, ioctx: IoCtx, sock_dir: Path) -> None:
    create(ioctx, "disk", MiB)
    sock = str(sock_dir / "s.sock")
    assert serve_exit(data_dir, "rbd/disk")[0] == 2  # neither --socket nor --bind
    assert serve_exit(data_dir, "rbd/disk", "--socket", sock, "--bind", "127.0.0.1:1")[0] == 2
    assert serve_exit(data_dir, "rbd/disk", "--socket", sock, "--cache", "sometimes")[0] == 2
    for bind in ("0.0.0.0:10809", "localhost:10809", "10.1.2.3:1", "127.0.0.1", "127.0.0.1:x"):
        code, err = serve_exit(data_dir, "rbd/disk", "--bind", bind)
        assert code == errno.EINVAL and "127.0.0.1:PORT" in err, (bind, err)


def test_missing_images_and_busy_sockets(data_dir: Path, ioctx: IoCtx, sock_dir: Path) -> None:
    create(ioctx, "disk", MiB)
    sock = str(sock_dir / "s.sock")
    code, err = serve_exit(data_dir, "rbd/nope", "--socket", sock)
    assert code == errno.ENOENT and "does not exist" in err
    code, err = serve_exit(data_dir, "rbd/disk@nope", "--socket", sock)
    assert code == errno.ENOENT and "does not exist" in err
    Path(sock).write_text("not a socket")
    code, err = serve_exit(data_dir, "rbd/disk", "--socket", sock)
    assert code == errno.EEXIST and "not a socket" in err
    Path(sock).unlink()
    with socket.socket(socket.AF_UNIX) as listener:  # someone else listens there
        listener.bind(sock)
        listener.listen()
        code, err = serve_exit(data_dir, "rbd/disk", "--socket", sock)
        assert code == errno.EEXIST and "listening" in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_flushes_and_exits_zero(
    cli_server: Start, ioctx: IoCtx, sig: signal.Signals
) -> None:
    create(ioctx, "disk", 8 * MiB)
    server = cli_server("rbd/disk", "--cache", "writeback")
    client = Client(server.socket).handshake()
    client.flush()  # writeback proper from here: the next writes stay in memory
    client.write(pattern(3, 128 << 10), 2 * MiB)
    assert engine_read(ioctx, "disk", 2 * MiB, 16) == bytes(16)
    assert server.stop(sig) == 0
    assert engine_read(ioctx, "disk", 2 * MiB, 128 << 10) == pattern(3, 128 << 10)
    assert not Path(server.socket).exists()
    client.close()


def test_stale_socket_file_is_replaced(cli_server: Start, ioctx: IoCtx, sock_dir: Path) -> None:
    create(ioctx, "disk", MiB)
    path = sock_dir / "disk.sock"
    with socket.socket(socket.AF_UNIX) as old:
        old.bind(str(path))  # bound, never listening: like a server that died
    server = cli_server("rbd/disk")
    with Client(server.socket).handshake() as client:
        assert client.size == MiB
    assert server.stop() == 0
