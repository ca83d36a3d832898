"""The node data path: stage, publish, expand, watch and recover volumes.

Design
------
A staged volume is a stack, bottom up::

    engine image  <-  attach daemon (block cache of the volume's mode, then
                      FUSE, <state>/fuse/<name>/image)
                  <-  loop device (losetup --direct-io=on over that file)
                  <-  filesystem mounted at <staging>/mount   (filesystem volumes)
                      or the device bound onto <staging>/device (block volumes)
                  <-  bind mounts at each publish target

What lives where (see :mod:`.stash`): the record of a staged volume is
``<staging>/csi-rbd-stash.json``; ``<state>/staged/<name>.json`` indexes every
staged volume so that a restarted plugin finds them all; the daemon's ready
file and log are under ``<state>/run``. Each step of NodeStage is recorded
(the daemon pid, then the loop device, then the filesystem type...) before
the next begins, so whatever a crash leaves behind can be found and undone.

Order of teardown is the reverse: unmount, detach the loop device (waiting
until the kernel really let go of it), unmount FUSE (the daemon then flushes
the image and exits), remove the records. A failure in NodeStage undoes
every step already done; if even that fails the record stays (state
``staging``) for :meth:`NodeStager.recover` or the next call to finish.

Crash and restart
-----------------
* The node plugin dies (even kill -9): nothing happens to the data path. The
  daemons run in their own sessions with their output on log files, and the
  kernel holds the loop devices and mounts. A new plugin calls
  :meth:`NodeStager.recover`, which adopts every healthy volume.
* An attach daemon dies: the kernel aborts its FUSE connection, and every
  layer above fails with EIO (ENOTCONN for the FUSE file itself). A kernel
  filesystem mount cannot be moved to a new device, so :meth:`recover` (and
  a repeated NodeStage) re-attaches: unmounts the publish targets and the
  staging mount (lazily if something still holds them), detaches the old
  loop device, unmounts the dead FUSE mount, starts a new daemon, attaches a
  new loop device, mounts the filesystem again (journal replay recovers what
  was flushed) and binds every recorded publish target again. On Ceph the
  dead daemon's exclusive lock is broken first (its owner id is recorded),
  and the new daemon needs credentials: the repeated NodeStage's secrets, or
  for :meth:`recover` the cluster's conf file identity. Paths resolved
  after that work again; file descriptors opened before the crash, and mounts
  that other mount namespaces (containers) copied from the old targets, keep
  failing with EIO until they are reopened or the workload restarts.
* NodeUnstage refuses (FAILED_PRECONDITION) while a recorded publish target is
  still mounted: unmounting the staging mount would succeed, but the binds
  would keep the filesystem, the loop device and the daemon alive with no
  record pointing at them. The CO unpublishes first, as the CSI spec says.

Concurrency: calls for one volume are serialized by a per-volume lock (the
gRPC layer serializes them too); different volumes proceed in parallel.
Every path argument must resolve (``..`` and symlinks followed) to one of
the allowed roots, or PathRefused is raised before anything is touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shlex
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from csi_rbd.config import ClusterConfig
from csi_rbd.engine.base import ImageLocator
from csi_rbd.node import health, loop, mounts
from csi_rbd.node.cache import MODES as CACHE_MODES
from csi_rbd.node.daemon_protocol import DISCARD_MODES
from csi_rbd.node.daemons import Supervisor, find_daemons
from csi_rbd.node.errors import (
    DataPathError,
    InvalidRequest,
    NodeError,
    PathRefused,
    PreconditionFailed,
    StagingConflict,
    VolumeNotFound,
)
from csi_rbd.node.stash import (
    IndexEntry,
    PublishTarget,
    StagedIndex,
    StageRecord,
    load_stash,
    remove_stash,
    safe_name,
    save_stash,
)

log = logging.getLogger(__name__)
_GROWTH_MINIMUM = 1 << 20  # smaller differences are block rounding, not growth


@dataclass(frozen=True)
class VolumeStats:
    """Usage of a volume (inodes are None for block volumes) and its condition."""

    total_bytes: int
    used_bytes: int | None
    available_bytes: int | None
    total_inodes: int | None
    used_inodes: int | None
    available_inodes: int | None
    abnormal: bool
    message: str


class NodeStager:
    def __init__(
        self,
        state_dir: Path,
        allowed_roots: Sequence[Path],
        *,
        python: str = sys.executable,
        start_timeout: float = 30.0,
        clusters: Mapping[str, ClusterConfig] | None = None,
    ) -> None:
        """``clusters``: the configured clusters by id, for images a locator alone
        cannot open (any but a native image with its data directory)."""
        self.clusters = dict(clusters or {})
        self.state_dir = Path(os.path.realpath(state_dir))
        self.allowed_roots = tuple(Path(os.path.realpath(root)) for root in allowed_roots)
        for sub in ("fuse", "run"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        self.index = StagedIndex(self.state_dir / "staged")
        self.supervisor = Supervisor(python, start_timeout)
        self._locks: dict[str, threading.RLock] = {}
        self._locks_guard = threading.Lock()

    # -- helpers -------------------------------------------------------------------
    @contextlib.contextmanager
    def _volume(self, volume_id: str) -> Iterator[None]:
        with self._locks_guard:
            lock = self._locks.setdefault(volume_id, threading.RLock())
        with lock:
            yield

    def check_path(self, path: str | os.PathLike[str]) -> Path:
        """``path`` resolved; PathRefused unless it lies in one of the allowed roots."""
        text = os.fspath(path)
        if not os.path.isabs(text):
            raise PathRefused(f"{text!r} is not an absolute path")
        real = Path(os.path.realpath(text))
        for root in self.allowed_roots:
            if real == root or root in real.parents:
                return real
        raise PathRefused(f"{text} (resolved to {real}) is outside the allowed roots")

    def _fuse_mountpoint(self, volume_id: str) -> str:
        return str(self.state_dir / "fuse" / safe_name(volume_id))

    def _run_file(self, volume_id: str, suffix: str) -> Path:
        return self.state_dir / "run" / f"{safe_name(volume_id)}.{suffix}"

    def _record(self, volume_id: str) -> StageRecord | None:
        """The staged record of ``volume_id``, found through the index."""
        entry = self.index.get(volume_id)
        if entry is None:
            return None
        record = load_stash(entry.staging_path)
        if record is None or record.volume_id != volume_id:
            return None
        return record

    # -- stage ---------------------------------------------------------------------
    def stage(
        self,
        volume_id: str,
        locator: ImageLocator,
        staging_path: str | os.PathLike[str],
        *,
        block: bool,
        fstype: str | None,
        mkfs_options: str | Sequence[str],
        mount_flags: Sequence[str],
        read_only: bool,
        discard: str = "unmap",
        cache: str = "none",
        secrets: Mapping[str, str] | None = None,
        shared: bool = False,
    ) -> None:
        """Attach the image and mount it (or expose the device) under ``staging_path``.

        ``locator`` names a native image with its data directory or an image of
        one of ``clusters``; ``secrets`` are the credentials to open it with
        (handed to the attach daemon, never stored). ``mkfs_options`` is a
        shell-quoted string or an argument list, used only when the device is
        blank. ``cache`` is the attach daemon's cache mode (librbd's meaning:
        ``none``, ``writethrough`` or ``writeback``); like ``discard`` it is
        recorded, and a repeated stage must ask for the same. ``shared``: other
        clients (other nodes) may write the image too (multi-node block volumes
        on Ceph), so the daemon does not take the image's exclusive lock for good.
        """
        staging = self.check_path(staging_path)
        self._cluster_of(locator)
        if discard not in DISCARD_MODES:
            raise InvalidRequest(f"discard mode must be one of {DISCARD_MODES}, not {discard!r}")
        if cache not in CACHE_MODES:
            raise InvalidRequest(f"cache mode must be one of {CACHE_MODES}, not {cache!r}")
        fstype = None if block else (fstype or None)
        if fstype is not None and fstype not in mounts.SUPPORTED_FILESYSTEMS:
            raise InvalidRequest(
                f"unsupported filesystem {fstype!r}; use one of {mounts.SUPPORTED_FILESYSTEMS}"
            )
        record = StageRecord(
            volume_id=volume_id,
            staging_path=str(staging),
            locator=locator,
            block=block,
            fstype=fstype,
            mkfs_options=tuple(
                shlex.split(mkfs_options) if isinstance(mkfs_options, str) else mkfs_options
            ),
            mount_flags=tuple(mount_flags),
            read_only=read_only,
            discard=discard,
            fuse_mountpoint=self._fuse_mountpoint(volume_id),
            cache=cache,
            shared=shared,
        )
        with self._volume(volume_id):
            existing = load_stash(staging)
            if existing is not None:
                if existing.volume_id != volume_id:
                    raise StagingConflict(f"{staging} is the staging path of {existing.volume_id}")
                if existing.state == "staged":
                    _require_same_stage(existing, record)
                    self.index.put(IndexEntry(volume_id, existing.staging_path))
                    self._heal(existing, secrets)
                    return
                if not self._undo(existing):
                    raise DataPathError(f"leftovers of an interrupted {existing.state} remain")
            self._claim(record)
            try:
                self._attach(record, allow_mkfs=True, secrets=secrets)
            except BaseException as exc:
                self._undo(record, reason=exc)
                if isinstance(exc, OSError):
                    raise DataPathError(f"staging {volume_id} failed: {exc}") from exc
                raise
            record.state = "staged"
            save_stash(record)

    def _claim(self, record: StageRecord) -> None:
        """Check nothing else owns the paths; write the index entry and first stash."""
        staging = Path(record.staging_path)
        other = self.index.get(record.volume_id)
        if other is not None and other.staging_path != record.staging_path:
            elsewhere = load_stash(other.staging_path)
            if elsewhere is not None and elsewhere.volume_id == record.volume_id:
                raise PreconditionFailed(
                    f"volume {record.volume_id} is already staged at {other.staging_path}"
                )
        mounted = mounts.mounts_under(staging)
        if mounted:
            raise StagingConflict(f"{staging} already has a mount at {mounted[0].mountpoint}")
        staging.mkdir(parents=True, exist_ok=True)
        self.index.put(IndexEntry(record.volume_id, record.staging_path))
        save_stash(record)

    def _cluster_of(self, locator: ImageLocator) -> ClusterConfig | None:
        """The cluster an attach daemon opens; None for a native image with its data dir."""
        if locator.engine == "native" and locator.data_dir:
            return None
        cluster = self.clusters.get(locator.cluster_id)
        if cluster is None or cluster.engine != locator.engine:
            raise InvalidRequest(
                f"this node has no {locator.engine or 'engine'} cluster {locator.cluster_id!r} "
                f"configured (known: {', '.join(sorted(self.clusters)) or 'none'})"
            )
        return cluster

    def _attach(
        self, record: StageRecord, *, allow_mkfs: bool, secrets: Mapping[str, str] | None
    ) -> None:
        """Daemon, loop device, then the filesystem mount or device bind (recorded as made)."""
        if mounts.is_mounted(record.fuse_mountpoint):  # a dead daemon's mount
            mounts.unmount(record.fuse_mountpoint, timeout=2, lazy_fallback=True)
        # the lock of a previous daemon: broken only once no daemon serves this volume
        stale_owner = record.lock_owner if not find_daemons(record.fuse_mountpoint) else None
        started = self.supervisor.start(
            record.locator,
            record.fuse_mountpoint,
            read_only=record.read_only,
            discard=record.discard,
            cache=record.cache,
            ready_file=self._run_file(record.volume_id, "ready"),
            log_file=self._run_file(record.volume_id, "log"),
            cluster=self._cluster_of(record.locator),
            secrets=secrets,
            break_lock=stale_owner,
            shared=record.shared,
        )
        record.daemon_pid, record.lock_owner = started.pid, started.lock_owner
        save_stash(record)
        answer = health.stat_within(record.fuse_file, timeout=10)
        if isinstance(answer, str):
            raise DataPathError(f"{record.fuse_file} does not answer: {answer}")
        device = loop.attach(record.fuse_file, read_only=record.read_only)
        record.loop_device, record.direct_io = device.path, device.direct_io
        save_stash(record)
        if record.block:
            _make_file(record.device_file)
            mounts.bind_mount(device.path, record.device_file, read_only=record.read_only)
            return
        record.actual_fstype = self._filesystem(record, device.path, allow_mkfs)
        save_stash(record)
        self._grow_offline(record, device.path)
        record.mount_dir.mkdir(exist_ok=True)
        mounts.mount(
            device.path,
            record.mount_dir,
            record.actual_fstype,
            record.mount_flags,
            read_only=record.read_only,
        )
        self._grow_xfs_online(record, device.path)

    @staticmethod
    def _grow_xfs_online(record: StageRecord, device: str) -> None:
        """A volume made larger than its source (a restore or clone) shows its full
        size at publish: xfs grows only while mounted, so grow it right after the mount."""
        if record.actual_fstype != "xfs" or record.read_only:
            return
        try:
            mounts.grow_filesystem(device, record.mount_dir, "xfs")
        except NodeError as exc:
            log.warning("could not grow %s: %s", record.volume_id, exc)

    @staticmethod
    def _grow_offline(record: StageRecord, device: str) -> None:
        """Grow ext4 before mounting when the image grew: online growth needs
        CAP_SYS_RESOURCE, offline growth does not. Tried once per device size;
        a failure is logged and the volume is mounted at its old size."""
        if record.actual_fstype != "ext4" or record.read_only:
            return
        size = loop.block_device_size(device)
        if record.grown_for_size == size or size - mounts.ext4_size(device) < _GROWTH_MINIMUM:
            return
        try:
            mounts.grow_ext4_offline(device)
        except NodeError as exc:
            log.warning("could not grow %s offline: %s", record.volume_id, exc)
        record.grown_for_size = size
        save_stash(record)

    @staticmethod
    def _filesystem(record: StageRecord, device: str, allow_mkfs: bool) -> str:
        if allow_mkfs and not record.read_only:
            return mounts.ensure_filesystem(device, record.fstype, record.mkfs_options)
        found = mounts.probe(device)
        if found.fstype is None:
            why = "it is read-only" if record.read_only else "it is being re-attached"
            raise PreconditionFailed(
                f"{record.volume_id} holds no filesystem ({found.other or 'blank'}) and {why}"
            )
        if record.fstype is not None and found.fstype != record.fstype:
            raise PreconditionFailed(
                f"{record.volume_id} holds a {found.fstype} filesystem, not {record.fstype}"
            )
        return found.fstype

    # -- teardown ------------------------------------------------------------------
    def _teardown(self, record: StageRecord, *, lazy: bool, targets: bool) -> None:
        """Unmount, detach, stop the daemon. Strict (raises, leaving the rest) unless ``lazy``."""
        if targets:
            for target in record.targets:
                mounts.unmount(target.path, timeout=0.5 if lazy else 10, lazy_fallback=lazy)
        for path in (record.mount_dir, record.device_file):
            mounts.unmount(path, timeout=0.5 if lazy else 10, lazy_fallback=lazy)
        devices = set(loop.find_by_backing_file(record.fuse_file))
        if record.loop_device and loop.backing_file(record.loop_device) == str(record.fuse_file):
            devices.add(record.loop_device)
        for device in sorted(devices):
            try:
                loop.detach(device, record.fuse_file, timeout=1 if lazy else 10)
            except PreconditionFailed:
                if not lazy:
                    raise
                log.warning("%s stays attached until its last user closes it", device)
        if mounts.is_mounted(record.fuse_mountpoint):
            mounts.unmount(record.fuse_mountpoint, timeout=0.5 if lazy else 10, lazy_fallback=lazy)
        pids = set(find_daemons(record.fuse_mountpoint))
        if record.daemon_pid is not None:
            pids.add(record.daemon_pid)
        for pid in sorted(pids):
            self.supervisor.stop(pid, record.fuse_mountpoint)
        with contextlib.suppress(OSError):
            os.rmdir(record.fuse_mountpoint)

    def _undo(self, record: StageRecord, reason: BaseException | None = None) -> bool:
        """Roll back a stage that failed or was interrupted; keep the record if that fails."""
        if reason is not None:
            log.warning("staging %s failed (%s); undoing it", record.volume_id, reason)
        try:
            self._teardown(record, lazy=True, targets=False)
            _remove_quietly(record.mount_dir, record.device_file)
        except (NodeError, OSError) as exc:
            log.error("could not undo staging %s: %s; left for recover()", record.volume_id, exc)
            return False
        remove_stash(record.staging_path)
        entry = self.index.get(record.volume_id)
        if entry is not None and entry.staging_path == record.staging_path:
            self.index.remove(record.volume_id)
        return True

    def unstage(self, volume_id: str, staging_path: str | os.PathLike[str]) -> None:
        """Undo stage; success if not staged. PreconditionFailed while still published."""
        staging = self.check_path(staging_path)
        with self._volume(volume_id):
            record = load_stash(staging)
            if record is None:
                entry = self.index.get(volume_id)
                if entry is not None and entry.staging_path == str(staging):
                    self._undo(self._skeleton(volume_id, str(staging)))
                return
            if record.volume_id != volume_id:
                raise VolumeNotFound(f"{staging} holds volume {record.volume_id}, not {volume_id}")
            busy = [t.path for t in record.targets if mounts.is_mounted(t.path)]
            if busy:
                raise PreconditionFailed(
                    f"volume {volume_id} is still published at {', '.join(busy)}; unpublish first"
                )
            record.state, record.targets = "unstaging", []
            save_stash(record)
            self._teardown(record, lazy=False, targets=False)
            _remove_quietly(record.mount_dir, record.device_file)
            remove_stash(staging)
            self.index.remove(volume_id)

    def _skeleton(self, volume_id: str, staging_path: str) -> StageRecord:
        """A record for cleaning up by convention when the stash itself is gone."""
        return StageRecord(
            volume_id=volume_id,
            staging_path=staging_path,
            locator=ImageLocator("", "", "", ""),
            block=False,
            fstype=None,
            mkfs_options=(),
            mount_flags=(),
            read_only=False,
            discard="unmap",
            fuse_mountpoint=self._fuse_mountpoint(volume_id),
        )

    # -- publish -------------------------------------------------------------------
    def publish(
        self,
        volume_id: str,
        staging_path: str | os.PathLike[str],
        target_path: str | os.PathLike[str],
        *,
        block: bool,
        read_only: bool,
        mount_flags: Sequence[str],
    ) -> None:
        """Bind the staged filesystem (or device) at ``target_path``.

        A volume staged read-only is always published read-only.
        """
        staging = self.check_path(staging_path)
        target = self.check_path(target_path)
        with self._volume(volume_id):
            record = load_stash(staging)
            if record is None or record.volume_id != volume_id or record.state != "staged":
                raise PreconditionFailed(f"volume {volume_id} is not staged at {staging}")
            if record.block != block:
                kind = "block" if record.block else "filesystem"
                raise PreconditionFailed(f"volume {volume_id} is staged as a {kind} volume")
            wanted = PublishTarget(
                str(target), block, read_only or record.read_only, tuple(mount_flags)
            )
            known = record.target(str(target))
            entry = mounts.find_mount(target)
            if known is not None:
                if known != wanted:
                    raise StagingConflict(f"{target} is published with other options: {known}")
                if entry is not None and not health.target_problems(_only_target(record, known)):
                    return
            elif entry is not None:
                raise StagingConflict(f"something else is mounted at {target}")
            record.targets = [*record.without_target(str(target)), wanted]
            save_stash(record)  # recorded before the bind: a crash leaves nothing unrecorded
            created = _make_target(target, block)
            try:
                if entry is not None:
                    mounts.unmount(target, timeout=2, lazy_fallback=True)
                if known is not None and known.loop_device:
                    self._detach_target_loop(record, known)
                self._bind_target(record, wanted)
            except BaseException:
                if created:
                    _remove_quietly(target)
                record.targets = record.without_target(str(target))
                save_stash(record)
                raise

    def _bind_target(self, record: StageRecord, target: PublishTarget) -> None:
        """Bind one target, recording the read-only loop device a block target may need."""
        if not (target.block and target.read_only and not record.read_only):
            mounts.bind_mount(
                record.exposed_path,
                target.path,
                read_only=target.read_only,
                flags=target.mount_flags,
            )
            return
        device = loop.attach(record.fuse_file, read_only=True)
        record.targets = [
            *record.without_target(target.path),
            dataclasses.replace(target, loop_device=device.path),
        ]
        save_stash(record)
        try:
            mounts.bind_mount(device.path, target.path, read_only=True)
        except BaseException:
            loop.detach(device.path, device.backing_file, timeout=3)
            raise

    @staticmethod
    def _detach_target_loop(record: StageRecord, target: PublishTarget) -> None:
        device = target.loop_device
        if device and loop.backing_file(device) == str(record.fuse_file):
            loop.detach(device, record.fuse_file)

    def unpublish(self, volume_id: str, target_path: str | os.PathLike[str]) -> None:
        """Unmount and remove ``target_path``; success if it is not published."""
        target = self.check_path(target_path)
        with self._volume(volume_id):
            record = self._record(volume_id)
            entry = mounts.find_mount(target)
            if entry is not None:
                if record is None:
                    raise VolumeNotFound(f"volume {volume_id} is not staged on this node")
                if record.target(str(target)) is None:  # unrecorded: only if it is ours
                    probe = PublishTarget(str(target), record.block, False)
                    if health.target_problems(_only_target(record, probe)):
                        raise VolumeNotFound(f"{target} is not a publish target of {volume_id}")
                mounts.unmount(target)
            _remove_quietly(target)
            known = record.target(str(target)) if record is not None else None
            if record is not None and known is not None:
                self._detach_target_loop(record, known)
                record.targets = record.without_target(str(target))
                save_stash(record)

    # -- expand and stats ------------------------------------------------------------
    def _owning(self, volume_id: str, volume_path: str | os.PathLike[str]) -> StageRecord:
        path = self.check_path(volume_path)
        record = self._record(volume_id)
        if record is None or record.state != "staged":
            raise VolumeNotFound(f"volume {volume_id} is not staged on this node")
        mine = {
            record.staging_path,
            str(record.mount_dir),
            str(record.device_file),
            *(t.path for t in record.targets),
        }
        if str(path) not in mine or not path.exists():
            raise VolumeNotFound(f"{path} is not a path of volume {volume_id}")
        return record

    def expand(
        self, volume_id: str, volume_path: str | os.PathLike[str], new_size: int | None
    ) -> int:
        """Pick up a grown image: refresh the loop device, grow the filesystem; the new size.

        The size returned is what the device has now; ``new_size`` (the CO's
        required bytes) is only logged when larger: the caller decides whether
        that is OUT_OF_RANGE.
        """
        with self._volume(volume_id):
            record = self._owning(volume_id, volume_path)
            broken = health.daemon_problems(record, self.supervisor) + health.loop_problems(record)
            if broken:
                raise PreconditionFailed(f"volume {volume_id} is not attached: {broken[0]}")
            assert record.loop_device is not None
            answer = health.stat_within(record.fuse_file)  # FUSE re-reads the image size
            if isinstance(answer, str):
                raise DataPathError(f"{record.fuse_file} does not answer: {answer}")
            size = loop.refresh_capacity(record.loop_device)
            for target in record.targets:
                if target.loop_device:
                    loop.refresh_capacity(target.loop_device)
            if new_size is not None and size < new_size:
                log.warning("%s: the device has %d bytes, %d asked for", volume_id, size, new_size)
            if not record.block:
                assert record.actual_fstype is not None
                mounts.grow_filesystem(record.loop_device, record.mount_dir, record.actual_fstype)
            return size

    def stats(self, volume_id: str, volume_path: str | os.PathLike[str]) -> VolumeStats:
        with self._volume(volume_id):
            record = self._owning(volume_id, volume_path)
            path = self.check_path(volume_path)
            if str(path) == record.staging_path:
                path = record.exposed_path
            found = health.problems(record, self.supervisor, targets=False)
            if not mounts.is_mounted(path):
                found.append(f"{path} is not mounted")
            if record.block:
                try:
                    total = loop.block_device_size(path)
                except OSError as exc:
                    total = 0
                    found.append(f"cannot size {path}: {exc.strerror}")
                return VolumeStats(total, None, None, None, None, None, *_condition(found))
            try:
                use = mounts.usage(path)
            except OSError as exc:
                found.append(f"statfs {path}: {exc.strerror}")
                return VolumeStats(0, 0, 0, 0, 0, 0, *_condition(found))
            return VolumeStats(
                use.total_bytes,
                use.used_bytes,
                use.available_bytes,
                use.total_inodes,
                use.used_inodes,
                use.available_inodes,
                *_condition(found),
            )

    # -- recovery --------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Adopt or re-attach every staged volume after a plugin restart; what was done.

        One line per volume (``<volume id>: adopted ...``, ``re-attached ...``,
        ``failed: ...``), then one per orphan FUSE mount point removed.
        """
        report = []
        entries = self.index.entries()
        for entry in entries:
            with self._volume(entry.volume_id):
                try:
                    outcome = self._recover_one(entry)
                except (NodeError, OSError) as exc:
                    outcome = f"failed: {exc}"
                    log.error("recovering %s failed: %s", entry.volume_id, exc)
            report.append(f"{entry.volume_id}: {outcome}")
        known = {safe_name(entry.volume_id) for entry in entries}
        for orphan in sorted((self.state_dir / "fuse").iterdir()):
            if orphan.name not in known:
                report.append(f"{orphan.name}: {self._remove_orphan(orphan)}")
        return report

    def _remove_orphan(self, fuse_dir: Path) -> str:
        """A FUSE mount point no index entry names (state tampered with, or a bug)."""
        image = str(fuse_dir / "image")
        busy = []
        for device in loop.find_by_backing_file(image):
            source_of = [m.mountpoint for m in mounts.mount_table() if m.source == device]
            if source_of:
                busy.append(f"{device} (mounted at {', '.join(source_of)})")
                continue
            with contextlib.suppress(PreconditionFailed):
                loop.detach(device, image, timeout=3)
        if busy:
            return f"orphan FUSE mount point left alone: {'; '.join(busy)} in use"
        mounts.unmount(fuse_dir, timeout=2, lazy_fallback=True)
        for pid in find_daemons(str(fuse_dir)):
            self.supervisor.stop(pid, str(fuse_dir))
        with contextlib.suppress(OSError):
            fuse_dir.rmdir()
        return "orphan FUSE mount point removed"

    def _recover_one(self, entry: IndexEntry) -> str:
        record = load_stash(entry.staging_path)
        if record is None or record.volume_id != entry.volume_id:
            self._undo(self._skeleton(entry.volume_id, entry.staging_path))
            return "no stash at the staging path; cleaned up leftovers"
        if record.state != "staged":
            if not self._undo(record):
                raise DataPathError(f"could not undo the interrupted {record.state} step")
            return f"finished the interrupted {record.state} step (rolled back)"
        return self._heal(record, None)

    def _heal(self, record: StageRecord, secrets: Mapping[str, str] | None) -> str:
        """Adopt a healthy stack, rebind broken targets, or re-attach a broken stack."""
        gone = [t.path for t in record.targets if not os.path.lexists(t.path)]
        if gone:  # unpublished (path removed) but not yet forgotten: forget it
            record.targets = [t for t in record.targets if t.path not in gone]
            save_stash(record)
        found = health.problems(record, self.supervisor, targets=False)
        if found:
            self._reattach(record, found, secrets)
            return f"re-attached ({'; '.join(found)}) as {record.loop_device}"
        rebound = []
        for target in list(record.targets):
            if health.target_problems(_only_target(record, target)):
                mounts.unmount(target.path, timeout=2, lazy_fallback=True)
                self._detach_target_loop(record, target)
                self._bind_target(record, target)
                rebound.append(target.path)
        outcome = f"adopted (daemon pid {record.daemon_pid}, {record.loop_device})"
        return outcome + (f"; re-bound {', '.join(rebound)}" if rebound else "")

    def _reattach(
        self, record: StageRecord, found: list[str], secrets: Mapping[str, str] | None
    ) -> None:
        """Rebuild a broken stack on a fresh daemon and loop device; rebind the targets.

        Without ``secrets`` (a plugin restart) a Ceph image is opened with the
        cluster's own conf file identity; with neither, this fails and the next
        NodeStageVolume (which carries the secrets) re-attaches.
        """
        log.warning("re-attaching %s: %s", record.volume_id, "; ".join(found))
        self._teardown(record, lazy=True, targets=True)
        record.daemon_pid = record.loop_device = None
        save_stash(record)
        try:
            self._attach(record, allow_mkfs=False, secrets=secrets)
            for target in list(record.targets):
                _make_target(Path(target.path), target.block)
                self._bind_target(record, target)
        except BaseException:
            with contextlib.suppress(NodeError, OSError):
                self._teardown(record, lazy=True, targets=True)
            raise
        finally:
            save_stash(record)


