"""Planning a flatten: which object versions detach a clone (and its snapshots) from the parent.

Design
------
A view (head, or a snapshot) reads through to its parent for object ``n``
when its newest visible version of ``n`` is missing or an absent marker and
``n`` starts inside the view's overlap. Flatten gives every such view a
version holding exactly the parent bytes it used to see (up to its overlap),
after which no view reads the parent and the parent links can go.

Views are taken in id order (snapshots oldest first, head last as ``seq+1``).
Consecutive views that see the same version and the same parent span share
one new version, placed at the newest epoch below the first view of the
group: newer than anything the group saw, invisible to the views before it.
A group boundary always coincides with an epoch (a snapshot, shrink or
rollback made it), so two groups never need the same epoch.

Without the deep-flatten feature only head is flattened, as librbd does;
snapshots keep reading the parent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from csi_rbd.engine import errors
from csi_rbd.engine.native.catalog import ParentSpec
from csi_rbd.engine.native.gc import newest
from csi_rbd.engine.native.objects import Version


@dataclass(frozen=True)
class ViewSpec:
    """What flatten needs of a view: its id (head: seq + 1), parent and overlap."""

    view_id: int
    parent: ParentSpec | None
    overlap: int


@dataclass(frozen=True)
class Placement:
    """Write the parent's bytes [start, start + length) as object version ``epoch``,
    or, when ``parent`` is None, an absent marker there (zeros once detached)."""

    epoch: int
    parent: ParentSpec | None
    length: int


def plan_object(
    start: int,
    object_size: int,
    views: Sequence[ViewSpec],
    versions: Sequence[Version],
    epochs: Sequence[int],
) -> list[Placement]:
    """Placements for the object at image offset ``start`` (versions oldest first).

    A view that reads zeros there (past its overlap) but would see a version
    placed for an earlier group gets an absent marker of its own.
    """
    placements: list[Placement] = []
    previous: tuple[object, ...] | None = None
    for view in sorted(views, key=lambda v: v.view_id):
        visible = newest(versions, lambda e, limit=view.view_id: e < limit)  # type: ignore[misc]
        falls = (visible is None or visible.absent) and view.parent is not None
        span = min(object_size, view.overlap - start) if falls and start < view.overlap else 0
        key = (visible, view.parent if span else None, span)
        if key == previous:
            continue
        previous = key
        epoch = max(e for e in epochs if e < view.view_id)
        if span:
            assert view.parent is not None
            placement = Placement(epoch, view.parent, span)
        elif placements and (visible is None or visible.epoch < placements[-1].epoch):
            placement = Placement(epoch, None, 0)
        else:
            continue
        if placements and epoch <= placements[-1].epoch:
            raise errors.IOError(f"cannot flatten object at {start}: two views need epoch {epoch}")
        placements.append(placement)
    return placements
