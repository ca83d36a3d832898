"""Model-based test of the native engine (and, later, any other engine).

The run length is chosen by ``CSI_RBD_MODEL_PROFILE``: ``default`` (well under
a minute), ``quick`` (a smoke run) or ``long`` (for soak runs); the numbers can
be overridden with ``CSI_RBD_MODEL_EXAMPLES`` and ``CSI_RBD_MODEL_STEPS``.
Engines' data directories go to /dev/shm when it exists, or to
``CSI_RBD_MODEL_TMPDIR``.

Another engine joins by adding a factory (and, if it has extra checks, an
``EngineModel`` subclass) to ``ENGINES``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule

import csi_rbd.engine.native as native
from csi_rbd.engine.native import gc
from csi_rbd.engine.native.objects import ObjectStore
from tests.engine.conformance import EngineUnderTest, pattern
from tests.engine.model import EngineModel, run_model

_PROFILES = {"quick": (15, 25), "default": (150, 40), "long": (3000, 80)}
_examples, _steps = _PROFILES[os.environ.get("CSI_RBD_MODEL_PROFILE", "default")]
MODEL_SETTINGS = settings(
    max_examples=int(os.environ.get("CSI_RBD_MODEL_EXAMPLES", _examples)),
    stateful_step_count=int(os.environ.get("CSI_RBD_MODEL_STEPS", _steps)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class NativeModel(EngineModel):
    """The model plus what only the native engine has: ``write_pieces`` (the cache's
    write-back), and a check that nothing is left behind."""

    @precondition(lambda self: self.images)
    @rule(data=st.data(), seed=st.integers(1, 254), count=st.integers(1, 6))
    def write_pieces(self, data: st.DataObject, seed: int, count: int) -> None:
        """Scattered, possibly overlapping pieces in one call: applied in order."""
        image = self._pick_image(data)
        pieces = []
        for n in range(count):
            offset, length = self._range(data, image)
            pieces.append((offset, pattern(length, (seed + n) % 255 + 1)))
        assert self._head(image).write_pieces(pieces) == sum(len(p) for _, p in pieces)
        for offset, payload in pieces:
            image.data[offset : offset + len(payload)] = payload

    @invariant()
    def no_garbage_on_disk(self) -> None:
        if not hasattr(self, "images"):
            return
        for ioctx in self.ioctxs:
            ids = ioctx.catalog.image_ids()
            images = Path(ioctx.image_directory("x")).parent
            folders = {p.name for p in images.iterdir()} if images.exists() else set()
            assert folders <= ids, f"directories of removed images: {folders - ids}"
            for image_id in sorted(ids):
                self._check_image(ioctx, image_id)

    def _check_image(self, ioctx: Any, image_id: str) -> None:
        catalog = ioctx.catalog
        record = catalog.image_by_id(image_id)
        assert record.pending_seq is None, record
        snaps = catalog.snapshots(image_id, include_trashed=True)
        for snap in snaps:
            if snap.trashed:
                assert catalog.children(image_id, snap.id), f"unpurged trashed {snap}"
        current = {s.id for s in snaps}
        store = ObjectStore(ioctx.image_directory(image_id))
        if store.directory.exists():
            temps = [n for n in os.listdir(store.directory) if n.startswith(".tmp.")]
            assert not temps, temps
        for objno, found in store.scan().items():
            needed = {gc.newest(found, lambda e: e <= record.seq)}
            for snap_id in current:
                needed.add(gc.newest(found, lambda e, s=snap_id: e < s))
            garbage = [v for v in found if v not in needed]
            assert not garbage, f"{record.name} object {objno}: garbage {garbage} of {found}"
            assert not found[0].absent, f"{record.name} object {objno}: useless {found[0]}"


def native_factory(data_dir: Path) -> tuple[Any, Callable[[], None]]:
    cluster = native.Rados(data_dir=data_dir, lock_timeout=5.0)
    cluster.connect()
    cluster.create_pool("second")
    # a second connection to the same directory behaves like another process
    peer = native.Rados(data_dir=data_dir, lock_timeout=5.0)
    peer.connect()
    engine = EngineUnderTest(
        rados=cluster,
        ioctx=cluster.open_ioctx(native.DEFAULT_POOL),
        second_ioctx=cluster.open_ioctx("second"),
        module=native,
        peer_ioctxs=(peer.open_ioctx(native.DEFAULT_POOL), peer.open_ioctx("second")),
    )

    def close() -> None:
        try:
            peer.shutdown()
        finally:
            cluster.shutdown()

    return engine, close


# engine id -> (factory, state machine)
ENGINES: dict[str, tuple[Callable[[Path], tuple[Any, Callable[[], None]]], type[EngineModel]]] = {
    "native": (native_factory, NativeModel),
}


@pytest.mark.parametrize("engine_id", list(ENGINES))
def test_engine_matches_model(engine_id: str) -> None:
    factory, machine = ENGINES[engine_id]
    run_model(factory, MODEL_SETTINGS, machine)
