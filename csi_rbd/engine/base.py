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

    @abstractmethod
    def session(self, secrets: Mapping[str, str] | None = None) -> AbstractContextManager[Any]:
        """A connected cluster handle (``rados.Rados`` shape) for one call."""

    @abstractmethod
    def free_bytes(self, pool: str) -> int:
        """Space still available for new data in ``pool``."""

    @abstractmethod
    def probe(self) -> None:
        """Raise an engine error when the engine cannot serve."""

    def locator(self, pool: str, image: str) -> ImageLocator:
        return ImageLocator(self.cluster_id, self.kind, pool, image)

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
