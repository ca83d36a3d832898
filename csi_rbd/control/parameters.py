"""StorageClass parameters: parsed, validated, defaulted in one place.

Every key is known; an unknown key or a bad value is refused with a message
that names it. Defaults (also in the README):

=================================  ==========================================
clusterID                          the first configured cluster (``local``)
pool                               the cluster's default pool (``rbd``)
imageFeatures                      layering,exclusive-lock,object-map,
                                   fast-diff,deep-flatten
objectSize                         4M (a power of two from 4K to 32M)
csi.storage.k8s.io/fstype          ext4 (or xfs)
mkfsOptions                        none beyond the driver's own
cache                              none (| writethrough | writeback)
discard                            unmap (| ignore)
=================================  ==========================================
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass

from csi_rbd.config import DriverConfig
from csi_rbd.control.errors import InvalidRequest
from csi_rbd.engine import errors
from csi_rbd.engine.native import validate

CACHE_MODES = ("none", "writethrough", "writeback")
DISCARD_MODES = ("unmap", "ignore")
FILESYSTEMS = ("ext4", "xfs")
MUTABLE = ("cache", "discard")
K8S_PREFIX = "csi.storage.k8s.io/"
PVC_NAME = K8S_PREFIX + "pvc/name"
PVC_NAMESPACE = K8S_PREFIX + "pvc/namespace"
PV_NAME = K8S_PREFIX + "pv/name"
FSTYPE = K8S_PREFIX + "fstype"
_SECRET_ROLES = (
    "provisioner",
    "controller-publish",
    "node-stage",
    "node-publish",
    "controller-expand",
    "node-expand",
    "snapshotter",
)
_K8S_KEYS = {
    PVC_NAME,
    PVC_NAMESPACE,
    PV_NAME,
    FSTYPE,
    *(
        f"{K8S_PREFIX}{role}-secret-{part}"
        for role in _SECRET_ROLES
        for part in ("name", "namespace")
    ),
}
_OWN_KEYS = {"clusterID", "pool", "imageFeatures", "objectSize", "mkfsOptions", "cache", "discard"}
_SIZE = re.compile(r"^(\d+)([KMG]i?)?$")
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


@dataclass(frozen=True)
class VolumeParameters:
    cluster_id: str
    pool: str
    features: int
    order: int
    fstype: str
    mkfs_options: tuple[str, ...]
    cache: str
    discard: str
    pvc_name: str | None = None
    pvc_namespace: str | None = None

    def with_mutable(self, mutable: Mapping[str, str]) -> VolumeParameters:
        """These parameters with the mutable ones (cache, discard) taking precedence."""
        changes = parse_mutable(mutable)
        return dataclasses.replace(
            self,
            cache=changes.get("cache", self.cache),
            discard=changes.get("discard", self.discard),
        )

    def context(self) -> dict[str, str]:
        """What NodeStageVolume gets back in the volume context."""
        return {
            "clusterID": self.cluster_id,
            "pool": self.pool,
            "mkfsOptions": shlex.join(self.mkfs_options),
            "cache": self.cache,
            "discard": self.discard,
        }


def _choice(params: Mapping[str, str], key: str, allowed: tuple[str, ...], default: str) -> str:
    value = params.get(key, default)
    if value not in allowed:
        raise InvalidRequest(f"parameter {key}={value!r} must be one of {', '.join(allowed)}")
    return value


def parse_mutable(params: Mapping[str, str]) -> dict[str, str]:
    """The parameters ControllerModifyVolume may change: cache and discard."""
    for key in params:
        if key not in MUTABLE:
            raise InvalidRequest(
                f"parameter {key!r} cannot be modified (mutable: {', '.join(MUTABLE)})"
            )
    changes = {}
    if "cache" in params:
        changes["cache"] = _choice(params, "cache", CACHE_MODES, "none")
    if "discard" in params:
        changes["discard"] = _choice(params, "discard", DISCARD_MODES, "unmap")
    return changes


def _features(text: str) -> int:
    bits = 0
    for name in filter(None, (part.strip() for part in text.split(","))):
        bit = validate.FEATURE_NAMES.get(name)
        if bit is None or not bit & validate.RBD_FEATURES_SUPPORTED:
            supported = [
                n for n, b in validate.FEATURE_NAMES.items() if b & validate.RBD_FEATURES_SUPPORTED
            ]
            raise InvalidRequest(
                f"parameter imageFeatures: unsupported feature {name!r} "
                f"(supported: {', '.join(supported)})"
            )
        bits |= bit
    if not bits & validate.RBD_FEATURE_LAYERING:
        raise InvalidRequest("parameter imageFeatures must include layering (clones need it)")
    return bits


def _order(text: str) -> int:
    match = _SIZE.match(text.strip())
    if not match:
        raise InvalidRequest(f"parameter objectSize={text!r} is not a size like 4M or 4194304")
    size = int(match.group(1)) * _UNITS.get((match.group(2) or " ")[0], 1)
    order = size.bit_length() - 1
    if size <= 0 or size != 1 << order or not validate.MIN_ORDER <= order <= validate.MAX_ORDER:
        raise InvalidRequest(f"parameter objectSize={text!r} must be a power of two from 4K to 32M")
    return order


def parse(params: Mapping[str, str], config: DriverConfig) -> VolumeParameters:
    """Validate a StorageClass's parameters; InvalidRequest names the first bad key."""
    for key in params:
        if key not in _OWN_KEYS and key not in _K8S_KEYS:
            raise InvalidRequest(f"unknown parameter {key!r}")
    cluster_id = params.get("clusterID", config.default_cluster.id)
    cluster = config.cluster(cluster_id)
    if cluster is None:
        known = ", ".join(c.id for c in config.clusters)
        raise InvalidRequest(
            f"parameter clusterID={cluster_id!r} is not configured (known: {known})"
        )
    pool = params.get("pool", cluster.pool)
    try:
        validate.name(pool, "pool")
    except errors.InvalidArgument as exc:
        raise InvalidRequest(f"parameter pool: {exc}") from exc
    try:
        mkfs_options = tuple(shlex.split(params.get("mkfsOptions", "")))
    except ValueError as exc:
        raise InvalidRequest(f"parameter mkfsOptions: {exc}") from exc
    return VolumeParameters(
        cluster_id=cluster_id,
        pool=pool,
        features=_features(params["imageFeatures"])
        if "imageFeatures" in params
        else validate.RBD_FEATURES_DEFAULT,
        order=_order(params["objectSize"]) if "objectSize" in params else validate.DEFAULT_ORDER,
        fstype=_choice(params, FSTYPE, FILESYSTEMS, "ext4"),
        mkfs_options=mkfs_options,
        cache=_choice(params, "cache", CACHE_MODES, "none"),
        discard=_choice(params, "discard", DISCARD_MODES, "unmap"),
        pvc_name=params.get(PVC_NAME),
        pvc_namespace=params.get(PVC_NAMESPACE),
    )
