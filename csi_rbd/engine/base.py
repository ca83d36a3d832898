"""The engine interface the CSI layer drives.

Both engines expose python-rbd's shape (``RBD``, ``Image``, the exception
tree of :mod:`csi_rbd.engine.errors`), so the CSI layer calls image
operations the same way on either. What python-rbd has no word for lives
here: how to connect with a call's credentials, how much space is free, and
where a node's attach daemon finds the image.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ImageLocator:
    """Everything a node needs to open one image, except credentials."""

    cluster_id: str
    engine: str
    pool: str
    image: str
    data_dir: str | None = None


class Engine(ABC):
    """One configured cluster."""

    kind: str
    cluster_id: str
    default_pool: str
    rbd: Any  # an ``RBD`` instance (python-rbd shape)
    image_class: Any  # the ``Image`` class (python-rbd shape)
    # Threads a node's attach daemon serves one image with. The native engine
    # holds the GIL while it works, so more threads only add hand-offs between
    # them (measured: 16 threads do 40-50% fewer 4 KiB requests than 4);
    # librbd releases it and waits on the network, so it wants more in flight.
    io_threads: int = 4

    @abstractmethod
    def session(self, secrets: Mapping[str, str] | None = None) -> AbstractContextManager[Any]:
        """A connected cluster handle (``rados.Rados`` shape) for one call."""

    @abstractmethod
    def free_bytes(self, pool: str) -> int:
        """Space still available for new data in ``pool``."""

    @abstractmethod
    def probe(self) -> None:
        """Raise an engine error when the engine cannot serve."""

    def close(self) -> None:  # noqa: B027 (optional hook: most engines hold nothing)
        """Release what the engine keeps open between sessions."""

    def locator(self, pool: str, image: str) -> ImageLocator:
        return ImageLocator(self.cluster_id, self.kind, pool, image)

    def for_data_path(self, cache: str) -> tuple[Engine, str]:
        """(engine, cache mode of the node's own block cache) for serving one image.

        ``cache`` is the volume's mode with librbd's meaning (none, writethrough,
        writeback). By default the node's block cache implements it; an engine
        with a cache of its own (librbd) returns itself configured for the mode
        and ``"none"`` so that the data is cached once.
        """
        return self, cache

    def data_path_settings(self, cluster: Any) -> dict[str, str]:
        """Settings of a connected ``cluster`` that shape the data path (for the log)."""
        return {}

    def lock_owner(self, image: Any) -> str | None:
        """Who holds ``image``'s exclusive lock, as :meth:`break_lock` takes it.

        None by default: a native lock is an OFD lock that dies with its process.
        """
        return None

    def break_lock(self, image: Any, owner: str) -> bool:
        """Take the exclusive lock away from ``owner`` (a client known to be dead).

        True when ``owner`` held it and no longer does; False when someone else
        (or nobody) holds it. Never call this for a client that may be alive.
        """
        return False

    def open_image(self, ioctx: Any, name: str, **kwargs: Any) -> Any:
        return self.image_class(ioctx, name, **kwargs)

    def images(self, cluster: Any, pools: Iterator[str] | None = None) -> Iterator[tuple[str, str]]:
        """(pool, image) for every image in the given (default: all) pools."""
        for pool in pools if pools is not None else cluster.list_pools():
            ioctx = cluster.open_ioctx(pool)
            try:
                for name in self.rbd.list(ioctx):
                    yield pool, name
            finally:
                ioctx.close()
