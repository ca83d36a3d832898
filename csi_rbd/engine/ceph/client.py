"""python-rados/python-rbd behind the native engine's shapes, errors translated.

``Rados``, ``IoCtx``, ``RBD`` and ``Image`` here wrap the bindings' classes of
the same names. Every method of the wrapped object is reachable (attribute
access delegates to it) and every call goes through
:func:`csi_rbd.engine.ceph.translate.call`, so callers only ever see
:mod:`csi_rbd.engine.errors`; lazy iterators (snapshots, metadata, trash) are
turned into lists inside that call, so iteration cannot raise binding errors
later. Wrapped ``IoCtx`` arguments are unwrapped on the way in.

Where librbd's behaviour differs from what the driver relies on, the wrapper
adapts it, and says so:

* ``IoCtx.omap_get/omap_set/omap_remove``: the native engine's omap calls over
  RADOS omap, each one RADOS write or read operation. ``omap_set(...,
  exclusive=True)`` creates the object if needed and asserts, in the same
  operation, that every key is absent (``omap_cmp(key, "", EQ)``: RADOS reads a
  missing key as empty, so a key holding an empty value counts as absent; the
  journal never writes empty values); a failed assertion (ECANCELED) is
  ``ObjectExists``.
* ``RBD.remove``: librbd refuses an image whose only snapshots are trashed
  clone-v2 snapshots still used by clones with ENOTEMPTY (``ImageHasSnapshots``)
  unless ``rbd_move_parent_to_trash_on_remove`` is set; the native engine says
  ``ImageBusy`` ("has clones: flatten or remove them, or move it to the
  trash"), which is what the control plane acts on. The wrapper raises
  ``ImageBusy`` in that case (and ``ImageHasSnapshots`` when user snapshots
  remain).
* ``RBD.trash_move``: see :meth:`RBD.trash_move` (the trash differs most).
* ``RBD.clone`` takes the native engine's ``clone_format`` keyword (only 2, the
  connection default, is accepted).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import functools
import logging
import os
import re
import shlex
import struct
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from csi_rbd.engine import errors
from csi_rbd.engine.ceph import bindings
from csi_rbd.engine.ceph.translate import call, materialize, translate

log = logging.getLogger(__name__)

RBD_LOCK_MODE_EXCLUSIVE = 0
RBD_LOCK_MODE_SHARED = 1
RBD_SNAP_NAMESPACE_TYPE_USER = 0
RBD_SNAP_NAMESPACE_TYPE_TRASH = 2
RBD_FEATURE_LAYERING = 1
RBD_FEATURE_EXCLUSIVE_LOCK = 4
RBD_FEATURE_OBJECT_MAP = 8
RBD_FEATURE_FAST_DIFF = 16
RBD_FEATURE_DEEP_FLATTEN = 32
RBD_FEATURES_DEFAULT = (
    RBD_FEATURE_LAYERING
    | RBD_FEATURE_EXCLUSIVE_LOCK
    | RBD_FEATURE_OBJECT_MAP
    | RBD_FEATURE_FAST_DIFF
    | RBD_FEATURE_DEEP_FLATTEN
)
# Metadata mark on images this engine moved to the trash the plain way (they
# still had user snapshots): RBD.purge_trash removes them once no clone needs them.
TRASH_MARK = "csi-rbd.trash-auto-remove"

_OMAP_PAGE = 1024
_USER_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_KEY = re.compile(r"^[A-Za-z0-9+/]{4,256}={0,2}$")


def _lib() -> tuple[Any, Any]:
    return bindings.load()


def _unwrap(value: Any) -> Any:
    return value.raw if isinstance(value, IoCtx) else value


def _delegate(target: Any, name: str) -> Any:
    """``target.name``, translated (and materialized) when it is a method."""
    attribute = call(getattr, target, name)
    if not callable(attribute):
        return attribute

    @functools.wraps(attribute)
    def method(*args: Any, **kwargs: Any) -> Any:
        args = tuple(_unwrap(a) for a in args)
        kwargs = {k: _unwrap(v) for k, v in kwargs.items()}
        return call(lambda: materialize(attribute(*args, **kwargs)))

    return method


# ------------------------------------------------------------------------------------
# connections
# ------------------------------------------------------------------------------------
def _keyring_directory() -> str | None:
    """Memory-backed when possible, so a key never reaches a disk."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


