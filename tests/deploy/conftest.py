"""Fixtures of the deployment tests: helm, chart rendering, a real kube-apiserver."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import apiserver
from tests.deploy.tools import CHART, documents, find_helm, run

# Releases the API-server tests install, and the service-account identities
# (static tokens) that let tests act as the chart's own service accounts.
NATIVE_RELEASE, NATIVE_NAMESPACE = "t", "csi-rbd"
CEPH_RELEASE, CEPH_NAMESPACE = "c", "csi-rbd-ceph"
NATIVE_NODE_SA = f"system:serviceaccount:{NATIVE_NAMESPACE}:{NATIVE_RELEASE}-csi-rbd-node"
CEPH_CONTROLLER_SA = f"system:serviceaccount:{CEPH_NAMESPACE}:{CEPH_RELEASE}-csi-rbd-controller"
CEPH_NODE_SA = f"system:serviceaccount:{CEPH_NAMESPACE}:{CEPH_RELEASE}-csi-rbd-node"

Render = Callable[..., list[dict[str, Any]]]


@pytest.fixture(scope="session")
def helm() -> Path:
    binary, reason = find_helm()
    if binary is None:
        pytest.skip(reason)
    return binary


def _values_args(values: dict[str, Any] | None, sets: Sequence[str], tmp: Path) -> list[str]:
    args: list[str] = []
    if values is not None:
        path = tmp / f"values-{len(list(tmp.iterdir()))}.yaml"
        path.write_text(yaml.safe_dump(values))
        args += ["-f", str(path)]
    for item in sets:
        args += ["--set", item]
    return args


@pytest.fixture
def values_args(tmp_path: Path) -> Callable[..., list[str]]:
    def make(values: dict[str, Any] | None = None, sets: Sequence[str] = ()) -> list[str]:
        return _values_args(values, sets, tmp_path)

    return make


@pytest.fixture
def render(helm: Path, values_args: Callable[..., list[str]]) -> Render:
    """helm template the chart with values (a dict) and --set items; the documents."""

    def template(
        values: dict[str, Any] | None = None,
        sets: Sequence[str] = (),
        release: str = "t",
        namespace: str = "csi-rbd",
    ) -> list[dict[str, Any]]:
        result = run(
            [helm, "template", release, CHART, "--namespace", namespace, *values_args(values, sets)]
        )
        return documents(result.stdout)

    return template


@pytest.fixture
def render_error(helm: Path, values_args: Callable[..., list[str]]) -> Callable[..., str]:
    """helm template that must fail; its error output."""

    def template(values: dict[str, Any] | None = None, sets: Sequence[str] = ()) -> str:
        result = run([helm, "template", "t", CHART, *values_args(values, sets)], check=False)
        assert result.returncode != 0, f"rendered although it should not:\n{result.stdout[:2000]}"
        return result.stderr

    return template


CEPH_VALUES: dict[str, Any] = {
    "engine": "ceph",
    "ceph": {
        "clusters": [
            {"id": "ceph-a", "monitors": ["10.0.0.1:3300", "10.0.0.2:3300"], "pool": "kube"},
            {"id": "ceph-b", "monitors": ["10.1.0.1:3300"], "radosNamespace": "k8s"},
        ],
        "clusterID": "ceph-b",
        "conf": "[global]\nms_mode = secure\n",
        "secret": {"userID": "kubernetes", "userKey": "AQBexamplekey=="},
    },
}
KUBEVIRT_VALUES: dict[str, Any] = {
    "kubevirt": {"storageProfile": {"enabled": True}, "preference": {"enabled": True}}
}


# --- the real API server -------------------------------------------------------------------


@pytest.fixture(scope="session")
def cluster() -> Iterator[apiserver.Cluster]:
    """etcd + kube-apiserver on 127.0.0.1 (built once from Debian's source, then cached)."""
    workdir = Path(tempfile.mkdtemp(prefix="csi-rbd-apiserver-"))
    users = {
        NATIVE_NODE_SA: ["system:serviceaccounts", f"system:serviceaccounts:{NATIVE_NAMESPACE}"],
        CEPH_CONTROLLER_SA: ["system:serviceaccounts", f"system:serviceaccounts:{CEPH_NAMESPACE}"],
        CEPH_NODE_SA: ["system:serviceaccounts", f"system:serviceaccounts:{CEPH_NAMESPACE}"],
    }
    try:
        running = apiserver.start(workdir, users=users)
    except apiserver.Unavailable as exc:
        reason = f"no real kube-apiserver: {exc}"
        warnings.warn(reason, stacklevel=1)
        shutil.rmtree(workdir, ignore_errors=True)
        pytest.skip(reason)
    try:
        yield running
    finally:
        running.stop()
        shutil.rmtree(workdir, ignore_errors=True)
