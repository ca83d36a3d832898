"""Engine figures for the metrics endpoint, through the engine API only."""

from __future__ import annotations

from collections.abc import Mapping

from csi_rbd.engine import errors
from csi_rbd.engine.base import Engine
from csi_rbd.engine.usage import used_size
from csi_rbd.metrics import EngineFigures


def engine_figures(engines: Mapping[str, Engine]) -> list[EngineFigures]:
    """Images, snapshots, used and provisioned bytes per cluster and pool."""
    figures = []
    for engine in engines.values():
        with engine.session(None) as cluster:
            for pool in cluster.list_pools():
                ioctx = cluster.open_ioctx(pool)
                images = snapshots = used = provisioned = 0
                try:
                    for name in engine.rbd.list(ioctx):
                        try:
                            with engine.open_image(ioctx, name, read_only=True) as image:
                                size = int(image.size())
                                images += 1
                                snapshots += len(list(image.list_snaps()))
                                provisioned += size
                                used += used_size(image, size)
                        except (errors.ImageNotFound, FileNotFoundError):
                            continue  # removed while we counted
                finally:
                    ioctx.close()
                figures.append(
                    EngineFigures(engine.cluster_id, pool, images, snapshots, used, provisioned)
                )
    return figures
