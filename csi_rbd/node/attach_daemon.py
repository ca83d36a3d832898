"""The attach daemon: one process serving one image as a file over FUSE.

Protocol
--------
``python -m csi_rbd.node.attach_daemon --data-dir D --pool P --image I
--mountpoint M [--read-only] [--discard unmap|ignore]
[--cache none|writethrough|writeback] [--ready-file F]``

1. Opens the engine (``Rados`` -> ioctx -> ``Image``). Unless read-only it takes
   the image's exclusive write lock at once (``lock_acquire``): while this
   process lives no other handle on the node can write the image, and since
   the lock is an OFD lock it goes away with the process, even on kill -9.
   A lock held elsewhere ends the daemon with exit code 3 and one line on
   stderr; a missing image or pool with 4; anything else with 1.
2. Puts the image behind the block cache of the volume's mode
   (:func:`csi_rbd.node.cache.open_cached`; librbd's meaning of ``none``,
   ``writethrough`` and ``writeback``).
3. Mounts a FUSE filesystem at M holding one file, ``M/image`` (see
   :mod:`.fuse_image`), and serves it with a pool of threads. A flush from
   the kernel (the loop device's REQ_OP_FLUSH becomes ``fsync`` of the file)
   is ``CachedImage.flush()``: dirty data is written back, then the engine
   makes it durable.
4. When the kernel has answered FUSE_INIT, writes F atomically (temp file +
   rename) with ``{"pid", "mountpoint", "size", "read_only", "discard",
   "cache"}``: the starter waits for this file, not for the process to exit.
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
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from csi_rbd.engine import errors as engine_errors
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
    parser.add_argument("--data-dir", required=True, help="native engine data directory")
    parser.add_argument("--pool", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--mountpoint", required=True, help="an empty directory to mount at")
    parser.add_argument("--read-only", action="store_true")
    parser.add_argument("--discard", choices=DISCARD_MODES, default="unmap")
    parser.add_argument("--cache", choices=CACHE_MODES, default="none")
    parser.add_argument("--ready-file", help="written atomically once the mount serves")
    parser.add_argument("--threads", type=int, default=16, help="FUSE worker threads")
    return parser.parse_args(argv)


def write_ready_file(path: Path, info: dict[str, object]) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temp, "w", encoding="utf-8") as handle:
        json.dump(info, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


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
    from csi_rbd.engine.native import Image, Rados
    from csi_rbd.node import mounts
    from csi_rbd.node.cache import CachedImage, open_cached
    from csi_rbd.node.fuse_image import ImageFile, serve

    name = f"{args.pool}/{args.image}"
    mountpoint = os.path.abspath(args.mountpoint)
    if not os.path.isdir(mountpoint):
        return _fail(EXIT_FAILED, f"mount point {mountpoint} is not a directory")
    if mounts.is_mounted(mountpoint):  # from /proc: a dead FUSE mount does not answer lstat
        return _fail(EXIT_FAILED, f"something is already mounted at {mountpoint}")
    try:
        cluster = Rados(data_dir=args.data_dir)
        cluster.connect()
        ioctx = cluster.open_ioctx(args.pool)
        image = Image(ioctx, args.image, read_only=args.read_only)
    except (engine_errors.ImageNotFound, engine_errors.ObjectNotFound) as exc:
        return _fail(EXIT_NOT_FOUND, f"image {name} not found: {exc}")
    except engine_errors.Error as exc:
        return _fail(EXIT_FAILED, f"cannot open image {name}: {exc}")
    try:
        if not args.read_only:
            try:
                image.lock_acquire()
            except engine_errors.ImageBusy as exc:
                return _fail(EXIT_BUSY, f"image {name} is busy (locked by another writer): {exc}")
        cached: CachedImage = open_cached(image, args.cache)
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
                threads=args.threads,
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
    finally:
        image.close()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
