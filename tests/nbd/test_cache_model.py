"""A Hypothesis state machine: a CachedImage over a real native image against a byte array.

Every mode runs random writes (plain and FUA), reads, discards, write-zeroes
and flushes, with limits small enough that pressure write-back, the age
flusher and eviction all happen. Checked at every step: reads equal the
model, the dirty data stays within ``max_dirty``; after every flush, the
engine itself (read through a handle of its own) equals the model; after the
final close, too. The image size is not a multiple of the page or object
size, so the partial last page is exercised.

``CSI_RBD_CACHE_MODEL_EXAMPLES`` and ``..._STEPS`` override the run length.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from csi_rbd.engine.native import RBD, Image, Rados
from csi_rbd.node.cache import MODES, PAGE, CachedImage, open_cached

SIZE = 24 * PAGE + 1234  # 25 partial pages, 7 objects of 16 KiB (order 14)
LIMITS = {"max_dirty": 6 * PAGE, "target_dirty": 3 * PAGE, "cache_size": 10 * PAGE}
SETTINGS = settings(
    max_examples=int(os.environ.get("CSI_RBD_CACHE_MODEL_EXAMPLES", 100)),
    stateful_step_count=int(os.environ.get("CSI_RBD_CACHE_MODEL_STEPS", 50)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_TMP = "/dev/shm" if os.path.isdir("/dev/shm") else None

offsets = st.integers(0, SIZE - 1)
lengths = st.one_of(st.integers(0, 3 * PAGE), st.sampled_from([PAGE, 2 * PAGE, 5 * PAGE]))
aligned = st.integers(0, SIZE // PAGE - 1).map(lambda n: n * PAGE)


def fill(seed: int, length: int) -> bytes:
    return bytes((seed + i) % 255 + 1 for i in range(length))  # never zero


class CacheModel(RuleBasedStateMachine):
    mode = "writeback"

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="cache-model-", dir=_TMP))
        self.cluster = Rados(data_dir=self.tmp)
        self.cluster.connect()
        self.ioctx = self.cluster.open_ioctx("rbd")
        RBD().create(self.ioctx, "disk", SIZE, order=14)
        self.image = Image(self.ioctx, "disk")
        self.cache: CachedImage = open_cached(self.image, self.mode, max_dirty_age=0.02, **LIMITS)
        self.model = bytearray(SIZE)
        self.seed = 0
        self.flushed = False

    def teardown(self) -> None:
        try:
            self.cache.close()
            assert self.engine() == self.model, "after close"
        finally:
            self.image.close()
            self.cluster.shutdown()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def engine(self) -> bytes:
        with Image(self.ioctx, "disk", read_only=True) as other:
            return other.read(0, SIZE)

    def _data(self, length: int) -> bytes:
        self.seed += 1
        return fill(self.seed * 7, length)

    # -- rules -------------------------------------------------------------------------
    @rule(offset=offsets, length=lengths, fua=st.booleans())
    def write(self, offset: int, length: int, fua: bool) -> None:
        length = min(length, SIZE - offset)
        data = self._data(length)
        assert self.cache.write(data, offset, fua=fua) == length
        self.model[offset : offset + length] = data
        if fua:
            assert self.engine()[offset : offset + length] == data

    @rule(offset=offsets, pages=st.integers(7, 12))
    def write_streaming(self, offset: int, pages: int) -> None:
        """More than max_dirty: straight through, and with writeback (after a first
        flush) written behind: acknowledged early, in the engine when it returns."""
        length = min(pages * PAGE, SIZE - offset)
        data = self._data(length)
        acknowledged: list[bool] = []
        self.cache.write(data, offset, acknowledge=lambda: acknowledged.append(True))
        self.model[offset : offset + length] = data
        if acknowledged:
            assert self.mode == "writeback" and self.flushed
            assert self.engine()[offset : offset + length] == data
        elif length > LIMITS["max_dirty"] or self.mode != "writeback" or not self.flushed:
            assert self.engine()[offset : offset + length] == data

    @rule(offset=aligned, pages=st.integers(1, 4))
    def write_pages(self, offset: int, pages: int) -> None:
        length = min(pages * PAGE, SIZE - offset)
        data = self._data(length)
        self.cache.write(data, offset)
        self.model[offset : offset + length] = data

    @rule(offset=offsets, length=lengths)
    def read(self, offset: int, length: int) -> None:
        expected = self.model[offset : offset + length]
        assert self.cache.read(offset, length) == expected

    @rule(offset=offsets, length=lengths, zeroes=st.booleans())
    def discard(self, offset: int, length: int, zeroes: bool) -> None:
        done = (self.cache.write_zeroes if zeroes else self.cache.discard)(offset, length)
        assert done == min(length, SIZE - offset)
        self.model[offset : offset + done] = bytes(done)

    @rule()
    def flush(self) -> None:
        self.cache.flush()
        self.flushed = True
        assert self.engine() == self.model, "after flush"

    @precondition(lambda self: self.mode != "none")
    @rule()
    def read_everything(self) -> None:
        assert self.cache.read(0, SIZE) == self.model

    # -- invariants --------------------------------------------------------------------
    @invariant()
    def dirty_within_limits(self) -> None:
        assert 0 <= self.cache.dirty_bytes <= LIMITS["max_dirty"]
        if self.mode != "writeback":
            assert self.cache.dirty_bytes == 0
        runs = self.cache.dirty_ranges(0, SIZE)
        assert sum(n for _, n in runs) == self.cache.dirty_bytes


@pytest.mark.parametrize("mode", MODES)
def test_cache_matches_model(mode: str) -> None:
    machine = type(f"CacheModel_{mode}", (CacheModel,), {"mode": mode})
    run_state_machine_as_test(machine, settings=SETTINGS)
