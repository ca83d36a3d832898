"""Registering subcommands: every leaf command shares the global output options.

Options given after the subcommand override the global ones; they default to
``argparse.SUPPRESS`` there so that an absent one does not reset a global value.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from csi_rbd.admin.output import FORMATS

if TYPE_CHECKING:
    from csi_rbd.admin.context import Context

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

Handler = Callable[["Context", argparse.Namespace], int | None]


def add_output_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--format", choices=FORMATS, default=default("plain"), help="output format (plain)"
    )
    parser.add_argument(
        "--pretty-format",
        action="store_true",
        default=default(False),
        help="indented JSON (implies --format json)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", default=default(False), help="hide progress bars"
    )


def _leaf_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--data-dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    add_output_options(parent, suppress=True)
    return parent


_LEAF_OPTIONS = _leaf_options()


def add_command(
    subparsers: Subparsers,
    name: str,
    handler: Handler,
    help: str,
    aliases: Sequence[str] = (),
) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name, aliases=list(aliases), help=help, description=help, parents=[_LEAF_OPTIONS]
    )
    parser.set_defaults(handler=handler)
    return parser
