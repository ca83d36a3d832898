"""A fixed pool of threads running queued calls (cheaper per call than an executor)."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class WorkerPool:
    def __init__(self, threads: int, name: str = "nbd-worker") -> None:
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(max(1, threads))
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, call: Callable[[], None]) -> None:
        self._queue.put(call)

    def close(self) -> None:
        """Run what is queued, then stop every thread."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()

    def _work(self) -> None:
        while True:
            call = self._queue.get()
            if call is None:
                return
            try:
                call()
            except Exception:  # calls handle their own errors; never lose a worker
                log.exception("NBD worker call failed")


class Runners:
    """Long-lived threads for long jobs (connections): a new one only when none is idle.

    The threads never exit before :meth:`close`, so the set of OS threads that
    ever call the engine stays as small as the peak of concurrent connections
    (a thread costs its stack; the native engine's barrier descriptors follow
    the I/O in flight, not the threads, so none of them leak either way).
    """

    def __init__(self, limit: int, name: str = "nbd-connection") -> None:
        self._limit = limit
        self._name = name
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._threads: list[threading.Thread] = []

    def run(self, job: Callable[[], None]) -> bool:
        """Start ``job`` on an idle thread or a new one; False at the limit."""
        with self._lock:
            if self._idle:
                self._idle -= 1  # that thread is now reserved for this job
            elif len(self._threads) < self._limit:
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
            else:
                return False
        self._jobs.put(job)
        return True

    def close(self) -> None:
        """Stop every thread once its job is done."""
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        for thread in threads:
            thread.join()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception:
                log.exception("NBD connection job failed")
            with self._lock:
                self._idle += 1
