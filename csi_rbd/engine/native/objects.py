"""Versioned data objects of one image.

Design
------
An image is striped into objects of ``2**order`` bytes; object ``n`` covers
image bytes ``[n << order, (n + 1) << order)``. Each object is stored as one
or more *versions*, files named ``<objno:016x>.<epoch:08x>`` in the image's
directory. A version is tagged with the epoch (the image's snapshot-context
``seq``) it was created in and is written in place only while that epoch is
current, so a version becomes immutable the moment a snapshot moves ``seq``
on. That is redirect-on-write, the native counterpart of the OSD cloning a
RADOS object on the first write after a snapshot:

* head reads the newest version with ``epoch <= seq``;
* snapshot ``S`` reads the newest version with ``epoch < S``;
* the first write after a snapshot copies the old version into a new one
  (*copy-up*), fsyncs it, then renames it into place, so a crash never
  replaces flushed data with a torn copy;
* a version may be a regular file (bytes past its end read as zeros, holes
  read as zeros, and an empty file hides a clone's parent), or an *absent*
  marker, a dangling symlink, meaning "no object here in this epoch": reads
  fall through to a clone's parent within the overlap, or give zeros.

A version nothing can read any more (not head, no snapshot's) is garbage and
is unlinked by :meth:`ObjectStore.unlink` callers. Temporary files carry the
writer's pid so that leftovers of a killed process can be told from work in
progress.

Descriptor cache. A store may keep the descriptors of versions it reads and
writes open (:meth:`ObjectStore.cache_descriptors`, bounded, least recently
used out first). That is only right where the name of a version keeps meaning
the same file: its owner turns it on for a handle whose versions no one else
replaces or unlinks without first moving the image's generation (the write
lock holder's head, a snapshot), and drops the cache (:meth:`ObjectStore.
drop_descriptors`) whenever the generation moved. The store itself forgets a
version's descriptor whenever it renames a file onto that name or unlinks it;
an open that raced with such a change is used once but never kept. A
descriptor closes when the last user lets go of it (a reference count), so
that a thread still reading through one that was just forgotten never reads
another file that happened to get the same number.
"""

from __future__ import annotations

import contextlib
import os
import resource
import secrets
import shutil
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from csi_rbd.engine.native import sparse

_ABSENT_TARGET = "absent"
# Large writes go to the files in pieces of this size. The kernel sizes the
# page-cache folios it allocates for a write by the write's length, and a
# later 4 KiB overwrite dirties (and writes back) a whole folio. Measured on
# ext4 (Linux 6.18): scattered 4 KiB overwrites of objects written in 2 MiB
# writes cost 30 us each and 110 ms per 256-object sync; of objects written
# in 64 KiB pieces, 3.5 us and 71 ms. Sequential writes lose nothing measurable.
WRITE_PIECE = sparse.ZERO_CHUNK
_TMP_PREFIX = ".tmp."


