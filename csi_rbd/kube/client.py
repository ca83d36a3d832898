"""The driver's few Kubernetes API calls, with the official ``kubernetes`` client.

- :meth:`KubeClient.annotate_thick_provisioned`: KubeVirt turns discard off
  for a disk whose PVC carries ``<anything>/storage.thick-provisioned: "true"``;
  the controller sets ``<driver name>/storage.thick-provisioned`` when it
  creates a volume with ``discard=ignore``, so the VM and the volume agree.
  It is a JSON merge patch of one annotation: it touches nothing else on the
  PVC, needs no resourceVersion, and a repeat is a no-op (the PVC is read
  first; an annotation already ``"true"`` is not patched again).
- :meth:`KubeClient.node_topology`: the node's labels for the given keys.

RBAC the driver's service account needs: ``persistentvolumeclaims`` get and
patch (annotation), ``nodes`` get (topology); the Helm chart grants them.

Connection: :meth:`KubeClient.connect` uses a kubeconfig file when given one
(or ``$KUBECONFIG``), else the pod's service account (in-cluster config).
Every failure is a :class:`KubeError` whose message says what was asked,
of which object, and what to fix.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

THICK_PROVISIONED_SUFFIX = "storage.thick-provisioned"
DEFAULT_TIMEOUT = 10.0
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class KubeError(Exception):
    """A Kubernetes API call failed; the message says which and why."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class KubeConfigError(KubeError):
    """No usable kubeconfig or in-cluster service account."""


class NotFound(KubeError):
    """The object does not exist (HTTP 404)."""


class Forbidden(KubeError):
    """RBAC refused the call (HTTP 403) or the credentials were refused (401)."""


def thick_provisioned_key(driver_name: str) -> str:
    """``<driver name>/storage.thick-provisioned``, checked as an annotation key."""
    if len(driver_name) > 253 or not _DNS_SUBDOMAIN.match(driver_name):
        raise ValueError(
            f"driver name {driver_name!r} cannot prefix an annotation key: it must be a "
            "lower-case DNS subdomain (at most 253 characters)"
        )
    return f"{driver_name}/{THICK_PROVISIONED_SUFFIX}"


def _check_name(kind: str, name: str) -> None:
    if not name or len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        raise ValueError(f"{kind} name {name!r} is not a valid Kubernetes object name")


def _check_namespace(namespace: str) -> None:
    if not namespace or len(namespace) > 63 or not _DNS_LABEL.match(namespace):
        raise ValueError(f"namespace {namespace!r} is not a valid Kubernetes namespace name")


