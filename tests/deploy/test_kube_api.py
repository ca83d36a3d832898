"""csi_rbd.kube against a real kube-apiserver (etcd + kube-apiserver started by the tests).

The first test that needs the API server may build it (see apiserver.py),
hence the long timeout.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from csi_rbd import kube
from csi_rbd.kube import KubeClient
from tests.deploy.apiserver import Cluster

pytestmark = pytest.mark.timeout(3600)

DRIVER = "rbd.csi-rbd.io"
KEY = f"{DRIVER}/storage.thick-provisioned"


@pytest.fixture(scope="module")
def admin(cluster: Cluster) -> Iterator[KubeClient]:
    with KubeClient.connect(cluster.kubeconfig()) as client:
        yield client


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    name = f"annotate-{secrets.token_hex(4)}"
    cluster.call("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
    yield name
    cluster.request(f"/api/v1/namespaces/{name}", method="DELETE")


def create_pvc(
    cluster: Cluster, namespace: str, name: str, annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    return cluster.call(
        "POST",
        f"/api/v1/namespaces/{namespace}/persistentvolumeclaims",
        {
            "metadata": {"name": name, "annotations": annotations or {}},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "volumeMode": "Block",
                "resources": {"requests": {"storage": "1Gi"}},
                "storageClassName": "csi-rbd-vm",
            },
        },
    )


def pvc(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    return cluster.call("GET", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}")


def test_annotate_thick_provisioned_sets_the_annotation_once(
    cluster: Cluster, admin: KubeClient, namespace: str
) -> None:
    create_pvc(cluster, namespace, "disk", {"keep.example/me": "yes"})
    before = pvc(cluster, namespace, "disk")["metadata"]["resourceVersion"]

    assert admin.annotate_thick_provisioned(namespace, "disk", DRIVER) is True
    after = pvc(cluster, namespace, "disk")
    assert after["metadata"]["annotations"] == {KEY: "true", "keep.example/me": "yes"}
    assert after["spec"]["resources"]["requests"]["storage"] == "1Gi"
    changed = after["metadata"]["resourceVersion"]
    assert changed != before

    # idempotent: nothing is written the second time
    assert admin.annotate_thick_provisioned(namespace, "disk", DRIVER) is False
    assert pvc(cluster, namespace, "disk")["metadata"]["resourceVersion"] == changed
    assert admin.pvc_annotations(namespace, "disk")[KEY] == "true"


def test_annotate_overrides_a_false_value_and_keeps_other_drivers_keys(
    cluster: Cluster, admin: KubeClient, namespace: str
) -> None:
    create_pvc(
        cluster, namespace, "disk", {KEY: "false", "other.io/storage.thick-provisioned": "x"}
    )
    assert admin.annotate_thick_provisioned(namespace, "disk", DRIVER) is True
    annotations = pvc(cluster, namespace, "disk")["metadata"]["annotations"]
    assert annotations == {KEY: "true", "other.io/storage.thick-provisioned": "x"}


def test_annotate_errors_say_what_and_why(
    cluster: Cluster, admin: KubeClient, namespace: str
) -> None:
    with pytest.raises(
        kube.NotFound, match=rf"PersistentVolumeClaim {namespace}/missing.*not found"
    ):
        admin.annotate_thick_provisioned(namespace, "missing", DRIVER)
    create_pvc(cluster, namespace, "disk")
    with KubeClient.connect(cluster.kubeconfig("nobody")) as nobody:
        with pytest.raises(kube.Forbidden, match=r"forbidden.*RBAC") as caught:
            nobody.annotate_thick_provisioned(namespace, "disk", DRIVER)
        assert caught.value.status == 403
        assert "nobody" in str(caught.value)  # the API server's message names the user
    with pytest.raises(ValueError, match="cannot prefix an annotation key"):
        admin.annotate_thick_provisioned(namespace, "disk", "Not A Driver")
    with pytest.raises(ValueError, match="not a valid Kubernetes namespace"):
        admin.annotate_thick_provisioned("Bad_NS", "disk", DRIVER)
    assert KEY not in pvc(cluster, namespace, "disk")["metadata"].get("annotations", {})


def test_unreachable_api_server_and_missing_kubeconfig(cluster: Cluster, tmp_path: Any) -> None:
    with pytest.raises(kube.KubeConfigError, match="does not exist"):
        KubeClient.connect(tmp_path / "nope")
    config = cluster.kubeconfig().read_text().replace(cluster.url, "https://127.0.0.1:1")
    dead = tmp_path / "dead"
    dead.write_text(config)
    with KubeClient.connect(dead, timeout=2) as client:
        with pytest.raises(kube.KubeError, match="cannot reach the Kubernetes API server"):
            client.annotate_thick_provisioned("default", "disk", DRIVER)


def test_in_cluster_config_outside_a_pod_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(kube.KubeConfigError, match="outside a pod, pass a kubeconfig"):
        KubeClient.connect()


def test_node_topology_reads_labels(cluster: Cluster, admin: KubeClient) -> None:
    name = f"node-{secrets.token_hex(3)}"
    labels = {
        "topology.rbd.csi-rbd.io/node": name,
        "topology.kubernetes.io/zone": "zone-a",
        "kubernetes.io/hostname": name,
    }
    cluster.call("POST", "/api/v1/nodes", {"metadata": {"name": name, "labels": labels}})
    try:
        keys = ["topology.rbd.csi-rbd.io/node", "topology.kubernetes.io/zone", "absent/key"]
        assert admin.node_topology(name, keys) == {
            "topology.rbd.csi-rbd.io/node": name,
            "topology.kubernetes.io/zone": "zone-a",
        }
        assert admin.node_topology(name, []) == {}
        with pytest.raises(kube.NotFound, match="Node missing-node: not found"):
            admin.node_topology("missing-node", keys)
        with KubeClient.connect(cluster.kubeconfig("nobody")) as nobody:
            with pytest.raises(kube.Forbidden):
                nobody.node_topology(name, keys)
    finally:
        cluster.request(f"/api/v1/nodes/{name}", method="DELETE")


def test_module_level_calls_use_the_shared_client(
    cluster: Cluster, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig()))
    kube.set_shared_client(None)
    try:
        create_pvc(cluster, namespace, "disk")
        assert kube.annotate_thick_provisioned(namespace, "disk", DRIVER) is True
        assert kube.shared_client() is kube.shared_client()
    finally:
        kube.shared_client().close()
        kube.set_shared_client(None)
    assert pvc(cluster, namespace, "disk")["metadata"]["annotations"][KEY] == "true"


def test_create_volume_with_discard_ignore_annotates_its_pvc(
    cluster: Cluster, admin: KubeClient, namespace: str, tmp_path: Any
) -> None:
    """The controller path: CreateVolume(discard=ignore) with the PVC name and namespace
    csi-provisioner passes (--extra-create-metadata) marks the PVC for KubeVirt."""
    from csi_rbd.config import ClusterConfig, DriverConfig
    from csi_rbd.control.volumes import CreateVolumeRequest, VolumeService
    from csi_rbd.engine.native.engine import NativeEngine
    from csi_rbd.locks import OperationLocks

    create_pvc(cluster, namespace, "vm-disk")
    create_pvc(cluster, namespace, "plain-disk")
    config = DriverConfig(
        endpoint="unix:///unused",
        node_id="n",
        clusters=(ClusterConfig("local", "native", data_dir=tmp_path / "data"),),
    )
    engine = NativeEngine("local", tmp_path / "data")
    kube.set_shared_client(admin)
    try:
        volumes = VolumeService(config, {"local": engine}, OperationLocks())
        for pvc_name, discard in (("vm-disk", "ignore"), ("plain-disk", "unmap")):
            volumes.create(
                CreateVolumeRequest(
                    name=f"pvc-{pvc_name}",
                    required_bytes=1 << 20,
                    parameters={
                        "discard": discard,
                        "csi.storage.k8s.io/pvc/name": pvc_name,
                        "csi.storage.k8s.io/pvc/namespace": namespace,
                    },
                )
            )
    finally:
        kube.set_shared_client(None)
        engine.close()
    assert pvc(cluster, namespace, "vm-disk")["metadata"]["annotations"][KEY] == "true"
    assert KEY not in (pvc(cluster, namespace, "plain-disk")["metadata"].get("annotations") or {})