def _descriptor_budget() -> int:
    """Descriptors one store may keep: a small share of the process's limit."""
    try:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (OSError, ValueError):
        soft = 1024
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 16
    return max(8, min(256, soft // 16))


DESCRIPTOR_BUDGET = _descriptor_budget()


class _Descriptor:
    """An open version; closed when the last reference goes."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


@dataclass(frozen=True)
class Version:
    """One stored version of an object."""

    epoch: int
    absent: bool = False


def version_name(objno: int, epoch: int) -> str:
    return f"{objno:016x}.{epoch:08x}"


def parse_version_name(name: str) -> tuple[int, int] | None:
    objno, dot, epoch = name.partition(".")
    if not dot or len(objno) != 16 or len(epoch) != 8:
        return None
    try:
        return int(objno, 16), int(epoch, 16)
    except ValueError:
        return None


class ObjectStore:
    """The object versions in one image directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._prefix = os.path.join(directory, "")
        self._fds: OrderedDict[int, _Descriptor] | None = None  # by _key(); None: off
        self._fd_flags = os.O_RDONLY | os.O_CLOEXEC
        self._fd_writable = False
        self._fd_limit = DESCRIPTOR_BUDGET
        self._fd_stamp = 0  # moves whenever a cached descriptor may have gone stale
        self._fd_lock = threading.Lock()

    def path(self, objno: int, epoch: int) -> str:
        return f"{self._prefix}{objno:016x}.{epoch:08x}"

    # -- descriptor cache (see the design note) -------------------------------
    def cache_descriptors(self, writable: bool, limit: int | None = None) -> None:
        """Keep descriptors of versions open from now on (until dropped)."""
        with self._fd_lock:
            if self._fds is None or writable != self._fd_writable:
                self._fd_stamp += 1
                self._fds = OrderedDict()
                self._fd_writable = writable
                self._fd_flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
            if limit is not None:
                self._fd_limit = max(1, limit)

    def drop_descriptors(self, keep_caching: bool = True) -> None:
        """Forget every kept descriptor (and stop keeping them unless ``keep_caching``)."""
        with self._fd_lock:
            self._fd_stamp += 1
            if self._fds is not None:
                self._fds = OrderedDict() if keep_caching else None

    @property
    def cached_descriptors(self) -> int:
        fds = self._fds
        return 0 if fds is None else len(fds)

    def _forget(self, objno: int, epoch: int) -> None:
        """The file named (objno, epoch) was replaced or unlinked (by this store)."""
        if self._fds is None:
            return
        with self._fd_lock:
            self._fd_stamp += 1
            if self._fds is not None:
                self._fds.pop(_key(objno, epoch), None)

    def _descriptor(self, objno: int, epoch: int, flags: int) -> _Descriptor:
        """An open descriptor of a version, from the cache when it is on."""
        fds = self._fds
        if fds is None or (flags != os.O_RDONLY and not self._fd_writable):
            return _Descriptor(os.open(self.path(objno, epoch), flags | os.O_CLOEXEC))
        key = _key(objno, epoch)
        found = fds.get(key)
        if found is not None:
            with contextlib.suppress(KeyError):  # forgotten on another thread meanwhile
                fds.move_to_end(key)
            return found
        stamp = self._fd_stamp
        found = _Descriptor(os.open(self.path(objno, epoch), self._fd_flags))
        with self._fd_lock:
            # an unlink or rename since ``stamp`` may have made this one stale: use once
            if stamp == self._fd_stamp and self._fds is fds:
                fds[key] = found
                while len(fds) > self._fd_limit:
                    fds.popitem(last=False)
        return found

    def ensure_directory(self) -> None:
        os.makedirs(self.directory, exist_ok=True)

    # -- lookup ---------------------------------------------------------------
    def probe(self, objno: int, epochs: Iterable[int]) -> Version | None:
        """The first existing version among ``epochs`` (give them newest first)."""
        for epoch in epochs:
            try:
                mode = os.lstat(self.path(objno, epoch)).st_mode
            except FileNotFoundError:
                continue
            return Version(epoch, absent=stat.S_ISLNK(mode))
        return None

    def versions(self, objno: int, epochs: Iterable[int]) -> list[Version]:
        """Every existing version of one object among ``epochs``, oldest first."""
        found = []
        for epoch in sorted(epochs):
            try:
                mode = os.lstat(self.path(objno, epoch)).st_mode
            except FileNotFoundError:
                continue
            found.append(Version(epoch, absent=stat.S_ISLNK(mode)))
        return found

    def scan(self) -> dict[int, list[Version]]:
        """Every version on disk, per object, oldest first."""
        return {
            objno: [version for version, _ in found]
            for objno, found in self.scan_with_inodes().items()
        }

    def scan_with_inodes(self) -> dict[int, list[tuple[Version, int]]]:
        """Every version on disk with its inode number, per object, oldest first."""
        found: dict[int, list[tuple[Version, int]]] = {}
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return found
        for entry in entries:
            parsed = parse_version_name(entry.name)
            if parsed is None:
                continue
            objno, epoch = parsed
            found.setdefault(objno, []).append((Version(epoch, entry.is_symlink()), entry.inode()))
        for versions in found.values():
            versions.sort(key=lambda item: item[0].epoch)
        return found

    # -- reading --------------------------------------------------------------
    def read(self, objno: int, epoch: int, offset: int, length: int) -> bytes:
        """Bytes of a regular version; past its end reads zeros."""
        # keep the reference while the descriptor is used: dropping it may close it
        descriptor = self._descriptor(objno, epoch, os.O_RDONLY)
        data = os.pread(descriptor.fd, length, offset)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def data_segments(self, objno: int, epoch: int) -> list[tuple[int, int]]:
        fd = os.open(self.path(objno, epoch), os.O_RDONLY | os.O_CLOEXEC)
        try:
            return sparse.data_segments(fd)
        finally:
            os.close(fd)

    def allocated_bytes(self, objno: int, epoch: int) -> int:
        try:
            st = os.lstat(self.path(objno, epoch))
        except FileNotFoundError:
            return 0
        return 0 if stat.S_ISLNK(st.st_mode) else st.st_blocks * 512

    # -- writing a current version in place -----------------------------------
    def write(
        self, objno: int, epoch: int, pieces: Iterable[tuple[int, bytes | memoryview]]
    ) -> None:
        """Write (offset, data) pieces into an existing version; FileNotFoundError if
        it was discarded meanwhile."""
        descriptor = self._descriptor(objno, epoch, os.O_WRONLY)  # held: keeps fd open
        fd = descriptor.fd
        for offset, data in pieces:
            if len(data) <= WRITE_PIECE:
                done = os.pwrite(fd, data, offset)
                if done == len(data):
                    continue
            else:
                done = 0
            view = memoryview(data)
            while done < len(view):
                done += os.pwrite(fd, view[done : done + WRITE_PIECE], offset + done)

    def punch(self, objno: int, epoch: int, offset: int, length: int) -> None:
        descriptor = self._descriptor(objno, epoch, os.O_WRONLY)
        sparse.punch_hole(descriptor.fd, offset, length)

    # -- creating versions (atomic: temp file, fsync, rename) -----------------
    def _temp(self) -> str:
        return os.path.join(self.directory, f"{_TMP_PREFIX}{os.getpid()}.{secrets.token_hex(6)}")

    def _install(self, temp: str, objno: int, epoch: int) -> None:
        try:
            os.rename(temp, self.path(objno, epoch))
        finally:
            self._forget(objno, epoch)

    def create_copy(self, objno: int, epoch: int, source_epoch: int, limit: int | None) -> None:
        """A new version with the data of another regular version, cut at ``limit``."""
        temp = self._temp()
        src = os.open(self.path(objno, source_epoch), os.O_RDONLY | os.O_CLOEXEC)
        try:
            dst = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                sparse.copy_sparse(src, dst, limit)
                os.fsync(dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        self._install(temp, objno, epoch)

    def create_from(self, objno: int, epoch: int, chunks: Iterable[tuple[int, bytes]]) -> None:
        """A new version holding ``chunks`` of (offset, bytes); zero runs stay holes."""
        temp = self.prepare_from(chunks)
        self._install(temp, objno, epoch)

    def prepare_from(self, chunks: Iterable[tuple[int, bytes]]) -> str:
        """A durable temp file with ``chunks``, to :meth:`install_prepared` later."""
        temp = self._temp()
        dst = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            for offset, data in chunks:
                sparse.write_sparse(dst, offset, data)
            os.fsync(dst)
        finally:
            os.close(dst)
        return temp

    def install_prepared(self, temp: str, objno: int, epoch: int) -> None:
        self._install(temp, objno, epoch)

    def discard_prepared(self, temp: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)

    def create_empty(self, objno: int, epoch: int) -> None:
        """A new, empty regular version: all zeros, hides a parent."""
        temp = self._temp()
        os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
        self._install(temp, objno, epoch)

    def mark_absent(self, objno: int, epoch: int) -> None:
        temp = self._temp()
        os.symlink(_ABSENT_TARGET, temp)
        self._install(temp, objno, epoch)

    def unlink_if_same(self, objno: int, epoch: int, inode: int) -> bool:
        """Unlink a version only if it is still the file with ``inode``."""
        path = self.path(objno, epoch)
        try:
            if os.lstat(path).st_ino != inode:
                return False
            os.unlink(path)
        except FileNotFoundError:
            return False
        finally:
            self._forget(objno, epoch)
        return True

    def unlink(self, objno: int, epoch: int) -> None:
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(objno, epoch))
        finally:
            self._forget(objno, epoch)

    # -- durability and housekeeping ------------------------------------------
    def fsync_version(self, objno: int, epoch: int) -> None:
        fds = self._fds
        kept = None if fds is None else fds.get(_key(objno, epoch))
        if kept is not None:  # (``kept`` holds it open)
            os.fsync(kept.fd)
            return
        try:
            fd = os.open(self.path(objno, epoch), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # replaced by a newer version, which was fsynced when made
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def fsync_directory(self) -> None:
        try:
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove_stale_temps(self) -> None:
        """Delete temp files whose writing process is gone."""
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return
        for entry in entries:
            if not entry.name.startswith(_TMP_PREFIX):
                continue
            pid = int(entry.name[len(_TMP_PREFIX) :].split(".", 1)[0] or 0)
            if pid != os.getpid() and not process_alive(pid):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)

    def remove_all(self) -> None:
        self.drop_descriptors(keep_caching=False)
        shutil.rmtree(self.directory, ignore_errors=True)


def _key(objno: int, epoch: int) -> int:
    return objno << 32 | epoch


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
