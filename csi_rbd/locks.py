"""Per-resource operation locks whose acquisition never waits.

Two RPCs on the same volume or snapshot at once: the first proceeds, the
second is refused at once (the CSI layer answers ABORTED and the sidecar
retries with back-off), so no call ever queues behind a hung one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class OperationPending(Exception):
    """Another operation holds one of the requested keys."""

    def __init__(self, key: str) -> None:
        super().__init__(f"an operation on {key} is already in progress")
        self.key = key


class OperationLocks:
    def __init__(self) -> None:
        self._held: set[str] = set()
        self._mutex = threading.Lock()

    @contextmanager
    def hold(self, *keys: str) -> Iterator[None]:
        """Hold every key for the block, or raise OperationPending holding none."""
        wanted = set(keys)
        with self._mutex:
            busy = sorted(wanted & self._held)
            if busy:
                raise OperationPending(busy[0])
            self._held |= wanted
        try:
            yield
        finally:
            with self._mutex:
                self._held -= wanted

    def held(self) -> frozenset[str]:
        with self._mutex:
            return frozenset(self._held)
