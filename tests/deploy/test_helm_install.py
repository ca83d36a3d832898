"""`helm install` of the chart against a real kube-apiserver, and its RBAC put to work.

The API server (1.20, Debian's build) validates and stores every object the
chart makes; no controllers run, so nothing is scheduled. The CRD-based
kinds go in through the tests' own CRDs (tests/deploy/crds.py), since the
upstream CRDs are not available offline.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from csi_rbd.kube import Forbidden, KubeClient
from tests.deploy import crds
from tests.deploy.apiserver import Cluster
from tests.deploy.conftest import (
    CEPH_CONTROLLER_SA,
    CEPH_NAMESPACE,
    CEPH_NODE_SA,
    CEPH_RELEASE,
    CEPH_VALUES,
    KUBEVIRT_VALUES,
    NATIVE_NAMESPACE,
    NATIVE_NODE_SA,
    NATIVE_RELEASE,
)
from tests.deploy.tools import CHART, documents, run

pytestmark = pytest.mark.timeout(3600)

Helm = Callable[..., Any]
CEPH_RELEASE_VALUES = [
    "driverName=ceph.csi-rbd.io",
    "storageClasses.filesystem.name=csi-rbd-ceph",
    "storageClasses.vm.name=csi-rbd-ceph-vm",
    "volumeSnapshotClass.name=csi-rbd-ceph",
]


@pytest.fixture(scope="module")
def helm_on(helm: Path, cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """Run helm against the test API server (its own config and cache directories)."""
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_DATA_HOME": str(home / "data"),
        "KUBECONFIG": str(cluster.kubeconfig()),
    }
    counter = iter(range(1000))

    def helm_run(*args: str, values: dict[str, Any] | None = None, check: bool = True) -> Any:
        extra: list[str] = []
        if values is not None:
            path = home / f"values-{next(counter)}.json"
            path.write_text(json.dumps(values))
            extra = ["-f", str(path)]
        return run([helm, *args, *extra], env=env, timeout=300, check=check)

    return helm_run


def get(cluster: Cluster, path: str) -> dict[str, Any] | None:
    status, text = cluster.request(path)
    if status == 404:
        return None
    assert status == 200, f"GET {path}: {status} {text[:500]}"
    answer = json.loads(text)
    assert isinstance(answer, dict)
    return answer


def crd_exists(cluster: Cluster, plural: str, group: str) -> bool:
    path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{plural}.{group}"
    return get(cluster, path) is not None


@pytest.fixture(scope="module")
def crds_installed(cluster: Cluster) -> None:
    for crd in crds.custom_resource_definitions():
        name = crd["metadata"]["name"]
        if get(cluster, f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"):
            continue
        cluster.call("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    deadline = time.monotonic() + 60
    for crd in crds.custom_resource_definitions():
        name = crd["metadata"]["name"]
        while True:
            found = get(cluster, f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
            conditions = (found or {}).get("status", {}).get("conditions", [])
            if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                break
            assert time.monotonic() < deadline, f"CRD {name} not established: {conditions}"
            time.sleep(0.2)
    # discovery caches in helm are per run; the API server needs a moment to serve the kinds
    time.sleep(1)


def manifest_objects(helm_on: Helm, release: str, namespace: str) -> list[dict[str, Any]]:
    return documents(helm_on("get", "manifest", release, "-n", namespace).stdout)


def api_path(document: dict[str, Any], namespace: str) -> str:
    """The REST path of a rendered object (the kinds the chart makes)."""
    plurals = {
        "ServiceAccount": "serviceaccounts",
        "Secret": "secrets",
        "ConfigMap": "configmaps",
        "Service": "services",
        "DaemonSet": "daemonsets",
        "Deployment": "deployments",
        "ClusterRole": "clusterroles",
        "ClusterRoleBinding": "clusterrolebindings",
        "Role": "roles",
        "RoleBinding": "rolebindings",
        "CSIDriver": "csidrivers",
        "StorageClass": "storageclasses",
        "VolumeSnapshotClass": "volumesnapshotclasses",
        "StorageProfile": "storageprofiles",
        "VirtualMachineClusterPreference": "virtualmachineclusterpreferences",
    }
    api_version, kind = document["apiVersion"], document["kind"]
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    namespaced = kind in {
        "ServiceAccount",
        "Secret",
        "ConfigMap",
        "Service",
        "DaemonSet",
        "Deployment",
        "Role",
        "RoleBinding",
    }
    where = f"/namespaces/{namespace}" if namespaced else ""
    return f"{prefix}{where}/{plurals[kind]}/{document['metadata']['name']}"


def access(cluster: Cluster, user: str, verb: str, resource: str, **more: str) -> bool:
    review = cluster.call(
        "POST",
        "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
        {"spec": {"resourceAttributes": {"verb": verb, "resource": resource, **more}}},
        user=user,
    )
    return bool(review["status"]["allowed"])  # type: ignore[index]


# --- without the CRDs ----------------------------------------------------------------------


def test_install_without_the_crds_needs_those_kinds_off(helm_on: Helm, cluster: Cluster) -> None:
    if crd_exists(cluster, "volumesnapshotclasses", "snapshot.storage.k8s.io"):
        pytest.skip("the snapshot CRD is already installed in this API server")
    sets = [
        "driverName=bare.csi-rbd.io",
        "storageClasses.filesystem.name=bare",
        "storageClasses.vm.name=bare-vm",
        "volumeSnapshotClass.name=bare",
    ]
    args = ["install", "bare", str(CHART), "-n", "bare", "--create-namespace"]
    refused = helm_on(*args, *[f"--set={s}" for s in sets], check=False)
    assert refused.returncode != 0
    assert 'no matches for kind "VolumeSnapshotClass"' in refused.stderr
    assert "snapshot.storage.k8s.io/v1" in refused.stderr
    helm_on(*args, *[f"--set={s}" for s in sets], "--set=volumeSnapshotClass.enabled=false")
    assert get(cluster, "/apis/storage.k8s.io/v1/csidrivers/bare.csi-rbd.io") is not None
    helm_on("uninstall", "bare", "-n", "bare")
    assert get(cluster, "/apis/storage.k8s.io/v1/csidrivers/bare.csi-rbd.io") is None


# --- the native engine with the KubeVirt extras ---------------------------------------------


@pytest.fixture(scope="module")
def native_release(helm_on: Helm, crds_installed: None) -> Iterator[str]:
    result = helm_on(
        "install",
        NATIVE_RELEASE,
        str(CHART),
        "-n",
        NATIVE_NAMESPACE,
        "--create-namespace",
        values=KUBEVIRT_VALUES,
    )
    yield result.stdout
    helm_on("uninstall", NATIVE_RELEASE, "-n", NATIVE_NAMESPACE, check=False)


def test_native_install_creates_every_object(
    helm_on: Helm, cluster: Cluster, native_release: str
) -> None:
    assert "STATUS: deployed" in native_release
    assert "VirtualMachineClusterPreference csi-rbd-vm (preferredDiskCache writeback)" in (
        native_release
    )
    objects = manifest_objects(helm_on, NATIVE_RELEASE, NATIVE_NAMESPACE)
    kinds = {o["kind"] for o in objects}
    assert {"CSIDriver", "DaemonSet", "StorageClass", "VolumeSnapshotClass", "StorageProfile",
            "VirtualMachineClusterPreference", "ClusterRole", "Role"} <= kinds  # fmt: skip
    for document in objects:
        stored = get(cluster, api_path(document, NATIVE_NAMESPACE))
        assert stored is not None, f"{document['kind']} {document['metadata']['name']} missing"
    driver = get(cluster, "/apis/storage.k8s.io/v1/csidrivers/rbd.csi-rbd.io")
    assert driver is not None
    assert driver["spec"]["attachRequired"] is False
    assert driver["spec"]["podInfoOnMount"] is True
    assert driver["spec"]["fsGroupPolicy"] == "File"
    assert driver["spec"]["volumeLifecycleModes"] == ["Persistent"]
    vm = get(cluster, "/apis/storage.k8s.io/v1/storageclasses/csi-rbd-vm")
    assert vm is not None and vm["volumeBindingMode"] == "WaitForFirstConsumer"
    assert vm["parameters"]["cache"] == "writeback"
    profile = get(cluster, "/apis/cdi.kubevirt.io/v1beta1/storageprofiles/csi-rbd-vm")
    assert profile is not None and profile["spec"]["cloneStrategy"] == "csi-clone"
    daemonset = get(
        cluster, f"/apis/apps/v1/namespaces/{NATIVE_NAMESPACE}/daemonsets/t-csi-rbd-node"
    )
    assert daemonset is not None
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-node-critical"


def test_the_node_service_account_can_do_the_drivers_calls(
    cluster: Cluster, native_release: str
) -> None:
    """The chart's RBAC, as the node plugin's service account (native: it provisions)."""
    namespace = f"app-{secrets.token_hex(3)}"
    cluster.call("POST", "/api/v1/namespaces", {"metadata": {"name": namespace}})
    node = f"node-{secrets.token_hex(3)}"
    cluster.call(
        "POST",
        "/api/v1/nodes",
        {"metadata": {"name": node, "labels": {"topology.rbd.csi-rbd.io/node": node}}},
    )
    cluster.call(
        "POST",
        f"/api/v1/namespaces/{namespace}/persistentvolumeclaims",
        {
            "metadata": {"name": "vm-disk"},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "volumeMode": "Block",
                "storageClassName": "csi-rbd-vm",
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )
    try:
        with KubeClient.connect(cluster.kubeconfig(NATIVE_NODE_SA)) as client:
            assert client.annotate_thick_provisioned(namespace, "vm-disk", "rbd.csi-rbd.io")
            assert client.node_topology(node, ["topology.rbd.csi-rbd.io/node"]) == {
                "topology.rbd.csi-rbd.io/node": node
            }
        sa = NATIVE_NODE_SA
        assert access(cluster, sa, "create", "persistentvolumes")
        assert access(cluster, sa, "update", "persistentvolumeclaims")
        assert access(cluster, sa, "patch", "persistentvolumeclaims", subresource="status")
        assert access(cluster, sa, "patch", "volumesnapshotcontents",
                      group="snapshot.storage.k8s.io")  # fmt: skip
        assert access(cluster, sa, "create", "leases", group="coordination.k8s.io",
                      namespace=NATIVE_NAMESPACE)  # fmt: skip
        # and no more than that
        assert not access(cluster, sa, "delete", "persistentvolumeclaims")
        assert not access(cluster, sa, "get", "secrets", namespace=namespace)
        assert not access(cluster, sa, "create", "pods", namespace=namespace)
        assert not access(cluster, sa, "create", "leases", group="coordination.k8s.io",
                          namespace="kube-system")  # fmt: skip
    finally:
        cluster.request(f"/api/v1/nodes/{node}", method="DELETE")
        cluster.request(f"/api/v1/namespaces/{namespace}", method="DELETE")


def test_upgrade_and_values_the_server_refuses(
    helm_on: Helm, cluster: Cluster, native_release: str
) -> None:
    helm_on(
        "upgrade",
        NATIVE_RELEASE,
        str(CHART),
        "-n",
        NATIVE_NAMESPACE,
        "--reuse-values",
        "--set=kubevirt.preference.devices.preferredDiskBus=virtio",
        "--set=controller.replicas=3",
    )
    preference = get(
        cluster,
        "/apis/instancetype.kubevirt.io/v1beta1/virtualmachineclusterpreferences/csi-rbd-vm",
    )
    assert preference is not None
    assert preference["spec"]["devices"] == {
        "preferredDiskCache": "writeback",
        "preferredDiskBus": "virtio",
    }
    history = helm_on("history", NATIVE_RELEASE, "-n", NATIVE_NAMESPACE).stdout
    assert "Upgrade complete" in history
    bad = helm_on("upgrade", NATIVE_RELEASE, str(CHART), "-n", NATIVE_NAMESPACE,
                  "--reuse-values", "--set=storageClasses.vm.cache=fast", check=False)  # fmt: skip
    assert bad.returncode != 0
    assert "storageClasses.vm.cache must be one of the following" in bad.stderr


# --- the Ceph engine -----------------------------------------------------------------------


def test_ceph_install_and_its_rbac(helm_on: Helm, cluster: Cluster, crds_installed: None) -> None:
    result = helm_on(
        "install",
        CEPH_RELEASE,
        str(CHART),
        "-n",
        CEPH_NAMESPACE,
        "--create-namespace",
        *[f"--set={s}" for s in CEPH_RELEASE_VALUES],
        values=CEPH_VALUES,
    )
    try:
        assert "Engine: ceph (clusters: ceph-a, ceph-b; StorageClasses use ceph-b)" in result.stdout
        ns = f"/namespaces/{CEPH_NAMESPACE}"
        deployment = get(cluster, f"/apis/apps/v1{ns}/deployments/c-csi-rbd-controller")
        assert deployment is not None and deployment["spec"]["replicas"] == 2
        secret = get(cluster, f"/api/v1{ns}/secrets/c-csi-rbd-ceph")
        assert secret is not None and set(secret["data"]) == {"userID", "userKey"}
        config = get(cluster, f"/api/v1{ns}/configmaps/c-csi-rbd-config")
        assert config is not None and "ceph-b" in config["data"]["clusters.yaml"]
        sc = get(cluster, "/apis/storage.k8s.io/v1/storageclasses/csi-rbd-ceph")
        assert sc is not None and sc["provisioner"] == "ceph.csi-rbd.io"
        assert sc["parameters"]["csi.storage.k8s.io/provisioner-secret-name"] == "c-csi-rbd-ceph"

        # the controller creates volumes and annotates PVCs; the node plugin does neither
        assert access(cluster, CEPH_CONTROLLER_SA, "patch", "persistentvolumeclaims")
        assert access(cluster, CEPH_CONTROLLER_SA, "create", "persistentvolumes")
        assert not access(cluster, CEPH_NODE_SA, "patch", "persistentvolumeclaims")
        assert not access(cluster, CEPH_NODE_SA, "create", "persistentvolumes")
        assert access(cluster, CEPH_NODE_SA, "get", "nodes")
        with (
            KubeClient.connect(cluster.kubeconfig(CEPH_NODE_SA)) as node_client,
            pytest.raises(Forbidden),
        ):
            node_client.annotate_thick_provisioned(CEPH_NAMESPACE, "any", "ceph.csi-rbd.io")
    finally:
        helm_on("uninstall", CEPH_RELEASE, "-n", CEPH_NAMESPACE)
    assert get(cluster, "/apis/storage.k8s.io/v1/csidrivers/ceph.csi-rbd.io") is None
    assert get(cluster, "/apis/storage.k8s.io/v1/storageclasses/csi-rbd-ceph") is None


def test_uninstall_removes_everything(helm_on: Helm, cluster: Cluster, native_release: str) -> None:
    objects = manifest_objects(helm_on, NATIVE_RELEASE, NATIVE_NAMESPACE)
    helm_on("uninstall", NATIVE_RELEASE, "-n", NATIVE_NAMESPACE)
    for document in objects:
        assert get(cluster, api_path(document, NATIVE_NAMESPACE)) is None, document["kind"]
