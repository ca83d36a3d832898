"""The NBD server: a listening socket, a thread per connection, one worker pool.

It listens on a unix socket or on 127.0.0.1 only (NBD has no authentication
here, so nothing beyond the node may reach it). Each accepted connection gets
a thread (reused across connections, see :class:`.workers.Runners`) that runs
the handshake (bounded by a timeout) and then the
transmission loop; requests that need engine I/O go to a pool shared by all
connections, which all use the export's one cache. A connection that breaks
the protocol is dropped alone: its in-flight requests finish, nothing it did
not complete is written, the other connections carry on.

:meth:`NbdServer.stop` stops accepting, ends every connection's reading side
(in-flight requests are answered) and stops the pool; the caller then closes
the cache (a final flush) and the image.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
import stat
import threading
import time
from dataclasses import dataclass

from csi_rbd.node.nbd.export import Export
from csi_rbd.node.nbd.handshake import ProtocolError, negotiate
from csi_rbd.node.nbd.stream import ConnectionClosed, SocketReader
from csi_rbd.node.nbd.transmission import Connection
from csi_rbd.node.nbd.workers import Runners, WorkerPool

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_STOP_GRACE = 10.0  # seconds connections get to answer in-flight requests on stop


@dataclass(frozen=True)
class Address:
    """Where to listen: a unix socket path, or a TCP port on 127.0.0.1 (0: any free one)."""

    socket_path: str | None = None
    port: int | None = None

    def __post_init__(self) -> None:
        if (self.socket_path is None) == (self.port is None):
            raise ValueError("give exactly one of a socket path and a port")
        if self.port is not None and not 0 <= self.port <= 65535:
            raise ValueError(f"invalid port {self.port}")


class NbdServer:
    def __init__(
        self,
        export: Export,
        address: Address,
        *,
        workers: int = 8,
        max_connections: int = 64,
        handshake_timeout: float = 10.0,
        stop_grace: float = _STOP_GRACE,
    ) -> None:
        self.export = export
        self.address = address
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.stop_grace = stop_grace
        self._workers = workers
        self._listener: socket.socket | None = None
        self._pool: WorkerPool | None = None
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._accepter: threading.Thread | None = None
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Event] = {}  # set when done
        self._runners = Runners(max_connections)
        self._stopping = False
        self.bound_port: int | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Bind and start accepting in a background thread."""
        self._listener = self._bind()
        self._pool = WorkerPool(self._workers)
        self._accepter = threading.Thread(target=self._accept_loop, name="nbd-accept", daemon=True)
        self._accepter.start()
        log.info("serving %s on %s", self.export.name, self.uri)

    @property
    def uri(self) -> str:
        """The NBD URI clients (qemu, nbdinfo) connect to."""
        if self.address.socket_path is not None:
            return f"nbd+unix:///?socket={self.address.socket_path}"
        return f"nbd://{LOOPBACK}:{self.bound_port}/"

    def stop(self) -> None:
        """Stop accepting, end every connection (in-flight requests finish), stop the pool."""
        with self._lock:
            self._stopping = True
            connections = list(self._connections.items())
        self._wakeup_w.send(b"x")
        if self._accepter is not None:
            self._accepter.join()
        for sock, _ in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)
        deadline = time.monotonic() + self.stop_grace
        for sock, done in connections:
            if not done.wait(max(0.0, deadline - time.monotonic())):
                with contextlib.suppress(OSError):  # stuck sending to a client not reading
                    sock.shutdown(socket.SHUT_RDWR)
                done.wait()
        self._runners.close()
        if self._pool is not None:
            self._pool.close()
        self._wakeup_r.close()
        self._wakeup_w.close()
        log.info("stopped serving %s", self.export.name)

    def __enter__(self) -> NbdServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- listening ---------------------------------------------------------------------
    def _bind(self) -> socket.socket:
        if self.address.socket_path is not None:
            path = self.address.socket_path
            _remove_stale_socket(path)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o177)  # the socket is 0600: root (or the owner) only
            try:
                listener.bind(path)
            except BaseException:
                listener.close()
                raise
            finally:
                os.umask(old)
        else:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                listener.bind((LOOPBACK, self.address.port or 0))
            except BaseException:
                listener.close()
                raise
            self.bound_port = listener.getsockname()[1]
        listener.listen(64)
        return listener

    def _accept_loop(self) -> None:
        assert self._listener is not None
        listener = self._listener
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(self._wakeup_r, selectors.EVENT_READ)
            while True:
                ready = [key.fileobj for key, _ in selector.select()]
                if self._wakeup_r in ready:
                    break
                try:
                    sock, peer = listener.accept()
                except OSError as exc:
                    log.warning("accept failed: %s", exc)
                    continue
                self._admit(sock, peer)
        listener.close()
        if self.address.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address.socket_path)

    def _admit(self, sock: socket.socket, peer: object) -> None:
        name = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else f"unix:{sock.fileno()}"
        with self._lock:
            if self._stopping or len(self._connections) >= self.max_connections:
                log.warning("refusing connection from %s: too many connections", name)
                sock.close()
                return
            done = self._connections[sock] = threading.Event()

        def serve() -> None:
            try:
                self._serve_connection(sock, name)
            finally:
                done.set()

        if not self._runners.run(serve):  # cannot happen below max_connections
            with self._lock:
                del self._connections[sock]
            sock.close()

    # -- one connection ----------------------------------------------------------------
    def _serve_connection(self, sock: socket.socket, peer: str) -> None:
        assert self._pool is not None
        try:
            if sock.family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.handshake_timeout)
            reader = SocketReader(sock)
            session = negotiate(sock, reader, self.export)
            if session is None:
                log.debug("%s: aborted the handshake", peer)
                return
            sock.settimeout(None)
            log.info("%s: serving %s (%d bytes)", peer, self.export.name, session.size)
            Connection(sock, reader, session, self._pool, peer).serve()
        except ProtocolError as exc:
            log.warning("%s: dropped: %s", peer, exc)
        except ConnectionClosed as exc:
            if exc.partial:
                log.warning("%s: dropped: %s", peer, exc)
            else:
                log.info("%s: %s", peer, exc)
        except (OSError, ValueError) as exc:  # reset, timeout, or reading a shut socket
            log.info("%s: connection ended: %s", peer, exc)
        except Exception:
            log.exception("%s: connection failed", peer)
        finally:
            with self._lock:
                self._connections.pop(sock, None)
            with contextlib.suppress(OSError):
                sock.close()


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file no one listens on; refuse anything else in the way."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:  # refused: a leftover of a server that is gone
        os.unlink(path)
        return
    finally:
        probe.close()
    raise FileExistsError(errno.EEXIST, f"another server is listening on {path}")
