"""The Helm chart, rendered by a real helm: lint, value sets, schema refusals, objects.

Every rendered object is validated offline: built-in kinds against the
Kubernetes JSON schemas kubernetes-validate ships (strict: unknown fields
refused), at the oldest and the newest Kubernetes it knows; the CRD-based
kinds (VolumeSnapshotClass, StorageProfile, VirtualMachineClusterPreference)
against the tests' own schemas (tests/deploy/crds.py). StorageClass
parameters go through the driver's own parameter parser, and the clusters
file of the Ceph engine through the driver's own config loader.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from csi_rbd.config import ClusterConfig, DriverConfig, load_clusters
from csi_rbd.control import parameters
from tests.deploy import crds
from tests.deploy.conftest import CEPH_VALUES, KUBEVIRT_VALUES, Render
from tests.deploy.tools import CHART, by_kind, containers, one, run, walk

OLDEST = kubernetes_validate.utils.all_versions()[0]
NEWEST = kubernetes_validate.utils.latest_version()

VALUE_SETS: dict[str, tuple[dict[str, Any] | None, list[str]]] = {
    "defaults": (None, []),
    "native-multi-node": (None, ["native.singleNode=false"]),
    "native-kubevirt": (KUBEVIRT_VALUES, []),
    "ceph": (CEPH_VALUES, []),
    "ceph-kubevirt-vac": (
        {**CEPH_VALUES, **KUBEVIRT_VALUES},
        ["volumeAttributesClass.enabled=true", "storageClasses.vm.cache=writethrough"],
    ),
    "ceph-existing-secret": (
        {**CEPH_VALUES, "ceph": {**CEPH_VALUES["ceph"], "secret": {"existingSecret": "mine"}}},
        [],
    ),
    "minimal": (
        None,
        [
            "metrics.enabled=false",
            "volumeSnapshotClass.enabled=false",
            "storageClasses.vm.enabled=false",
            "sidecars.snapshotter.enabled=false",
            "sidecars.resizer.enabled=false",
        ],
    ),
}


def validate_offline(document: dict[str, Any]) -> str:
    """Validate one object; returns how ('k8s' or 'crd')."""
    if crds.schema_for(document["apiVersion"], document["kind"]) is not None:
        crds.validate(document)
        return "crd"
    for version in (OLDEST, NEWEST):
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.utils.ValidationError as exc:
            name = document["metadata"]["name"]
            raise AssertionError(
                f"{document['kind']} {name} fails Kubernetes {version} (strict): {exc.message} "
                f"at {'/'.join(map(str, exc.path))}"
            ) from exc
    return "k8s"


# --- lint and render ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "values", [None, CEPH_VALUES, KUBEVIRT_VALUES], ids=["native", "ceph", "kubevirt"]
)
def test_helm_lint_strict(helm: Path, values: dict[str, Any] | None, values_args: Any) -> None:
    result = run([helm, "lint", "--strict", CHART, *values_args(values)])
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_object_validates_offline(render: Render, name: str) -> None:
    values, sets = VALUE_SETS[name]
    docs = render(values, sets)
    assert docs, "nothing rendered"
    how = [validate_offline(doc) for doc in docs]
    assert how.count("k8s") >= 5
    kinds = {doc["kind"] for doc in docs}
    assert {"CSIDriver", "DaemonSet", "ServiceAccount", "ClusterRole"} <= kinds
    for doc in docs:
        assert doc["metadata"]["name"], doc
        labels = doc["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/managed-by") == "Helm", doc["kind"]


def test_crd_schemas_catch_mistakes() -> None:
    """The tests' CRD schemas are not vacuous."""
    meta = {"metadata": {"name": "x"}}
    snapshot_class = {"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass"}
    profile = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "StorageProfile"}
    preference = {
        "apiVersion": "instancetype.kubevirt.io/v1beta1",
        "kind": "VirtualMachineClusterPreference",
    }
    bad = [
        {**snapshot_class, **meta, "driver": "d", "deletionPolicy": "Keep"},
        {**snapshot_class, **meta, "deletionPolicy": "Delete"},
        {
            **profile,
            **meta,
            "spec": {
                "claimPropertySets": [{"accessModes": ["ReadWriteSome"], "volumeMode": "Block"}]
            },
        },
        {**profile, **meta, "spec": {"cloneStrategy": "csi-clone", "clonestrategy": "copy"}},
        {**preference, **meta, "spec": {"devices": {"preferredDiskCache": "unsafe"}}},
        {**preference, "metadata": {}, "spec": {}},
    ]
    for document in bad:
        with pytest.raises(jsonschema.ValidationError):
            crds.validate(document)


