"""Engine calls the control plane shares: opening pools, finding images, sizes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from csi_rbd.control.errors import FailedPrecondition, InvalidRequest, NotFound, Unavailable
from csi_rbd.engine import errors
from csi_rbd.engine.base import Engine
from csi_rbd.ids import BadId, ResourceId

ROUNDING = 4096
MAX_CLONE_DEPTH = 8


def round_up(size: int) -> int:
    return -(-size // ROUNDING) * ROUNDING


@contextlib.contextmanager
def pool(
    engine: Engine, pool_name: str, secrets: Mapping[str, str] | None
) -> Iterator[tuple[Any, Any]]:
    """(cluster, ioctx) for a pool of ``engine``; a missing pool is the caller's mistake."""
    try:
        with engine.session(secrets) as cluster:
            try:
                ioctx = cluster.open_ioctx(pool_name)
            except errors.ObjectNotFound as exc:
                raise InvalidRequest(
                    f"pool {pool_name!r} does not exist in cluster {engine.cluster_id}"
                ) from exc
            try:
                yield cluster, ioctx
            finally:
                ioctx.close()
    except errors.ConnectionShutdown as exc:
        raise Unavailable(f"cluster {engine.cluster_id} is unreachable: {exc}") from exc


def decode(resource_id: str, what: str) -> ResourceId:
    if not resource_id:
        raise InvalidRequest(f"{what} ID is missing")
    try:
        return ResourceId.decode(resource_id)
    except BadId as exc:
        raise NotFound(f"{what} {resource_id!r} is not a csi-rbd {what} ID: {exc}") from exc


def image_exists(engine: Engine, ioctx: Any, name: str) -> bool:
    try:
        engine.open_image(ioctx, name, read_only=True).close()
    except errors.ImageNotFound:
        return False
    return True


def image_size(engine: Engine, ioctx: Any, name: str) -> int:
    with engine.open_image(ioctx, name, read_only=True) as image:
        return int(image.size())


def snapshot_names(engine: Engine, ioctx: Any, image_name: str) -> list[str]:
    with engine.open_image(ioctx, image_name, read_only=True) as image:
        return [s["name"] for s in image.list_snaps()]


def clone_depth(engine: Engine, cluster: Any, pool_name: str, name: str) -> int:
    """How many parents an image reads through (0 for a flat image).

    Parents are followed by id: a parent moved to the trash has lost its name.
    """
    depth = 0
    ioctx = cluster.open_ioctx(pool_name)
    image = engine.open_image(ioctx, name, read_only=True)
    try:
        while depth <= 64:
            try:
                parent_pool = image.parent_info()[0]
                parent_id = image.parent_id()
            except errors.ImageNotFound:
                return depth
            image.close()
            ioctx.close()
            ioctx = cluster.open_ioctx(parent_pool)
            image = engine.image_class(ioctx, image_id=parent_id, read_only=True)
            depth += 1
        return depth
    finally:
        image.close()
        ioctx.close()


def remove_or_trash(engine: Engine, ioctx: Any, name: str, what: str) -> None:
    """Remove an image; one that clones still read moves to the trash instead."""
    try:
        engine.rbd.remove(ioctx, name)
        return
    except errors.ImageNotFound:
        return
    except errors.ImageBusy:
        pass
    with engine.open_image(ioctx, name, read_only=True) as image:
        has_clones = bool(image.list_children())
    if not has_clones:
        raise FailedPrecondition(f"{what} is in use (open for writing on a node)")
    try:
        engine.rbd.trash_move(ioctx, name)
    except errors.ImageBusy as exc:
        raise FailedPrecondition(f"{what} is in use (open for writing on a node)") from exc
