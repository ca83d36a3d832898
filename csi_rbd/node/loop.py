"""Loop devices over a file: attach, detach, refresh capacity, look up, size.

Attachment asks for direct I/O (``losetup --direct-io=on``) so that reads and
writes reach the file's server instead of stopping in a page cache between
the loop device and the file. A kernel that refuses direct I/O on the file
gets a buffered loop device; ``LoopDevice.direct_io`` records which (read back
from ``/sys/block/loopN/loop/dio``).

Detaching is asynchronous in the kernel: ``losetup -d`` on a device something
still holds only marks it to clear on last close. :func:`detach` polls until
the device no longer serves the file it was given.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from csi_rbd.node.commands import CommandFailed, run
from csi_rbd.node.errors import DataPathError, PreconditionFailed

_SYS_BLOCK = Path("/sys/block")
_BLKGETSIZE64 = 0x80081272
_attach_lock = threading.Lock()
_ATTACH_TRIES = 5  # one losetup --find at a time in this process


@dataclass(frozen=True)
class LoopDevice:
    path: str  # /dev/loopN
    backing_file: str
    direct_io: bool
    read_only: bool


def _sys_loop(device: str) -> Path:
    return _SYS_BLOCK / os.path.basename(device) / "loop"


def _read_sys(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def backing_file(device: str) -> str | None:
    """The file behind ``device``, or None when nothing is attached."""
    text = _read_sys(_sys_loop(device) / "backing_file")
    if text is None:
        return None
    return text.removesuffix(" (deleted)")


def _flag(device: str, name: str) -> bool:
    return _read_sys(_sys_loop(device) / name) == "1"


def describe(device: str) -> LoopDevice | None:
    """What is attached at ``device`` now, or None."""
    file = backing_file(device)
    if file is None:
        return None
    return LoopDevice(device, file, _flag(device, "dio"), _read_sys_ro(device))


def _read_sys_ro(device: str) -> bool:
    return _read_sys(_SYS_BLOCK / os.path.basename(device) / "ro") == "1"


def list_attached() -> dict[str, str]:
    """Every attached loop device and its backing file."""
    found: dict[str, str] = {}
    try:
        names = sorted(p.name for p in _SYS_BLOCK.glob("loop*"))
    except OSError:
        return found
    for name in names:
        file = backing_file("/dev/" + name)
        if file is not None:
            found["/dev/" + name] = file
    return found


def find_by_backing_file(file: str | os.PathLike[str]) -> list[str]:
    """Loop devices whose backing file is ``file`` (compared as absolute paths)."""
    wanted = os.path.abspath(file)
    return [dev for dev, backing in list_attached().items() if backing == wanted]


def attach(file: str | os.PathLike[str], *, read_only: bool = False) -> LoopDevice:
    """Attach ``file`` to a free loop device, with direct I/O unless the kernel refuses.

    Other processes on the node attach loop devices too (``losetup --find``
    is not atomic across processes): the result is checked (our file, a
    non-zero size) and the attach tried again when another process won.
    """
    path = os.path.abspath(file)
    for _ in range(_ATTACH_TRIES):
        info = _attach_once(path, read_only)
        if info is not None:
            return info
        time.sleep(0.05)
    raise DataPathError(f"could not attach {path} to a loop device: others kept taking it")


def _attach_once(path: str, read_only: bool) -> LoopDevice | None:
    base = ["losetup", "--find", "--show"] + (["--read-only"] if read_only else [])
    with _attach_lock:
        try:
            device = run([*base, "--direct-io=on", path], timeout=30).stdout.strip()
        except CommandFailed as exc:
            if "busy" in exc.stderr.lower():
                return None
            if "direct" not in exc.stderr.lower() and "invalid argument" not in exc.stderr.lower():
                raise
            device = run([*base, path], timeout=30).stdout.strip()
    if not device.startswith("/dev/loop"):
        raise DataPathError(f"losetup printed {device!r} for {path}")
    info = describe(device)
    if info is None or info.backing_file != path or block_device_size(device) == 0:
        return None
    return info


def detach(device: str, file: str | os.PathLike[str], *, timeout: float = 10.0) -> None:
    """Detach ``device`` from ``file``; succeed once the device no longer serves it.

    The device's name alone is not enough: the moment the kernel frees it,
    another attach (another volume, another process) may take it, and a
    retry by name would detach that one instead (seen as mkfs finding a
    zero-size device on a volume staged at the same time). So every step
    checks that the device still serves ``file``.

    PreconditionFailed when it is still attached after ``timeout`` (something
    still holds it open: a mount, a process, another namespace).
    """
    wanted = os.path.abspath(file)
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        if backing_file(device) != wanted:
            return
        if not _flag(device, "autoclear"):
            result = run(["losetup", "-d", device], timeout=30, check=False)
            failed = result.returncode != 0 and "No such device" not in result.stderr
            if failed and backing_file(device) == wanted:
                raise CommandFailed(["losetup", "-d", device], result.returncode, result.stderr)
        if time.monotonic() >= deadline:
            raise PreconditionFailed(
                f"{device} is still in use {timeout:g}s after detaching it from {wanted}"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def refresh_capacity(device: str) -> int:
    """Re-read the backing file's size (``losetup -c``); the device's new size in bytes."""
    run(["losetup", "-c", device], timeout=30)
    return block_device_size(device)


def block_device_size(device: str | os.PathLike[str]) -> int:
    """Size in bytes of a block device (BLKGETSIZE64)."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        buffer = fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8)
    finally:
        os.close(fd)
    return int(struct.unpack("Q", buffer)[0])
