"""Differential test: the same random history on a native image and a Ceph image.

Writes, discards, zeroing, snapshots, clones (of clones), resizes, rollbacks
and flattens are applied to both engines in the same order; after every step
the image just changed reads the same on both, and at the end every image and
every snapshot does, through fresh handles. ``CSI_RBD_CEPH_DIFF_SEEDS`` (6)
and ``CSI_RBD_CEPH_DIFF_STEPS`` (40) set the length. No model is involved: whatever
librbd does, the native engine must do too (outside the documented
differences, which the generator avoids: clones of size-0 snapshots, clones
shrunk to nothing).
"""

from __future__ import annotations

import os
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import csi_rbd.engine.native as native
from tests.engine.conformance import pattern

KiB = 1024


@dataclass
class Side:
    """One engine: its module, RBD, pool, and one open read-write handle per image."""

    module: Any
    ioctx: Any
    prefix: str
    rbd: Any = None
    handles: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rbd = self.module.RBD()

    def name(self, image: str) -> str:
        return self.prefix + image

    def head(self, image: str) -> Any:
        if image not in self.handles:
            self.handles[image] = self.module.Image(self.ioctx, self.name(image))
        return self.handles[image]

    def read(self, image: str, snapshot: str | None = None) -> bytes:
        if snapshot is None:
            handle = self.head(image)
            return bytes(handle.read(0, handle.size()))
        with self.module.Image(self.ioctx, self.name(image), snapshot=snapshot) as handle:
            return bytes(handle.read(0, handle.size()))

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()


@dataclass
class ImageState:
    size: int
    snaps: dict[str, int] = field(default_factory=dict)  # name -> size
    parent: bool = False


def _apply(side: Side, action: tuple[Any, ...]) -> None:
    """One step on one engine: (operation, image, arguments...)."""
    op, image, *args = action
    if op == "create":
        side.rbd.create(side.ioctx, side.name(image), *args)
    elif op == "clone":
        parent, snap = args
        side.rbd.clone(side.ioctx, side.name(parent), snap, side.ioctx, side.name(image))
    else:
        getattr(side.head(image), op)(*args)


OPERATIONS = ("write", "write", "discard", "zero", "snap", "snap", "clone", "resize", "flatten")


def _run(seed: int, sides: list[Side], steps: int = 40) -> None:
    rng = random.Random(seed)
    images: dict[str, ImageState] = {}

    def check(image: str) -> None:
        reads = [side.read(image) for side in sides]
        assert reads[0] == reads[1], (seed, image, "head differs")

    size = rng.randrange(1, 16) * 4096 + rng.choice([0, 1, 511, 4095])
    order = rng.choice([12, 13, 14])
    actions: list[tuple[Any, ...]] = [
        ("create", "i0", size, order),
        ("write", "i0", pattern(size, seed % 250 + 1), 0),
    ]
    images["i0"] = ImageState(size)
    for step in range(steps):
        image = rng.choice(sorted(images))
        state = images[image]
        op = rng.choice([*OPERATIONS, "rollback"])
        action: tuple[Any, ...] | None = None
        if op in ("write", "discard", "zero") and state.size:
            offset = rng.randrange(state.size)
            length = rng.choice([1, 511, 4096, 5000, rng.randrange(1, 20000)])
            length = min(length, state.size - offset)
            if op == "write":
                action = ("write", image, pattern(length, step % 250 + 3), offset)
            else:
                action = ("discard" if op == "discard" else "write_zeroes", image, offset, length)
        elif op == "snap" and len(state.snaps) < 4:
            action = ("create_snap", image, f"s{step}")
            state.snaps[f"s{step}"] = state.size
        elif op == "clone" and len(images) < 6:
            candidates = [(i, n) for i in sorted(images) for n, sz in images[i].snaps.items() if sz]
            if candidates:
                parent, snap = rng.choice(candidates)
                image = f"i{step}"
                action = ("clone", image, parent, snap)
                images[image] = ImageState(images[parent].snaps[snap], parent=True)
        elif op == "resize":
            state.size = rng.randrange(1 if state.parent else 0, 24 * 4096)
            action = ("resize", image, state.size)
        elif op == "flatten" and state.parent:
            action = ("flatten", image)
            state.parent = False
        elif op == "rollback" and state.snaps:
            snap = rng.choice(sorted(state.snaps))
            action = ("rollback_to_snap", image, snap)
            state.size = state.snaps[snap]
        if action is not None:
            actions.append(action)
        for pending in actions:
            for side in sides:
                _apply(side, pending)
        actions.clear()
        check(image)
    for side in sides:
        side.close()
    for image, state in sorted(images.items()):
        check(image)
        for snap in state.snaps:
            reads = [side.read(image, snap) for side in sides]
            assert reads[0] == reads[1], (seed, image, snap)
    for side in sides:
        side.close()


@pytest.fixture(scope="module")
def native_ioctx(tmp_path_factory: pytest.TempPathFactory) -> Any:
    cluster = native.Rados(data_dir=tmp_path_factory.mktemp("native") / "data")
    cluster.connect()
    yield cluster.open_ioctx("rbd")
    cluster.shutdown()


@pytest.mark.parametrize("seed", range(int(os.environ.get("CSI_RBD_CEPH_DIFF_SEEDS", 6))))
def test_native_and_ceph_read_the_same(seed: int, native_ioctx: Any, ceph_rados: Any) -> None:
    steps = int(os.environ.get("CSI_RBD_CEPH_DIFF_STEPS", 40))
    import csi_rbd.engine.ceph as ceph

    prefix = f"diff{seed}-{uuid.uuid4().hex[:6]}-"
    ceph_ioctx = ceph_rados.open_ioctx("rbd")
    try:
        _run(seed, [Side(native, native_ioctx, prefix), Side(ceph, ceph_ioctx, prefix)], steps)
    finally:
        ceph_ioctx.close()


def test_sides_are_independent(tmp_path: Path) -> None:
    """The harness itself: two native data directories give identical reads."""
    clusters = []
    for name in ("a", "b"):
        cluster = native.Rados(data_dir=tmp_path / name)
        cluster.connect()
        clusters.append(cluster)
    try:
        _run(99, [Side(native, c.open_ioctx("rbd"), "x-") for c in clusters], steps=15)
    finally:
        for cluster in clusters:
            cluster.shutdown()
