"""One engine image as the single regular file ``image`` of a FUSE filesystem.

The file is what a loop device is attached to, so everything here is shaped
by what the loop driver sends (Linux ``drivers/block/loop.c``):

* reads and writes at any offset and length (``losetup --direct-io=on`` makes
  them O_DIRECT; every open is answered ``direct_io`` so that no page cache
  sits between the loop device and the engine, whoever opens the file);
* ``REQ_OP_FLUSH`` becomes ``fsync`` -> ``image.flush()`` (so does a close);
  the attach daemon serves a :class:`csi_rbd.node.cache.CachedImage`, whose
  flush writes back its dirty data first, so a flush the kernel sends makes
  everything written before it durable in every cache mode;
* ``REQ_OP_DISCARD`` becomes ``fallocate(PUNCH_HOLE|KEEP_SIZE)``, and so does
  ``REQ_OP_WRITE_ZEROES`` without ``REQ_NOUNMAP`` (what ext4's zero-out and
  mke2fs use). The two cannot be told apart here, so a punched range must
  read back as zeros. With discard mode ``unmap`` it becomes
  ``image.discard`` (the range is deallocated and reads zeros). With mode
  ``ignore`` it is refused with EOPNOTSUPP: the loop driver then reports the
  discard as unsupported and the block layer falls back to writing zero
  pages for zero-outs, so no space is ever freed and nothing reads stale
  data. Accepting and dropping the punch would make zero-outs silently keep
  old data;
* ``REQ_OP_WRITE_ZEROES`` with ``REQ_NOUNMAP`` becomes ``ZERO_RANGE``: zeros
  are written (``image.write_zeroes`` with ``unmap``, real zero buffers with
  ``ignore``, which keeps the range allocated).

The size is read from the image on every ``getattr`` and the attribute cache
is off (``attr_timeout=0``), so a stat of the file after the image grew
shows the new size and ``losetup -c`` picks it up.

With ``ignore`` the first refused discard also makes the loop driver (Linux
6.x) stop advertising discard (``discard_max_bytes`` drops to 0);
``fstrim``/``blkdiscard`` still exit 0, so only the engine's usage tells.

Threads and speed: libfuse serves requests on a pool of its own threads
(async direct I/O from the loop device keeps several in flight; measured
requests are at most 512 KiB, the loop queue's 128 segments). Two things are
needed for correctness there, see :func:`_pin_thread_state` and
:class:`ObjectLocks` (taken here only for an image that does not take them
itself: the node cache does, around every engine call it makes, so cache hits
and cached writes are not serialised per object). Per-request overhead is kept
low: read/write take the path-less route (``nullpath_ok``: libfuse resolves no
path) and lean callbacks (:class:`_FUSE`: no file-handle structure built per
request), there are no xattr handlers (the kernel remembers ENOSYS and stops
asking, e.g. for security.capability on every write), and the
background-request limit is raised so that the kernel keeps more async
requests in flight.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import threading
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")

import mfusepy

from csi_rbd.engine import errors as engine_errors
from csi_rbd.node.cache import CacheableImage, ObjectLocks
from csi_rbd.node.daemon_protocol import DISCARD_MODES

IMAGE_NAME = "image"
IMAGE_PATH = "/" + IMAGE_NAME

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_WRITE_ZEROES = 0x80  # Linux 6.17+: zero and keep allocated
_ZERO_CHUNK = 1 << 20
_BLOCK = 4096


_pinned = threading.local()


def _pin_thread_state() -> None:
    """Keep this thread's Python thread state for the thread's whole life.

    libfuse calls in on threads Python did not create; ctypes then makes a
    fresh thread state for every callback and drops it on return, and with
    it all ``threading.local`` data, which would then be built again on every
    request. One extra ``PyGILState_Ensure`` that is never released keeps the
    state, and so any per-thread data, alive. (The native engine itself keeps
    nothing per thread: its barrier descriptors are pooled per I/O in flight.)
    """
    if not getattr(_pinned, "done", False):
        ctypes.pythonapi.PyGILState_Ensure()
        _pinned.done = True


def _fail(code: int) -> mfusepy.FuseOSError:
    return mfusepy.FuseOSError(code)


def _engine_errno(exc: engine_errors.Error) -> int:
    return exc.errno if isinstance(exc, engine_errors.OSError) else errno.EIO


class ImageFile(mfusepy.Operations):  # type: ignore[misc]
    """FUSE operations serving one image; a root directory holding ``image``."""

    use_ns = True  # utimens in nanoseconds (and no deprecation warning)
    flag_nopath = True  # with nullpath_ok: read/write/fsync get no path
    flag_nullpath_ok = True

    def __init__(
        self,
        image: CacheableImage,
        *,
        read_only: bool = False,
        discard: str = "unmap",
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        if discard not in DISCARD_MODES:
            raise ValueError(f"discard mode must be one of {DISCARD_MODES}, not {discard!r}")
        self.image = image
        self.read_only = read_only
        self.discard = discard
        self._on_ready = on_ready
        self._flush_lock = threading.Lock()
        self._objects = ObjectLocks(int(image.stat()["obj_size"]))
        # The node cache holds the object locks of every engine call it makes
        # itself, so reads and writes need no second layer (which would also
        # serialise cache hits and cached writes to one object); a bare
        # engine image gets them here.
        self._own_locks = not getattr(image, "locks_objects", False)
        now = time.time_ns()
        self._times = {"st_atime": now, "st_mtime": now, "st_ctime": now}
        self._mode = stat.S_IFREG | (0o444 if read_only else 0o644)

    # -- lifecycle ---------------------------------------------------------------
    def init_with_config(self, conn: Any, config: Any) -> None:
        if config is not None:
            config.direct_io = 1  # FOPEN_DIRECT_IO on every open: no page cache
            config.attr_timeout = 0.0  # getattr every time: growth shows
            config.entry_timeout = 0.0
            config.negative_timeout = 0.0
            config.nullpath_ok = 1
        if conn is not None:
            conn.max_background = max(int(conn.max_background), 64)
            conn.congestion_threshold = max(int(conn.congestion_threshold), 48)
        if self._on_ready is not None:
            self._on_ready()

    def destroy(self, path: str) -> None:
        self._flush()

    def _flush(self) -> None:
        if self.read_only:
            return
        with self._flush_lock:
            try:
                self.image.flush()
            except engine_errors.Error as exc:
                raise _fail(_engine_errno(exc)) from exc

    # -- namespace -----------------------------------------------------------------
    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
        _pin_thread_state()
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, **self._times}
        if path is not None and path != IMAGE_PATH:
            raise _fail(errno.ENOENT)
        try:
            size = self.image.size()
        except engine_errors.Error as exc:
            raise _fail(_engine_errno(exc)) from exc
        return {
            "st_mode": self._mode,
            "st_nlink": 1,
            "st_size": size,
            "st_blocks": (size + 511) // 512,
            "st_blksize": _BLOCK,
            **self._times,
        }

    def readdir(self, path: str | None, fh: int) -> list[str]:
        return [".", "..", IMAGE_NAME]

    def statfs(self, path: str) -> dict[str, int]:
        _pin_thread_state()
        try:
            blocks = self.image.size() // _BLOCK
        except engine_errors.Error as exc:
            raise _fail(_engine_errno(exc)) from exc
        return {
            "f_bsize": _BLOCK,
            "f_frsize": _BLOCK,
            "f_blocks": blocks,
            "f_bfree": 0,
            "f_bavail": 0,
            "f_files": 2,
            "f_ffree": 0,
            "f_namemax": 255,
        }

    def open(self, path: str, flags: int) -> int:
        if path != IMAGE_PATH:
            raise _fail(errno.ENOENT if path != "/" else errno.EISDIR)
        if self.read_only and flags & os.O_ACCMODE != os.O_RDONLY:
            raise _fail(errno.EROFS)
        return 0

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        _pin_thread_state()
        if self.read_only:
            raise _fail(errno.EROFS)
        if length != self.image.size():
            raise _fail(errno.EINVAL)  # an image is resized by the controller, not here
        return 0

    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
        return 0  # touch works; times are not stored

    # -- data ----------------------------------------------------------------------
    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        _pin_thread_state()
        held = self._objects.acquire(offset, size) if self._own_locks else None
        try:
            return self.image.read(offset, size)
        except engine_errors.InvalidArgument:
            if offset >= self.image.size():
                return b""  # reading at or past the end is EOF
            raise _fail(errno.EINVAL) from None
        except engine_errors.Error as exc:
            raise _fail(_engine_errno(exc)) from exc
        finally:
            if held is not None:
                self._objects.release(held)

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        _pin_thread_state()
        if self.read_only:
            raise _fail(errno.EROFS)
        held = self._objects.acquire(offset, len(data)) if self._own_locks else None
        try:
            return self.image.write(data, offset)
        except engine_errors.InvalidArgument:
            if offset + len(data) > self.image.size():
                raise _fail(errno.ENOSPC) from None  # fixed-size file: no growing by writes
            raise _fail(errno.EINVAL) from None
        except engine_errors.Error as exc:
            raise _fail(_engine_errno(exc)) from exc
        finally:
            if held is not None:
                self._objects.release(held)

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        _pin_thread_state()
        self._flush()
        return 0

    def flush(self, path: str | None, fh: int) -> int:
        self._flush()  # close() of a descriptor (rare: the loop device keeps one open)
        return 0

    def release(self, path: str | None, fh: int) -> int:
        return 0

    def fallocate(self, path: str | None, mode: int, offset: int, size: int, fh: int) -> int:
        _pin_thread_state()
        if self.read_only:
            raise _fail(errno.EROFS)
        if size <= 0 or offset < 0:
            raise _fail(errno.EINVAL)
        kind = mode & ~FALLOC_FL_KEEP_SIZE
        held = self._objects.acquire(offset, size)
        try:
            end = min(offset + size, self.image.size())
            if offset >= end:
                return 0
            if kind == FALLOC_FL_PUNCH_HOLE:
                if not mode & FALLOC_FL_KEEP_SIZE:
                    raise _fail(errno.EINVAL)  # as for regular files
                if self.discard != "unmap":
                    raise _fail(errno.EOPNOTSUPP)
                self.image.discard(offset, end - offset)
                return 0
            if kind in (FALLOC_FL_ZERO_RANGE, FALLOC_FL_WRITE_ZEROES):
                if self.discard == "unmap":
                    self.image.write_zeroes(offset, end - offset)
                else:
                    self._write_zero_buffers(offset, end)
                return 0
        except engine_errors.Error as exc:
            raise _fail(_engine_errno(exc)) from exc
        finally:
            self._objects.release(held)
        raise _fail(errno.EOPNOTSUPP)  # mode 0 (preallocate) and the rest

    def _write_zero_buffers(self, offset: int, end: int) -> None:
        zeros = bytes(min(_ZERO_CHUNK, end - offset))
        while offset < end:
            count = min(len(zeros), end - offset)
            self.image.write(zeros[:count] if count < len(zeros) else zeros, offset)
            offset += count


def serve(
    operations: ImageFile,
    mountpoint: str,
    *,
    fsname: str,
    read_only: bool = False,
    threads: int = 16,
) -> None:
    """Mount ``operations`` at ``mountpoint`` and serve until unmounted or signalled.

    libfuse installs SIGTERM/SIGINT/SIGHUP handlers that end the loop; it
    then unmounts (lazily) and calls ``destroy``.
    """
    options: dict[str, Any] = {
        "foreground": True,
        "nothreads": threads <= 1,
        "fsname": fsname,
        "subtype": "csi-rbd",
    }
    if threads > 1:
        # idle threads never exit: each thread pins a Python thread state
        options["max_threads"] = threads
        options["max_idle_threads"] = threads
    if read_only:
        options["ro"] = True
    _FUSE(operations, mountpoint, raw_fi=False, **options)


class _FUSE(mfusepy.FUSE):  # type: ignore[misc]
    """mfusepy's FUSE with leaner read and write callbacks, the ones every I/O takes.

    They hand the operations the same arguments as mfusepy's (the path, None
    with ``nullpath_ok``, decoded the same way) except the file handle, which
    :class:`ImageFile` does not use (``open`` returns 0): reading it would
    build a ctypes structure per request. Errors still go through mfusepy's
    wrapper (a ``FuseOSError`` becomes its errno).
    """

    def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        data = self.operations.read(
            None if path is None else path.decode(self.encoding, self.errors), size, offset, 0
        )
        count = len(data)
        if count > size:
            raise RuntimeError(f"read returned {count} bytes for {size} asked")
        if count:
            ctypes.memmove(buf, data, count)
        return count

    def write(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        return int(
            self.operations.write(
                None if path is None else path.decode(self.encoding, self.errors),
                ctypes.string_at(buf, size),
                offset,
                0,
            )
        )
