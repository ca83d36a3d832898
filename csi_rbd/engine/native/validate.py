"""Argument checks shared by the native engine's entry points."""

from __future__ import annotations

from csi_rbd.engine import errors

MIN_ORDER, MAX_ORDER, DEFAULT_ORDER = 12, 25, 22
MAX_SIZE = (1 << 63) - 1
MAX_NAME = 250

# librbd feature bits (rbd.RBD_FEATURE_*)
RBD_FEATURE_LAYERING = 1
RBD_FEATURE_STRIPINGV2 = 2
RBD_FEATURE_EXCLUSIVE_LOCK = 4
RBD_FEATURE_OBJECT_MAP = 8
RBD_FEATURE_FAST_DIFF = 16
RBD_FEATURE_DEEP_FLATTEN = 32
RBD_FEATURE_JOURNALING = 64
RBD_FEATURE_DATA_POOL = 128
RBD_FEATURES_DEFAULT = (
    RBD_FEATURE_LAYERING
    | RBD_FEATURE_EXCLUSIVE_LOCK
    | RBD_FEATURE_OBJECT_MAP
    | RBD_FEATURE_FAST_DIFF
    | RBD_FEATURE_DEEP_FLATTEN
)
# What the native engine implements; asking for more is an error, as librbd
# refuses features it does not know.
RBD_FEATURES_SUPPORTED = RBD_FEATURES_DEFAULT
FEATURE_NAMES = {
    "layering": RBD_FEATURE_LAYERING,
    "striping": RBD_FEATURE_STRIPINGV2,
    "exclusive-lock": RBD_FEATURE_EXCLUSIVE_LOCK,
    "object-map": RBD_FEATURE_OBJECT_MAP,
    "fast-diff": RBD_FEATURE_FAST_DIFF,
    "deep-flatten": RBD_FEATURE_DEEP_FLATTEN,
    "journaling": RBD_FEATURE_JOURNALING,
    "data-pool": RBD_FEATURE_DATA_POOL,
}


def name(value: object, what: str) -> str:
    """A pool, image or snapshot name: text, not empty, no '/', '@' or NUL."""
    if not isinstance(value, str):
        raise errors.InvalidArgument(f"{what} name must be a string, not {type(value).__name__}")
    if not value:
        raise errors.InvalidArgument(f"{what} name is empty")
    if len(value.encode()) > MAX_NAME:
        raise errors.InvalidArgument(f"{what} name is longer than {MAX_NAME} bytes")
    for bad in ("/", "@", "\0"):
        if bad in value:
            raise errors.InvalidArgument(f"{what} name {value!r} contains {bad!r}")
    if value in (".", ".."):
        raise errors.InvalidArgument(f"{what} name {value!r} is reserved")
    return value


def pool_name(value: object) -> str:
    """A pool name: as any name, and not starting with a dot (the data dir's own files)."""
    text = name(value, "pool")
    if text.startswith("."):
        raise errors.InvalidArgument(f"pool name {text!r} must not start with '.'")
    return text


def size(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise errors.InvalidArgument(f"size must be an integer, not {type(value).__name__}")
    if value < 0 or value > MAX_SIZE:
        raise errors.InvalidArgument(f"size {value} is out of range 0..{MAX_SIZE}")
    return value


def order(value: object) -> int:
    if value is None or value == 0:
        return DEFAULT_ORDER
    if not isinstance(value, int) or not MIN_ORDER <= value <= MAX_ORDER:
        raise errors.InvalidArgument(
            f"order {value!r} is out of range {MIN_ORDER}..{MAX_ORDER} (objects of 4 KiB to 32 MiB)"
        )
    return value


def features(value: object) -> int:
    if value is None:
        return RBD_FEATURES_DEFAULT
    if not isinstance(value, int) or value < 0:
        raise errors.InvalidArgument(f"features {value!r} must be a non-negative integer")
    unsupported = value & ~RBD_FEATURES_SUPPORTED
    if unsupported:
        names = [n for n, bit in FEATURE_NAMES.items() if bit & unsupported] or [hex(unsupported)]
        raise errors.InvalidArgument(f"features not supported: {', '.join(names)}")
    for feature, needs in _FEATURE_NEEDS:
        if value & feature and not value & needs:
            raise errors.InvalidArgument(
                f"feature {_feature_name(feature)} needs {_feature_name(needs)}"
            )
    return value


# librbd's dependencies between features: (feature, what it needs)
_FEATURE_NEEDS = (
    (RBD_FEATURE_OBJECT_MAP, RBD_FEATURE_EXCLUSIVE_LOCK),
    (RBD_FEATURE_FAST_DIFF, RBD_FEATURE_OBJECT_MAP),
)


def _feature_name(bit: int) -> str:
    return next(n for n, b in FEATURE_NAMES.items() if b == bit)


def io_range(offset: object, length: object) -> tuple[int, int]:
    if not isinstance(offset, int) or not isinstance(length, int):
        raise errors.InvalidArgument("offset and length must be integers")
    if offset < 0 or length < 0:
        raise errors.InvalidArgument(f"negative offset or length ({offset}, {length})")
    return offset, length