# --- values the schema (or the chart's checks) refuse ----------------------------------------

BAD_VALUES = [
    (["engine=lvm"], 'engine must be one of the following: "native", "ceph"'),
    (["storageClasses.vm.cache=fast"], "storageClasses.vm.cache must be one of the following"),
    (["storageClasses.vm.discard=sometimes"], "storageClasses.vm.discard must be one of"),
    (["storageClasses.filesystem.fsType=btrfs"], "storageClasses.filesystem.fsType must be one of"),
    (["driverName=Bad_Name"], "driverName: Does not match pattern"),
    (["frobnicate=1"], "Additional property frobnicate is not allowed"),
    (["storageClasses.vm.cahce=none"], "Additional property cahce is not allowed"),
    (["node.dataDir=var/lib/csi-rbd"], "node.dataDir: Does not match pattern"),
    (["metrics.port=70000"], "metrics.port: Must be less than or equal to 65535"),
    (["storageClasses.filesystem.objectSize=3M"], "objectSize"),
    (["storageClasses.vm.imageFeatures=layering\\,journaling"], "imageFeatures"),
    (["kubevirt.storageProfile.cloneStrategy=fast"], "cloneStrategy must be one of"),
    (["kubevirt.storageProfile.dataImportCronSourceFormat=qcow2"], "dataImportCronSourceFormat"),
    (["sidecars.provisioner.extraArgs={verbose}"], "Does not match pattern '^--'"),
    (["sidecars.provisioner.featureGates.Topology=yes"], "Invalid type. Expected: boolean"),
    (["engine=ceph"], "ceph.clusters: Array must have at least 1 items"),
    (
        ["engine=ceph", "ceph.clusters[0].id=a"],
        "ceph.clusters.0: monitors is required",
    ),
    (
        ["engine=ceph", "ceph.clusters[0].id=a", "ceph.clusters[0].monitors={10.0.0.1:3300}"],
        "engine=ceph needs Ceph credentials: set ceph.secret.userID and ceph.secret.userKey",
    ),
    (
        [
            "engine=ceph",
            "ceph.clusters[0].id=a",
            "ceph.clusters[0].monitors={m:3300}",
            "ceph.clusters[1].id=a",
            "ceph.clusters[1].monitors={n:3300}",
            "ceph.secret.existingSecret=s",
        ],
        'cluster id "a" appears twice',
    ),
    (
        [
            "engine=ceph",
            "ceph.clusters[0].id=a",
            "ceph.clusters[0].monitors={m:3300}",
            "ceph.clusterID=b",
            "ceph.secret.existingSecret=s",
        ],
        'ceph.clusterID "b" is not one of ceph.clusters (a)',
    ),
    (
        ["kubevirt.preference.enabled=true", "storageClasses.vm.enabled=false"],
        "takes its cache mode from the VM StorageClass: set storageClasses.vm.enabled=true",
    ),
    (
        ["kubevirt.preference.devices.preferredDiskCache=none"],
        "kubevirt.preference.devices: Must not validate the schema (not)",
    ),
]


@pytest.mark.parametrize(("sets", "message"), BAD_VALUES, ids=[s[0][-1] for s in BAD_VALUES])
def test_bad_values_fail_with_a_clear_message(
    render_error: Any, sets: list[str], message: str
) -> None:
    error = render_error(sets=sets)
    assert message in error, error


# --- what the default (native) render contains ---------------------------------------------


def test_csidriver(render: Render) -> None:
    driver = one(render(), "CSIDriver")
    assert driver["metadata"]["name"] == "rbd.csi-rbd.io"
    assert driver["spec"] == {
        "attachRequired": False,
        "podInfoOnMount": True,
        "fsGroupPolicy": "File",
        "volumeLifecycleModes": ["Persistent"],
    }


