"""The one export an NBD server offers: a cached image, its names, flags and allocation map."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from csi_rbd.node.cache import CachedImage
from csi_rbd.node.nbd import protocol as p

log = logging.getLogger(__name__)

DISCARD_MODES = ("unmap", "ignore")
STATUS_SPAN = 1 << 30  # a BLOCK_STATUS reply describes at most this much
_DIFF_RETRIES = 5

Extent = tuple[int, int]  # (length, NBD_STATE_* flags)


class DiffImage(Protocol):
    """What block status needs of the engine image (python-rbd's ``diff_iterate``)."""

    def diff_iterate(
        self,
        offset: int,
        length: int,
        from_snapshot: str | None,
        iterate_cb: Callable[[int, int, bool], Any],
        include_parent: bool = ...,
    ) -> None: ...


@dataclass
class Export:
    """An image served under ``name`` (``pool/image[@snap]``) and the default name ``""``."""

    cache: CachedImage
    name: str
    read_only: bool = False
    discard: str = "unmap"
    description: str = ""

    def __post_init__(self) -> None:
        if self.discard not in DISCARD_MODES:
            raise ValueError(f"discard mode must be one of {DISCARD_MODES}")
        if not self.description:
            self.description = f"csi-rbd {self.name} (cache {self.cache.mode})"

    def matches(self, name: str) -> bool:
        return name in ("", self.name)

    def size(self) -> int:
        return self.cache.size()

    def flags(self, structured: bool) -> int:
        """Transmission flags. CAN_MULTI_CONN holds in every cache mode: every
        connection goes through the same cache, so a flush or FUA on one covers
        what any connection wrote."""
        flags = p.FLAG_HAS_FLAGS | p.FLAG_CAN_MULTI_CONN
        if structured:
            flags |= p.FLAG_SEND_DF
        if self.read_only:
            return flags | p.FLAG_READ_ONLY
        return (
            flags
            | p.FLAG_SEND_FLUSH
            | p.FLAG_SEND_FUA
            | p.FLAG_SEND_TRIM
            | p.FLAG_SEND_WRITE_ZEROES
            | p.FLAG_SEND_FAST_ZERO
        )

    def block_status(self, offset: int, length: int, one: bool) -> list[Extent]:
        """``base:allocation`` descriptors from ``offset``: data (0) or hole (HOLE|ZERO).

        Allocated is what the engine reports (``diff_iterate`` against nothing,
        parent included) plus what the cache holds dirty. If the engine cannot
        answer, everything is reported allocated, which the protocol allows.
        """
        length = min(length, STATUS_SPAN)
        end = offset + length
        runs = self._allocated(offset, length) + self.cache.dirty_ranges(offset, length)
        runs.sort()
        extents: list[Extent] = []
        at = offset
        for start, count in runs:
            start, stop = max(start, at), min(start + count, end)
            if stop <= start:
                continue
            if start > at:
                extents.append((start - at, p.STATE_HOLE | p.STATE_ZERO))
            if extents and extents[-1][1] == 0:
                extents[-1] = (extents[-1][0] + stop - start, 0)
            else:
                extents.append((stop - start, 0))
            at = stop
        if at < end:
            extents.append((end - at, p.STATE_HOLE | p.STATE_ZERO))
        return extents[:1] if one else extents

    def _allocated(self, offset: int, length: int) -> list[tuple[int, int]]:
        image = cast(DiffImage, self.cache.image)
        for _ in range(_DIFF_RETRIES):
            runs: list[tuple[int, int]] = []
            try:
                image.diff_iterate(offset, length, None, _collector(runs), include_parent=True)
                return runs
            except FileNotFoundError:
                continue  # an object went away between the engine's scan and its read
            except Exception as exc:
                log.warning("block status of %s: %s; reporting it allocated", self.name, exc)
                break
        return [(offset, length)]


def _collector(runs: list[tuple[int, int]]) -> Callable[[int, int, bool], None]:
    def note(start: int, count: int, exists: bool) -> None:
        if exists:
            runs.append((start, count))

    return note
