"""Driver configuration: what `csi-rbd serve` turns its flags and config file into.

The config file (YAML) lists clusters by id; a StorageClass's ``clusterID``
picks one. Without a file there is one native cluster, ``local``, at
``--data-dir``::

    clusters:
      - id: ceph-a
        engine: ceph
        monitors: ["mon-a.example:3300"]
        conf: /etc/ceph/ceph.conf      # optional
        pool: rbd                      # default when the StorageClass names none
        radosNamespace: ""             # optional
      - id: local
        engine: native
        dataDir: /var/lib/csi-rbd
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from csi_rbd import __version__

DEFAULT_DRIVER_NAME = "rbd.csi-rbd.io"
DEFAULT_CLUSTER_ID = "local"
Mode = Literal["all", "controller", "node"]
EngineKind = Literal["native", "ceph"]
_CLUSTER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,35}$")


class ConfigError(ValueError):
    """A configuration a person has to fix; the message says what and where."""


@dataclass(frozen=True)
class ClusterConfig:
    id: str
    engine: EngineKind
    data_dir: Path | None = None
    monitors: tuple[str, ...] = ()
    conf: Path | None = None
    pool: str = "rbd"
    rados_namespace: str = ""

    def to_mapping(self) -> dict[str, Any]:
        """The config file's shape (what :func:`cluster_from_mapping` reads back)."""
        if self.engine == "native":
            return {
                "id": self.id,
                "engine": "native",
                "dataDir": str(self.data_dir),
                "pool": self.pool,
            }
        mapping: dict[str, Any] = {
            "id": self.id,
            "engine": "ceph",
            "monitors": list(self.monitors),
            "pool": self.pool,
            "radosNamespace": self.rados_namespace,
        }
        if self.conf is not None:
            mapping["conf"] = str(self.conf)
        return mapping


@dataclass(frozen=True)
class DriverConfig:
    endpoint: str
    node_id: str
    clusters: tuple[ClusterConfig, ...]
    mode: Mode = "all"
    driver_name: str = DEFAULT_DRIVER_NAME
    version: str = __version__
    state_dir: Path = Path("/var/lib/csi-rbd/node")
    allowed_roots: tuple[Path, ...] = (Path("/var/lib/kubelet"),)
    max_volumes_per_node: int = 0
    metrics_address: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def topology_key(self) -> str:
        return f"topology.{self.driver_name}/node"

    @property
    def default_cluster(self) -> ClusterConfig:
        return self.clusters[0]

    def cluster(self, cluster_id: str) -> ClusterConfig | None:
        return next((c for c in self.clusters if c.id == cluster_id), None)

    @property
    def runs_controller(self) -> bool:
        return self.mode in ("all", "controller")

    @property
    def runs_node(self) -> bool:
        return self.mode in ("all", "node")


def cluster_from_mapping(raw: Any, where: str) -> ClusterConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a cluster must be a mapping")
    known = {"id", "engine", "dataDir", "monitors", "conf", "pool", "radosNamespace"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})"
        )
    cluster_id = raw.get("id")
    if not isinstance(cluster_id, str) or not _CLUSTER_ID.match(cluster_id):
        raise ConfigError(f"{where}: id must be 1-36 characters of letters, digits, '.', '_', '-'")
    engine = raw.get("engine")
    if engine not in ("native", "ceph"):
        raise ConfigError(f"{where} ({cluster_id}): engine must be 'native' or 'ceph'")
    pool = raw.get("pool", "rbd")
    if not isinstance(pool, str) or not pool:
        raise ConfigError(f"{where} ({cluster_id}): pool must be a non-empty string")
    if engine == "native":
        data_dir = raw.get("dataDir")
        if not isinstance(data_dir, str) or not data_dir:
            raise ConfigError(f"{where} ({cluster_id}): a native cluster needs dataDir")
        return ClusterConfig(cluster_id, "native", data_dir=Path(data_dir), pool=pool)
    monitors = raw.get("monitors")
    if (
        not isinstance(monitors, list)
        or not monitors
        or not all(isinstance(m, str) and m for m in monitors)
    ):
        raise ConfigError(f"{where} ({cluster_id}): a ceph cluster needs a list of monitors")
    conf = raw.get("conf")
    namespace = raw.get("radosNamespace", "")
    if not isinstance(namespace, str):
        raise ConfigError(f"{where} ({cluster_id}): radosNamespace must be a string")
    return ClusterConfig(
        cluster_id,
        "ceph",
        monitors=tuple(monitors),
        conf=Path(conf) if conf else None,
        pool=pool,
        rados_namespace=namespace,
    )


def load_clusters(path: Path | None, data_dir: Path) -> tuple[ClusterConfig, ...]:
    """Clusters from a config file, or the single native cluster at ``data_dir``."""
    if path is None:
        return (ClusterConfig(DEFAULT_CLUSTER_ID, "native", data_dir=data_dir),)
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("clusters"), list):
        raise ConfigError(f"{path}: expected a mapping with a 'clusters' list")
    clusters = tuple(
        cluster_from_mapping(raw, f"{path}: clusters[{i}]")
        for i, raw in enumerate(document["clusters"])
    )
    if not clusters:
        raise ConfigError(f"{path}: 'clusters' is empty")
    ids = [c.id for c in clusters]
    duplicate = next((i for i in ids if ids.count(i) > 1), None)
    if duplicate:
        raise ConfigError(f"{path}: cluster id {duplicate!r} appears twice")
    return clusters