@contextlib.contextmanager
def private_keyring(user: str, key: str) -> Iterator[Path]:
    """A 0600 keyring holding one key, in a 0700 directory of its own, gone on exit."""
    directory = Path(tempfile.mkdtemp(prefix="csi-rbd-keyring-", dir=_keyring_directory()))
    path = directory / "keyring"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"[client.{user}]\n\tkey = {key}\n")
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with contextlib.suppress(OSError):
            directory.rmdir()


def check_credentials(user: str, key: str) -> str:
    """The bare user id (``client.`` dropped); PermissionError for a malformed pair.

    Checked here so that a bad key never reaches librados, which would print it
    in its parse error, and cannot inject keyring lines.
    """
    if user.startswith("client."):
        user = user[len("client.") :]
    if not _USER_ID.match(user):
        raise errors.PermissionError("the userID secret is not a valid Ceph user name")
    if not _KEY.match(key):
        raise errors.PermissionError(f"the userKey secret of user {user!r} is not a cephx key")
    return user


def identity_from_environment(environ: Mapping[str, str] | None = None) -> str | None:
    """The client id ``CEPH_ARGS`` names (``--id csi``, ``--user csi``, ``--name client.csi``).

    librados parses the rest of ``CEPH_ARGS`` itself, but takes the name only
    when the handle is created, so it is read here.
    """
    words = shlex.split((environ if environ is not None else os.environ).get("CEPH_ARGS", ""))
    for i, word in enumerate(words):
        flag, _, value = word.partition("=")
        if flag in ("--id", "--user", "-i", "--name", "-n"):
            if not value and i + 1 < len(words):
                value = words[i + 1]
            if flag in ("--name", "-n"):
                if not value.startswith("client."):
                    continue
                value = value[len("client.") :]
            return value or None
    return None


def connect(
    monitors: Sequence[str],
    *,
    user: str | None = None,
    key: str | None = None,
    conf: Path | None = None,
    namespace: str = "",
    timeout: float = 10.0,
    options: Mapping[str, str] | None = None,
) -> Rados:
    """A connected cluster handle.

    With ``user``/``key``: that cephx identity, through a private keyring that
    is deleted as soon as ``connect`` returns (librados reads it once). Without:
    the identity of the conf file (its ``keyring``; the name from ``CEPH_ARGS``,
    e.g. ``--id csi``, else ``client.admin``).

    ``timeout`` bounds the connect through ``client_mount_timeout`` (librados
    ignores the Python ``connect(timeout=)``); monitors given here override the
    conf file's ``mon_host``.
    """
    rados, _ = _lib()
    if (user is None) != (key is None):
        raise errors.PermissionError("credentials need both userID and userKey")
    if user is not None and key is not None:
        user = check_credentials(user, key)
    conffile = str(conf) if conf is not None else rados.Rados.NO_CONF_FILE
    rados_id = user if user is not None else identity_from_environment()
    try:
        handle = call(rados.Rados, rados_id=rados_id, conffile=conffile)
    except errors.OSError as exc:
        raise errors.IOError(f"cannot read the conf file {conf}: {exc}", errno=exc.errno) from exc
    try:
        if user is None:
            call(handle.conf_parse_env)
        settings = {
            "client_mount_timeout": str(max(1, round(timeout))),
            "rados_mon_op_timeout": str(max(30, round(timeout))),
            "rbd_default_clone_format": "2",
            # discard zeroes what it is given, as the native engine (librbd's
            # default skips partial-object discards: they would read old data)
            "rbd_skip_partial_discard": "false",
            "admin_socket": "",
            "log_to_stderr": "false",
            "err_to_stderr": "false",
            **(options or {}),
        }
        if monitors:
            settings["mon_host"] = ",".join(monitors)
        for name, value in settings.items():
            call(handle.conf_set, name, value)
        if user is not None and key is not None:
            with private_keyring(user, key) as keyring:
                call(handle.conf_set, "keyring", str(keyring))
                _connect(handle, user)
        else:
            _connect(handle, None)
    except BaseException:
        with contextlib.suppress(Exception):
            handle.shutdown()
        raise
    return Rados(handle, namespace)


