"""Fixtures for the cache and NBD tests: engine images, in-process and CLI servers.

Unix socket paths must stay under 108 bytes, so sockets live in a short
temporary directory of their own rather than under pytest's ``tmp_path``.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from csi_rbd.engine.native import RBD, Image, IoCtx, Rados
from csi_rbd.engine.usage import used_size
from csi_rbd.node.cache import open_cached
from csi_rbd.node.nbd import Address, Export, NbdServer
from tests.nbd.client import Client

MiB = 1 << 20
CLI = Path(sys.executable).with_name("csi-rbd")


def pattern(seed: int, size: int) -> bytes:
    block = bytes((seed * 31 + i * 7) % 251 for i in range(4096))
    return (block * (size // len(block) + 1))[:size]


def need_tools(*tools: str) -> pytest.MarkDecorator:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def cluster(data_dir: Path) -> Iterator[Rados]:
    with Rados(data_dir=data_dir) as rados:
        yield rados


@pytest.fixture
def ioctx(cluster: Rados) -> IoCtx:
    return cluster.open_ioctx("rbd")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nbd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def create(ioctx: IoCtx, name: str, size: int = 64 * MiB, order: int = 20) -> None:
    RBD().create(ioctx, name, size, order=order)


def engine_read(
    ioctx: IoCtx, name: str, offset: int, length: int, snap: str | None = None
) -> bytes:
    """What the engine holds, through a handle of its own (read-only)."""
    with Image(ioctx, name, snapshot=snap, read_only=True) as image:
        return image.read(offset, length)


def engine_used(ioctx: IoCtx, name: str) -> int:
    for _ in range(20):  # an object may go away under diff_iterate: retry
        try:
            with Image(ioctx, name, read_only=True) as image:
                return used_size(image, image.size())
        except FileNotFoundError:
            time.sleep(0.05)
    raise AssertionError(f"could not measure the usage of {name}")


@dataclass
class Served:
    """An in-process server of one image."""

    server: NbdServer
    socket: str
    image: Image

    def connect(self, name: str = "", **options: bool) -> Client:
        return Client(self.socket).handshake(name, **options)


@pytest.fixture
def serve(ioctx: IoCtx, sock_dir: Path) -> Callable[..., object]:
    """``with serve(name, cache=..., read_only=..., discard=..., snap=...) as served:``."""

    @contextmanager
    def serving(
        name: str,
        cache: str = "none",
        read_only: bool = False,
        discard: str = "unmap",
        snap: str | None = None,
        handshake_timeout: float = 5.0,
        **cache_options: int | float,
    ) -> Iterator[Served]:
        read_only = read_only or snap is not None
        path = str(sock_dir / f"{name}.sock")
        with Image(ioctx, name, snapshot=snap, read_only=read_only) as image:
            cached = open_cached(image, cache, **cache_options)  # type: ignore[arg-type]
            spec = f"rbd/{name}" + (f"@{snap}" if snap else "")
            export = Export(cached, spec, read_only=read_only, discard=discard)
            server = NbdServer(export, Address(path), handshake_timeout=handshake_timeout)
            server.start()
            try:
                yield Served(server, path, image)
            finally:
                server.stop()
                cached.close()

    return serving


# -- the CLI server, as a separate process ------------------------------------------------
@dataclass
class CliServer:
    process: subprocess.Popen[bytes]
    socket: str

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


def start_cli(data_dir: Path, spec: str, socket_path: str, *options: str) -> CliServer:
    argv = [str(CLI), "--data-dir", str(data_dir), "nbd", "serve", spec, "--socket", socket_path]
    process = subprocess.Popen(
        [*argv, *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    if not line.startswith("serving "):
        process.kill()
        _, err = process.communicate(timeout=10)
        raise AssertionError(f"server did not start: {line!r} {err.decode()}")
    return CliServer(process, socket_path)


@pytest.fixture
def cli_server(data_dir: Path, sock_dir: Path) -> Iterator[Callable[..., CliServer]]:
    """``cli_server(spec, *options)``: ``csi-rbd nbd serve`` on a unix socket; stopped after."""
    started: list[CliServer] = []

    def start(spec: str, *options: str, name: str = "disk") -> CliServer:
        server = start_cli(data_dir, spec, str(sock_dir / f"{name}.sock"), *options)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGKILL)
            server.process.wait(10)


def run(*argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{argv} failed ({result.returncode}): {result.stderr}")
    return result


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()
