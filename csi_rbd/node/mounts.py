"""Mounts and filesystems: the mount table, mount/bind/unmount, probe, mkfs, grow, usage.

Nothing here reads through a mount to learn about it: the mount table comes
from ``/proc/self/mountinfo`` and unmounting is ``umount2(2)``, so a mount
whose server died (a FUSE mount answering ENOTCONN, a filesystem on a dead
loop device) can still be found and removed.

Filesystems are only ever created on a device where neither ``blkid -p`` nor
``wipefs`` finds any signature: mke2fs run without a terminal overwrites an
existing filesystem without asking.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass

from csi_rbd.node.commands import CommandFailed, run
from csi_rbd.node.errors import (
    DataPathError,
    InvalidRequest,
    OnlineResizeUnsupported,
    PreconditionFailed,
)

SUPPORTED_FILESYSTEMS = ("ext4", "xfs")
DEFAULT_FILESYSTEM = "ext4"
MNT_FORCE, MNT_DETACH = 1, 2
# per-mount flags a bind mount can take (filesystem options belong to the staging mount)
BIND_FLAGS = frozenset(
    {
        "ro",
        "rw",
        "nosuid",
        "suid",
        "nodev",
        "dev",
        "noexec",
        "exec",
        "noatime",
        "atime",
        "nodiratime",
        "diratime",
        "relatime",
        "norelatime",
        "strictatime",
    }
)
_libc = ctypes.CDLL(None, use_errno=True)
_MOUNTINFO = "/proc/self/mountinfo"


# -- the mount table ----------------------------------------------------------------
@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    device: str  # major:minor
    root: str
    mountpoint: str
    options: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...]

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def _unescape(text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    if "\\" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        code = text[i + 1 : i + 4]
        if text[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountEntry]:
    entries = []
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) < 10:
            continue
        dash = fields.index("-", 6)
        entries.append(
            MountEntry(
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
                device=fields[2],
                root=_unescape(fields[3]),
                mountpoint=_unescape(fields[4]),
                options=tuple(fields[5].split(",")),
                fstype=fields[dash + 1],
                source=_unescape(fields[dash + 2]),
                super_options=tuple(fields[dash + 3].split(",")) if len(fields) > dash + 3 else (),
            )
        )
    return entries


def mount_table() -> list[MountEntry]:
    with open(_MOUNTINFO, encoding="utf-8", errors="surrogateescape") as handle:
        return parse_mountinfo(handle.read())


def _canonical(path: str | os.PathLike[str]) -> str:
    return os.path.realpath(path)


def find_mount(path: str | os.PathLike[str]) -> MountEntry | None:
    """The topmost mount whose mount point is exactly ``path``, or None."""
    wanted = _canonical(path)
    found = None
    for entry in mount_table():
        if entry.mountpoint == wanted:
            found = entry  # later lines are mounted on top of earlier ones
    return found


def is_mounted(path: str | os.PathLike[str]) -> bool:
    return find_mount(path) is not None


def mounts_under(prefix: str | os.PathLike[str]) -> list[MountEntry]:
    """Mounts at ``prefix`` or below it, deepest (and newest) first: the unmount order."""
    root = _canonical(prefix)
    inside = [
        e
        for e in mount_table()
        if e.mountpoint == root or e.mountpoint.startswith(root.rstrip("/") + "/")
    ]
    inside.reverse()
    inside.sort(key=lambda e: e.mountpoint.count("/"), reverse=True)
    return inside


# -- mount and unmount --------------------------------------------------------------
def mount(
    source: str,
    target: str | os.PathLike[str],
    fstype: str,
    options: Sequence[str] = (),
    *,
    read_only: bool = False,
) -> None:
    flags = [o for o in options if o not in ("ro", "rw")]
    flags.insert(0, "ro" if read_only or "ro" in options else "rw")
    if fstype == "xfs" and "nouuid" not in flags:
        # XFS refuses a second filesystem with the same UUID: a clone of a
        # volume, or the old instance of a re-attached one that a process
        # still holds open after a lazy unmount
        flags.append("nouuid")
    run(["mount", "-t", fstype, "-o", ",".join(flags), source, os.fspath(target)], timeout=120)


def bind_mount(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    read_only: bool = False,
    flags: Sequence[str] = (),
) -> None:
    """Bind ``source`` (a directory, or a device node onto a file) at ``target``.

    Per-mount flags (``ro``, ``nosuid``, ``noexec``...) need a second, remounting
    step; if it fails the bind is undone.
    """
    target = os.fspath(target)
    run(["mount", "--bind", os.fspath(source), target], timeout=60)
    extra = [f for f in flags if f in BIND_FLAGS and f not in ("ro", "rw")]
    if not read_only and not extra:
        return
    options = ",".join(["remount", "bind", "ro" if read_only else "rw", *extra])
    try:
        run(["mount", "-o", options, target], timeout=60)
    except CommandFailed:
        unmount(target)
        raise


def _umount2(path: str, flags: int) -> int:
    """0, or the errno of umount2(2)."""
    if _libc.umount2(os.fsencode(path), flags) == 0:
        return 0
    return ctypes.get_errno()


def unmount(
    path: str | os.PathLike[str], *, timeout: float = 10.0, lazy_fallback: bool = False
) -> None:
    """Unmount every mount stacked at ``path``; "not mounted" counts as success.

    Busy mounts are retried until ``timeout``; then, with ``lazy_fallback``,
    detached lazily (MNT_DETACH), otherwise PreconditionFailed.
    """
    target = _canonical(path)
    deadline = time.monotonic() + timeout
    delay = 0.01
    while is_mounted(target):
        code = _umount2(target, 0)
        if code == 0:
            continue  # another mount may be stacked underneath
        if code in (errno.EINVAL, errno.ENOENT):
            return  # not a mount point (any more)
        if code != errno.EBUSY:
            raise DataPathError(f"umount {target}: {os.strerror(code)}")
        if time.monotonic() >= deadline:
            if lazy_fallback:
                code = _umount2(target, MNT_DETACH)
                if code in (errno.EINVAL, errno.ENOENT):
                    return
                if code != 0:
                    raise DataPathError(f"umount -l {target}: {os.strerror(code)}")
                continue
            raise PreconditionFailed(f"{target} is busy: still in use after {timeout:g}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


# -- filesystems --------------------------------------------------------------------
@dataclass(frozen=True)
class Probe:
    """What a device holds: a filesystem type, or another signature, or nothing."""

    fstype: str | None
    other: str | None  # a partition table, RAID member, LUKS header...

    @property
    def empty(self) -> bool:
        return self.fstype is None and self.other is None


def probe(device: str) -> Probe:
    """Look for signatures with ``blkid -p`` and, when it finds none, ``wipefs``."""
    result = run(["blkid", "-p", "-o", "export", device], timeout=60, check=False)
    if result.returncode not in (0, 2):
        raise CommandFailed(["blkid", "-p", device], result.returncode, result.stderr)
    values = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    if result.returncode == 0:
        usage = values.get("USAGE", "")
        if "TYPE" in values and usage in ("filesystem", ""):
            return Probe(values["TYPE"], None)
        return Probe(None, values.get("TYPE") or values.get("PTTYPE") or usage or "unknown")
    listing = run(["wipefs", "--no-act", "--json", device], timeout=60).stdout
    if '"type"' in listing:
        return Probe(None, "signature found by wipefs")
    return Probe(None, None)


def make_filesystem(device: str, fstype: str, options: str | Sequence[str] = ()) -> None:
    """mkfs without discarding (the image is thin and fresh already)."""
    user = shlex.split(options) if isinstance(options, str) else list(options)
    if fstype == "ext4":
        argv = ["mkfs.ext4", "-q", "-E", "nodiscard", *user, device]
    elif fstype == "xfs":
        argv = ["mkfs.xfs", "-q", "-K", *user, device]
    else:
        raise InvalidRequest(
            f"unsupported filesystem {fstype!r}; use one of {SUPPORTED_FILESYSTEMS}"
        )
    run(argv, timeout=600)


def ensure_filesystem(
    device: str, fstype: str | None, mkfs_options: str | Sequence[str] = ()
) -> str:
    """The filesystem type on ``device``, made with mkfs only if the device is blank.

    Never formats a device that holds any signature. PreconditionFailed when
    it holds something else than the requested filesystem.
    """
    if fstype is not None and fstype not in SUPPORTED_FILESYSTEMS:
        raise InvalidRequest(
            f"unsupported filesystem {fstype!r}; use one of {SUPPORTED_FILESYSTEMS}"
        )
    found = probe(device)
    if found.fstype is not None:
        if fstype is not None and found.fstype != fstype:
            raise PreconditionFailed(
                f"{device} holds a {found.fstype} filesystem, not {fstype}; it is never reformatted"
            )
        return found.fstype
    if found.other is not None:
        raise PreconditionFailed(
            f"{device} holds {found.other}, not a filesystem; not formatting it"
        )
    wanted = fstype or DEFAULT_FILESYSTEM
    make_filesystem(device, wanted, mkfs_options)
    return wanted


def grow_filesystem(device: str, mountpoint: str | os.PathLike[str], fstype: str) -> None:
    """Grow a mounted filesystem to fill its device."""
    if fstype == "xfs":
        run(["xfs_growfs", os.fspath(mountpoint)], timeout=600)
        return
    if fstype != "ext4":
        raise InvalidRequest(f"cannot grow a {fstype} filesystem")
    try:
        run(["resize2fs", device], timeout=600)
    except CommandFailed as exc:
        # resize2fs words EPERM from EXT4_IOC_RESIZE_FS / EXT4_IOC_GROUP_ADD its own way
        if "Operation not permitted" in exc.stderr or "Permission denied to resize" in exc.stderr:
            raise OnlineResizeUnsupported(
                "online ext4 resize failed with EPERM: the kernel's EXT4_IOC_RESIZE_FS needs "
                "CAP_SYS_RESOURCE, which this process lacks; grow it offline (unstage and stage "
                "again) or grant CAP_SYS_RESOURCE"
            ) from exc
        raise


def ext4_size(device: str) -> int:
    """Bytes an ext4 filesystem on ``device`` spans (from its superblock)."""
    out = run(["dumpe2fs", "-h", device], timeout=60).stdout
    fields = {
        key.strip(): value.strip()
        for key, _, value in (line.partition(":") for line in out.splitlines())
    }
    try:
        return int(fields["Block count"]) * int(fields["Block size"])
    except (KeyError, ValueError) as exc:
        raise DataPathError(f"dumpe2fs -h {device}: no block count or size") from exc


def grow_ext4_offline(device: str) -> None:
    """Grow an unmounted ext4 to fill its device: ``e2fsck -f -p`` then ``resize2fs``.

    This needs no capability beyond opening the device, unlike online growth.
    """
    check = run(["e2fsck", "-f", "-p", device], timeout=3600, check=False)
    if check.returncode not in (0, 1):  # 1: errors found and fixed
        raise CommandFailed(["e2fsck", "-f", "-p", device], check.returncode, check.stdout)
    run(["resize2fs", device], timeout=3600)


@dataclass(frozen=True)
class FsUsage:
    total_bytes: int
    used_bytes: int
    available_bytes: int
    total_inodes: int
    used_inodes: int
    available_inodes: int


def usage(path: str | os.PathLike[str]) -> FsUsage:
    st = os.statvfs(path)
    return FsUsage(
        total_bytes=st.f_blocks * st.f_frsize,
        used_bytes=(st.f_blocks - st.f_bfree) * st.f_frsize,
        available_bytes=st.f_bavail * st.f_frsize,
        total_inodes=st.f_files,
        used_inodes=st.f_files - st.f_ffree,
        available_inodes=st.f_favail,
    )
