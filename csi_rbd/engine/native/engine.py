"""The native engine behind the :class:`~csi_rbd.engine.base.Engine` interface."""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from csi_rbd.engine.base import Engine, ImageLocator
from csi_rbd.engine.native.image import Image
from csi_rbd.engine.native.rados import Rados
from csi_rbd.engine.native.rbd import RBD


class NativeEngine(Engine):
    kind = "native"

    def __init__(self, cluster_id: str, data_dir: Path, default_pool: str = "rbd") -> None:
        self.cluster_id = cluster_id
        self.data_dir = data_dir
        self.default_pool = default_pool
        self.rbd = RBD()
        self.image_class = Image
        self._rados = Rados(data_dir=data_dir)
        self._rados.connect()

    @contextmanager
    def session(self, secrets: Mapping[str, str] | None = None) -> Iterator[Rados]:
        # One long-lived handle: the native engine needs no credentials.
        yield self._rados

    def free_bytes(self, pool: str) -> int:
        return shutil.disk_usage(self.data_dir).free

    def probe(self) -> None:
        self._rados.list_pools()

    def locator(self, pool: str, image: str) -> ImageLocator:
        return ImageLocator(self.cluster_id, self.kind, pool, image, str(self.data_dir))

    def close(self) -> None:
        self._rados.shutdown()
