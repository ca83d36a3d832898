"""One configured cluster -> its engine (for the driver and for attach daemons)."""

from __future__ import annotations

from csi_rbd.config import ClusterConfig, ConfigError
from csi_rbd.engine.base import Engine


def build_engine(cluster: ClusterConfig) -> Engine:
    """The engine of ``cluster``; ConfigError when it cannot be built here."""
    if cluster.engine == "native":
        from csi_rbd.engine.native.engine import NativeEngine

        if cluster.data_dir is None:
            raise ConfigError(f"cluster {cluster.id}: a native cluster needs a data directory")
        return NativeEngine(cluster.id, cluster.data_dir, cluster.pool)
    from csi_rbd.engine.ceph import bindings
    from csi_rbd.engine.ceph.engine import CephEngine

    missing = bindings.available()
    if missing is not None:
        raise ConfigError(f"cluster {cluster.id}: the ceph engine cannot load: {missing}")
    return CephEngine.from_config(cluster)
