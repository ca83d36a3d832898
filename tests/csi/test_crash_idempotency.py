"""CreateVolume and CreateSnapshot stay idempotent across a kill -9 between any two steps.

A child process runs the real control plane and SIGKILLs itself right after
its Nth engine or journal step; the retry in this process must finish the
job, and deleting the result must leave no image, snapshot or journal entry.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from csi_rbd.config import ClusterConfig, DriverConfig
from csi_rbd.control.snapshots import SnapshotService
from csi_rbd.control.volumes import CreateVolumeRequest, VolumeService
from csi_rbd.engine.native import RBD, Image, Rados
from csi_rbd.engine.native.engine import NativeEngine
from csi_rbd.locks import OperationLocks

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


def run_child(
    data_dir: Path, kill_at: int, operation: str, args: dict[str, Any]
) -> dict[str, Any] | None:
    child = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.csi.crash_child",
            str(data_dir),
            str(kill_at),
            operation,
            json.dumps(args),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if child.returncode == -9:
        return None
    assert child.returncode == 0, child.stderr
    return dict(json.loads(child.stdout))


def services(data_dir: Path) -> tuple[VolumeService, SnapshotService, NativeEngine]:
    config = DriverConfig(
        endpoint="unix:///unused",
        node_id="node-a",
        clusters=(ClusterConfig("local", "native", data_dir=data_dir),),
    )
    engine = NativeEngine("local", data_dir)
    volumes = VolumeService(config, {"local": engine}, OperationLocks())
    return volumes, SnapshotService(volumes), engine


def inventory(data_dir: Path) -> tuple[list[str], list[str], dict[str, list[str]], int]:
    """(images, trashed images, snapshots per image, journal rows) of pool rbd."""
    with Rados(data_dir=data_dir) as cluster:
        ioctx = cluster.open_ioctx("rbd")
        names = RBD().list(ioctx)
        trashed = [t["name"] for t in RBD().trash_list(ioctx)]
        snaps = {}
        for name in names:
            with Image(ioctx, name, read_only=True) as image:
                snaps[name] = [s["name"] for s in image.list_snaps()]
        rows = ioctx.catalog._db.execute("SELECT COUNT(*) FROM omap").fetchone()[0]
    return names, trashed, snaps, rows


def count_steps(tmp_path: Path, operation: str, prepare: Any) -> int:
    data_dir = tmp_path / "count"
    args = prepare(data_dir)
    result = run_child(data_dir, 0, operation, args)
    assert result is not None
    return len(result["steps"])


def empty_volume(data_dir: Path) -> dict[str, Any]:
    NativeEngine("local", data_dir).close()
    return {"name": "pvc-1", "required_bytes": 8 * MiB}


def _source(data_dir: Path) -> tuple[VolumeService, SnapshotService, str]:
    volumes, snapshots, engine = services(data_dir)
    source = volumes.create(CreateVolumeRequest(name="source", required_bytes=8 * MiB))
    with engine.session() as cluster:
        with Image(cluster.open_ioctx("rbd"), "csi-vol-" + source.volume_id[-36:]) as image:
            image.write(b"source data", MiB)
            image.flush()
    return volumes, snapshots, source.volume_id


def clone_volume(data_dir: Path) -> dict[str, Any]:
    _, _, source = _source(data_dir)
    return {"name": "pvc-clone", "required_bytes": 12 * MiB, "source_volume": source}


def restore_snapshot(data_dir: Path) -> dict[str, Any]:
    _, snapshots, source = _source(data_dir)
    snap = snapshots.create("snap-1", source, {}, None)
    return {"name": "pvc-restore", "required_bytes": 8 * MiB, "source_snapshot": snap.snapshot_id}


def take_snapshot(data_dir: Path) -> dict[str, Any]:
    _, _, source = _source(data_dir)
    return {"name": "snap-x", "source": source}


CASES = {
    "empty": ("volume", empty_volume),
    "clone": ("volume", clone_volume),
    "restore": ("volume", restore_snapshot),
    "snapshot": ("snapshot", take_snapshot),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kill_between_any_two_steps(tmp_path: Path, case: str) -> None:
    operation, prepare = CASES[case]
    steps = count_steps(tmp_path, operation, prepare)
    assert steps >= 2
    for kill_at in range(1, steps + 1):
        data_dir = tmp_path / f"kill-{kill_at}"
        args = prepare(data_dir)
        before = inventory(data_dir)
        assert run_child(data_dir, kill_at, operation, args) is None, "the child was not killed"
        volumes, snapshots, engine = services(data_dir)
        try:
            if operation == "volume":
                request = CreateVolumeRequest(**args)
                made = volumes.create(request).volume_id
                assert volumes.create(request).volume_id == made
                data = _read(engine, made)
                if case != "empty":
                    assert data == b"source data", (kill_at, data)
                volumes.delete(made, None)
            else:
                made = snapshots.create(args["name"], args["source"], {}, None).snapshot_id
                assert snapshots.create(args["name"], args["source"], {}, None).snapshot_id == made
                snapshots.delete(made, None)
        finally:
            engine.close()
        assert inventory(data_dir) == before, f"leftovers after a kill at step {kill_at}"


def _read(engine: NativeEngine, volume_id: str) -> bytes:
    with engine.session() as cluster:
        with Image(
            cluster.open_ioctx("rbd"), "csi-vol-" + volume_id[-36:], read_only=True
        ) as image:
            return bytes(image.read(MiB, 11))
