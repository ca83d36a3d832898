"""``image clone|flatten|children``."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from csi_rbd.admin import errors as cli_errors
from csi_rbd.admin.command import add_command
from csi_rbd.admin.context import Context, ProgressCallback
from csi_rbd.admin.images import add_layout_options, layout_kwargs
from csi_rbd.admin.specs import Snap, parse_image_spec
from csi_rbd.engine import errors

if TYPE_CHECKING:
    from csi_rbd.admin.command import Subparsers


def register(subparsers: Subparsers) -> None:
    clone = add_command(subparsers, "clone", clone_image, "clone a snapshot (copy-on-write)")
    add_layout_options(clone, "feature name(s), repeated or comma-separated (default: parent's)")
    clone.add_argument("spec", metavar="POOL/IMAGE@SNAP")
    clone.add_argument("dest", metavar="POOL/CHILD")

    flatten = add_command(subparsers, "flatten", flatten_image, "copy a clone's parent data in")
    flatten.add_argument("spec", metavar="POOL/IMAGE")

    children = add_command(subparsers, "children", list_children, "list the clones of an image")
    children.add_argument("spec", metavar="POOL/IMAGE[@SNAP]")


def clone_image(ctx: Context, args: argparse.Namespace) -> None:
    parent = parse_image_spec(args.spec, Snap.REQUIRED)
    child = parse_image_spec(args.dest, Snap.FORBIDDEN)
    kwargs = layout_kwargs(args)
    assert parent.snap is not None
    ctx.require(parent)
    parent_ioctx = ctx.ioctx(parent.pool)
    child_ioctx = ctx.ioctx(child.pool)
    if ctx.image_exists(child):
        raise cli_errors.exists(f"image {child} already exists")
    try:
        with ctx.explain(parent):
            ctx.rbd.clone(
                parent_ioctx, parent.image, parent.snap, child_ioctx, child.image, **kwargs
            )
    except errors.ImageExists:
        raise cli_errors.exists(f"image {child} already exists") from None


def flatten_image(ctx: Context, args: argparse.Namespace) -> None:
    spec = parse_image_spec(args.spec, Snap.FORBIDDEN)
    with ctx.open_image(spec) as image:
        try:
            image.parent_info()
        except errors.ImageNotFound:
            raise cli_errors.invalid(f"image {spec} is not a clone") from None
        with ctx.progress("Image flatten", None, unit="obj") as bar:
            image.flatten(on_progress=ProgressCallback(bar))


def list_children(ctx: Context, args: argparse.Namespace) -> None:
    spec = parse_image_spec(args.spec, Snap.PERMITTED)
    with ctx.open_image(spec, read_only=True) as image:
        found = image.list_children()
    data = [{"pool": pool, "pool_namespace": "", "image": name} for pool, name in found]
    ctx.output.show(data, "\n".join(f"{pool}/{name}" for pool, name in found))
