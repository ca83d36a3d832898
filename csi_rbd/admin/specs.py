"""Parsing of command-line values: image specs, names, sizes and feature lists.

The rules follow Ceph's ``rbd`` tool: ``[pool/]image[@snap]`` with pool ``rbd``
when none is given, sizes with binary K/M/G/T/P/E suffixes (``--size`` without
a suffix means MiB), and feature names as ``rbd --image-feature`` takes them.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass

from csi_rbd.admin.errors import invalid

DEFAULT_POOL = "rbd"
MAX_NAME_BYTES = 250
MAX_SIZE = (1 << 63) - 1
MIN_ORDER, MAX_ORDER = 12, 25

MiB = 1 << 20

FEATURES = {
    "layering": 1,
    "striping": 2,
    "exclusive-lock": 4,
    "object-map": 8,
    "fast-diff": 16,
    "deep-flatten": 32,
    "journaling": 64,
    "data-pool": 128,
}
# (feature, what it needs), as librbd refuses at create time
_FEATURE_NEEDS = (("object-map", "exclusive-lock"), ("fast-diff", "object-map"))

_SIZE = re.compile(r"(\d+)\s*(?:([KMGTPE])(?:iB|i|B)?|(B))?", re.IGNORECASE)
_SHIFTS = {"K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}


class Snap(enum.Enum):
    """Whether an image spec may, must or must not name a snapshot."""

    FORBIDDEN = "forbidden"
    PERMITTED = "permitted"
    REQUIRED = "required"


@dataclass(frozen=True)
class ImageSpec:
    pool: str
    image: str
    snap: str | None = None

    def __str__(self) -> str:
        text = f"{self.pool}/{self.image}"
        return f"{text}@{self.snap}" if self.snap is not None else text

    @property
    def image_spec(self) -> str:
        """``pool/image`` without the snapshot."""
        return f"{self.pool}/{self.image}"

    def at(self, snap: str | None) -> ImageSpec:
        return ImageSpec(self.pool, self.image, snap)


def check_name(value: str, what: str) -> str:
    """A pool, image or snapshot name: not empty, no '/', '@' or NUL, at most 250 bytes."""
    if not value:
        raise invalid(f"{what} name is empty")
    for bad in ("/", "@", "\0"):
        if bad in value:
            raise invalid(f"invalid {what} name {value!r}: it contains {bad!r}")
    if value in (".", ".."):
        raise invalid(f"invalid {what} name {value!r}: it is reserved")
    if len(value.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise invalid(f"invalid {what} name: longer than {MAX_NAME_BYTES} bytes")
    return value


def parse_image_spec(
    text: str, snap: Snap = Snap.PERMITTED, default_pool: str = DEFAULT_POOL
) -> ImageSpec:
    """``[pool/]image[@snap]``; a missing pool means ``default_pool``."""
    rest, at, snap_name = text.partition("@")
    if "/" in snap_name:
        raise invalid(f"invalid image spec {text!r}: expected [pool/]image[@snapshot]")
    pool, slash, image = rest.rpartition("/")
    if "/" in pool:
        raise invalid(f"invalid image spec {text!r}: namespaces are not supported")
    if not slash:
        pool = default_pool
    check_name(pool, "pool")
    check_name(image, "image")
    if at:
        check_name(snap_name, "snapshot")
        if snap is Snap.FORBIDDEN:
            raise invalid(f"a snapshot is not allowed here: {text!r}")
        return ImageSpec(pool, image, snap_name)
    if snap is Snap.REQUIRED:
        raise invalid(f"snapshot name was not specified in {text!r} (use image@snapshot)")
    return ImageSpec(pool, image)


def parse_size(text: str, default_unit: int = MiB, what: str = "size") -> int:
    """``10G``, ``512M``, ``4KiB``, ``4096B``; a bare number is in ``default_unit``."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise invalid(f"invalid {what} {text!r}: expected a number with an optional K/M/G/T suffix")
    number, unit, byte_unit = match.groups()
    if unit:
        value = int(number) << _SHIFTS[unit.upper()]
    elif byte_unit:
        value = int(number)
    else:
        value = int(number) * default_unit
    if value > MAX_SIZE:
        raise invalid(f"invalid {what} {text!r}: larger than {MAX_SIZE} bytes")
    return value


def order_of(object_size: int) -> int:
    """The order (log2) of an object size of 4 KiB to 32 MiB."""
    order = object_size.bit_length() - 1
    if object_size <= 0 or 1 << order != object_size or not MIN_ORDER <= order <= MAX_ORDER:
        raise invalid(
            f"invalid object size {object_size}: a power of two from 4 KiB to 32 MiB is required"
        )
    return order


def check_order(order: int) -> int:
    if not MIN_ORDER <= order <= MAX_ORDER:
        raise invalid(f"invalid order {order}: expected {MIN_ORDER} to {MAX_ORDER}")
    return order


def parse_features(values: Iterable[str]) -> int:
    """Feature names (repeated or comma-separated) or a numeric mask, as a bit mask."""
    mask = 0
    names = [part.strip() for value in values for part in value.split(",") if part.strip()]
    for name in names:
        if name.isdigit():
            mask |= int(name)
        elif name.lower() in FEATURES:
            mask |= FEATURES[name.lower()]
        else:
            known = ", ".join(FEATURES)
            raise invalid(f"unknown image feature {name!r} (known: {known})")
    for feature, needs in _FEATURE_NEEDS:
        if mask & FEATURES[feature] and not mask & FEATURES[needs]:
            raise invalid(f"image feature {feature} needs {needs}")
    return mask


def feature_names(mask: int) -> list[str]:
    names = [name for name, bit in FEATURES.items() if mask & bit]
    unknown = mask & ~sum(FEATURES.values())
    if unknown:
        names.append(hex(unknown))
    return names
