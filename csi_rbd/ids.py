"""Volume and snapshot IDs: versioned, self-describing, at most 128 bytes.

An ID names the engine cluster, the pool and the UUID that the name journal
reserved, so every RPC can find the image without a lookup table::

    0001-0005-local-0003-rbd-8d3f0c8e-6a52-4c57-9a43-2b0b8e9c3f11
    ^ver ^len ^cluster ^len ^pool ^uuid

Lengths are 4 hex digits so that clusters and pools may contain dashes. The
image behind a volume is ``csi-vol-<uuid>``, behind a snapshot
``csi-snap-<uuid>``.
"""

from __future__ import annotations

import re
import uuid as uuid_module
from dataclasses import dataclass

VERSION = "0001"
MAX_LENGTH = 128
_UUID_LENGTH = 36
_FIXED = len(VERSION) + 1 + 4 + 1 + 1 + 4 + 1 + 1 + _UUID_LENGTH
MAX_CLUSTER_AND_POOL = MAX_LENGTH - _FIXED
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

VOLUME_PREFIX = "csi-vol-"
SNAPSHOT_PREFIX = "csi-snap-"


class BadId(ValueError):
    """An ID this driver did not make (or a newer version of it)."""


@dataclass(frozen=True)
class ResourceId:
    cluster: str
    pool: str
    uuid: str

    def __post_init__(self) -> None:
        if not self.cluster or not self.pool:
            raise BadId("cluster and pool must not be empty")
        if len(self.cluster) + len(self.pool) > MAX_CLUSTER_AND_POOL:
            raise BadId(f"cluster and pool names together exceed {MAX_CLUSTER_AND_POOL} characters")
        if not _UUID.match(self.uuid):
            raise BadId(f"{self.uuid!r} is not a lowercase UUID")

    @classmethod
    def new(cls, cluster: str, pool: str) -> ResourceId:
        return cls(cluster, pool, str(uuid_module.uuid4()))

    def encode(self) -> str:
        return (
            f"{VERSION}-{len(self.cluster):04x}-{self.cluster}-"
            f"{len(self.pool):04x}-{self.pool}-{self.uuid}"
        )

    @classmethod
    def decode(cls, text: str) -> ResourceId:
        if len(text) > MAX_LENGTH:
            raise BadId(f"ID is longer than {MAX_LENGTH} bytes")
        try:
            version, rest = text[:4], text[5:]
            if version != VERSION or text[4] != "-":
                raise BadId(f"ID {text!r} is not a version {VERSION} csi-rbd ID")
            cluster, rest = _take(rest)
            pool, rest = _take(rest)
        except (IndexError, ValueError) as exc:
            raise BadId(f"malformed ID {text!r}: {exc}") from exc
        return cls(cluster, pool, rest)

    def volume_image(self) -> str:
        return VOLUME_PREFIX + self.uuid

    def snapshot_image(self) -> str:
        return SNAPSHOT_PREFIX + self.uuid


def _take(text: str) -> tuple[str, str]:
    """Split ``<len:04x>-<value>-<rest>`` into (value, rest)."""
    length = int(text[:4], 16)
    if text[4] != "-":
        raise ValueError("missing separator")
    value = text[5 : 5 + length]
    if len(value) != length or text[5 + length] != "-":
        raise ValueError("length does not match")
    return value, text[6 + length :]
