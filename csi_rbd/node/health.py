"""Is a staged volume's data path whole? Each check names what is broken.

The layers, bottom up: the attach daemon process, its FUSE mount (and the
file answering a stat), the loop device over that file, the staging mount or
device bind, and every publish target. Nothing here can hang on a dead or
stuck server: the mount table comes from /proc, and the one stat through the
FUSE mount runs in a helper thread with a timeout.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from csi_rbd.node import loop, mounts
from csi_rbd.node.daemons import Supervisor
from csi_rbd.node.stash import StageRecord

FUSE_FSTYPE = "fuse.csi-rbd"
STAT_TIMEOUT = 2.0


def stat_within(path: Path, timeout: float = STAT_TIMEOUT) -> os.stat_result | str:
    """``os.stat(path)``, or a message if it fails or takes longer than ``timeout``."""
    result: list[os.stat_result | str] = []

    def probe() -> None:
        try:
            result.append(os.stat(path))
        except OSError as exc:
            result.append(exc.strerror or str(exc))

    worker = threading.Thread(target=probe, name=f"stat {path}", daemon=True)
    worker.start()
    worker.join(timeout)
    return result[0] if result else f"no answer within {timeout:g}s"


def device_number(path: str | Path) -> int | None:
    try:
        return os.stat(path).st_rdev
    except OSError:
        return None


def _major_minor(rdev: int) -> str:
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def daemon_problems(record: StageRecord, supervisor: Supervisor) -> list[str]:
    if not supervisor.is_running(record.daemon_pid, record.fuse_mountpoint):
        return [f"attach daemon (pid {record.daemon_pid}) is not running"]
    return []


def fuse_problems(record: StageRecord) -> list[str]:
    entry = mounts.find_mount(record.fuse_mountpoint)
    if entry is None or entry.fstype != FUSE_FSTYPE:
        return [f"FUSE mount {record.fuse_mountpoint} is missing"]
    answer = stat_within(record.fuse_file)
    if isinstance(answer, str):
        return [f"FUSE file {record.fuse_file} does not answer: {answer}"]
    return []


def loop_problems(record: StageRecord) -> list[str]:
    device = record.loop_device
    if device is None:
        return ["no loop device recorded"]
    backing = loop.backing_file(device)
    if backing != str(record.fuse_file):
        return [f"loop device {device} is gone (backing file now {backing})"]
    return []


def staging_problems(record: StageRecord) -> list[str]:
    rdev = device_number(record.loop_device) if record.loop_device else None
    if rdev is None:
        return [f"loop device {record.loop_device} does not exist"]
    if record.block:
        if mounts.find_mount(record.device_file) is None:
            return [f"device bind {record.device_file} is missing"]
        if device_number(record.device_file) != rdev:
            return [f"{record.device_file} is not {record.loop_device}"]
        return []
    entry = mounts.find_mount(record.mount_dir)
    if entry is None:
        return [f"staging mount {record.mount_dir} is missing"]
    if entry.device != _major_minor(rdev):
        return [f"{record.mount_dir} is not mounted from {record.loop_device}"]
    return []


def target_problems(record: StageRecord) -> list[str]:
    rdev = device_number(record.loop_device) if record.loop_device else None
    found = []
    for target in record.targets:
        entry = mounts.find_mount(target.path)
        if entry is None:
            found.append(f"publish target {target.path} is not mounted")
        elif rdev is not None and (
            device_number(target.path) != rdev
            if target.block
            else entry.device != _major_minor(rdev)
        ):
            found.append(f"publish target {target.path} is not bound to {record.loop_device}")
    return found


def problems(record: StageRecord, supervisor: Supervisor, *, targets: bool = True) -> list[str]:
    """Everything broken in ``record``'s data path (empty when healthy)."""
    found = daemon_problems(record, supervisor)
    if not found:
        found += fuse_problems(record)
    found += loop_problems(record)
    found += staging_problems(record)
    if targets:
        found += target_problems(record)
    return found
