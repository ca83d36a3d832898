"""``pool create|ls|rm``."""

from __future__ import annotations

import argparse
import errno
from typing import TYPE_CHECKING

from csi_rbd.admin import errors as cli_errors
from csi_rbd.admin.command import add_command
from csi_rbd.admin.context import Context
from csi_rbd.admin.specs import ImageSpec, check_name
from csi_rbd.engine import errors

if TYPE_CHECKING:
    from csi_rbd.admin.command import Subparsers


def register(subparsers: Subparsers) -> None:
    create = add_command(subparsers, "create", create_pool, "create a pool")
    create.add_argument("pool", metavar="POOL")

    add_command(subparsers, "ls", list_pools, "list the pools", ["list"])

    rm = add_command(subparsers, "rm", remove_pool, "remove a pool", ["remove", "delete"])
    rm.add_argument("--force", action="store_true", help="remove the pool even if it holds images")
    rm.add_argument("pool", metavar="POOL")


def create_pool(ctx: Context, args: argparse.Namespace) -> None:
    pool = check_name(args.pool, "pool")
    try:
        ctx.rados.create_pool(pool)
    except errors.ObjectExists:
        raise cli_errors.exists(f"pool {pool} already exists") from None


def list_pools(ctx: Context, args: argparse.Namespace) -> None:
    pools = ctx.rados.list_pools()
    ctx.output.show(pools, "\n".join(pools))


def remove_pool(ctx: Context, args: argparse.Namespace) -> None:
    pool = check_name(args.pool, "pool")
    names = ctx.rbd.list(ctx.ioctx(pool))
    if names and not args.force:
        raise cli_errors.CliError(
            f"pool {pool} is not empty ({len(names)} image{'s' if len(names) > 1 else ''}); "
            f"remove {'them' if len(names) > 1 else 'it'} first or pass --force",
            errno.ENOTEMPTY,
        )
    outside = [
        f"{child_pool}/{child}"
        for name in names
        for child_pool, child in _children(ctx, ImageSpec(pool, name))
        if child_pool != pool
    ]
    if outside:
        raise cli_errors.busy(
            f"pool {pool} has images cloned into other pools ({', '.join(outside)}); "
            "flatten or remove those clones first"
        )
    try:
        ctx.rados.delete_pool(pool)
    except errors.ObjectNotFound:
        raise cli_errors.not_found(f"pool {pool} does not exist") from None


def _children(ctx: Context, spec: ImageSpec) -> list[tuple[str, str]]:
    try:
        with ctx.open_image(spec, read_only=True) as image:
            return image.list_children()
    except cli_errors.CliError:
        return []  # removed meanwhile