def _connect(handle: Any, user: str | None) -> None:
    try:
        call(handle.connect)
    except (errors.ObjectNotFound, errors.IOError, errors.InvalidArgument) as exc:
        # no or unreadable keyring: librados says ENOENT/EIO/EINVAL; it is a credentials problem
        who = f"client.{user}" if user else "the conf file's identity"
        raise errors.PermissionError(
            f"cannot authenticate as {who}: {exc}", errno=exc.errno
        ) from exc
    except errors.Timeout as exc:
        raise errors.Timeout(f"no monitor answered in time: {exc}", errno=exc.errno) from exc


class Rados:
    """A connected cluster, shaped like ``rados.Rados`` (see :func:`connect`)."""

    def __init__(self, handle: Any, namespace: str = "") -> None:
        self.raw = handle
        self.namespace = namespace
        # held around librbd removals: trash_move flips a connection-wide option
        self.remove_lock = threading.RLock()
        # images open through this connection: closed before it shuts down
        # (closing a librbd image after its cluster handle shut down hangs)
        self.images: weakref.WeakSet[Image] = weakref.WeakSet()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("raw", "namespace", "remove_lock", "images"):
            raise AttributeError(name)
        return _delegate(self.raw, name)

    def __enter__(self) -> Rados:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Close the images still open through this connection, then disconnect."""
        for image in list(self.images):
            with contextlib.suppress(Exception):
                image.close()
        with contextlib.suppress(Exception):
            self.raw.shutdown()

    def open_ioctx(self, pool: str) -> IoCtx:
        """A pool (in the configured RADOS namespace); ObjectNotFound if it does not exist."""
        raw = call(self.raw.open_ioctx, pool)
        if self.namespace:
            call(raw.set_namespace, self.namespace)
        return IoCtx(self, raw, pool)

    def list_pools(self) -> list[str]:
        return list(call(self.raw.list_pools))

    def pool_exists(self, pool: str) -> bool:
        return bool(call(self.raw.pool_exists, pool))

    def get_fsid(self) -> str:
        return str(call(self.raw.get_fsid))

    def mon_command(
        self, command: str, data: bytes = b"", timeout: int = 30
    ) -> tuple[int, bytes, str]:
        code, out, status = call(self.raw.mon_command, command, data, timeout=timeout)
        return int(code), bytes(out), str(status)


class IoCtx:
    """A pool handle, shaped like ``rados.Ioctx``, with the native engine's omap calls."""

    def __init__(self, rados: Rados, raw: Any, pool: str) -> None:
        self.rados = rados
        self.raw = raw
        self.name = pool

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("raw", "rados", "name"):
            raise AttributeError(name)
        return _delegate(self.raw, name)

    def get_pool_name(self) -> str:
        return self.name

    def get_namespace(self) -> str:
        return str(call(self.raw.get_namespace))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.raw.close()

    def __enter__(self) -> IoCtx:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- omap ------------------------------------------------------------------
    def omap_get(self, obj: str, keys: list[str] | None = None) -> dict[str, bytes]:
        """Some keys (or all) of an omap object; {} when the object does not exist."""
        rados, _ = _lib()
        found: dict[str, bytes] = {}
        start = ""
        while True:
            with rados.ReadOpCtx() as op:
                if keys is not None:
                    if not keys:
                        return found
                    values, _ = call(self.raw.get_omap_vals_by_keys, op, tuple(keys))
                else:
                    values, _ = call(self.raw.get_omap_vals, op, start, "", _OMAP_PAGE)
                try:
                    call(self.raw.operate_read_op, op, obj)
                except errors.ObjectNotFound:
                    return found
                page = {str(k): bytes(v) for k, v in call(list, values)}
            found.update(page)
            if keys is not None or len(page) < _OMAP_PAGE:
                return found
            start = max(page)

    def omap_set(self, obj: str, values: dict[str, bytes], exclusive: bool = False) -> None:
        """Set keys in one operation; with ``exclusive``, ObjectExists if any is set already."""
        if not values:
            return
        rados, _ = _lib()
        with rados.WriteOpCtx() as op:
            op.new(rados.LIBRADOS_CREATE_IDEMPOTENT)
            if exclusive:
                for key in values:
                    op.omap_cmp(key, "", rados.LIBRADOS_CMPXATTR_OP_EQ)
            call(self.raw.set_omap, op, tuple(values), tuple(bytes(v) for v in values.values()))
            try:
                self.raw.operate_write_op(op, obj)
            except Exception as exc:
                overrides = {errno.ECANCELED: errors.ObjectExists} if exclusive else None
                failure = translate(exc, overrides)
                if failure is exc:
                    raise
                if isinstance(failure, errors.ObjectExists):
                    raise errors.ObjectExists(
                        f"omap key of {obj!r} exists: {sorted(values)}", errno=errno.EEXIST
                    ) from exc
                raise failure from exc

    def omap_remove(self, obj: str, keys: list[str] | None = None) -> None:
        """Remove some keys, or the whole object when ``keys`` is None; absent is fine."""
        rados, _ = _lib()
        try:
            if keys is None:
                call(self.raw.remove_object, obj)
                return
            if not keys:
                return
            with rados.WriteOpCtx() as op:
                call(self.raw.remove_omap_keys, op, tuple(keys))
                call(self.raw.operate_write_op, op, obj)
        except errors.ObjectNotFound:
            return


