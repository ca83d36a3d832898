"""``image create|ls|info|resize|rm|rename``."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from csi_rbd.admin import errors as cli_errors
from csi_rbd.admin.command import add_command
from csi_rbd.admin.context import Context
from csi_rbd.admin.output import Column, human_size, json_bool, table, yes_no
from csi_rbd.admin.specs import (
    DEFAULT_POOL,
    ImageSpec,
    Snap,
    check_order,
    feature_names,
    order_of,
    parse_features,
    parse_image_spec,
    parse_size,
)
from csi_rbd.engine import errors
from csi_rbd.engine.native import Image

if TYPE_CHECKING:
    from csi_rbd.admin.command import Subparsers


def register(subparsers: Subparsers) -> None:
    create = add_command(subparsers, "create", create_image, "create an empty (thin) image")
    create.add_argument("--size", "-s", required=True, help="size, e.g. 10G (no suffix: MiB)")
    add_layout_options(create)
    create.add_argument("spec", metavar="POOL/IMAGE")

    ls = add_command(subparsers, "ls", list_images, "list the images of a pool", ["list"])
    ls.add_argument("-l", "--long", action="store_true", help="sizes, parents and snapshots too")
    ls.add_argument("pool_arg", metavar="POOL", nargs="?", help=f"default: {DEFAULT_POOL}")
    ls.add_argument("-p", "--pool", help=argparse.SUPPRESS)

    info = add_command(subparsers, "info", show_info, "show an image or snapshot")
    info.add_argument("spec", metavar="POOL/IMAGE[@SNAP]")

    resize = add_command(subparsers, "resize", resize_image, "grow or shrink an image")
    resize.add_argument("--size", "-s", required=True, help="new size, e.g. 20G (no suffix: MiB)")
    resize.add_argument("--allow-shrink", action="store_true", help="permit shrinking")
    resize.add_argument("spec", metavar="POOL/IMAGE")

    rm = add_command(subparsers, "rm", remove_image, "remove an image", ["remove"])
    rm.add_argument("spec", metavar="POOL/IMAGE")

    rename = add_command(subparsers, "rename", rename_image, "rename an image", ["mv"])
    rename.add_argument("spec", metavar="POOL/IMAGE")
    rename.add_argument("dest", metavar="[POOL/]NEW")


# -- layout options shared with clone and import ------------------------------------
def add_layout_options(parser: argparse.ArgumentParser, features_help: str = "") -> None:
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument("--order", type=int, help="object size as a power of two (12-25)")
    layout.add_argument("--object-size", help="object size, e.g. 4M (4K-32M)")
    parser.add_argument(
        "--image-feature",
        action="append",
        default=None,
        metavar="FEATURE",
        help=features_help or "feature name(s), repeated or comma-separated (default: all)",
    )


def layout_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``order`` and ``features`` arguments for RBD.create/clone, validated."""
    kwargs: dict[str, Any] = {}
    if args.order is not None:
        kwargs["order"] = check_order(args.order)
    elif args.object_size is not None:
        kwargs["order"] = order_of(parse_size(args.object_size, 1, "object size"))
    if args.image_feature is not None:
        kwargs["features"] = parse_features(args.image_feature)
    return kwargs


# -- create -------------------------------------------------------------------------
def create_image(ctx: Context, args: argparse.Namespace) -> None:
    spec = parse_image_spec(args.spec, Snap.FORBIDDEN)
    size = parse_size(args.size)
    kwargs = layout_kwargs(args)
    ioctx = ctx.ioctx(spec.pool)
    try:
        ctx.rbd.create(ioctx, spec.image, size, **kwargs)
    except errors.ImageExists:
        raise cli_errors.exists(f"image {spec} already exists") from None


# -- ls -----------------------------------------------------------------------------
def list_images(ctx: Context, args: argparse.Namespace) -> None:
    if args.pool_arg is not None and args.pool is not None and args.pool_arg != args.pool:
        raise cli_errors.invalid("give the pool once, as POOL or --pool")
    pool = args.pool_arg or args.pool or DEFAULT_POOL
    names = ctx.rbd.list(ctx.ioctx(pool))
    if not args.long:
        ctx.output.show(names, "\n".join(names))
        return
    rows: list[dict[str, Any]] = []
    for name in names:
        try:
            with ctx.open_image(ImageSpec(pool, name), read_only=True) as image:
                rows.extend(_long_rows(ctx, pool, image))
        except cli_errors.CliError:
            continue  # removed while we listed
    columns = [Column("NAME"), Column("SIZE", True), Column("PARENT")]
    columns += [Column("FMT", True), Column("PROT")]
    plain = table(
        columns,
        [
            [
                f"{r['image']}@{r['snapshot']}" if "snapshot" in r else r["image"],
                human_size(r["size"]),
                _parent_text(r.get("parent")),
                r["format"],
                yes_no(r.get("protected") == "true"),
            ]
            for r in rows
        ],
    )
    ctx.output.show(rows, plain if rows else "")