def _api_error(exc: Exception, what: str) -> KubeError:
    """Turn a client exception into a KubeError that says what to fix."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        status = int(exc.status) if exc.status else None
        reason = _reason(exc)
        if status == 404:
            return NotFound(f"{what}: not found", status)
        if status == 403:
            return Forbidden(
                f"{what}: forbidden ({reason}); the driver's service account needs the RBAC "
                "rule for it (see the Helm chart's ClusterRole)",
                status,
            )
        if status == 401:
            return Forbidden(f"{what}: unauthorized: the API server refused the credentials", 401)
        return KubeError(f"{what}: API server answered {status} {reason}", status)
    return KubeError(f"{what}: cannot reach the Kubernetes API server: {exc}")


def _reason(exc: Any) -> str:
    """The Status message of an API error body, else its HTTP reason."""
    import json

    try:
        body = json.loads(exc.body or "")
        message = body.get("message")
        if isinstance(message, str) and message:
            return message
    except (ValueError, AttributeError):
        pass
    return str(exc.reason or "error")


class KubeClient:
    """One connection to the API server; thread-safe (the client pools connections)."""

    def __init__(self, api_client: Any, timeout: float = DEFAULT_TIMEOUT) -> None:
        from kubernetes import client

        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.timeout = timeout

    @classmethod
    def connect(
        cls,
        kubeconfig: str | os.PathLike[str] | None = None,
        context: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> KubeClient:
        """From a kubeconfig file (``kubeconfig`` or ``$KUBECONFIG``), else in-cluster."""
        from kubernetes import client, config

        configuration = client.Configuration()
        path = kubeconfig if kubeconfig is not None else os.environ.get("KUBECONFIG") or None
        try:
            if path is not None:
                if not Path(path).is_file():
                    raise KubeConfigError(f"kubeconfig {str(path)!r} does not exist")
                # the client's loaders are untyped: call them through typed names
                load_kube_config: Callable[..., None] = config.load_kube_config
                load_kube_config(
                    config_file=str(path),
                    context=context,
                    client_configuration=configuration,
                    persist_config=False,
                )
            else:
                load_incluster: Callable[..., None] = config.load_incluster_config
                load_incluster(client_configuration=configuration)
        except KubeConfigError:
            raise
        except config.ConfigException as exc:
            where = f"kubeconfig {str(path)!r}" if path is not None else "in-cluster config"
            hint = (
                ""
                if path is not None
                else " (outside a pod, pass a kubeconfig path or set KUBECONFIG)"
            )
            raise KubeConfigError(f"cannot load the {where}: {exc}{hint}") from exc
        return cls(client.ApiClient(configuration), timeout=timeout)

    def close(self) -> None:
        self.api_client.close()

    def __enter__(self) -> KubeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- PVC annotation ----------------------------------------------------------------------

    def annotate_thick_provisioned(self, namespace: str, pvc_name: str, driver_name: str) -> bool:
        """Set ``<driver_name>/storage.thick-provisioned: "true"`` on the PVC.

        Returns True if the PVC was patched, False if it already had it.
        Raises NotFound, Forbidden or KubeError (messages name the PVC) and
        ValueError for names Kubernetes would refuse anyway.
        """
        _check_namespace(namespace)
        _check_name("PersistentVolumeClaim", pvc_name)
        key = thick_provisioned_key(driver_name)
        what = f"annotate PersistentVolumeClaim {namespace}/{pvc_name} with {key}"
        try:
            pvc = self.core.read_namespaced_persistent_volume_claim(
                pvc_name, namespace, _request_timeout=self.timeout
            )
        except Exception as exc:
            raise _api_error(exc, what) from exc
        annotations = (pvc.metadata.annotations if pvc.metadata else None) or {}
        if annotations.get(key) == "true":
            return False
        body = {"metadata": {"annotations": {key: "true"}}}
        try:
            self.core.patch_namespaced_persistent_volume_claim(
                pvc_name,
                namespace,
                body,
                _content_type="application/merge-patch+json",
                _request_timeout=self.timeout,
            )
        except Exception as exc:
            raise _api_error(exc, what) from exc
        return True

    def pvc_annotations(self, namespace: str, pvc_name: str) -> dict[str, str]:
        """The PVC's annotations (for checks and tests)."""
        try:
            pvc = self.core.read_namespaced_persistent_volume_claim(
                pvc_name, namespace, _request_timeout=self.timeout
            )
        except Exception as exc:
            raise _api_error(exc, f"read PersistentVolumeClaim {namespace}/{pvc_name}") from exc
        return dict((pvc.metadata.annotations if pvc.metadata else None) or {})

    # --- node labels -------------------------------------------------------------------------

    def node_labels(self, node_name: str) -> dict[str, str]:
        _check_name("Node", node_name)
        try:
            node = self.core.read_node(node_name, _request_timeout=self.timeout)
        except Exception as exc:
            raise _api_error(exc, f"read Node {node_name}") from exc
        return dict((node.metadata.labels if node.metadata else None) or {})

    def node_topology(self, node_name: str, keys: Iterable[str]) -> dict[str, str]:
        """The node's labels named by ``keys`` (keys the node lacks are left out)."""
        wanted = list(keys)
        return topology_from_labels(self.node_labels(node_name), wanted)


# --- module-level calls on one shared client -------------------------------------------------

_shared: KubeClient | None = None
_shared_lock = threading.Lock()


def shared_client() -> KubeClient:
    """The process's client, connected on first use (``$KUBECONFIG`` or in-cluster)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = KubeClient.connect()
        return _shared


def set_shared_client(client: KubeClient | None) -> None:
    """Use ``client`` for the module-level calls (None: connect again on next use)."""
    global _shared
    with _shared_lock:
        _shared = client


def annotate_thick_provisioned(namespace: str, pvc_name: str, driver_name: str) -> bool:
    """:meth:`KubeClient.annotate_thick_provisioned` on the shared client."""
    return shared_client().annotate_thick_provisioned(namespace, pvc_name, driver_name)


def node_topology(node_name: str, keys: Iterable[str]) -> dict[str, str]:
    """:meth:`KubeClient.node_topology` on the shared client."""
    return shared_client().node_topology(node_name, keys)


def topology_from_labels(labels: Mapping[str, str], keys: Iterable[str]) -> dict[str, str]:
    """The subset of ``labels`` named by ``keys`` (pure; what node_topology returns)."""
    return {key: labels[key] for key in keys if key in labels}
