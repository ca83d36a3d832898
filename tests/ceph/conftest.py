"""Fixtures for the Ceph engine's tests: one throwaway cluster per test session.

The cluster (see :mod:`tests.ceph.cluster`) starts once, on first use, and is
torn down at the end of the session. Without the Debian packages (ceph-mon,
ceph-osd, ceph-common, python3-rados, python3-rbd; CI installs them from
``.ci/apt-packages``) every test here is skipped with the reason, which is also
printed in the terminal summary. ``CSI_RBD_REQUIRE_CEPH=1`` turns that skip
into a failure (for CI, where the packages must be there).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.ceph.cluster import CephCluster, missing

_skip_reason: list[str] = []


def _require_cluster() -> None:
    reason = missing()
    if reason is None:
        return
    message = f"Ceph tests skipped: {reason}"
    if os.environ.get("CSI_RBD_REQUIRE_CEPH") == "1":
        pytest.fail(message, pytrace=False)
    if not _skip_reason:
        _skip_reason.append(message)
    pytest.skip(message)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for reason in _skip_reason:
        terminalreporter.write_line(reason, yellow=True, bold=True)


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    _require_cluster()
    cluster = CephCluster.start(tmp_path_factory.mktemp("ceph") / "cluster")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def ceph_engine(ceph_cluster: CephCluster) -> Iterator[Any]:
    from csi_rbd.engine.ceph import CephEngine

    engine = CephEngine("ceph-test", [f"v2:{ceph_cluster.monitor}"], default_pool="rbd")
    try:
        yield engine
    finally:
        engine.close()  # its pooled clients, while the cluster still runs


@pytest.fixture(scope="session")
def csi_secrets(ceph_cluster: CephCluster) -> dict[str, str]:
    return ceph_cluster.csi_secrets


@pytest.fixture(scope="session")
def ceph_rados(ceph_engine: Any, csi_secrets: dict[str, str]) -> Iterator[Any]:
    """One long-lived connection as the CSI user (as a driver's session would be)."""
    cluster = ceph_engine.connect(csi_secrets)
    try:
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture(scope="session")
def ceph_driver(
    ceph_cluster: CephCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """(VolumeService, SnapshotService, engine) for one ``engine: ceph`` cluster, ``ceph-test``.

    Calls with secrets use them; the driver's own identity (for the calls the
    CSI spec gives none) is a conf file with client.admin's keyring.
    """
    from csi_rbd.config import ClusterConfig, DriverConfig
    from csi_rbd.control.snapshots import SnapshotService
    from csi_rbd.control.volumes import VolumeService
    from csi_rbd.engine.ceph import CephEngine
    from csi_rbd.locks import OperationLocks

    cluster = ClusterConfig(
        "ceph-test",
        "ceph",
        monitors=(f"v2:{ceph_cluster.monitor}",),
        conf=ceph_cluster.client_conf("admin"),
        pool="rbd",
    )
    config = DriverConfig(
        endpoint="unix:///unused.sock",
        node_id="node-a",
        clusters=(cluster,),
        state_dir=tmp_path_factory.mktemp("state"),
    )
    engine = CephEngine.from_config(cluster)
    volumes = VolumeService(config, {cluster.id: engine}, OperationLocks())
    try:
        yield volumes, SnapshotService(volumes), engine
    finally:
        # Pooled clients left to the interpreter's exit would shut down after the
        # cluster has stopped: librbd 16.2 has aborted the process there
        # (boost::bad_get, once, after every test had passed).
        engine.close()


@pytest.fixture
def ceph_csi_driver(
    tmp_path: Path, ceph_cluster: CephCluster, csi_secrets: dict[str, str]
) -> Iterator[Any]:
    """`csi-rbd serve --config` with one ``engine: ceph`` cluster, ``ceph-it``, and no
    conf file (no identity of its own): every request carries the CSI user's secret.
    Nothing may be left on the node afterwards."""
    from tests.csi.driver import running_driver

    root = Path(os.path.realpath(tmp_path))
    with running_driver(root, cluster=ceph_cluster.config_entry(), secrets=csi_secrets) as running:
        yield running