def test_native_node_daemonset_provisions_node_locally(render: Render) -> None:
    docs = render()
    assert not by_kind(docs, "Deployment"), "the native engine needs no controller Deployment"
    daemonset = one(docs, "DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["serviceAccountName"] == "t-csi-rbd-node"
    assert not pod.get("hostNetwork")
    c = containers(daemonset)
    assert set(c) == {
        "csi-rbd",
        "node-driver-registrar",
        "liveness-probe",
        "csi-provisioner",
        "csi-snapshotter",
        "csi-resizer",
    }
    driver = c["csi-rbd"]
    assert "--mode=all" in driver["args"]
    assert "--node-id=$(NODE_NAME)" in driver["args"]
    assert "--driver-name=rbd.csi-rbd.io" in driver["args"]
    assert "--allowed-root=/var/lib/kubelet" in driver["args"]
    assert driver["securityContext"]["privileged"] is True
    assert driver["securityContext"]["runAsUser"] == 0
    mounts = {m["name"]: m for m in driver["volumeMounts"]}
    assert mounts["kubelet-dir"]["mountPath"] == "/var/lib/kubelet"
    assert mounts["kubelet-dir"]["mountPropagation"] == "Bidirectional"
    assert mounts["data-dir"]["mountPath"] == "/var/lib/csi-rbd"
    assert {"dev", "sys", "socket-dir"} <= set(mounts)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data-dir"]["hostPath"]["path"] == "/var/lib/csi-rbd"
    assert volumes["dev"]["hostPath"]["path"] == "/dev"
    assert volumes["sys"]["hostPath"]["path"] == "/sys"
    assert volumes["socket-dir"]["hostPath"]["path"] == "/var/lib/kubelet/plugins/rbd.csi-rbd.io"
    assert volumes["registration-dir"]["hostPath"]["path"] == "/var/lib/kubelet/plugins_registry"

    provisioner = c["csi-provisioner"]
    assert "--node-deployment=true" in provisioner["args"]
    assert "--feature-gates=Topology=true" in provisioner["args"]
    assert "--extra-create-metadata=true" in provisioner["args"]
    assert "--default-fstype=ext4" in provisioner["args"]
    assert not any(a.startswith("--leader-election") for a in provisioner["args"])
    env = {e["name"]: e for e in provisioner["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert "--node-deployment=true" in c["csi-snapshotter"]["args"]
    # the single-node default runs the resizer on the node, leader-elected
    assert "--leader-election=true" in c["csi-resizer"]["args"]
    registrar = c["node-driver-registrar"]
    assert (
        "--kubelet-registration-path=/var/lib/kubelet/plugins/rbd.csi-rbd.io/csi.sock"
        in registrar["args"]
    )
    for name, container in c.items():
        if name != "csi-rbd":
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], name


def test_native_multi_node_leaves_expansion_out(render: Render) -> None:
    docs = render(sets=["native.singleNode=false"])
    assert "csi-resizer" not in containers(one(docs, "DaemonSet"))
    assert all(sc["allowVolumeExpansion"] is False for sc in by_kind(docs, "StorageClass"))
    names = {r["metadata"]["name"] for r in by_kind(docs, "ClusterRole")}
    assert "t-csi-rbd-resizer" not in names
    assert not by_kind(docs, "Role"), "nothing leader-elects"


def test_probes_and_ports_are_wired(render: Render) -> None:
    for docs in (render(), render(CEPH_VALUES)):
        for workload in by_kind(docs, "DaemonSet") + by_kind(docs, "Deployment"):
            c = containers(workload)
            driver = c["csi-rbd"]
            ports = {p["name"]: p["containerPort"] for p in driver["ports"]}
            assert ports == {"healthz": 9808, "metrics": 8080}
            assert driver["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
            assert driver["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
            assert "--metrics-address=:8080" in driver["args"]
            assert "--health-port=9808" in c["liveness-probe"]["args"]
            assert "--csi-address=/csi/csi.sock" in c["liveness-probe"]["args"]
    docs = render(sets=["metrics.enabled=false", "healthPort=9900"])
    driver = containers(one(docs, "DaemonSet"))["csi-rbd"]
    assert "readinessProbe" not in driver
    assert not any(a.startswith("--metrics-address") for a in driver["args"])
    assert [p["containerPort"] for p in driver["ports"]] == [9900]
    assert "--health-port=9900" in containers(one(docs, "DaemonSet"))["liveness-probe"]["args"]
    assert not by_kind(docs, "Service")


def test_storage_classes_are_accepted_by_the_driver(render: Render) -> None:
    docs = render()
    native = DriverConfig(
        endpoint="unix:///csi/csi.sock",
        node_id="n",
        clusters=(ClusterConfig("local", "native", data_dir=Path("/var/lib/csi-rbd")),),
    )
    fs = one(docs, "StorageClass", "csi-rbd")
    vm = one(docs, "StorageClass", "csi-rbd-vm")
    for sc in (fs, vm):
        assert sc["provisioner"] == "rbd.csi-rbd.io"
        assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
        assert sc["allowVolumeExpansion"] is True
        assert all(isinstance(v, str) for v in sc["parameters"].values())
        parameters.parse(sc["parameters"], native)  # raises on anything the driver refuses
    assert fs["parameters"]["csi.storage.k8s.io/fstype"] == "ext4"
    parsed = parameters.parse(vm["parameters"], native)
    assert (parsed.cache, parsed.discard) == ("writeback", "unmap")
    assert vm["metadata"]["annotations"]["cdi.kubevirt.io/clone-strategy"] == "csi-clone"

    tuned = render(
        sets=[
            "storageClasses.vm.cache=none",
            "storageClasses.vm.discard=ignore",
            "storageClasses.vm.objectSize=16M",
            "storageClasses.filesystem.fsType=xfs",
            "storageClasses.filesystem.imageFeatures=layering\\,exclusive-lock",
            "storageClasses.filesystem.mkfsOptions=-m 0",
        ]
    )
    parsed = parameters.parse(one(tuned, "StorageClass", "csi-rbd-vm")["parameters"], native)
    assert (parsed.cache, parsed.discard, parsed.order) == ("none", "ignore", 24)
    parsed = parameters.parse(one(tuned, "StorageClass", "csi-rbd")["parameters"], native)
    assert parsed.fstype == "xfs" and parsed.mkfs_options == ("-m", "0")


def test_volume_snapshot_class(render: Render) -> None:
    vsc = one(render(), "VolumeSnapshotClass")
    assert vsc["driver"] == "rbd.csi-rbd.io" and vsc["deletionPolicy"] == "Delete"
    assert "parameters" not in vsc
    assert not by_kind(render(sets=["volumeSnapshotClass.enabled=false"]), "VolumeSnapshotClass")


def test_rbac_is_least_privilege(render: Render) -> None:
    for docs in (render(), render(CEPH_VALUES)):
        roles = by_kind(docs, "ClusterRole") + by_kind(docs, "Role")
        for role in roles:
            for rule in role["rules"]:
                for key in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule[key], (role["metadata"]["name"], rule)
                assert "secrets" not in rule["resources"], "no role reads secrets"
        # every binding points at a role that exists
        names = {r["metadata"]["name"] for r in roles}
        for binding in by_kind(docs, "ClusterRoleBinding") + by_kind(docs, "RoleBinding"):
            assert binding["roleRef"]["name"] in names
    docs = render()
    driver = one(docs, "ClusterRole", "t-csi-rbd-driver-controller")
    assert {
        "apiGroups": [""],
        "resources": ["persistentvolumeclaims"],
        "verbs": ["get", "patch"],
    } in (driver["rules"])
    lease = one(docs, "Role", "t-csi-rbd-leader-election")
    assert lease["rules"][0]["resources"] == ["leases"]
    resizer = one(docs, "ClusterRole", "t-csi-rbd-resizer")
    assert any(r["resources"] == ["persistentvolumeclaims/status"] for r in resizer["rules"])


def test_ceph_engine(render: Render, tmp_path: Path) -> None:
    docs = render(CEPH_VALUES)
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 2
    assert pod["securityContext"]["runAsNonRoot"] is True
    c = containers(deployment)
    assert set(c) == {
        "csi-rbd",
        "csi-provisioner",
        "csi-snapshotter",
        "csi-resizer",
        "liveness-probe",
    }
    assert "--mode=controller" in c["csi-rbd"]["args"]
    assert "--config=/etc/csi-rbd/clusters.yaml" in c["csi-rbd"]["args"]
    assert c["csi-rbd"]["securityContext"]["readOnlyRootFilesystem"] is True
    for sidecar in ("csi-provisioner", "csi-snapshotter", "csi-resizer"):
        assert "--leader-election=true" in c[sidecar]["args"], sidecar
        assert not any("node-deployment" in a for a in c[sidecar]["args"]), sidecar
    node = containers(one(docs, "DaemonSet"))
    assert set(node) == {"csi-rbd", "node-driver-registrar", "liveness-probe"}
    assert "--mode=node" in node["csi-rbd"]["args"]
    assert "--config=/etc/csi-rbd/clusters.yaml" in node["csi-rbd"]["args"]

    # the clusters file is what the driver's config loader accepts
    config_map = one(docs, "ConfigMap")
    clusters_file = tmp_path / "clusters.yaml"
    clusters_file.write_text(config_map["data"]["clusters.yaml"])
    clusters = load_clusters(clusters_file, Path("/var/lib/csi-rbd"))
    assert [(c.id, c.engine, c.monitors, c.pool) for c in clusters] == [
        ("ceph-a", "ceph", ("10.0.0.1:3300", "10.0.0.2:3300"), "kube"),
        ("ceph-b", "ceph", ("10.1.0.1:3300",), "rbd"),
    ]
    assert clusters[1].rados_namespace == "k8s"
    assert clusters[0].conf == Path("/etc/csi-rbd/ceph.conf")
    assert "ms_mode = secure" in config_map["data"]["ceph.conf"]

    secret = one(docs, "Secret")
    assert secret["stringData"] == {"userID": "kubernetes", "userKey": "AQBexamplekey=="}
    config = DriverConfig(endpoint="unix:///csi/csi.sock", node_id="n", clusters=clusters)
    for sc in by_kind(docs, "StorageClass"):
        assert sc["volumeBindingMode"] == "Immediate"
        params = sc["parameters"]
        assert params["clusterID"] == "ceph-b"
        for role in ("provisioner", "controller-expand", "node-stage"):
            assert params[f"csi.storage.k8s.io/{role}-secret-name"] == "t-csi-rbd-ceph"
            assert params[f"csi.storage.k8s.io/{role}-secret-namespace"] == "csi-rbd"
        assert parameters.parse(params, config).cluster_id == "ceph-b"
    vsc = one(docs, "VolumeSnapshotClass")
    assert vsc["parameters"] == {
        "csi.storage.k8s.io/snapshotter-secret-name": "t-csi-rbd-ceph",
        "csi.storage.k8s.io/snapshotter-secret-namespace": "csi-rbd",
    }
    # pods restart when the clusters file changes
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    other = one(render(CEPH_VALUES, ["ceph.clusters[0].pool=other"]), "Deployment")
    assert other["spec"]["template"]["metadata"]["annotations"] != annotations


def test_ceph_existing_secret_is_referenced_not_created(render: Render) -> None:
    values = {**CEPH_VALUES, "ceph": {**CEPH_VALUES["ceph"], "secret": {"existingSecret": "mine"}}}
    docs = render(values)
    assert not by_kind(docs, "Secret")
    params = one(docs, "StorageClass", "csi-rbd")["parameters"]
    assert params["csi.storage.k8s.io/provisioner-secret-name"] == "mine"


def test_kubevirt_extras_are_optional_and_consistent(render: Render) -> None:
    docs = render()
    assert not by_kind(docs, "StorageProfile")
    assert not by_kind(docs, "VirtualMachineClusterPreference")

    docs = render(KUBEVIRT_VALUES, ["storageClasses.vm.cache=writethrough"])
    profile = one(docs, "StorageProfile")
    assert profile["metadata"]["name"] == "csi-rbd-vm"  # CDI names profiles after classes
    assert profile["spec"]["cloneStrategy"] == "csi-clone"
    assert profile["spec"]["dataImportCronSourceFormat"] == "snapshot"
    assert profile["spec"]["snapshotClass"] == "csi-rbd"
    native_sets = profile["spec"]["claimPropertySets"]
    assert {"accessModes": ["ReadWriteMany"], "volumeMode": "Block"} not in native_sets
    assert {"accessModes": ["ReadWriteOnce"], "volumeMode": "Block"} in native_sets
    assert {"accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem"} in native_sets
    preference = one(docs, "VirtualMachineClusterPreference")
    assert preference["apiVersion"] == "instancetype.kubevirt.io/v1beta1"
    vm_class = one(docs, "StorageClass", "csi-rbd-vm")
    assert preference["spec"]["devices"]["preferredDiskCache"] == "writethrough"
    assert vm_class["parameters"]["cache"] == "writethrough"

    ceph_sets = one(render({**CEPH_VALUES, **KUBEVIRT_VALUES}), "StorageProfile")["spec"][
        "claimPropertySets"
    ]
    assert ceph_sets[0] == {"accessModes": ["ReadWriteMany"], "volumeMode": "Block"}
    assert {"accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem"} in ceph_sets


def test_driver_name_flows_everywhere(render: Render) -> None:
    docs = render(sets=["driverName=block.example.com"])
    assert one(docs, "CSIDriver")["metadata"]["name"] == "block.example.com"
    for sc in by_kind(docs, "StorageClass"):
        assert sc["provisioner"] == "block.example.com"
    assert one(docs, "VolumeSnapshotClass")["driver"] == "block.example.com"
    c = containers(one(docs, "DaemonSet"))
    assert "--driver-name=block.example.com" in c["csi-rbd"]["args"]
    texts = [v for v in walk(docs) if isinstance(v, str) and "rbd.csi-rbd.io" in v]
    assert texts == [], texts


def test_images(render: Render) -> None:
    docs = render(CEPH_VALUES, ["image.repository=registry.example/csi-rbd", "image.tag=1.2.3"])
    for workload in by_kind(docs, "DaemonSet") + by_kind(docs, "Deployment"):
        for name, container in containers(workload).items():
            if name == "csi-rbd":
                assert container["image"] == "registry.example/csi-rbd:1.2.3"
            else:
                repository, tag = container["image"].rsplit(":", 1)
                assert repository.startswith("registry.k8s.io/sig-storage/") and tag.startswith("v")
    c = containers(one(render(), "DaemonSet"))
    assert c["csi-rbd"]["image"] == "csi-rbd:0.1.0"


def render_notes(helm: Path, values_args: Any, tmp_path: Path, values: dict[str, Any]) -> str:
    """NOTES.txt as `helm install` prints it, without a cluster.

    `helm template` leaves NOTES.txt out, and `helm install --dry-run` wants
    an API server, so a copy of the chart gets one more template that
    renders NOTES.txt (with tpl, the same engine and context) into a ConfigMap.
    """
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    shutil.copy(CHART / "templates" / "NOTES.txt", chart / "notes.txt")  # .Files skips templates/
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  notes: |\n"
        '{{ tpl (.Files.Get "notes.txt") . | indent 4 }}\n'
    )
    only = "templates/zz-notes.yaml"
    result = run([helm, "template", "t", chart, "--show-only", only, *values_args(values)])
    return str(yaml.safe_load(result.stdout)["data"]["notes"])


def test_notes_tell_what_was_installed_and_how_to_try_it(
    helm: Path, values_args: Any, tmp_path: Path
) -> None:
    notes = render_notes(helm, values_args, tmp_path, KUBEVIRT_VALUES)
    for text in (
        "CSIDriver rbd.csi-rbd.io",
        "Engine: native",
        "topology.rbd.csi-rbd.io/node",
        "StorageClass csi-rbd: filesystem volumes (ext4)",
        "StorageClass csi-rbd-vm: VM disks (cache=writeback, discard=unmap)",
        "VolumeSnapshotClass csi-rbd",
        "CDI StorageProfile csi-rbd-vm",
        "VirtualMachineClusterPreference csi-rbd-vm (preferredDiskCache writeback)",
        "pod-security.kubernetes.io/enforce=privileged",
        "kind: PersistentVolumeClaim",
        "kubectl exec csi-rbd-demo -- cat /data/hello",
    ):
        assert text in notes, text
    demo = notes.split("kubectl apply -f - <<'YAML'", 1)[1].split("  YAML", 1)[0]
    objects = [d for d in yaml.safe_load_all(demo.replace("\n  ", "\n")) if d]
    assert [o["kind"] for o in objects] == ["PersistentVolumeClaim", "Pod"]
    for obj in objects:
        kubernetes_validate.validate(obj, NEWEST, strict=True)


def test_chart_files_pass_yamllint() -> None:
    config = (
        "{extends: default, rules: {line-length: {max: 120}, document-start: disable,"
        " comments: {min-spaces-from-content: 1}}}"
    )
    yamllint = Path(sys.executable).parent / "yamllint"
    assert yamllint.is_file(), "yamllint is missing: pip install yamllint"
    run([yamllint, "--strict", "-d", config, CHART / "Chart.yaml", CHART / "values.yaml"])