# -- small helpers ------------------------------------------------------------------------
def _condition(problems: list[str]) -> tuple[bool, str]:
    """(abnormal, message) of a list of problems."""
    return bool(problems), "; ".join(problems) if problems else "healthy"


def _require_same_stage(existing: StageRecord, wanted: StageRecord) -> None:
    differences = [
        name
        for name in ("locator", "block", "mount_flags", "read_only", "discard", "cache", "shared")
        if getattr(existing, name) != getattr(wanted, name)
    ]
    if wanted.fstype not in (None, existing.fstype, existing.actual_fstype):
        differences.append("fstype")
    if differences:
        raise StagingConflict(
            f"{existing.volume_id} is staged at {existing.staging_path} with other "
            f"{', '.join(differences)}"
        )


def _only_target(record: StageRecord, target: PublishTarget) -> StageRecord:
    """A copy of ``record`` listing just ``target`` (to check that one bind)."""
    return dataclasses.replace(record, targets=[target])


def _make_file(path: Path) -> bool:
    """Create an empty file for a device bind; True if it was created."""
    if path.exists() and not path.is_file() and not path.is_block_device():
        raise StagingConflict(f"{path} exists and is not a file")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _make_target(target: Path, block: bool) -> bool:
    target.parent.mkdir(parents=True, exist_ok=True)
    if block:
        return _make_file(target)
    if target.exists() and not target.is_dir():
        raise StagingConflict(f"{target} exists and is not a directory")
    try:
        target.mkdir()
    except FileExistsError:
        return False
    return True


def _remove_quietly(*paths: Path) -> None:
    """Remove empty directories and files that nothing is mounted on."""
    for path in paths:
        if mounts.is_mounted(path):
            continue
        with contextlib.suppress(FileNotFoundError, OSError):
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()
