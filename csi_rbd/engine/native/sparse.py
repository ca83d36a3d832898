"""Sparse-file primitives: hole punching, data segments, sparse copies."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int

ZERO_CHUNK = 64 * 1024
_ZEROS = bytes(ZERO_CHUNK)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a byte range; it reads back as zeros and the file keeps its size."""
    if length <= 0:
        return
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"fallocate(PUNCH_HOLE): {os.strerror(code)}")


def data_segments(fd: int, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """(offset, length) runs of allocated data in [start, end) found with SEEK_DATA/SEEK_HOLE."""
    size = os.fstat(fd).st_size
    end = size if end is None else min(end, size)
    segments: list[tuple[int, int]] = []
    position = start
    while position < end:
        try:
            data = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data past position
                break
            raise
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        segments.append((data, hole - data))
        position = hole
    return segments


def write_sparse(fd: int, offset: int, data: bytes | memoryview) -> int:
    """pwrite ``data`` at ``offset``, skipping all-zero chunks; returns bytes written."""
    blob = data if isinstance(data, bytes) else bytes(data)
    written = 0
    for at in range(0, len(blob), ZERO_CHUNK):
        piece = blob[at : at + ZERO_CHUNK]
        if piece != _ZEROS[: len(piece)]:
            os.pwrite(fd, piece, offset + at)
            written += len(piece)
    return written


def copy_sparse(src_fd: int, dst_fd: int, limit: int | None = None) -> None:
    """Copy the data segments of ``src_fd`` (up to ``limit`` bytes) into ``dst_fd``.

    Holes stay holes; the destination gets the source's size (capped at ``limit``).
    """
    size = os.fstat(src_fd).st_size
    if limit is not None:
        size = min(size, limit)
    for offset, length in data_segments(src_fd, 0, size):
        done = 0
        while done < length:
            copied = os.copy_file_range(src_fd, dst_fd, length - done, offset + done, offset + done)
            if copied == 0:
                break
            done += copied
    os.ftruncate(dst_fd, size)