def _long_rows(ctx: Context, pool: str, image: Image) -> list[dict[str, Any]]:
    name = image.get_name()
    head: dict[str, Any] = {"image": name, "id": image.id(), "size": image.size()}
    parent = _parent(ctx, image)
    if parent is not None:
        head["parent"] = parent
    head["format"] = 2
    rows = [head]
    for snap in image.list_snaps():
        spec = ImageSpec(pool, name, snap["name"])
        with ctx.open_image(spec, read_only=True) as at_snap:
            row: dict[str, Any] = {
                "image": name,
                "id": image.id(),
                "snapshot": snap["name"],
                "snapshot_id": snap["id"],
                "size": snap["size"],
            }
            snap_parent = _parent(ctx, at_snap)
            if snap_parent is not None:
                row["parent"] = snap_parent
            row["format"] = 2
            row["protected"] = json_bool(image.is_protected_snap(snap["name"]))
            rows.append(row)
    return rows


def _parent(ctx: Context, image: Image) -> dict[str, Any] | None:
    try:
        pool, name, snap = image.parent_info()
        parent_id = image.parent_id()
        overlap = image.overlap()
    except errors.ImageNotFound:
        return None
    return {
        "pool": pool,
        "pool_namespace": "",
        "image": name,
        "id": parent_id,
        "snapshot": snap,
        "overlap": overlap,
    }


def _parent_text(parent: dict[str, Any] | None) -> str:
    if parent is None:
        return ""
    return f"{parent['pool']}/{parent['image']}@{parent['snapshot']}"


# -- info ---------------------------------------------------------------------------
def show_info(ctx: Context, args: argparse.Namespace) -> None:
    spec = parse_image_spec(args.spec, Snap.PERMITTED)
    with ctx.open_image(spec, read_only=True) as image:
        stat = image.stat()
        info: dict[str, Any] = {
            "name": spec.image,
            "id": image.id(),
            "size": stat["size"],
            "objects": stat["num_objs"],
            "order": stat["order"],
            "object_size": stat["obj_size"],
            "snapshot_count": len(list(image.list_snaps())),
            "block_name_prefix": stat["block_name_prefix"],
            "format": 2,
            "features": feature_names(image.features()),
        }
        parent = _parent(ctx, image)
        if parent is not None:
            info["parent"] = parent
        if spec.snap is not None:
            info["protected"] = json_bool(image.is_protected_snap(spec.snap))
    ctx.output.show(info, _info_text(info))


def _info_text(info: dict[str, Any]) -> str:
    object_size = human_size(info["object_size"])
    lines = [
        f"rbd image '{info['name']}':",
        f"\tsize {human_size(info['size'])} in {info['objects']} objects",
        f"\torder {info['order']} ({object_size} objects)",
        f"\tsnapshot_count: {info['snapshot_count']}",
        f"\tid: {info['id']}",
        f"\tblock_name_prefix: {info['block_name_prefix']}",
        f"\tformat: {info['format']}",
        f"\tfeatures: {', '.join(info['features'])}",
    ]
    if "parent" in info:
        lines.append(f"\tparent: {_parent_text(info['parent'])}")
        lines.append(f"\toverlap: {human_size(info['parent']['overlap'])}")
    if "protected" in info:
        lines.append(f"\tprotected: {info['protected'] == 'true'}")
    return "\n".join(lines)


# -- resize -------------------------------------------------------------------------
def resize_image(ctx: Context, args: argparse.Namespace) -> None:
    spec = parse_image_spec(args.spec, Snap.FORBIDDEN)
    size = parse_size(args.size)
    with ctx.open_image(spec) as image:
        current = image.size()
        if size < current and not args.allow_shrink:
            raise cli_errors.invalid(
                f"shrinking image {spec} from {human_size(current)} to {human_size(size)} "
                "needs --allow-shrink"
            )
        image.resize(size, allow_shrink=args.allow_shrink)


# -- rm -----------------------------------------------------------------------------
def remove_image(ctx: Context, args: argparse.Namespace) -> None:
    spec = parse_image_spec(args.spec, Snap.FORBIDDEN)
    with ctx.open_image(spec, read_only=True) as image:
        count = len(list(image.list_snaps()))
    if count:
        raise cli_errors.CliError(
            f"image {spec} has {count} snapshot{'s' if count > 1 else ''}; "
            f"remove {'them' if count > 1 else 'it'} first "
            f"(csi-rbd snap purge {spec})",
            errors.ImageHasSnapshots.errno_value,
        )
    with ctx.explain(spec):
        ctx.rbd.remove(ctx.ioctx(spec.pool), spec.image)


# -- rename -------------------------------------------------------------------------
def rename_image(ctx: Context, args: argparse.Namespace) -> None:
    spec = parse_image_spec(args.spec, Snap.FORBIDDEN)
    dest = parse_image_spec(args.dest, Snap.FORBIDDEN, default_pool=spec.pool)
    if dest.pool != spec.pool:
        raise cli_errors.invalid(f"cannot rename {spec} to {dest}: renaming across pools")
    ioctx = ctx.ioctx(spec.pool)
    try:
        with ctx.explain(spec):
            ctx.rbd.rename(ioctx, spec.image, dest.image)
    except errors.ImageExists:
        raise cli_errors.exists(f"image {dest} already exists") from None
