"""The name journal: CO request names to UUIDs, kept in the pool's omap.

Design
------
CreateVolume and CreateSnapshot must be idempotent by name across retries
and crashes, so the name is reserved before anything is created (the scheme
of ceph-csi's journal, over the engine's omap):

* ``csi.<kind>s`` (one per pool) maps ``csi.<kind>.<request name>`` to a UUID;
* ``csi.<kind>.<uuid>`` holds the request name, the image name and the
  request's fingerprint (what a compatible retry must match).

Reserve writes the UUID object first and the name key second, both
create-only; undo removes them in the opposite order. So at any crash point:
a UUID object without a name key is unreachable garbage; a name key with its
object but no image means "reserved, not created yet", and the retry goes on
to create; a name key whose object is gone is stale and is dropped.
"""

from __future__ import annotations

import json
import uuid as uuid_module
from dataclasses import dataclass
from typing import Any, Protocol

from csi_rbd.engine import errors
from csi_rbd.ids import SNAPSHOT_PREFIX, VOLUME_PREFIX


class OmapStore(Protocol):
    def omap_get(self, obj: str, keys: list[str] | None = None) -> dict[str, bytes]: ...
    def omap_set(self, obj: str, values: dict[str, bytes], exclusive: bool = False) -> None: ...
    def omap_remove(self, obj: str, keys: list[str] | None = None) -> None: ...


@dataclass(frozen=True)
class Reservation:
    uuid: str
    name: str
    image: str
    request: dict[str, Any]
    extra: dict[str, str]


class NameJournal:
    def __init__(self, omap: OmapStore, kind: str) -> None:
        if kind not in ("volume", "snapshot"):
            raise ValueError(kind)
        self._omap = omap
        self._kind = kind
        self._directory = f"csi.{kind}s"
        self._prefix = VOLUME_PREFIX if kind == "volume" else SNAPSHOT_PREFIX

    def _name_key(self, name: str) -> str:
        return f"csi.{self._kind}.{name}"

    def _entry(self, uuid: str) -> str:
        return f"csi.{self._kind}.{uuid}"

    def lookup(self, name: str) -> Reservation | None:
        key = self._name_key(name)
        found = self._omap.omap_get(self._directory, [key])
        if key not in found:
            return None
        uuid = found[key].decode()
        reservation = self.by_uuid(uuid)
        if reservation is None:  # the entry was undone after the name was written
            self._omap.omap_remove(self._directory, [key])
        return reservation

    def by_uuid(self, uuid: str) -> Reservation | None:
        values = self._omap.omap_get(self._entry(uuid))
        if "csi.name" not in values:
            return None
        extra = {
            k[len("csi.extra.") :]: v.decode()
            for k, v in values.items()
            if k.startswith("csi.extra.")
        }
        return Reservation(
            uuid=uuid,
            name=values["csi.name"].decode(),
            image=values["csi.image"].decode(),
            request=json.loads(values.get("csi.request", b"{}")),
            extra=extra,
        )

    def reserve(
        self, name: str, request: dict[str, Any], extra: dict[str, str] | None = None
    ) -> Reservation:
        """Reserve a UUID for ``name``; ObjectExists if the name was taken meanwhile."""
        uuid = str(uuid_module.uuid4())
        image = self._prefix + uuid
        entry = {
            "csi.name": name.encode(),
            "csi.image": image.encode(),
            "csi.request": json.dumps(request, sort_keys=True).encode(),
            **{f"csi.extra.{k}": v.encode() for k, v in (extra or {}).items()},
        }
        self._omap.omap_set(self._entry(uuid), entry, exclusive=True)
        try:
            self._omap.omap_set(
                self._directory, {self._name_key(name): uuid.encode()}, exclusive=True
            )
        except errors.ObjectExists:
            self._omap.omap_remove(self._entry(uuid))
            raise
        return Reservation(uuid, name, image, request, dict(extra or {}))

    def set_extra(self, reservation: Reservation, **values: str) -> None:
        self._omap.omap_set(
            self._entry(reservation.uuid), {f"csi.extra.{k}": v.encode() for k, v in values.items()}
        )

    def release(self, reservation: Reservation) -> None:
        """Undo a reservation: the name key first, then the UUID entry."""
        key = self._name_key(reservation.name)
        current = self._omap.omap_get(self._directory, [key]).get(key)
        if current is not None and current.decode() == reservation.uuid:
            self._omap.omap_remove(self._directory, [key])
        self._omap.omap_remove(self._entry(reservation.uuid))
