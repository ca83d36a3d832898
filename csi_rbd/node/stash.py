"""What the node remembers about a staged volume, and where.

Layout
------
Per staged volume, in its staging path (the directory the CO gave)::

    <staging>/csi-rbd-stash.json   the record below (the source of truth)
    <staging>/mount/               filesystem volumes: the filesystem's mount point
    <staging>/device               block volumes: the loop device bound onto a file

and in the node state directory::

    <state>/staged/<name>.json     index: volume id -> staging path (to find them all)
    <state>/fuse/<name>/           the attach daemon's FUSE mount point (file ``image``)
    <state>/run/<name>.ready       written by the daemon once it serves
    <state>/run/<name>.log         the daemon's stderr

``<name>`` is :func:`safe_name` of the volume id. Every file is replaced
atomically (temp file, fsync, rename, fsync of the directory), so a crash
leaves the old or the new version, never a torn one.

A record's ``state`` is ``staging`` while NodeStage runs (so a crash midway
can be rolled back: every resource it made is recorded before the next is
made), ``staged`` once complete and ``unstaging`` while NodeUnstage runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csi_rbd.engine.base import ImageLocator
from csi_rbd.node.errors import DataPathError

STASH_NAME = "csi-rbd-stash.json"
MOUNT_DIR = "mount"
DEVICE_FILE = "device"
VERSION = 1
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(volume_id: str) -> str:
    """A file name for ``volume_id``: itself when safe, else a cleaned prefix and a hash."""
    cleaned = _SAFE.sub("_", volume_id)
    if cleaned == volume_id and 0 < len(volume_id) <= 100 and not volume_id.startswith("."):
        return volume_id
    digest = hashlib.sha256(volume_id.encode()).hexdigest()[:16]
    return f"{cleaned.lstrip('.')[:80]}-{digest}"


@dataclass(frozen=True)
class PublishTarget:
    path: str
    block: bool
    read_only: bool
    mount_flags: tuple[str, ...] = ()
    # a read-only block publish of a writable volume gets its own read-only loop
    # device (a read-only bind of a device node does not stop writes through it)
    loop_device: str | None = field(default=None, compare=False)


@dataclass
class StageRecord:
    volume_id: str
    staging_path: str
    locator: ImageLocator
    block: bool
    fstype: str | None  # as requested (None: whatever is there, else ext4)
    mkfs_options: tuple[str, ...]
    mount_flags: tuple[str, ...]
    read_only: bool
    discard: str
    fuse_mountpoint: str
    state: str = "staging"
    cache: str = "none"  # the attach daemon's cache mode (none, writethrough, writeback)
    shared: bool = False  # other nodes may write too: no exclusive lock held for good
    actual_fstype: str | None = None  # what the device holds
    daemon_pid: int | None = None
    lock_owner: str | None = (
        None  # the daemon's exclusive-lock owner id (Ceph), to break if it dies
    )
    loop_device: str | None = None
    direct_io: bool | None = None
    grown_for_size: int | None = None  # device size the last offline ext4 growth was for
    targets: list[PublishTarget] = field(default_factory=list)
    version: int = VERSION

    # -- paths ------------------------------------------------------------------
    @property
    def mount_dir(self) -> Path:
        return Path(self.staging_path) / MOUNT_DIR

    @property
    def device_file(self) -> Path:
        return Path(self.staging_path) / DEVICE_FILE

    @property
    def exposed_path(self) -> Path:
        """What publish binds: the filesystem directory or the device file."""
        return self.device_file if self.block else self.mount_dir

    @property
    def fuse_file(self) -> Path:
        return Path(self.fuse_mountpoint) / "image"

    def target(self, path: str) -> PublishTarget | None:
        for target in self.targets:
            if target.path == path:
                return target
        return None

    def without_target(self, path: str) -> list[PublishTarget]:
        return [t for t in self.targets if t.path != path]

    # -- (de)serialisation ------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageRecord:
        if data.get("version") != VERSION:
            raise DataPathError(f"unknown stash version {data.get('version')!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["locator"] = ImageLocator(**values["locator"])
        values["mount_flags"] = tuple(values["mount_flags"])
        values["mkfs_options"] = tuple(values["mkfs_options"])
        values["targets"] = [
            PublishTarget(
                t["path"],
                bool(t["block"]),
                bool(t["read_only"]),
                tuple(t["mount_flags"]),
                t.get("loop_device"),
            )
            for t in values["targets"]
        ]
        return cls(**values)


# -- atomic files ---------------------------------------------------------------------
def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync the directory."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_directory(path.parent)


def remove_durably(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
        _fsync_directory(path.parent)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when there is no such file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DataPathError(f"cannot read {path}: {exc}") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise DataPathError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise DataPathError(f"{path} does not hold a JSON object")
    return data


# -- the stash in the staging path -----------------------------------------------------
def stash_path(staging_path: str | os.PathLike[str]) -> Path:
    return Path(staging_path) / STASH_NAME


def load_stash(staging_path: str | os.PathLike[str]) -> StageRecord | None:
    data = read_json(stash_path(staging_path))
    return None if data is None else StageRecord.from_json(data)


def save_stash(record: StageRecord) -> None:
    write_json_atomically(stash_path(record.staging_path), record.to_json())


def remove_stash(staging_path: str | os.PathLike[str]) -> None:
    remove_durably(stash_path(staging_path))


# -- the index in the state directory ---------------------------------------------------
@dataclass(frozen=True)
class IndexEntry:
    volume_id: str
    staging_path: str


class StagedIndex:
    """``<state>/staged/<safe name>.json``: every volume this node has staged."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, volume_id: str) -> Path:
        return self.directory / f"{safe_name(volume_id)}.json"

    def get(self, volume_id: str) -> IndexEntry | None:
        data = read_json(self._path(volume_id))
        if data is None or data.get("volume_id") != volume_id:
            return None
        return IndexEntry(data["volume_id"], data["staging_path"])

    def put(self, entry: IndexEntry) -> None:
        write_json_atomically(self._path(entry.volume_id), dataclasses.asdict(entry))

    def remove(self, volume_id: str) -> None:
        remove_durably(self._path(volume_id))

    def entries(self) -> list[IndexEntry]:
        found = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                data = read_json(path)
            except DataPathError:
                continue
            if data is not None and "volume_id" in data and "staging_path" in data:
                found.append(IndexEntry(data["volume_id"], data["staging_path"]))
        return found
