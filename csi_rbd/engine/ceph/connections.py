"""Connected librados clients kept for reuse, one per identity.

Connecting costs a round of cephx with the monitors (tens of milliseconds,
seconds when a monitor is down), and a controller makes one call after
another with the same StorageClass secret. So, as ceph-csi does, a client is
kept per identity (user and a digest of the key; never the key itself) and
shared by the calls that use it: librados clients are thread-safe. A client
nobody used for ``idle_seconds`` is shut down at the next call; one whose
call failed with a lost connection is dropped at once. Keeping few, long-lived
clients also avoids churning librbd's per-client state, which librbd 16.2
handles badly (a process that connects and shuts down many clients rarely
aborts).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from csi_rbd.engine import errors

Identity = tuple[str, str]  # (user or "", sha256 of the key or "")


def identity(user: str | None, key: str | None) -> Identity:
    digest = hashlib.sha256(key.encode()).hexdigest() if key else ""
    return (user or "", digest)


@dataclass
class _Entry:
    client: Any | None = None
    users: int = 0
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)  # one connect at a time


class ConnectionPool:
    def __init__(self, idle_seconds: float = 600.0) -> None:
        self.idle_seconds = idle_seconds
        self._entries: dict[Identity, _Entry] = {}
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def use(self, who: Identity, connect: Callable[[], Any]) -> Iterator[Any]:
        """A connected client for ``who`` (made with ``connect`` when there is none)."""
        self._expire()
        with self._guard:
            entry = self._entries.setdefault(who, _Entry())
            entry.users += 1
        try:
            with entry.lock:
                if entry.client is None:
                    entry.client = connect()
                client = entry.client
            try:
                yield client
            except errors.ConnectionShutdown:
                self._drop(who, entry, client)
                raise
        finally:
            with self._guard:
                entry.users -= 1
                entry.last_used = time.monotonic()
                if entry.client is None and entry.users == 0 and self._entries.get(who) is entry:
                    del self._entries[who]  # its connect failed: nothing to keep

    def _drop(self, who: Identity, entry: _Entry, client: Any) -> None:
        with self._guard:
            if self._entries.get(who) is entry and entry.client is client:
                del self._entries[who]
        with contextlib.suppress(Exception):
            client.shutdown()

    def _expire(self) -> None:
        now = time.monotonic()
        with self._guard:
            idle = [
                (who, entry)
                for who, entry in self._entries.items()
                if entry.users == 0 and now - entry.last_used > self.idle_seconds
            ]
            for who, _ in idle:
                del self._entries[who]
        for _, entry in idle:
            if entry.client is not None:
                with contextlib.suppress(Exception):
                    entry.client.shutdown()

    def close(self) -> None:
        """Shut every client down (they must no longer be in use)."""
        with self._guard:
            entries = list(self._entries.values())
            self._entries.clear()
        for entry in entries:
            if entry.client is not None:
                with contextlib.suppress(Exception):
                    entry.client.shutdown()

    def __len__(self) -> int:
        with self._guard:
            return sum(1 for entry in self._entries.values() if entry.client is not None)
