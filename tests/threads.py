"""Test work run on several threads at once, failures reported in the test's thread."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


def run_in_threads(
    work: Callable[[T], object], args: Iterable[T], timeout: float | None = None
) -> None:
    """Run ``work(arg)`` for every ``arg``, each on a thread of its own, all at once;
    once every thread is done (or ``timeout`` passed for each), fail the test with
    every exception they raised (an assertion in a thread counts)."""
    failures: list[BaseException] = []

    def guarded(arg: T) -> None:
        try:
            work(arg)
        except BaseException as exc:  # reported below, in the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=guarded, args=(arg,)) for arg in args]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not failures, failures
    assert not any(thread.is_alive() for thread in threads), "threads still running"
