"""``image du`` and ``image diff``."""

from __future__ import annotations

import argparse
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from csi_rbd.admin.command import add_command
from csi_rbd.admin.context import Context
from csi_rbd.admin.output import Column, human_size, json_bool, table
from csi_rbd.admin.specs import DEFAULT_POOL, ImageSpec, Snap, check_name, parse_image_spec
from csi_rbd.engine import usage
from csi_rbd.engine.native import Image

if TYPE_CHECKING:
    from csi_rbd.admin.command import Subparsers


def register(subparsers: Subparsers) -> None:
    du = add_command(subparsers, "du", disk_usage, "provisioned and used space", ["disk-usage"])
    du.add_argument(
        "target",
        metavar="POOL[/IMAGE[@SNAP]]",
        nargs="?",
        help=f"a pool (default: {DEFAULT_POOL}) or one image or snapshot",
    )

    diff = add_command(subparsers, "diff", diff_image, "list the extents that hold data")
    diff.add_argument("--from-snap", metavar="SNAP", help="only what changed since SNAP")
    diff.add_argument("--whole-object", action="store_true", help="report whole objects")
    diff.add_argument("spec", metavar="POOL/IMAGE[@SNAP]")


def disk_usage(ctx: Context, args: argparse.Namespace) -> None:
    pool, spec = _du_target(ctx, args.target or DEFAULT_POOL)
    ioctx = ctx.ioctx(pool)

    def open_image(name: str, snap: str | None) -> AbstractContextManager[usage.UsageImage]:
        return Image(ioctx, name, snapshot=snap, read_only=True)

    if spec is None:
        result = usage.pool_usage(open_image, ctx.rbd.list(ioctx))
    else:
        ctx.require(spec)
        with ctx.explain(spec):
            result = usage.PoolUsage(usage.image_usage(open_image, spec.image, spec.snap))
    rows = [
        [
            f"{u.name}@{u.snapshot}" if u.snapshot is not None else u.name,
            human_size(u.provisioned_size),
            human_size(u.used_size),
        ]
        for u in result.images
    ]
    if len(rows) > 1:
        rows.append(
            [
                "<TOTAL>",
                human_size(result.total_provisioned_size),
                human_size(result.total_used_size),
            ]
        )
    columns = [Column("NAME"), Column("PROVISIONED", True), Column("USED", True)]
    ctx.output.show(result.to_json(), table(columns, rows) if rows else "")


def _du_target(ctx: Context, target: str) -> tuple[str, ImageSpec | None]:
    """(pool, image spec or None for the whole pool) of ``pool``, ``pool/image[@snap]``
    or ``image@snap``. A bare name that is no pool but an image of the default pool
    means that image, as ``rbd du IMAGE`` does."""
    if "/" in target or "@" in target:
        spec = parse_image_spec(target, Snap.PERMITTED)
        return spec.pool, spec
    check_name(target, "pool")
    pools = ctx.rados.list_pools()
    if target not in pools and DEFAULT_POOL in pools:
        fallback = ImageSpec(DEFAULT_POOL, target)
        if ctx.image_exists(fallback):
            return DEFAULT_POOL, fallback
    return target, None


def diff_image(ctx: Context, args: argparse.Namespace) -> None:
    spec = parse_image_spec(args.spec, Snap.PERMITTED)
    if args.from_snap is not None:
        check_name(args.from_snap, "snapshot")
        ctx.require(spec.at(args.from_snap))
    extents: list[tuple[int, int, bool]] = []
    with ctx.open_image(spec, read_only=True) as image:
        image.diff_iterate(
            0,
            image.size(),
            args.from_snap,
            lambda offset, length, exists: extents.append((offset, length, exists)),
            include_parent=True,
            whole_object=args.whole_object,
        )
    data: list[dict[str, Any]] = [
        {"offset": offset, "length": length, "exists": json_bool(exists)}
        for offset, length, exists in extents
    ]
    columns = [Column("Offset"), Column("Length"), Column("Type")]
    plain = table(
        columns,
        [[offset, length, "data" if exists else "zero"] for offset, length, exists in extents],
    )
    ctx.output.show(data, plain if extents else "")
