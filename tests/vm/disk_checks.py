"""What a guest does to each of its disks, and how the host checks it through the engine.

Layout of a 64 MiB disk (offsets in MiB)::

    0..32   an ext4 driver-mounted ext2 filesystem (busybox mke2fs): a 16 MiB file
            written, deleted and trimmed (fstrim), and a small file kept
    40..41  a raw pattern written with dd conv=fsync (a flush)
    44..46  written, then discarded with blkdiscard

The guest prints ``CSI fstrim-<dev> ...`` and ``CSI disk-<dev> ok``. On the
host :func:`check_disk` reads the engine image directly: the pattern, zeros
where the discard went, the kept file (a copy of the filesystem read with
debugfs), and the engine's used bytes, which show whether the trims and the
discard reached it (exit codes do not: they succeed when nothing is freed).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from csi_rbd.engine.native import Image, IoCtx
from csi_rbd.engine.usage import used_size

MiB = 1 << 20
DISK_SIZE = 64 * MiB
FS_SIZE = 32 * MiB
PATTERN_AT = 40 * MiB
DISCARD_AT = 44 * MiB
DISCARD_LENGTH = 2 * MiB
BIG_FILE = 16 * MiB
USED_LIMIT = 8 * MiB  # metadata + pattern + kept file; a failed trim leaves > 16 MiB


def pattern(token: str, length: int = MiB) -> bytes:
    """What ``yes <token> | head -c <length>`` prints."""
    line = f"{token}\n".encode()
    return (line * (length // len(line) + 1))[:length]


def guest_script(device: str) -> str:
    """Shell for the guest's /init: exercise /dev/<device> as the module docstring says."""
    d = f"/dev/{device}"
    return f"""
yes {device}-raw | head -c {MiB} | \\
  dd of={d} bs=65536 seek={PATTERN_AT // 65536} conv=fsync 2>/dev/null
mke2fs -q {d} {FS_SIZE // 1024} || echo "CSI error mke2fs {device}"
mount -t ext4 {d} /mnt || echo "CSI error mount {device}"
yes {device}-big | head -c {BIG_FILE} > /mnt/big
echo "{device} keeps this" > /mnt/keep
sync
rm /mnt/big
sync
echo "CSI fstrim-{device} $(fstrim -v /mnt 2>&1)"
umount /mnt
yes {device}-gone | head -c {DISCARD_LENGTH} | \\
  dd of={d} bs=65536 seek={DISCARD_AT // 65536} conv=fsync 2>/dev/null
blkdiscard -o {DISCARD_AT} -l {DISCARD_LENGTH} {d} || echo "CSI error blkdiscard {device}"
dd if=/dev/null of={d} conv=fsync 2>/dev/null
echo "CSI disk-{device} ok"
"""


def used_bytes(ioctx: IoCtx, name: str) -> int:
    with Image(ioctx, name, read_only=True) as image:
        for _ in range(20):
            try:
                return used_size(image, image.size())
            except FileNotFoundError:  # an object went while it was scanned
                continue
    raise AssertionError(f"could not measure the usage of {name}")


def read_file_from_filesystem(image_bytes: bytes, path: str, workdir: Path) -> bytes | None:
    """A file from an ext2/3/4 image, or None if it is not there (debugfs)."""
    workdir.mkdir(parents=True, exist_ok=True)
    copy = workdir / "fs-copy.img"
    copy.write_bytes(image_bytes)
    dumped = workdir / "dumped"
    dumped.unlink(missing_ok=True)
    subprocess.run(
        ["debugfs", "-R", f"dump {path} {dumped}", str(copy)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    copy.unlink()
    return dumped.read_bytes() if dumped.exists() else None


def check_disk(ioctx: IoCtx, name: str, device: str, workdir: Path) -> int:
    """Assert what the guest left on ``device`` is in engine image ``name``; its used bytes."""
    with Image(ioctx, name, read_only=True) as image:
        assert image.read(PATTERN_AT, MiB) == pattern(f"{device}-raw"), f"{device}: pattern"
        assert image.read(DISCARD_AT, DISCARD_LENGTH) == bytes(DISCARD_LENGTH), f"{device}: discard"
        filesystem = image.read(0, FS_SIZE)
    kept = read_file_from_filesystem(filesystem, "/keep", workdir)
    assert kept == f"{device} keeps this\n".encode(), f"{device}: /keep is {kept!r}"
    assert read_file_from_filesystem(filesystem, "/big", workdir) is None
    used = used_bytes(ioctx, name)
    assert used < USED_LIMIT, f"{device}: {used} bytes used after fstrim and blkdiscard"
    return used
