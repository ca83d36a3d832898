"""Fixtures shared by the native engine's multi-process and descriptor tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from csi_rbd.engine.native import Rados


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
