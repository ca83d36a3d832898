"""Fixtures for the VM tests: QEMU tools, the node data path, the whole driver.

Tests that need something this machine lacks are skipped with the reason
(the Debian packages are in ``.ci/apt-packages``). Every test that stages
volumes checks afterwards that nothing is left behind under its directory
(mounts, loop devices, FUSE mounts, attach daemons), like the node tests.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.csi.driver import Driver
from tests.node.conftest import _UNUSABLE, force_clean, leftovers
from tests.node.conftest import node as node  # the fixture, for tests here
from tests.vm import guest

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
DATA_PATH_UNUSABLE = _UNUSABLE
GUEST_UNUSABLE = guest.unusable()

needs_data_path = pytest.mark.skipif(bool(_UNUSABLE), reason=f"node data path {_UNUSABLE}")
needs_qemu_tools = pytest.mark.skipif(
    QEMU_IMG is None or QEMU_IO is None, reason="needs qemu-img and qemu-io (qemu-utils)"
)
needs_qemu_system = pytest.mark.skipif(
    guest.QEMU is None, reason="needs qemu-system-x86_64 (qemu-system-x86)"
)
needs_guest = pytest.mark.skipif(bool(GUEST_UNUSABLE), reason=f"QEMU guests {GUEST_UNUSABLE}")


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    """The test's directory (resolved); fails the test if anything is left mounted there."""
    resolved = Path(os.path.realpath(tmp_path))
    yield resolved
    found = leftovers(resolved)
    force_clean(resolved)
    assert not found, f"left behind: {found}"


@pytest.fixture
def driver(root: Path) -> Iterator[Driver]:
    """``csi-rbd serve`` in its own process, with stubs for its services."""
    running = Driver(root)
    running.start()
    try:
        yield running
    finally:
        running.stop()
