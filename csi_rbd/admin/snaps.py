"""``snap create|ls|rm|purge|rollback|protect|unprotect``."""

from __future__ import annotations

import argparse
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from csi_rbd.admin import errors as cli_errors
from csi_rbd.admin.command import add_command
from csi_rbd.admin.context import Context, ProgressCallback
from csi_rbd.admin.output import Column, human_size, json_bool, table, yes_no
from csi_rbd.admin.specs import ImageSpec, Snap, parse_image_spec
from csi_rbd.engine import errors

if TYPE_CHECKING:
    from csi_rbd.admin.command import Handler, Subparsers

_SNAP_SPEC = "POOL/IMAGE@SNAP"


def register(subparsers: Subparsers) -> None:
    commands: list[tuple[str, Handler, str, list[str]]] = [
        ("create", create_snap, "create a snapshot", ["add"]),
        ("rm", remove_snap, "remove a snapshot", ["remove"]),
        ("rollback", rollback_snap, "make the image what the snapshot holds", ["revert"]),
        ("protect", protect_snap, "forbid removing a snapshot", []),
        ("unprotect", unprotect_snap, "allow removing a snapshot", []),
    ]
    for name, handler, help, aliases in commands:
        add_command(subparsers, name, handler, help, aliases).add_argument(
            "spec", metavar=_SNAP_SPEC
        )
    ls = add_command(subparsers, "ls", list_snaps, "list the snapshots of an image", ["list"])
    ls.add_argument("spec", metavar="POOL/IMAGE")
    purge = add_command(subparsers, "purge", purge_snaps, "remove every snapshot of an image")
    purge.add_argument("spec", metavar="POOL/IMAGE")


def create_snap(ctx: Context, args: argparse.Namespace) -> None:
    spec = parse_image_spec(args.spec, Snap.REQUIRED)
    assert spec.snap is not None
    with ctx.open_image(spec.at(None)) as image:
        try:
            image.create_snap(spec.snap)
        except errors.ImageExists:
            raise cli_errors.exists(f"snapshot {spec} already exists") from None


def list_snaps(ctx: Context, args: argparse.Namespace) -> None:
    spec = parse_image_spec(args.spec, Snap.FORBIDDEN)
    with ctx.open_image(spec, read_only=True) as image:
        snaps = [
            (
                {**snap, "timestamp": image.get_snap_timestamp(int(snap["id"]))},
                image.is_protected_snap(snap["name"]),
            )
            for snap in sorted(image.list_snaps(), key=lambda s: int(s["id"]))
        ]
    data = [
        {
            "id": snap["id"],
            "name": snap["name"],
            "size": snap["size"],
            "protected": json_bool(protected),
            "timestamp": _timestamp(snap),
        }
        for snap, protected in snaps
    ]
    columns = [
        Column("SNAPID", True),
        Column("NAME"),
        Column("SIZE", True),
        Column("PROTECTED"),
        Column("TIMESTAMP"),
    ]
    rows = [[s["id"], s["name"], human_size(s["size"]), yes_no(p), _timestamp(s)] for s, p in snaps]
    ctx.output.show(data, table(columns, rows) if rows else "")


def _timestamp(snap: dict[str, Any]) -> str:
    value = snap.get("timestamp")
    return time.ctime(value.timestamp()) if isinstance(value, datetime) else ""


def remove_snap(ctx: Context, args: argparse.Namespace) -> None:
    spec = parse_image_spec(args.spec, Snap.REQUIRED)
    assert spec.snap is not None
    ctx.require(spec)
    with ctx.open_image(spec.at(None)) as image:
        if image.is_protected_snap(spec.snap):
            raise cli_errors.busy(f"snapshot {spec} is protected; unprotect it first")
        with ctx.explain(spec):
            image.remove_snap(spec.snap)


def purge_snaps(ctx: Context, args: argparse.Namespace) -> None:
    spec = parse_image_spec(args.spec, Snap.FORBIDDEN)
    with ctx.open_image(spec) as image:
        names = [s["name"] for s in sorted(image.list_snaps(), key=lambda s: int(s["id"]))]
        protected = [name for name in names if image.is_protected_snap(name)]
        if protected:
            raise cli_errors.busy(
                f"image {spec} has protected snapshots ({', '.join(protected)}); "
                "unprotect them first"
            )
        for name in names:
            image.remove_snap(name)


def rollback_snap(ctx: Context, args: argparse.Namespace) -> None:
    spec = parse_image_spec(args.spec, Snap.REQUIRED)
    assert spec.snap is not None
    ctx.require(spec)
    with (
        ctx.open_image(spec.at(None)) as image,
        ctx.explain(spec),
        ctx.progress("Rolling back to snapshot", None, unit="obj") as bar,
    ):
        image.rollback_to_snap(spec.snap, on_progress=ProgressCallback(bar))


def protect_snap(ctx: Context, args: argparse.Namespace) -> None:
    _set_protected(ctx, args.spec, True)


def unprotect_snap(ctx: Context, args: argparse.Namespace) -> None:
    _set_protected(ctx, args.spec, False)


def _set_protected(ctx: Context, text: str, protect: bool) -> None:
    spec = parse_image_spec(text, Snap.REQUIRED)
    assert spec.snap is not None
    ctx.require(spec)
    with ctx.open_image(spec.at(None)) as image, ctx.explain(spec):
        if image.is_protected_snap(spec.snap) == protect:
            # librbd answers EBUSY to protecting twice and EINVAL to unprotecting twice
            if protect:
                raise cli_errors.busy(f"snapshot {spec} is already protected")
            raise cli_errors.invalid(f"snapshot {spec} is not protected")
        if protect:
            image.protect_snap(spec.snap)
            return
        children = _children_of(ctx, spec)
        if children:
            raise cli_errors.busy(
                f"snapshot {spec} has clones ({', '.join(children)}); flatten or remove them first"
            )
        image.unprotect_snap(spec.snap)


def _children_of(ctx: Context, spec: ImageSpec) -> list[str]:
    with ctx.open_image(spec, read_only=True) as at_snap:
        return [f"{pool}/{name}" for pool, name in at_snap.list_children()]
