"""Where NodeStageVolume finds a volume's cache and discard modes."""

from __future__ import annotations

import pytest

from csi_rbd.control import parameters
from csi_rbd.csi.node import _mode


@pytest.mark.parametrize(
    ("metadata", "context", "expected"),
    [
        ({}, {}, "none"),  # the default
        ({}, {"cache": "writethrough"}, "writethrough"),  # the volume context
        ({"csi.cache": "writeback"}, {"cache": "writethrough"}, "writeback"),  # metadata wins
        ({"csi.cache": "bogus"}, {"cache": "writeback"}, "none"),  # unknown: the default
    ],
    ids=["default", "context", "metadata", "unknown"],
)
def test_cache_mode(metadata: dict[str, str], context: dict[str, str], expected: str) -> None:
    assert _mode(metadata, context, "cache", parameters.CACHE_MODES) == expected


def test_discard_mode() -> None:
    assert _mode({}, {}, "discard", parameters.DISCARD_MODES) == "unmap"
    assert _mode({"csi.discard": "ignore"}, {}, "discard", parameters.DISCARD_MODES) == "ignore"
