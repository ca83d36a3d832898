"""The CSI integration tests, unchanged, on a Ceph cluster; then what only Ceph has.

`csi-rbd serve --config` with one ``engine: ceph`` cluster and no conf file:
the driver has no identity of its own, so every call that needs the cluster
works only because the StorageClass secret (the CSI user, ``profile rbd``
caps) reaches it. The node side serves librbd images through the same
attach daemon, FUSE and loop device as native images (this kernel has
neither rbd nor nbd), with librbd's cache in the volume's cache mode.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_rbd._proto import csi_pb2 as csi
from csi_rbd.ids import ResourceId
from csi_rbd.node.daemons import find_daemons
from csi_rbd.node.stash import load_stash
from tests.ceph.cluster import CephCluster
from tests.csi import engine_probe
from tests.csi.conftest import block_capability, expect_code, mount_capability
from tests.csi.driver import Driver, direct_io, running_driver, write_file
from tests.csi.test_integration import (  # noqa: F401 - collected here against Ceph
    test_block_volume_lifecycle,
    test_discard_reaches_the_engine,
    test_filesystem_volume_lifecycle,
    test_killed_node_plugin_comes_back,
    test_node_errors,
)
from tests.node.conftest import _UNUSABLE, leftovers

MiB = 1 << 20
Code = grpc.StatusCode
pytestmark = pytest.mark.skipif(bool(_UNUSABLE), reason=f"node data path {_UNUSABLE}")


@pytest.fixture
def driver(ceph_csi_driver: Driver) -> Driver:
    return ceph_csi_driver


def _stage_request(driver: Driver, volume: csi.Volume, name: str, capability: Any) -> Any:
    return csi.NodeStageVolumeRequest(
        volume_id=volume.volume_id,
        staging_target_path=str(driver.root / "staging" / name),
        volume_capability=capability,
        volume_context=volume.volume_context,
    )


@pytest.mark.parametrize("cache", ["none", "writethrough", "writeback"])
def test_cache_modes_reach_librbd_and_flushed_data_survives(driver: Driver, cache: str) -> None:
    """Each mode's librbd settings are in force in the attach daemon, and what a
    flush covered is in the cluster even when the daemon is killed right after."""
    capability = block_capability()
    volume = driver.create(f"pvc-{cache}", 64 * MiB, capability, parameters={"cache": cache})
    device = driver.stage_and_publish(volume, capability, cache)
    record = load_stash(driver.root / "staging" / cache)
    assert record is not None and record.daemon_pid is not None
    settings = _daemon_librbd_settings(driver, ResourceId.decode(volume.volume_id).uuid)
    expected = {
        "none": ("false", None),
        "writethrough": ("true", "0"),
        "writeback": ("true", None),
    }[cache]
    assert settings["rbd_cache"] == expected[0], settings
    if expected[1] is not None:
        assert settings["rbd_cache_max_dirty"] == expected[1], settings
    else:
        assert settings["rbd_cache_max_dirty"] != "0", settings

    _assert_secret_nowhere(driver, record.daemon_pid)

    data = os.urandom(2 * MiB)
    direct_io(device, 8 * MiB, data)  # O_DIRECT write + fsync: a flush down to librbd
    os.kill(record.daemon_pid, signal.SIGKILL)
    assert driver.read_image(volume.volume_id, 8 * MiB, len(data)) == data

    # the next NodeStage (kubelet retries it) re-attaches, breaking the dead client's lock
    started = time.monotonic()
    driver.node.NodeStageVolume(_stage_request(driver, volume, cache, capability))
    assert time.monotonic() - started < 20, "waited for the dead client's watch to time out"
    assert direct_io(device, 8 * MiB, length=len(data)) == data
    more = os.urandom(MiB)
    direct_io(device, 0, more)
    assert driver.read_image(volume.volume_id, 0, MiB) == more
    driver.unpublish_and_unstage(volume, cache, device)
    driver.controller.DeleteVolume(csi.DeleteVolumeRequest(volume_id=volume.volume_id))


def test_second_node_writer_is_refused(driver: Driver, tmp_path: Path) -> None:
    """A live client elsewhere holds the image's exclusive lock: the stage fails
    with FAILED_PRECONDITION and leaves nothing behind; its lock is not broken."""
    capability = mount_capability("ext4")
    volume = driver.create("pvc-locked", 32 * MiB, capability)
    rid = ResourceId.decode(volume.volume_id)
    holder = {
        "cluster": driver.cluster.to_mapping(),
        "secrets": driver.secrets,
        "pool": rid.pool,
        "image": rid.volume_image(),
    }
    with engine_probe.holding_lock(holder):
        message = expect_code(
            lambda: driver.node.NodeStageVolume(
                _stage_request(driver, volume, "locked", capability)
            ),
            Code.FAILED_PRECONDITION,
        )
        assert "busy" in message, message
    assert not leftovers(driver.root / "staging")
    assert not find_daemons(under=str(driver.root))
    target = driver.stage_and_publish(volume, capability, "locked")  # free now
    write_file(target / "f", b"ok")
    driver.unpublish_and_unstage(volume, "locked", target)
    driver.controller.DeleteVolume(csi.DeleteVolumeRequest(volume_id=volume.volume_id))


def test_stage_without_secrets_is_unauthenticated(driver: Driver) -> None:
    """The cluster has no conf file: without the secret the node cannot open the image."""
    capability = mount_capability("ext4")
    volume = driver.create("pvc-nosecret", 32 * MiB, capability)
    request = _stage_request(driver, volume, "nosecret", capability)
    request.secrets["userID"] = "csi"
    request.secrets["userKey"] = "AQAAAAAAAAAAABAAAAAAAAAAAAAAAAAAAAAAAA=="  # well-formed, wrong
    expect_code(lambda: driver.node.NodeStageVolume(request), Code.UNAUTHENTICATED)
    assert not leftovers(driver.root)
    driver.controller.DeleteVolume(csi.DeleteVolumeRequest(volume_id=volume.volume_id))


def _assert_secret_nowhere(driver: Driver, daemon_pid: int) -> None:
    """The key is not in the daemon's command line or environment, nor in any file
    the node keeps (stash, index, logs, ready files), nor in a keyring left behind."""
    key = driver.secrets["userKey"].encode()
    proc = Path("/proc") / str(daemon_pid)
    assert key not in (proc / "cmdline").read_bytes()
    assert key not in (proc / "environ").read_bytes()
    for path in driver.root.rglob("*"):
        if path.is_file() and not path.is_mount() and "mount" not in path.parts:
            assert key not in path.read_bytes(), f"the key is in {path}"
    for folder in (Path("/dev/shm"), Path(tempfile.gettempdir())):
        left = [str(path) for path in folder.glob("csi-rbd-keyring-*")]
        assert not left, f"private keyrings left behind: {left}"


def _daemon_librbd_settings(driver: Driver, name: str) -> dict[str, str]:
    """librbd's cache settings as the attach daemon's client has them (it logs them)."""
    log = (driver.root / "state" / "run").glob(f"*{name}*.log")
    for line in "".join(path.read_text() for path in log).splitlines():
        if "ceph engine settings: " in line:
            parsed = json.loads(line.split("ceph engine settings: ", 1)[1])
            assert isinstance(parsed, dict)
            return parsed
    raise AssertionError("the attach daemon did not log its librbd settings")


@pytest.mark.parametrize("own_identity", [False, True])
def test_restarted_plugin_with_a_dead_daemon(
    tmp_path: Path, ceph_cluster: CephCluster, csi_secrets: dict[str, str], own_identity: bool
) -> None:
    """Plugin and attach daemon both die. With the driver's own identity (a conf file
    with a keyring) the restarted plugin re-attaches by itself; without, it reports
    the volume abnormal until the next NodeStageVolume brings the secret."""
    root = Path(os.path.realpath(tmp_path))
    entry = ceph_cluster.config_entry()
    if own_identity:
        entry["conf"] = str(ceph_cluster.client_conf("admin"))
    with running_driver(root, cluster=entry, secrets=csi_secrets) as driver:
        capability = mount_capability("ext4")
        volume = driver.create("pvc-restart", 64 * MiB, capability)
        target = driver.stage_and_publish(volume, capability, "r")
        write_file(target / "kept", b"flushed before both died")
        record = load_stash(driver.root / "staging" / "r")
        assert record is not None and record.daemon_pid is not None
        driver.kill()
        os.kill(record.daemon_pid, signal.SIGKILL)
        driver.start()
        stats = driver.node.NodeGetVolumeStats(
            csi.NodeGetVolumeStatsRequest(volume_id=volume.volume_id, volume_path=str(target))
        )
        if not own_identity:
            assert stats.volume_condition.abnormal, stats.volume_condition
            started = time.monotonic()
            driver.node.NodeStageVolume(_stage_request(driver, volume, "r", capability))
            assert time.monotonic() - started < 20
            stats = driver.node.NodeGetVolumeStats(
                csi.NodeGetVolumeStatsRequest(volume_id=volume.volume_id, volume_path=str(target))
            )
        assert not stats.volume_condition.abnormal, stats.volume_condition.message
        assert (target / "kept").read_bytes() == b"flushed before both died"
        write_file(target / "after", b"x")
        driver.unpublish_and_unstage(volume, "r", target)
        driver.controller.DeleteVolume(csi.DeleteVolumeRequest(volume_id=volume.volume_id))


def test_block_volume_written_from_two_nodes(
    driver: Driver, tmp_path_factory: pytest.TempPathFactory, ceph_cluster: CephCluster
) -> None:
    """ReadWriteMany block (KubeVirt live migration): two node plugins stage the same
    volume; what one writes and flushes, the other reads, both ways. A filesystem
    cannot be multi-writer, and the native engine has no multi-node modes."""
    mode = csi.VolumeCapability.AccessMode.MULTI_NODE_MULTI_WRITER
    capability = block_capability(mode)
    volume = driver.create("pvc-rwx", 32 * MiB, capability)
    other_root = Path(os.path.realpath(tmp_path_factory.mktemp("node-b")))
    with running_driver(
        other_root, cluster=ceph_cluster.config_entry(), secrets=driver.secrets, node_id="node-b"
    ) as other:
        here = driver.stage_and_publish(volume, capability, "rwx")
        there = other.stage_and_publish(volume, capability, "rwx")
        first = os.urandom(MiB)
        direct_io(here, 4 * MiB, first)
        assert direct_io(there, 4 * MiB, length=MiB) == first
        second = os.urandom(MiB)
        direct_io(there, 4 * MiB, second)
        assert direct_io(here, 4 * MiB, length=MiB) == second
        other.unpublish_and_unstage(volume, "rwx", there)
        driver.unpublish_and_unstage(volume, "rwx", here)
    reason = expect_code(
        lambda: driver.create("pvc-rwx-fs", 32 * MiB, mount_capability(mode=mode)),
        Code.INVALID_ARGUMENT,
    )
    assert "block volumes only" in reason
    driver.controller.DeleteVolume(csi.DeleteVolumeRequest(volume_id=volume.volume_id))
