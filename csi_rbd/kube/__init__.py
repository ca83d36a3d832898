"""The driver's Kubernetes API calls (PVC annotation, node labels); see :mod:`.client`."""

from csi_rbd.kube.client import (
    THICK_PROVISIONED_SUFFIX,
    Forbidden,
    KubeClient,
    KubeConfigError,
    KubeError,
    NotFound,
    annotate_thick_provisioned,
    node_topology,
    set_shared_client,
    shared_client,
    thick_provisioned_key,
    topology_from_labels,
)

__all__ = [
    "THICK_PROVISIONED_SUFFIX",
    "Forbidden",
    "KubeClient",
    "KubeConfigError",
    "KubeError",
    "NotFound",
    "annotate_thick_provisioned",
    "node_topology",
    "set_shared_client",
    "shared_client",
    "thick_provisioned_key",
    "topology_from_labels",
]
