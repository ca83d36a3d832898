"""Disk usage of images and snapshots, the way ``rbd du`` computes it.

Only the python-rbd API is used (``Image(ioctx, name, snapshot=...)``,
``list_snaps``, ``size``, ``id`` and ``diff_iterate``), so this works unchanged
on the native engine and on a librbd-backed one:

* a snapshot's ``used_size`` is the data allocated since the previous snapshot
  (all of its allocated data for the first one);
* the head's ``used_size`` is the data allocated since the newest snapshot
  (all of its allocated data when it has none);
* a clone counts only its own data (``include_parent=False``).

``used_size`` counts the bytes of allocated extents exactly, not whole
objects. With no snapshots, an image's ``used_size`` is the number of bytes
``diff_iterate(0, size, None, cb, include_parent=False)`` reports as existing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from csi_rbd.engine import errors


class UsageImage(Protocol):
    """The part of ``rbd.Image`` that disk usage needs."""

    def size(self) -> int: ...

    def id(self) -> str: ...

    def list_snaps(self) -> Iterable[dict[str, Any]]: ...

    def diff_iterate(
        self,
        offset: int,
        length: int,
        from_snapshot: str | None,
        iterate_cb: Callable[[int, int, bool], Any],
        include_parent: bool = ...,
        whole_object: bool = ...,
    ) -> None: ...


# open_image(name, snapshot) -> a read-only image handle usable with ``with``
ImageOpener = Callable[[str, str | None], AbstractContextManager[UsageImage]]


@dataclass(frozen=True)
class ImageUsage:
    """One row of ``rbd du``: an image head or one of its snapshots."""

    name: str
    id: str
    provisioned_size: int
    used_size: int
    snapshot: str | None = None
    snapshot_id: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The object ``rbd du --format json`` prints for this row."""
        data: dict[str, Any] = {"name": self.name, "id": self.id}
        if self.snapshot is not None:
            data["snapshot"] = self.snapshot
            data["snapshot_id"] = self.snapshot_id
        data["provisioned_size"] = self.provisioned_size
        data["used_size"] = self.used_size
        return data


@dataclass(frozen=True)
class PoolUsage:
    images: list[ImageUsage]

    @property
    def total_provisioned_size(self) -> int:
        """Head sizes, as ``rbd du`` adds snapshot sizes only when no head is listed."""
        with_head = {u.id for u in self.images if u.snapshot is None}
        return sum(
            u.provisioned_size for u in self.images if u.snapshot is None or u.id not in with_head
        )

    @property
    def total_used_size(self) -> int:
        return sum(u.used_size for u in self.images)

    def to_json(self) -> dict[str, Any]:
        """``{"images": [...], "total_provisioned_size": N, "total_used_size": N}``."""
        return {
            "images": [u.to_json() for u in self.images],
            "total_provisioned_size": self.total_provisioned_size,
            "total_used_size": self.total_used_size,
        }


def used_size(image: UsageImage, size: int, from_snapshot: str | None = None) -> int:
    """Bytes of the extents allocated in ``image`` (since ``from_snapshot``), parent excluded."""
    total = 0

    def count(offset: int, length: int, exists: bool) -> None:
        nonlocal total
        if exists:
            total += length

    image.diff_iterate(0, size, from_snapshot, count, include_parent=False)
    return total


def image_usage(
    open_image: ImageOpener, name: str, snapshot: str | None = None
) -> list[ImageUsage]:
    """Rows for every snapshot of ``name`` and its head, or for the snapshots up to
    and including ``snapshot`` when one is named (ImageNotFound if it does not exist)."""
    rows: list[ImageUsage] = []
    with open_image(name, None) as head:
        image_id = head.id()
        snaps = sorted(head.list_snaps(), key=lambda s: int(s["id"]))
        if snapshot is not None and snapshot not in {s["name"] for s in snaps}:
            raise errors.ImageNotFound(f"snapshot {snapshot} not found")
        previous: str | None = None
        for snap in snaps:
            with open_image(name, snap["name"]) as at_snap:
                size = at_snap.size()
                used = used_size(at_snap, size, previous)
            rows.append(ImageUsage(name, image_id, size, used, snap["name"], int(snap["id"])))
            if snap["name"] == snapshot:
                return rows
            previous = snap["name"]
        size = head.size()
        rows.append(ImageUsage(name, image_id, size, used_size(head, size, previous)))
    return rows


def pool_usage(open_image: ImageOpener, names: Iterable[str]) -> PoolUsage:
    """Rows for every image in ``names``; images removed meanwhile are skipped."""
    rows: list[ImageUsage] = []
    for name in names:
        try:
            rows.extend(image_usage(open_image, name))
        except errors.ImageNotFound:
            continue
    return PoolUsage(rows)
