"""The attach daemon: one process serving one image as a file over FUSE.

Protocol
--------
``python -m csi_rbd.node.attach_daemon (--data-dir D | --cluster-fd N) --pool P
--image I --mountpoint M [--read-only] [--discard unmap|ignore]
[--cache none|writethrough|writeback] [--break-lock OWNER] [--shared]
[--ready-file F]``

``--data-dir`` names a native engine's data directory. ``--cluster-fd`` names
an inherited pipe holding JSON ``{"cluster": <a config file cluster entry>,
"secrets": {"userID": ..., "userKey": ...}}``: any engine, and credentials
that never appear on a command line or on disk (the Ceph engine turns them
into a 0600 keyring that lives only while it connects).

1. Opens the engine (``Rados`` -> ioctx -> ``Image``). Unless read-only it takes
   the image's exclusive write lock at once (``lock_acquire``): while this
   process lives no other client can write the image. A native lock is an
   OFD lock that goes away with the process, even on kill -9; a Ceph lock
   outlives a killed client until its watch times out, so a starter that
   knows the previous daemon is dead passes that daemon's lock owner as
   ``--break-lock`` and the lock is broken first if (and only if) that owner
   still holds it. A lock held by anyone else ends the daemon with exit code
   3 and one line on stderr; a missing image or pool with 4; anything else
   with 1. With ``--shared`` (a block volume other nodes may write too, on
   Ceph) no lock is taken: librbd passes the exclusive lock from writer to
   writer, each flushing its cache before it lets go.
2. Puts the image behind the block cache of the volume's mode, librbd's
   meaning of ``none``, ``writethrough`` and ``writeback``: the node's own
   (:func:`csi_rbd.node.cache.open_cached`) on the native engine, librbd's
   cache on the Ceph engine (:meth:`Engine.for_data_path`).
3. Mounts a FUSE filesystem at M holding one file, ``M/image`` (see
   :mod:`.fuse_image`), and serves it with a pool of threads. A flush from
   the kernel (the loop device's REQ_OP_FLUSH becomes ``fsync`` of the file)
   is ``CachedImage.flush()``: dirty data is written back, then the engine
   makes it durable.
4. When the kernel has answered FUSE_INIT, writes F atomically (temp file +
   rename) with ``{"pid", "mountpoint", "size", "read_only", "discard",
   "cache", "lock_owner"}``: the starter waits for this file, not for the process to exit.
5. Serves until the mount is unmounted (``umount M``: the normal way to stop
   it) or until SIGTERM/SIGINT/SIGHUP (libfuse then unmounts lazily). Then it
   flushes the cache and the image, closes them, removes F and exits 0.

Independence: the starter runs it in a new session (``start_new_session``)
with stdin on /dev/null and stdout/stderr on a log file, never a pipe, so a
kill -9 of the starter (the node plugin) changes nothing for the daemon or
the loop device and mounts above it. The FUSE option ``auto_unmount`` is not
used: it would run ``fusermount3`` as a helper tied to this process and
lazily detach the mount when the daemon dies, which makes a crash harder to
see and to clean up; the stager unmounts stale mounts itself.

Crash behaviour: if this process dies, the kernel aborts the FUSE
connection. Everything above it then fails with EIO (or ENOTCONN when
stat-ing ``M``) until the stager re-attaches the volume with a new daemon.
Whatever a completed ``fsync`` (a flush) covered is durable in the engine in
every cache mode, so nothing acknowledged by ``fsync`` is lost; with
``writeback``, writes acknowledged since the last flush may be lost, as with
librbd's cache (with ``writethrough`` and ``none`` they are in the engine's
object files, in the host's page cache at worst). The daemon
never touches its own mount point (a FUSE server doing I/O on its own mount
can deadlock).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from csi_rbd.config import DEFAULT_CLUSTER_ID, ClusterConfig, ConfigError, cluster_from_mapping
from csi_rbd.engine import errors as engine_errors
from csi_rbd.engine.base import Engine
from csi_rbd.node.cache import MODES as CACHE_MODES
from csi_rbd.node.daemon_protocol import (
    DISCARD_MODES,
    EXIT_BUSY,
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    MODULE,
)

log = logging.getLogger("attach-daemon")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=MODULE, description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", help="native engine data directory")
    source.add_argument(
        "--cluster-fd", type=int, help="inherited fd with the cluster and secrets as JSON"
    )
    parser.add_argument("--pool", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--mountpoint", required=True, help="an empty directory to mount at")
    parser.add_argument("--read-only", action="store_true")
    parser.add_argument("--discard", choices=DISCARD_MODES, default="unmap")
    parser.add_argument("--cache", choices=CACHE_MODES, default="none")
    parser.add_argument("--ready-file", help="written atomically once the mount serves")
    parser.add_argument(
        "--break-lock", metavar="OWNER", help="a dead client whose exclusive lock to break"
    )
    parser.add_argument(
        "--shared", action="store_true", help="other clients may write: take no exclusive lock"
    )
    parser.add_argument(
        "--threads", type=int, help="FUSE worker threads (default: the engine's io_threads)"
    )
    return parser.parse_args(argv)


def write_ready_file(path: Path, info: dict[str, object]) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temp, "w", encoding="utf-8") as handle:
        json.dump(info, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def read_cluster(args: argparse.Namespace) -> tuple[ClusterConfig, dict[str, str] | None]:
    """The cluster to open and the secrets to open it with."""
    if args.data_dir:
        return ClusterConfig(DEFAULT_CLUSTER_ID, "native", data_dir=Path(args.data_dir)), None
    with os.fdopen(args.cluster_fd, "rb") as pipe:
        settings = json.loads(pipe.read())
    if not isinstance(settings, dict):
        raise ConfigError("--cluster-fd: expected a JSON object")
    secrets = settings.get("secrets") or None
    if secrets is not None and not (
        isinstance(secrets, dict) and all(isinstance(v, str) for v in secrets.values())
    ):
        raise ConfigError("--cluster-fd: secrets must map names to strings")
    return cluster_from_mapping(settings.get("cluster"), "--cluster-fd"), secrets


def _fail(code: int, message: str) -> int:
    print(f"attach-daemon: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s attach-daemon[%(process)d] %(levelname)s %(message)s",
    )
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    # before libfuse loads: pick libfuse3
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    from csi_rbd.engine.factory import build_engine
    from csi_rbd.node import mounts

    name = f"{args.pool}/{args.image}"
    mountpoint = os.path.abspath(args.mountpoint)
    if not os.path.isdir(mountpoint):
        return _fail(EXIT_FAILED, f"mount point {mountpoint} is not a directory")
    if mounts.is_mounted(mountpoint):  # from /proc: a dead FUSE mount does not answer lstat
        return _fail(EXIT_FAILED, f"something is already mounted at {mountpoint}")
    try:
        cluster_config, secrets = read_cluster(args)
        engine, cache_mode = build_engine(cluster_config).for_data_path(args.cache)
    except (ConfigError, OSError, ValueError) as exc:
        return _fail(EXIT_FAILED, f"cannot read the cluster settings: {exc}")
    opened = contextlib.ExitStack()  # closed in reverse: image, ioctx, session, engine
    try:
        opened.callback(engine.close)
        cluster = opened.enter_context(engine.session(secrets))
        ioctx = cluster.open_ioctx(args.pool)
        opened.callback(ioctx.close)
        image = engine.open_image(ioctx, args.image, read_only=args.read_only)
        opened.callback(image.close)
        settings = engine.data_path_settings(cluster)
        if settings:
            log.info("%s engine settings: %s", engine.kind, json.dumps(settings, sort_keys=True))
    except (engine_errors.ImageNotFound, engine_errors.ObjectNotFound) as exc:
        opened.close()
        return _fail(EXIT_NOT_FOUND, f"image {name} not found: {exc}")
    except engine_errors.Error as exc:
        opened.close()
        return _fail(EXIT_FAILED, f"cannot open image {name}: {exc}")
    try:
        return _serve(args, engine, image, cache_mode, name, mountpoint)
    finally:
        opened.close()


def _serve(
    args: argparse.Namespace,
    engine: Engine,
    image: Any,
    cache_mode: str,
    name: str,
    mountpoint: str,
) -> int:
    from csi_rbd.node.cache import CachedImage, open_cached
    from csi_rbd.node.fuse_image import ImageFile, serve

    lock_owner = None
    try:
        if not args.read_only and not args.shared:
            try:
                if args.break_lock:
                    engine.break_lock(image, args.break_lock)
                image.lock_acquire()
            except engine_errors.ImageBusy as exc:
                return _fail(EXIT_BUSY, f"image {name} is busy (locked by another writer): {exc}")
            lock_owner = engine.lock_owner(image)
        cached: CachedImage = open_cached(image, cache_mode)
        ready_file = Path(args.ready_file) if args.ready_file else None
        served = []

        def ready() -> None:
            served.append(True)
            if ready_file is not None:
                write_ready_file(
                    ready_file,
                    {
                        "pid": os.getpid(),
                        "mountpoint": mountpoint,
                        "size": image.size(),
                        "read_only": args.read_only,
                        "discard": args.discard,
                        "cache": args.cache,
                        "lock_owner": lock_owner,
                    },
                )
            log.info(
                "serving %s at %s (discard=%s, cache=%s)",
                name,
                mountpoint,
                args.discard,
                args.cache,
            )

        operations = ImageFile(
            cached, read_only=args.read_only, discard=args.discard, on_ready=ready
        )
        try:
            serve(
                operations,
                mountpoint,
                fsname=f"csi-rbd:{name}",
                read_only=args.read_only,
                threads=args.threads or engine.io_threads,
            )
        except RuntimeError as exc:
            if not served:
                return _fail(EXIT_FAILED, f"cannot mount FUSE at {mountpoint} (libfuse: {exc})")
            # fuse_main returns 8 when its loop ends on a signal too
            log.info("FUSE loop ended: %s", exc)
        cached.close()  # writes back what is dirty and flushes the image
        log.info("stopped serving %s; flushed", name)
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)
        return EXIT_OK
    except engine_errors.Error as exc:
        return _fail(EXIT_FAILED, f"{name}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
