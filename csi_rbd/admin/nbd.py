"""``csi-rbd nbd serve``: export one image (or snapshot) over NBD until signalled.

    csi-rbd --data-dir DIR nbd serve POOL/IMAGE[@SNAP] (--socket PATH | --bind 127.0.0.1:PORT)
        [--cache none|writethrough|writeback] [--discard unmap|ignore] [--read-only]

A writable export takes the image's exclusive write lock for its whole life
(a second writer, here or in an attach daemon, gets EBUSY). Once listening it
prints one line, ``serving SPEC at URI``, on stdout. SIGTERM or SIGINT stop it
cleanly: no new connections, in-flight requests answered, the cache flushed,
the image closed; the exit status is then 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import TYPE_CHECKING

from csi_rbd.admin import errors as cli_errors
from csi_rbd.admin.command import add_command
from csi_rbd.admin.context import Context
from csi_rbd.admin.specs import Snap, parse_image_spec
from csi_rbd.engine import errors
from csi_rbd.node.cache import MODES, open_cached
from csi_rbd.node.nbd import DISCARD_MODES, Address, Export, NbdServer
from csi_rbd.node.nbd.server import LOOPBACK

if TYPE_CHECKING:
    from csi_rbd.admin.command import Subparsers

log = logging.getLogger("csi-rbd.nbd")


def register(subparsers: Subparsers) -> None:
    serve = add_command(subparsers, "serve", serve_image, "export an image over NBD")
    serve.add_argument("spec", metavar="POOL/IMAGE[@SNAP]")
    where = serve.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", metavar="PATH", help="listen on this unix socket")
    where.add_argument(
        "--bind", metavar=f"{LOOPBACK}:PORT", help=f"listen on TCP {LOOPBACK}:PORT (0: any port)"
    )
    serve.add_argument("--cache", choices=MODES, default="none", help="cache mode (none)")
    serve.add_argument(
        "--discard",
        choices=DISCARD_MODES,
        default="unmap",
        help="unmap: TRIM frees space; ignore: TRIM is accepted and dropped (unmap)",
    )
    serve.add_argument("--read-only", action="store_true", help="refuse writes")
    serve.add_argument("--workers", type=int, default=8, help=argparse.SUPPRESS)
    serve.add_argument("--log-level", default="WARNING", help="log level on stderr (WARNING)")


def parse_bind(text: str) -> int:
    """The port of ``127.0.0.1:PORT``; nothing but the loopback address is accepted."""
    host, colon, port = text.rpartition(":")
    if not colon or host != LOOPBACK or not port.isdigit() or int(port) > 65535:
        raise cli_errors.invalid(f"--bind takes {LOOPBACK}:PORT, not {text!r}")
    return int(port)


def serve_image(ctx: Context, args: argparse.Namespace) -> None:
    spec = parse_image_spec(args.spec, Snap.PERMITTED)
    address = Address(port=parse_bind(args.bind)) if args.bind else Address(args.socket)
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="%(asctime)s csi-rbd-nbd[%(process)d] %(levelname)s %(message)s",
    )
    read_only = args.read_only or spec.snap is not None
    with ctx.open_image(spec, read_only=read_only) as image:
        if not read_only:
            try:
                image.lock_acquire()
            except errors.ImageBusy:
                raise cli_errors.busy(f"image {spec} is being written by another client") from None
        cache = open_cached(image, args.cache)
        try:
            export = Export(cache, str(spec), read_only=read_only, discard=args.discard)
            _serve(export, address, args.workers)
        finally:
            cache.close()  # the final flush


def _serve(export: Export, address: Address, workers: int) -> None:
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server = NbdServer(export, address, workers=workers)
        try:
            server.start()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise cli_errors.CliError(f"cannot listen: {reason}", exc.errno or 1) from exc
        try:
            print(f"serving {export.name} at {server.uri}", flush=True)
            while not stop.wait(0.5):
                pass
        finally:
            server.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
