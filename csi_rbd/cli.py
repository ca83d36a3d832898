"""The ``csi-rbd`` command line: ``csi-rbd [--data-dir DIR] GROUP COMMAND ...``.

The parser is assembled from the command modules in :mod:`csi_rbd.admin`;
this module only dispatches and turns failures into one line on stderr and an
exit status (an errno value, like Ceph's ``rbd``; 2 for usage errors).

Adding a top-level command (such as ``serve``): write a function that takes
the top-level subparsers and registers the command with
:func:`csi_rbd.admin.command.add_command`, and append it to :data:`COMMANDS`.
Its handler gets the :class:`~csi_rbd.admin.context.Context` (which opens the
engine only if asked) and the parsed arguments, ``--data-dir`` included::

    def register_serve(top: Subparsers) -> None:
        parser = add_command(top, "serve", lambda ctx, args: serve.run(args), "run the driver")
        serve.add_arguments(parser)
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from csi_rbd import __version__, serve
from csi_rbd.admin import clones, diffs, images, nbd, pools, qemu, snaps, transfer
from csi_rbd.admin.command import add_output_options
from csi_rbd.admin.context import DATA_DIR_ENV, DEFAULT_DATA_DIR, Context
from csi_rbd.admin.errors import CliError
from csi_rbd.admin.output import Output
from csi_rbd.engine import errors

if TYPE_CHECKING:
    from csi_rbd.admin.command import Subparsers

PROG = "csi-rbd"

Registrar = Callable[["Subparsers"], None]

# `csi-rbd GROUP COMMAND ...`: each registrar adds its commands to the group.
GROUPS: list[tuple[str, str, tuple[Registrar, ...]]] = [
    (
        "image",
        "manage images",
        (images.register, clones.register, diffs.register, transfer.register),
    ),
    ("snap", "manage snapshots", (snaps.register,)),
    ("pool", "manage pools", (pools.register,)),
    ("qemu", "give volumes to QEMU", (qemu.register,)),
    ("nbd", "serve images over NBD", (nbd.register,)),
]

# `csi-rbd COMMAND ...`: top-level commands (the place for `serve`).
COMMANDS: list[Registrar] = [serve.register]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Manage the images of a csi-rbd native data directory."
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "--data-dir",
        default=os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR,
        help=f"data directory (env {DATA_DIR_ENV}; default: {DEFAULT_DATA_DIR})",
    )
    add_output_options(parser, suppress=False)
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help, registrars in GROUPS:
        group = top.add_parser(name, help=help, description=help)
        commands = group.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)
        for register in registrars:
            register(commands)
    for register in COMMANDS:
        register(top)
    return parser


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.stderr.flush()
    return code if 0 < code < 256 else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (also for usage errors and --help)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    ctx = Context(
        args.data_dir,
        Output(args.format, args.pretty_format),
        progress=not args.no_progress,
    )
    try:
        return args.handler(ctx, args) or 0
    except CliError as exc:
        return _fail(exc.message, exc.code)
    except errors.Error as exc:
        code = getattr(exc, "errno", None) or errno.EIO
        return _fail(str(exc) or type(exc).__name__, code)
    except BrokenPipeError:
        _silence_stdout()
        return errno.EPIPE
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror or exc}", exc.errno or errno.EIO)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    finally:
        ctx.close()


def _silence_stdout() -> None:
    """After EPIPE, point stdout at /dev/null so the interpreter's final flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
