"""The ``-drive`` value that gives QEMU a volume with the volume's cache and discard.

A volume's cache and discard modes come from the StorageClass (the CSI
volume context keeps them) and ControllerModifyVolume changes them (image
metadata ``csi.cache``, ``csi.discard``, which win); flags may override both. Where QEMU finds the
volume depends on the engine:

* **native**: the volume is exported by ``csi-rbd nbd serve`` on a unix
  socket; QEMU's NBD client opens ``nbd+unix:///<export>?socket=<path>``.
* **ceph**: QEMU's own ``rbd`` driver opens ``rbd:<pool>/<image>[@<snap>]``
  with ``id``, ``conf``, ``keyring`` or ``mon_host`` options
  (see :mod:`csi_rbd.vm.rbd_spec`), and librbd does the caching (QEMU sets
  ``rbd_cache`` from ``cache=``).

The value is always ``format=raw``: a volume is a disk, not an image file
holding a disk, and probing would let a guest that writes a qcow2 header
change how the host reads the volume. Two quoting layers apply: the file
name's own (URI percent-encoding, ``rbd:`` backslashes) and then QEMU's
option syntax, where a ``,`` in a value is written ``,,``.

Cache modes (QEMU's names, librbd's meaning; see also tests/vm/KUBEVIRT.md):
``none`` is O_DIRECT with the device's write cache on (the guest must
flush); ``writethrough`` acknowledges a write only once it is flushed;
``writeback`` acknowledges writes from the cache and makes them durable when
the guest flushes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from csi_rbd.vm.rbd_spec import RbdSpec, format_spec

CACHE_MODES = ("none", "writethrough", "writeback")
DISCARD_MODES = ("unmap", "ignore")
CACHE_KEY = "csi.cache"
DISCARD_KEY = "csi.discard"
DEFAULT_CACHE = "none"
DEFAULT_DISCARD = "unmap"

# QEMU cache mode -> (cache.writeback, cache.direct, cache.no-flush)
_CACHE_FLAGS = {
    "none": (True, True, False),
    "writethrough": (False, False, False),
    "writeback": (True, False, False),
}


class DriveError(ValueError):
    """A setting or name QEMU could not be given."""


@dataclass(frozen=True)
class DiskSettings:
    """How QEMU should treat writes and discards of one volume."""

    cache: str = DEFAULT_CACHE
    discard: str = DEFAULT_DISCARD

    def __post_init__(self) -> None:
        if self.cache not in CACHE_MODES:
            raise DriveError(f"cache mode must be one of {', '.join(CACHE_MODES)}: {self.cache!r}")
        if self.discard not in DISCARD_MODES:
            raise DriveError(
                f"discard mode must be one of {', '.join(DISCARD_MODES)}: {self.discard!r}"
            )

    @classmethod
    def from_metadata(
        cls,
        metadata: Mapping[str, str],
        *,
        context: Mapping[str, str] | None = None,
        cache: str | None = None,
        discard: str | None = None,
    ) -> DiskSettings:
        """The volume's settings, as the node plugin finds them.

        Explicit values win; then the image metadata (``csi.cache``,
        ``csi.discard``: what ControllerModifyVolume sets); then the CSI volume
        context (``cache``, ``discard``: what the volume was created with);
        then the defaults. A value that is not a known mode counts as absent,
        so a hand-edited key cannot break a VM.
        """
        context = context or {}

        def pick(explicit: str | None, key: str, name: str, allowed: tuple[str, ...]) -> str:
            if explicit is not None:
                return explicit
            for value in (metadata.get(key), context.get(name)):
                if value in allowed:
                    assert value is not None
                    return value
            return allowed[0]

        return cls(
            pick(cache, CACHE_KEY, "cache", CACHE_MODES),
            pick(discard, DISCARD_KEY, "discard", DISCARD_MODES),
        )


def quote_option(value: str) -> str:
    """``value`` as a QEMU option value: every ``,`` doubled."""
    return value.replace(",", ",,")


@dataclass(frozen=True)
class Drive:
    """One disk for QEMU: a file name QEMU understands and the volume's settings.

    ``file_options`` say the same as ``filename`` in QEMU's structured
    options (``driver`` first), for ``--image-opts``, where QEMU takes a nested
    file name for a host file unless told its driver, and where its NBD
    driver does not read URIs.
    """

    filename: str
    file_options: tuple[tuple[str, str], ...]
    settings: DiskSettings
    read_only: bool = False

    def value(self) -> str:
        """The ``-drive`` value (add ``if=virtio`` or ``if=none,id=...`` to use it)."""
        parts = [
            f"file={quote_option(self.filename)}",
            "format=raw",
            f"cache={self.settings.cache}",
            f"discard={self.settings.discard}",
        ]
        if self.read_only:
            parts.append("readonly=on")
        return ",".join(parts)

    def image_opts(self) -> str:
        """The same disk for ``qemu-img``/``qemu-io --image-opts`` (no BlockBackend,
        so no write-back switch: pass ``-t <cache>`` to qemu-io for that)."""
        _, direct, no_flush = _CACHE_FLAGS[self.settings.cache]
        parts = ["driver=raw"]
        parts += [f"file.{key}={quote_option(value)}" for key, value in self.file_options]
        parts += [
            f"cache.direct={'on' if direct else 'off'}",
            f"cache.no-flush={'on' if no_flush else 'off'}",
            f"discard={self.settings.discard}",
        ]
        if self.read_only:
            parts.append("read-only=on")
        return ",".join(parts)


# -- native engine: NBD ---------------------------------------------------------------------------
def nbd_uri(socket: str | Path, export: str) -> str:
    """``nbd+unix:///<export>?socket=<path>``, percent-encoded as QEMU's URI parser decodes."""
    socket_text = str(socket)
    if not socket_text.startswith("/"):
        raise DriveError(f"the NBD socket must be an absolute path: {socket_text!r}")
    for what, text in (("socket path", socket_text), ("export name", export)):
        if "\0" in text:
            raise DriveError(f"the {what} holds a NUL character")
    return f"nbd+unix:///{quote(export, safe='')}?socket={quote(socket_text, safe='/')}"


