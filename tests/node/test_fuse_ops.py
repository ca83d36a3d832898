"""The FUSE operations called directly (no mount): errno and discard-mode semantics."""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest

from csi_rbd.engine import errors as engine_errors

fuse_image = pytest.importorskip("csi_rbd.node.fuse_image", reason="libfuse3 is not installed")
FuseOSError = fuse_image.mfusepy.FuseOSError
KEEP, PUNCH, ZERO = 0x01, 0x02, 0x10


class MemoryImage:
    """An in-memory stand-in for an engine image that records what it was asked."""

    def __init__(self, size: int = 1 << 20) -> None:
        self.data = bytearray(b"\xaa" * size)
        self.calls: list[str] = []

    def size(self) -> int:
        return len(self.data)

    def stat(self) -> dict[str, Any]:
        return {"obj_size": 1 << 16}

    def read(self, offset: int, length: int, fadvise_flags: int = 0) -> bytes:
        if offset > len(self.data):
            raise engine_errors.InvalidArgument("past the end")
        return bytes(self.data[offset : offset + length])

    def write(self, data: bytes, offset: int, fadvise_flags: int = 0) -> int:
        if offset + len(data) > len(self.data):
            raise engine_errors.InvalidArgument("past the end")
        self.data[offset : offset + len(data)] = data
        self.calls.append(f"write {offset} {len(data)}")
        return len(data)

    def discard(self, offset: int, length: int) -> int:
        self.data[offset : offset + length] = bytes(length)
        self.calls.append(f"discard {offset} {length}")
        return length

    def write_zeroes(self, offset: int, length: int, zero_flags: int = 0) -> int:
        self.data[offset : offset + length] = bytes(length)
        self.calls.append(f"write_zeroes {offset} {length}")
        return length

    def flush(self) -> None:
        self.calls.append("flush")


def errno_of(call: Any, *args: Any) -> int:
    with pytest.raises(FuseOSError) as raised:
        call(*args)
    return int(raised.value.errno)


def test_unmap_discards_and_zeroes() -> None:
    image = MemoryImage()
    ops = fuse_image.ImageFile(image, discard="unmap")
    assert ops.fallocate(None, PUNCH | KEEP, 4096, 8192, 0) == 0
    assert ops.fallocate(None, ZERO | KEEP, 0, 4096, 0) == 0
    assert image.calls == ["discard 4096 8192", "write_zeroes 0 4096"]
    assert image.data[:12288] == bytes(12288)


def test_ignore_refuses_punches_and_writes_real_zeros() -> None:
    image = MemoryImage()
    ops = fuse_image.ImageFile(image, discard="ignore")
    assert errno_of(ops.fallocate, None, PUNCH | KEEP, 0, 4096, 0) == errno.EOPNOTSUPP
    assert image.data[:4096] == b"\xaa" * 4096  # refused, never silently dropped
    assert ops.fallocate(None, ZERO | KEEP, 0, 3 << 20, 0) == 0  # clipped to the end
    assert image.calls == ["write 0 1048576"]
    assert image.data == bytes(1 << 20)


def test_other_modes_and_bad_ranges() -> None:
    ops = fuse_image.ImageFile(MemoryImage())
    assert errno_of(ops.fallocate, None, 0, 0, 4096, 0) == errno.EOPNOTSUPP  # preallocate
    assert errno_of(ops.fallocate, None, PUNCH, 0, 4096, 0) == errno.EINVAL  # needs KEEP_SIZE
    assert errno_of(ops.fallocate, None, PUNCH | KEEP, 0, 0, 0) == errno.EINVAL
    assert ops.fallocate(None, PUNCH | KEEP, 2 << 20, 4096, 0) == 0  # past the end: nothing


def test_read_write_truncate_and_attributes() -> None:
    image = MemoryImage()
    ops = fuse_image.ImageFile(image)
    assert ops.write(None, b"xyz", 10, 0) == 3
    assert ops.read(None, 5, 9, 0) == b"\xaaxyz\xaa"
    assert ops.read(None, 10, 1 << 20, 0) == b""
    assert ops.read(None, 10, (1 << 20) + 5, 0) == b""  # past the end: EOF
    assert errno_of(ops.write, None, b"x" * 10, (1 << 20) - 5, 0) == errno.ENOSPC
    assert ops.truncate("/image", 1 << 20) == 0
    assert errno_of(ops.truncate, "/image", 4096) == errno.EINVAL
    assert ops.getattr("/image")["st_size"] == 1 << 20
    assert errno_of(ops.getattr, "/other") == errno.ENOENT
    assert ops.readdir("/", 0) == [".", "..", "image"]
    ops.fsync(None, 0, 0)
    ops.flush(None, 0)
    assert image.calls[-2:] == ["flush", "flush"]


def test_read_only_refuses_every_change() -> None:
    image = MemoryImage()
    ops = fuse_image.ImageFile(image, read_only=True)
    assert errno_of(ops.open, "/image", os.O_RDWR) == errno.EROFS
    assert ops.open("/image", os.O_RDONLY) == 0
    assert errno_of(ops.write, None, b"x", 0, 0) == errno.EROFS
    assert errno_of(ops.fallocate, None, PUNCH | KEEP, 0, 4096, 0) == errno.EROFS
    assert errno_of(ops.truncate, "/image", 1 << 20) == errno.EROFS
    ops.fsync(None, 0, 0)
    assert image.calls == []  # not even a flush


def test_engine_errors_become_their_errno() -> None:
    class Failing(MemoryImage):
        def read(self, offset: int, length: int, fadvise_flags: int = 0) -> bytes:
            raise engine_errors.IOError("disk on fire")

    ops = fuse_image.ImageFile(Failing())
    assert errno_of(ops.read, None, 10, 0, 0) == errno.EIO


def test_object_locks_cover_every_object_of_a_range() -> None:
    locks = fuse_image.ObjectLocks(1 << 22, stripes=8)
    held = locks.acquire((1 << 22) - 1, 2)  # two objects
    assert len(held) == 2 and all(lock.locked() for lock in held)
    locks.release(held)
    everything = locks.acquire(0, 100 << 22)
    assert len(everything) == 8
    locks.release(everything)
