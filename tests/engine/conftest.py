"""Fixtures shared by the native engine's multi-process and descriptor tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from csi_rbd.engine.native import Rados

if TYPE_CHECKING:
    from tests.engine.test_multiprocess import Agent


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A native data directory with its default pool, ``rbd``."""
    directory = tmp_path / "data"
    cluster = Rados(data_dir=directory)
    cluster.connect()
    cluster.shutdown()
    return directory


@pytest.fixture
def local(data_dir: Path) -> Iterator[Any]:
    """This process's own ioctx on the shared pool."""
    cluster = Rados(data_dir=data_dir)
    cluster.connect()
    yield cluster.open_ioctx("rbd")
    cluster.shutdown()


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    """Agents a test started (with ``new_agent``); killed at the end whatever happened."""
    started: list[Agent] = []
    yield started
    for agent in started:
        agent.kill()
