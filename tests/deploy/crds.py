"""Schemas for the chart's CRD-based kinds, which kubernetes-validate does not carry.

kubernetes-validate knows the built-in kinds only. For the three kinds the
chart renders from other projects' CRDs, these are schemas written for the
tests from those projects' published API types (external-snapshotter's
VolumeSnapshotClass v1, CDI's StorageProfile v1beta1, KubeVirt's
VirtualMachineClusterPreference v1beta1): the fields the chart sets, with
their types and enums, everything else of ``spec`` refused where upstream
refuses it too. They are not the upstream CRDs (those are not available
offline); they check what the chart writes, not every upstream rule.

The same schemas serve twice: offline (jsonschema) and as the
openAPIV3Schema of CRDs installed into the tests' kube-apiserver, so that
``helm install`` creates real objects of these kinds and the API server
validates them (structural schemas: no patternProperties, x-kubernetes-*
markers only where the API server knows them).
"""

from __future__ import annotations

from typing import Any

import jsonschema

ACCESS_MODES = ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]

_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "minLength": 1}},
}
_CLAIM_SET = {
    "type": "object",
    "required": ["accessModes", "volumeMode"],
    "additionalProperties": False,
    "properties": {
        "accessModes": {
            "type": "array",
            "maxItems": 4,
            "items": {"type": "string", "enum": ACCESS_MODES},
        },
        "volumeMode": {"type": "string", "enum": ["Block", "Filesystem"]},
    },
}

VOLUME_SNAPSHOT_CLASS: dict[str, Any] = {
    "type": "object",
    "required": ["driver", "deletionPolicy"],
    "properties": {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
        "driver": {"type": "string", "minLength": 1},
        "deletionPolicy": {"type": "string", "enum": ["Delete", "Retain"]},
        "parameters": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}

STORAGE_PROFILE: dict[str, Any] = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "claimPropertySets": {"type": "array", "maxItems": 8, "items": _CLAIM_SET},
                "cloneStrategy": {"type": "string", "enum": ["copy", "snapshot", "csi-clone"]},
                "dataImportCronSourceFormat": {"type": "string", "enum": ["pvc", "snapshot"]},
                "snapshotClass": {"type": "string"},
            },
        },
        "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    },
}

CLUSTER_PREFERENCE: dict[str, Any] = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": True,
            "properties": {
                "devices": {
                    "type": "object",
                    "x-kubernetes-preserve-unknown-fields": True,
                    "properties": {
                        "preferredDiskCache": {
                            "type": "string",
                            "enum": ["none", "writethrough", "writeback"],
                        },
                        "preferredDiskBus": {
                            "type": "string",
                            "enum": ["virtio", "sata", "scsi", "usb"],
                        },
                        "preferredDiskIO": {
                            "type": "string",
                            "enum": ["native", "threads", "default"],
                        },
                        "preferredDiskDedicatedIoThread": {"type": "boolean"},
                    },
                },
            },
        },
    },
}

# (group, version, kind, plural, schema): all cluster-scoped.
KINDS: list[tuple[str, str, str, str, dict[str, Any]]] = [
    (
        "snapshot.storage.k8s.io",
        "v1",
        "VolumeSnapshotClass",
        "volumesnapshotclasses",
        VOLUME_SNAPSHOT_CLASS,
    ),
    ("cdi.kubevirt.io", "v1beta1", "StorageProfile", "storageprofiles", STORAGE_PROFILE),
    (
        "instancetype.kubevirt.io",
        "v1beta1",
        "VirtualMachineClusterPreference",
        "virtualmachineclusterpreferences",
        CLUSTER_PREFERENCE,
    ),
]


def schema_for(api_version: str, kind: str) -> dict[str, Any] | None:
    for group, version, known_kind, _, schema in KINDS:
        if api_version == f"{group}/{version}" and kind == known_kind:
            return schema
    return None


def validate(document: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError if the object breaks its kind's schema."""
    schema = schema_for(document["apiVersion"], document["kind"])
    if schema is None:
        raise KeyError(f"no schema for {document['apiVersion']} {document['kind']}")
    jsonschema.Draft7Validator(schema).validate(document)
    jsonschema.Draft7Validator(_METADATA).validate(document.get("metadata", {}))


def _structural(schema: Any) -> Any:
    """The schema as a CRD takes it: no ``additionalProperties: false`` beside ``properties``
    (the API server prunes unknown fields instead of refusing them)."""
    if isinstance(schema, dict):
        return {
            k: _structural(v)
            for k, v in schema.items()
            if not (k == "additionalProperties" and v is False)
        }
    if isinstance(schema, list):
        return [_structural(item) for item in schema]
    return schema


def _crd_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema without apiVersion/kind/metadata, which the API server fills in itself."""
    properties = {
        k: v for k, v in schema["properties"].items() if k not in ("apiVersion", "kind", "metadata")
    }
    return dict(_structural({**schema, "properties": properties}))


def custom_resource_definitions() -> list[dict[str, Any]]:
    """apiextensions.k8s.io/v1 CRDs for the three kinds, for the tests' API server."""
    crds = []
    for group, version, kind, plural, schema in KINDS:
        metadata: dict[str, Any] = {"name": f"{plural}.{group}"}
        if group.endswith(".k8s.io"):  # the API server guards its own groups
            metadata["annotations"] = {
                "api-approved.kubernetes.io": "unapproved, a test stand-in for the upstream CRD"
            }
        crds.append(
            {
                "apiVersion": "apiextensions.k8s.io/v1",
                "kind": "CustomResourceDefinition",
                "metadata": metadata,
                "spec": {
                    "group": group,
                    "scope": "Cluster",
                    "names": {
                        "kind": kind,
                        "plural": plural,
                        "singular": kind.lower(),
                        "listKind": f"{kind}List",
                    },
                    "versions": [
                        {
                            "name": version,
                            "served": True,
                            "storage": True,
                            "schema": {"openAPIV3Schema": _crd_schema(schema)},
                        }
                    ],
                },
            }
        )
    return crds
