"""Starting, finding and stopping attach daemons (see :mod:`.attach_daemon`).

A daemon is recognised by its command line (this module's name and
``--mountpoint <M>``), never by pid alone, so a recycled pid is not mistaken
for it. Daemons started by this process are its children until they exit;
their ``Popen`` objects are kept to reap them (a killed child would otherwise
linger as a zombie that ``kill(pid, 0)`` still finds).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from csi_rbd.config import ClusterConfig
from csi_rbd.engine.base import ImageLocator
from csi_rbd.node import daemon_protocol as protocol
from csi_rbd.node.errors import DataPathError, PreconditionFailed, VolumeNotFound

_PROC = Path("/proc")
_PIPE_CAPACITY = 65536  # Linux's default pipe buffer


@dataclass(frozen=True)
class Started:
    """A daemon that serves: its pid and, on engines whose locks outlive a
    killed client (Ceph), the lock owner to break if it dies."""

    pid: int
    lock_owner: str | None = None


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return [os.fsdecode(part) for part in raw.split(b"\0") if part]


def _zombie(pid: int) -> bool:
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return True
    return text.rpartition(")")[2].split()[0] in ("Z", "X")


def _serves(argv: list[str] | None, mountpoint: str) -> bool:
    if not argv or protocol.MODULE not in argv:
        return False
    try:
        return argv[argv.index("--mountpoint") + 1] == mountpoint
    except (ValueError, IndexError):
        return False


def find_daemons(mountpoint: str | None = None, under: str | None = None) -> list[int]:
    """Pids of live attach daemons serving ``mountpoint`` (or any mount point below ``under``)."""
    found = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        argv = _cmdline(int(entry.name))
        if not argv or protocol.MODULE not in argv or "--mountpoint" not in argv:
            continue
        point = argv[argv.index("--mountpoint") + 1] if argv[-1] != "--mountpoint" else ""
        if mountpoint is not None and point != mountpoint:
            continue
        if under is not None and not point.startswith(under.rstrip("/") + "/"):
            continue
        if not _zombie(int(entry.name)):
            found.append(int(entry.name))
    return found


class Supervisor:
    """Starts daemons and keeps track of the ones that are its children."""

    def __init__(self, python: str = sys.executable, start_timeout: float = 30.0) -> None:
        self.python = python
        self.start_timeout = start_timeout
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    # -- start ---------------------------------------------------------------------
    def start(
        self,
        locator: ImageLocator,
        mountpoint: str,
        *,
        read_only: bool,
        discard: str,
        cache: str = "none",
        ready_file: Path,
        log_file: Path,
        cluster: ClusterConfig | None = None,
        secrets: Mapping[str, str] | None = None,
        break_lock: str | None = None,
        shared: bool = False,
    ) -> Started:
        """Start a daemon and wait until it serves.

        A native ``locator`` carries its data directory; any other needs
        ``cluster`` (and ``secrets`` unless the cluster's conf file has a
        keyring), handed over through a pipe: never on the command line, never
        on disk. ``break_lock`` names the lock owner of a daemon known to be
        dead (see :mod:`.attach_daemon`). ``shared``: other clients may write the
        image too; the daemon does not hold its exclusive lock.

        PreconditionFailed when another writer holds the image, VolumeNotFound
        when the image does not exist, DataPathError for anything else.
        """
        if cluster is None and not locator.data_dir:
            raise DataPathError(f"{locator}: the node has no configuration for this cluster")
        ready_file.unlink(missing_ok=True)
        Path(mountpoint).mkdir(parents=True, exist_ok=True)
        settings = b""
        if cluster is not None:
            settings = json.dumps(
                {"cluster": cluster.to_mapping(), "secrets": dict(secrets or {})}
            ).encode()
            if len(settings) > _PIPE_CAPACITY:
                raise DataPathError("the cluster settings and secrets are too large")
        reader, writer = os.pipe()
        try:
            # the whole document fits in the pipe: written before the daemon runs
            os.write(writer, settings)
            os.close(writer)
            if cluster is not None:
                source = ["--cluster-fd", str(reader)]
            else:
                source = ["--data-dir", str(locator.data_dir)]
            argv = [
                self.python,
                "-m",
                protocol.MODULE,
                *source,
                "--pool",
                locator.pool,
                "--image",
                locator.image,
                "--mountpoint",
                mountpoint,
                "--discard",
                discard,
                "--cache",
                cache,
                "--ready-file",
                str(ready_file),
            ]
            if read_only:
                argv.append("--read-only")
            if break_lock:
                argv += ["--break-lock", break_lock]
            if shared:
                argv.append("--shared")
            env = dict(os.environ, FUSE_LIBRARY_NAME="fuse3")
            with open(log_file, "ab") as log:
                offset = log.tell()
                process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    cwd="/",
                    env=env,
                    close_fds=True,
                    pass_fds=(reader,) if cluster is not None else (),
                    start_new_session=True,
                )
        finally:
            with contextlib.suppress(OSError):
                os.close(writer)
            os.close(reader)
        with self._lock:
            self._children[process.pid] = process
        info = self._wait_ready(process, ready_file, log_file, offset)
        owner = info.get("lock_owner")
        return Started(process.pid, owner if isinstance(owner, str) else None)

    def _wait_ready(
        self, process: subprocess.Popen[bytes], ready_file: Path, log_file: Path, offset: int
    ) -> dict[str, object]:
        deadline = time.monotonic() + self.start_timeout
        delay = 0.005
        while True:
            if ready_file.exists():
                with contextlib.suppress(OSError, ValueError):
                    info = json.loads(ready_file.read_text())
                    if isinstance(info, dict) and info.get("pid") == process.pid:
                        return info
            code = process.poll()
            if code is not None:
                self._forget(process.pid)
                message = _log_tail(log_file, offset) or f"attach daemon exited with {code}"
                if code == protocol.EXIT_BUSY:
                    raise PreconditionFailed(message)
                if code == protocol.EXIT_NOT_FOUND:
                    raise VolumeNotFound(message)
                raise DataPathError(message)
            if time.monotonic() >= deadline:
                self.kill(process.pid)
                raise DataPathError(
                    f"attach daemon not ready after {self.start_timeout:g}s: "
                    f"{_log_tail(log_file, offset)}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    # -- liveness ------------------------------------------------------------------
    def is_running(self, pid: int | None, mountpoint: str) -> bool:
        if pid is None:
            return False
        with self._lock:
            process = self._children.get(pid)
        if process is not None and process.poll() is not None:
            self._forget(pid)
            return False
        return not _zombie(pid) and _serves(_cmdline(pid), mountpoint)

    def _forget(self, pid: int) -> None:
        with self._lock:
            self._children.pop(pid, None)

    def wait_exit(self, pid: int, timeout: float) -> bool:
        """True once ``pid`` is gone (reaped when it is a child) within ``timeout``."""
        with self._lock:
            process = self._children.get(pid)
        if process is not None:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            self._forget(pid)
            return True
        deadline = time.monotonic() + timeout
        while not _zombie(pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    # -- stop ----------------------------------------------------------------------
    def kill(self, pid: int, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if sig == signal.SIGKILL:
            self.wait_exit(pid, 10.0)

    def stop(self, pid: int, mountpoint: str, timeout: float = 15.0) -> None:
        """Stop a daemon whose mount is already gone (it then exits by itself).

        Falls back to SIGTERM (the daemon flushes and exits) and then SIGKILL.
        """
        if not self.is_running(pid, mountpoint):
            self.wait_exit(pid, 0)
            return
        if self.wait_exit(pid, timeout):
            return
        self.kill(pid, signal.SIGTERM)
        if not self.wait_exit(pid, timeout):
            self.kill(pid, signal.SIGKILL)


def _log_tail(log_file: Path, offset: int) -> str:
    """The last non-empty line the daemon logged since ``offset``."""
    try:
        with open(log_file, "rb") as handle:
            handle.seek(offset)
            lines = handle.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""