# ------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------
def check_name(value: object, what: str) -> str:
    """Image and snapshot names as the native engine takes them: no '/', '@' or NUL.

    librbd itself accepts ``a/b`` or ``a@b``, names no ``pool/image@snap`` spec
    (the rbd CLI, QEMU's ``rbd:``) can address.
    """
    if not isinstance(value, str) or not value:
        raise errors.InvalidArgument(f"{what} name must be a non-empty string")
    for bad in ("/", "@", "\0"):
        if bad in value:
            raise errors.InvalidArgument(f"{what} name {value!r} contains {bad!r}")
    return value


def check_size(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise errors.InvalidArgument(f"size {value!r} must be a non-negative integer")
    return value


def _progress(callback: Callable[[int, int], Any] | None) -> Callable[[int, int], int] | None:
    """A progress callback for librbd, which wants an int back (0: go on)."""
    if callback is None:
        return None

    def report(done: int, total: int) -> int:
        callback(done, total)
        return 0

    return report


def _check_range(offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise errors.InvalidArgument(f"negative offset or length ({offset}, {length})")


class Image:
    """An open image or snapshot, shaped like ``rbd.Image``.

    Differences from python-rbd, to behave as the native engine does:

    * a handle opened at a snapshot is read-only (librbd would let it create
      snapshots of the head); it is opened with librbd's ``read_only``, which
      also means it registers no watch, so it never blocks a removal;
    * a write refused because another client holds the exclusive lock (librbd
      says EROFS, as for a read-only handle) first tries to take the lock, as
      the native engine's first write does, then is ``ImageBusy``; so is
      ``lock_acquire`` while another client holds the lock;
    * ``rollback_to_snap`` works from any read-write handle (see there);
    * an operation does not leave this handle holding a lock it had to take
      after an explicit ``lock_acquire`` (see ``_maintenance``).

    Left as librbd has it: without an explicit ``lock_acquire`` librbd hands the
    exclusive lock from writer to writer on request (cooperative), where the
    native engine keeps it with the first writer until it closes, so two
    handles writing at once both succeed here. A writer that must be alone
    (the node's attach daemon) takes the lock with ``lock_acquire``; the next
    one is then ``ImageBusy`` on either engine. Read-only handles register no
    watch: they keep the size and parent they opened with.
    """

    def __init__(
        self,
        ioctx: IoCtx,
        name: str | None = None,
        snapshot: str | None = None,
        read_only: bool = False,
        image_id: str | None = None,
        *,
        snap_id: int | None = None,
    ) -> None:
        _, rbd = _lib()
        self.ioctx = ioctx
        if name is None and image_id is None:
            raise errors.InvalidArgument("an image name or id is required")
        self.read_only = read_only or snapshot is not None or snap_id is not None
        self._manual = False  # lock_acquire was called (see _maintenance)
        self.raw = call(
            rbd.Image,
            ioctx.raw,
            name,
            snapshot=snapshot,
            read_only=self.read_only,
            image_id=image_id,
        )
        ioctx.rados.images.add(self)
        if snap_id is not None:
            try:
                call(self.raw.set_snap_by_id, snap_id)
            except BaseException:
                self.close()
                raise

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("raw", "ioctx", "read_only"):
            raise AttributeError(name)
        method = _delegate(self.raw, name)
        if not callable(method) or not self._manual or name.startswith(("is_", "get_", "list")):
            return method
        return functools.partial(self._maintenance, method)

    def close(self) -> None:
        raw = self.__dict__.get("raw")
        if raw is not None:
            call(raw.close)

    def __enter__(self) -> Image:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- data path (called directly: no per-call wrapper objects) ----------------
    def read(self, offset: int, length: int, fadvise_flags: int = 0) -> bytes:
        _check_range(offset, length)
        return bytes(call(self.raw.read, offset, length, fadvise_flags))

    def write(self, data: bytes, offset: int, fadvise_flags: int = 0) -> int:
        _check_range(offset, len(data))
        return int(self._locked_write(self.raw.write, data, offset, fadvise_flags))

    def discard(self, offset: int, length: int) -> Any:
        _check_range(offset, length)
        return self._locked_write(self.raw.discard, offset, length)

    def write_zeroes(self, offset: int, length: int, zero_flags: int = 0) -> Any:
        _check_range(offset, length)
        return self._locked_write(self.raw.write_zeroes, offset, length, zero_flags)

    def flush(self) -> None:
        if self._manual:
            self._locked_write(self.raw.flush)
        else:
            call(self.raw.flush)

    def diff_iterate(
        self,
        offset: int,
        length: int,
        from_snapshot: str | None,
        iterate_cb: Callable[[int, int, bool], Any],
        include_parent: bool = True,
        whole_object: bool = False,
    ) -> None:
        """Report changed extents; an empty range reports nothing.

        (librbd 16.2 aborts the whole process, a failed ceph_assert in
        DiffIterate::execute, on an empty range with ``whole_object``.)
        """
        _check_range(offset, length)
        if length == 0:
            return
        call(
            self.raw.diff_iterate,
            offset,
            length,
            from_snapshot,
            iterate_cb,
            include_parent=include_parent,
            whole_object=whole_object,
        )

    def _locked_write(self, operation: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(operation, *args)
        except errors.ReadOnlyImage as exc:
            if self.read_only:
                raise
            if not self._manual:  # an automatic holder would have handed the lock over
                raise errors.ImageBusy(
                    "image is being written by another client (it holds the exclusive lock)",
                    errno=errno.EBUSY,
                ) from exc
        # after lock_acquire librbd no longer takes the lock for writes: take it
        self.lock_acquire(RBD_LOCK_MODE_EXCLUSIVE)
        return call(operation, *args)

    def rollback_to_snap(self, name: str) -> None:
        """Roll the head back from any read-write handle.

        librbd does not ask the lock holder to roll back (as it does for other
        maintenance operations): the handle needs the exclusive lock itself,
        and taking it with ``lock_acquire`` would leave that handle in librbd's
        manual lock mode for good. So a handle without the lock rolls back
        through a temporary handle that takes the lock (an automatic holder
        hands it over; an explicit one makes this ``ImageBusy``) and lets go
        of it when it closes.
        """
        if self.read_only:
            raise errors.ReadOnlyImage("image is open read-only (or at a snapshot)")
        try:
            self._maintenance(call, self.raw.rollback_to_snap, name)
            return
        except errors.ReadOnlyImage:
            pass
        with Image(self.ioctx, image_id=str(call(self.raw.id))) as helper:
            helper.lock_acquire(RBD_LOCK_MODE_EXCLUSIVE)
            call(helper.raw.rollback_to_snap, name)

    def _maintenance(self, operation: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run an image operation without keeping a lock it made this handle take.

        After ``lock_acquire`` librbd keeps a handle in "manual" lock mode: any
        later operation that needs the lock takes it and then refuses to hand it
        over, so a writer on another handle would be locked out for good.
        """
        held = self._lock_owner()
        try:
            return operation(*args, **kwargs)
        finally:
            if self._manual and not held and self._lock_owner():
                with contextlib.suppress(errors.Error):
                    call(self.raw.lock_release)

    def _lock_owner(self) -> bool:
        if self.read_only:
            return False
        try:
            return bool(call(self.raw.is_exclusive_lock_owner))
        except errors.Error:
            return False

    def lock_acquire(self, lock_mode: int = RBD_LOCK_MODE_EXCLUSIVE) -> None:
        if self.read_only:
            raise errors.ReadOnlyImage("image is open read-only")
        self._manual = True
        try:
            call(self.raw.lock_acquire, lock_mode)
        except errors.ReadOnlyImage as exc:
            raise errors.ImageBusy(
                "image is being written by another client (it holds the exclusive lock)",
                errno=errno.EBUSY,
            ) from exc

    # -- snapshots and metadata ----------------------------------------------------
    def create_snap(self, name: str) -> None:
        if self.read_only:
            raise errors.ReadOnlyImage("image is open read-only (or at a snapshot)")
        self._maintenance(call, self.raw.create_snap, check_name(name, "snapshot"))

    def list_snaps(self) -> list[dict[str, Any]]:
        """Every snapshot, trash-namespace ones (clone v2 leftovers) included, as librbd."""
        return list(call(lambda: list(self.raw.list_snaps())))

    def user_snaps(self) -> list[dict[str, Any]]:
        snaps = self.list_snaps()
        return [s for s in snaps if s.get("namespace", 0) == RBD_SNAP_NAMESPACE_TYPE_USER]

    def metadata_list(self) -> list[tuple[str, str]]:
        return list(call(lambda: list(self.raw.metadata_list())))

    def resize(self, size: int, allow_shrink: bool = True) -> None:
        self._maintenance(call, self.raw.resize, check_size(size), allow_shrink=allow_shrink)

    # -- layering --------------------------------------------------------------------
    def parent_spec(self) -> dict[str, Any] | None:
        """The parent's pool_name, pool_namespace, image_name, image_id and snap_name."""
        try:
            spec = dict(call(self.raw.get_parent_image_spec))
            spec["image_id"] = str(call(self.raw.parent_id))
        except errors.ImageNotFound:
            return None
        return spec

    def flatten(self, on_progress: Callable[[int, int], Any] | None = None) -> None:
        parent = self.parent_spec()
        self._maintenance(call, self.raw.flatten, on_progress=_progress(on_progress))
        if parent is not None:
            purge_parent(self.ioctx.rados, parent)


class RBD:
    """Image management, shaped like ``rbd.RBD`` (see the module notes on the trash)."""

    def __init__(self) -> None:
        _, rbd = _lib()
        self.raw = rbd.RBD()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "raw":
            raise AttributeError(name)
        return _delegate(self.raw, name)

    def list(self, ioctx: IoCtx) -> builtins.list[str]:
        return builtins.list(call(lambda: builtins.list(self.raw.list(ioctx.raw))))

    def create(
        self,
        ioctx: IoCtx,
        name: str,
        size: int,
        order: int | None = None,
        old_format: bool = False,
        features: int | None = None,
        stripe_unit: int | None = None,
        stripe_count: int | None = None,
        data_pool: str | None = None,
    ) -> None:
        call(
            self.raw.create,
            ioctx.raw,
            check_name(name, "image"),
            check_size(size),
            order=order,
            old_format=old_format,
            features=features,
            stripe_unit=stripe_unit,
            stripe_count=stripe_count,
            data_pool=data_pool,
        )

    def rename(self, ioctx: IoCtx, src: str, dest: str) -> None:
        call(self.raw.rename, ioctx.raw, src, check_name(dest, "image"))

    def clone(
        self,
        p_ioctx: IoCtx,
        p_name: str,
        p_snapname: str,
        c_ioctx: IoCtx,
        c_name: str,
        features: int | None = None,
        order: int | None = None,
        stripe_unit: int | None = None,
        stripe_count: int | None = None,
        data_pool: str | None = None,
        clone_format: int | None = None,
    ) -> None:
        """A copy-on-write child; clone format 2 (set on every connection).

        librbd refuses a child with smaller objects than its parent's (EINVAL);
        that is checked first, to say so.
        """
        if clone_format not in (None, 2):
            raise errors.InvalidArgument("only clone format 2 is supported")
        check_name(c_name, "image")
        if order:
            with Image(p_ioctx, p_name, snapshot=p_snapname) as parent:
                parent_order = int(parent.stat()["order"])
            if order < parent_order:
                raise errors.InvalidArgument(
                    f"librbd cannot clone {p_name}@{p_snapname} (objects of 2^{parent_order} "
                    f"bytes) into smaller objects (2^{order})"
                )
        call(
            self.raw.clone,
            p_ioctx.raw,
            p_name,
            p_snapname,
            c_ioctx.raw,
            c_name,
            features=features,
            order=order,
            stripe_unit=stripe_unit,
            stripe_count=stripe_count,
            data_pool=data_pool,
        )

    def remove(self, ioctx: IoCtx, name: str, on_progress: Any = None) -> None:
        """Remove an image; ImageBusy while trashed snapshots of it still have clones."""
        parent: dict[str, Any] | None = None
        with contextlib.suppress(errors.Error):
            with Image(ioctx, name, read_only=True) as image:
                parent = image.parent_spec()
        try:
            with ioctx.rados.remove_lock:
                call(self.raw.remove, ioctx.raw, name, on_progress=_progress(on_progress))
        except errors.ImageHasSnapshots as exc:
            with Image(ioctx, name, read_only=True) as image:
                if image.user_snaps():
                    raise
            raise errors.ImageBusy(
                f"image {name} has clones; flatten or remove them first, or move it to the trash",
                errno=errno.EBUSY,
            ) from exc
        if parent is not None:
            purge_parent(ioctx.rados, parent)

    def trash_move(self, ioctx: IoCtx, name: str, delay: int = 0) -> None:
        """Hide an image in the trash; it is removed once no clone needs it (as natively).

        librbd's own ``trash_move`` keeps an image in the trash until someone
        removes it (``rbd trash rm``/``purge``), even after its last clone is
        gone. librbd removes a trashed image by itself only when it got there
        through ``rbd remove`` with ``rbd_move_parent_to_trash_on_remove``
        (trash source "user_parent"), which librbd allows only for an image whose
        snapshots are all trashed clone-v2 snapshots. So:

        * no user snapshots (the control plane's case: it removes its snapshots
          first): removed through that path: gone at once without clones, or
          trashed as "user_parent" and removed by librbd when its last clone is
          removed or flattened, whoever does it;
        * user snapshots left: librbd's ``trash_move`` after marking the image
          (metadata ``csi-rbd.trash-auto-remove``); this engine removes marked
          images once no clone needs them, after removing or flattening one of
          their clones through it, or in :meth:`purge_trash`.

        ImageBusy if another client holds the image's exclusive lock.
        """
        with Image(ioctx, name, read_only=True) as image:
            user = bool(image.user_snaps())
        if user:
            with Image(ioctx, name) as image:
                image.metadata_set(TRASH_MARK, "1")
            call(self.raw.trash_move, ioctx.raw, name, delay)
            return
        option = "rbd_move_parent_to_trash_on_remove"
        with ioctx.rados.remove_lock:
            previous = call(ioctx.rados.raw.conf_get, option)
            call(ioctx.rados.raw.conf_set, option, "true")
            try:
                self.remove(ioctx, name)
            finally:
                call(ioctx.rados.raw.conf_set, option, previous)

    def trash_list(self, ioctx: IoCtx) -> builtins.list[dict[str, Any]]:
        """The pool's trash: dicts with id, name, source, deletion/deferment times.

        Read from the ``rbd_trash`` object's omap, not through python-rbd: its
        16.2 ``trash_list``/``trash_get`` raise IndexError on any entry whose
        source is "user_parent" (it knows only the first four sources), which
        is exactly what :meth:`trash_move` makes.
        """
        entries = []
        for key, value in sorted(ioctx.omap_get(TRASH_OBJECT).items()):
            if key.startswith("id_"):
                entries.append({"id": key[3:], **decode_trash_spec(value)})
        return entries

    def trash_remove(self, ioctx: IoCtx, image_id: str, force: bool = False) -> None:
        """Remove a trashed image now; ImageBusy while clones still need it."""
        try:
            call(self.raw.trash_remove, ioctx.raw, image_id, force)
        except errors.ImageHasSnapshots as exc:
            with Image(ioctx, image_id=image_id, read_only=True) as image:
                if image.user_snaps():
                    raise
            raise errors.ImageBusy(f"trashed image {image_id} still has clones") from exc

    def purge_trash(self, ioctx: IoCtx) -> builtins.list[str]:
        """Remove the images this engine trashed that no clone needs any more; their ids."""
        removed = []
        for entry in self.trash_list(ioctx):
            if _purge_marked(self, ioctx, str(entry["id"])):
                removed.append(str(entry["id"]))
        return removed


TRASH_OBJECT = "rbd_trash"
TRASH_SOURCES = ("USER", "MIRRORING", "MIGRATION", "REMOVING", "USER_PARENT")
TRASH_STATES = ("NORMAL", "MOVING", "REMOVING", "RESTORING")


def decode_trash_spec(value: bytes) -> dict[str, Any]:
    """cls_rbd's TrashImageSpec: ENCODE_START header, then source (u8), name
    (u32 length + bytes), deletion and deferment-end times (utime_t: u32
    seconds, u32 nanoseconds) and, from version 2, state (u8)."""
    view = memoryview(value)
    version = view[0]
    if len(view) < 7:
        raise errors.IOError("a truncated trash entry")
    at = 6  # struct_v, compat, length
    source = view[at]
    at += 1
    (length,) = struct.unpack_from("<I", view, at)
    at += 4
    name = bytes(view[at : at + length]).decode()
    at += length
    deleted, _, deferred, _ = struct.unpack_from("<IIII", view, at)
    at += 16
    state = view[at] if version >= 2 and at < len(view) else 0
    return {
        "name": name,
        "source": TRASH_SOURCES[source] if source < len(TRASH_SOURCES) else str(source),
        "deletion_time": datetime.fromtimestamp(deleted, UTC).replace(tzinfo=None),
        "deferment_end_time": datetime.fromtimestamp(deferred, UTC).replace(tzinfo=None),
        "state": TRASH_STATES[state] if state < len(TRASH_STATES) else str(state),
    }


def _purge_marked(rbd: RBD, ioctx: IoCtx, image_id: str) -> bool:
    """Remove a trashed image carrying TRASH_MARK once none of its snapshots has clones."""
    try:
        with Image(ioctx, image_id=image_id) as image:
            if dict(image.metadata_list()).get(TRASH_MARK) != "1":
                return False
            for snap in image.user_snaps():
                with Image(ioctx, image_id=image_id, snapshot=snap["name"], read_only=True) as s:
                    if s.list_children():
                        continue
                if image.is_protected_snap(snap["name"]):
                    image.unprotect_snap(snap["name"])
                image.remove_snap(snap["name"])
            if image.user_snaps():
                return False
        rbd.trash_remove(ioctx, image_id)
    except (errors.ImageBusy, errors.ImageNotFound, errors.ImageHasSnapshots):
        return False
    return True


def purge_parent(rados: Rados, parent: Mapping[str, Any]) -> None:
    """After a child let go of ``parent``: remove it if this engine trashed it and it is free.

    (python-rbd 16.2's parent spec has no "in the trash" flag: the pool's trash
    directory is asked, one omap key.)
    """
    try:
        ioctx = rados.open_ioctx(str(parent["pool_name"]))
    except errors.Error:
        return
    try:
        if parent.get("pool_namespace", "") != ioctx.get_namespace():
            call(ioctx.raw.set_namespace, str(parent.get("pool_namespace", "")))
        image_id = str(parent["image_id"])
        if ioctx.omap_get(TRASH_OBJECT, [f"id_{image_id}"]):
            _purge_marked(RBD(), ioctx, image_id)
    except errors.Error as exc:
        log.info("could not purge trashed parent %s: %s", parent.get("image_id"), exc)
    finally:
        ioctx.close()