def nbd_drive(
    socket: str | Path, export: str, settings: DiskSettings, *, read_only: bool = False
) -> Drive:
    options = (
        ("driver", "nbd"),
        ("server.type", "unix"),
        ("server.path", str(socket)),
        ("export", export),
    )
    return Drive(nbd_uri(socket, export), options, settings, read_only)


# -- Ceph: QEMU's rbd driver ----------------------------------------------------------------
def ceph_spec(
    pool: str,
    image: str,
    snap: str | None = None,
    *,
    namespace: str = "",
    user: str | None = None,
    conf: str | Path | None = None,
    keyring: str | Path | None = None,
    monitors: tuple[str, ...] = (),
) -> RbdSpec:
    """The ``rbd:`` spec of an image: who to connect as and how to find the monitors.

    Without ``conf`` QEMU reads the default /etc/ceph/ceph.conf; ``monitors``
    then go in as ``mon_host`` so no file is needed for them.
    """
    options: list[tuple[str, str]] = []
    if user:
        options.append(("id", user))
    if conf is not None:
        options.append(("conf", str(conf)))
    if keyring is not None:
        options.append(("keyring", str(keyring)))
    if monitors:
        options.append(("mon_host", ",".join(monitors)))
    return RbdSpec(pool, image, snap, namespace, tuple(options))


def rbd_drive(spec: RbdSpec, settings: DiskSettings) -> Drive:
    """QEMU opens an rbd snapshot read-only by itself; the drive says so too."""
    filename = format_spec(spec)
    options = (("driver", "rbd"), ("filename", filename))
    return Drive(filename, options, settings, read_only=spec.snap is not None)
