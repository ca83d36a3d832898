"""A model-based state machine for RBD engines.

``EngineModel`` drives an engine through random sequences of writes, discards,
zeroing, resizes, snapshots, rollbacks, clones (of clones, across pools),
flattens and removals, and checks every image and snapshot against a plain
in-memory model: one ``bytearray`` per image head and one ``bytes`` per
snapshot. A clone starts as a copy of its parent snapshot's bytes; since a
snapshot never changes, the model needs no notion of layering for data at all.

It only uses the python-rbd-shaped API, so it runs against any engine:
pass a factory ``make(data_dir) -> (engine, close)`` where ``engine`` has the
attributes ``rados``, ``ioctx``, ``second_ioctx`` and ``module`` (see
:mod:`tests.engine.conformance`), and run it with :func:`run_model`. An engine
can subclass ``EngineModel`` to add invariants only it can check.

Images get the default features, deep-flatten included: flattening a clone
detaches its snapshots from the parent too, as librbd does.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.engine.conformance import covers, differing_runs, nonzero_runs, pattern

EngineFactory = Callable[[Path], tuple[Any, Callable[[], None]]]

MAX_IMAGES = 7
MAX_PLAIN_IMAGES = 3
MAX_SNAPS = 3
MAX_DEPTH = 4
MAX_SIZE = 64 * 1024
IMAGE_NAMES = [f"img{i}" for i in range(MAX_IMAGES + 1)]
SNAP_NAMES = [f"s{i}" for i in range(MAX_SNAPS + 1)]
ORDERS = st.integers(min_value=12, max_value=14)
SIZES = st.one_of(
    st.integers(min_value=0, max_value=MAX_SIZE),
    st.sampled_from([0, 4096, 8192, 3 * 4096 + 1, 16 * 1024, 5 * 8192 - 1, MAX_SIZE]),
)

_uids = itertools.count()


def _scratch_root() -> str | None:
    """Where the engines' data directories go: tmpfs when there is one (much faster)."""
    chosen = os.environ.get("CSI_RBD_MODEL_TMPDIR")
    if chosen:
        return chosen
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


@dataclass(eq=False)
class SnapModel:
    image: ImageModel
    name: str
    data: bytes
    parent: SnapModel | None
    protected: bool = False
    uid: int = field(default_factory=lambda: next(_uids))

    def __repr__(self) -> str:
        return f"{self.image.name}@{self.name}#{self.uid}"


@dataclass(eq=False)
class ImageModel:
    name: str
    pool: int  # 0 or 1: which ioctx
    order: int
    data: bytearray
    parent: SnapModel | None = None
    snaps: dict[str, SnapModel] = field(default_factory=dict)
    trashed: list[SnapModel] = field(default_factory=list)  # removed, maybe kept for clones
    handle: Any = None  # the writer
    admin: Any = None  # a second handle (on the peer connection if any), never writing
    snap_handles: dict[int, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"{self.name}(pool{self.pool})"

    @property
    def depth(self) -> int:
        depth, parent = 0, self.parent
        while parent is not None:
            depth += 1
            parent = parent.image.parent
        return depth

    def set_size(self, size: int) -> None:
        old = len(self.data)
        if size < old:
            del self.data[size:]
        else:
            self.data.extend(bytes(size - old))


class EngineModel(RuleBasedStateMachine):
    """Compare an engine with a bytearray model. Subclass and set ``factory``."""

    factory: EngineFactory

    def __init__(self) -> None:
        super().__init__()
        self._dir = Path(tempfile.mkdtemp(prefix="rbd-model-", dir=_scratch_root()))
        self.engine, self._close_engine = type(self).factory(self._dir)
        self.m = self.engine.module
        self.rbd = self.m.RBD()
        self.ioctxs = [self.engine.ioctx, self.engine.second_ioctx]
        self.images: dict[tuple[int, str], ImageModel] = {}

    def teardown(self) -> None:
        try:
            for image in self.images.values():
                self._close_handles(image)
        finally:
            try:
                self._close_engine()
            finally:
                shutil.rmtree(self._dir, ignore_errors=True)

    # -- handles -------------------------------------------------------------------
    def _ioctx(self, image: ImageModel) -> Any:
        return self.ioctxs[image.pool]

    def _head(self, image: ImageModel) -> Any:
        """The handle that writes the image's data (and holds its write lock)."""
        if image.handle is None:
            image.handle = self.m.Image(self._ioctx(image), image.name)
        return image.handle

    def _manager(self, image: ImageModel, data: st.DataObject) -> Any:
        """The handle an image operation goes through: the writer's, or another one."""
        if not data.draw(st.booleans(), label="through a second handle"):
            return self._head(image)
        if image.admin is None:
            peers = getattr(self.engine, "peer_ioctxs", None)
            ioctx = peers[image.pool] if peers else self._ioctx(image)
            image.admin = self.m.Image(ioctx, image.name)
        return image.admin

    def _snap_handle(self, snap: SnapModel) -> Any:
        handles = snap.image.snap_handles
        if snap.uid not in handles:
            handles[snap.uid] = self.m.Image(
                self._ioctx(snap.image), snap.image.name, snapshot=snap.name
            )
        return handles[snap.uid]

    def _close_handles(self, image: ImageModel) -> None:
        for handle in (image.handle, image.admin, *image.snap_handles.values()):
            if handle is not None:
                handle.close()
        image.handle = image.admin = None
        image.snap_handles.clear()

    def _close_snap_handle(self, snap: SnapModel) -> None:
        handle = snap.image.snap_handles.pop(snap.uid, None)
        if handle is not None:
            handle.close()

    # -- drawing -------------------------------------------------------------------
    def _pick_image(self, data: st.DataObject, clones_only: bool = False) -> ImageModel:
        keys = sorted(k for k, v in self.images.items() if not clones_only or v.parent)
        return self.images[data.draw(st.sampled_from(keys), label="image")]

    def _pick_snap(self, data: st.DataObject) -> SnapModel:
        snaps = [s for key in sorted(self.images) for s in self.images[key].snaps.values()]
        return data.draw(st.sampled_from(snaps), label="snapshot")

    def _range(self, data: st.DataObject, image: ImageModel) -> tuple[int, int]:
        size = len(image.data)
        obj = 1 << image.order
        offset = data.draw(
            st.one_of(
                st.integers(0, size),
                st.integers(0, size // obj).map(lambda n: n * obj),
                st.integers(0, size // obj).map(lambda n: max(0, n * obj - 1)),
            ).map(lambda o: min(o, size)),
            label="offset",
        )
        length = data.draw(
            st.one_of(
                st.integers(0, 3 * obj),
                st.sampled_from([1, obj - 1, obj, obj + 1, 2 * obj]),
            ),
            label="length",
        )
        return offset, min(length, size - offset)

    # -- who refers to whom ------------------------------------------------------------
    def _in_use(self, snap: SnapModel) -> bool:
        """Whether a clone's head or one of its snapshots reads through to ``snap``."""
        return any(
            image.parent is snap
            or any(other.parent is snap for other in (*image.snaps.values(), *image.trashed))
            for image in self.images.values()
        )

    def _prune_trash(self) -> None:
        """Forget trashed snapshots nothing can refer to any more (to a fixed point)."""
        changed = True
        while changed:
            changed = False
            for image in self.images.values():
                for snap in list(image.trashed):
                    if not self._in_use(snap):
                        image.trashed.remove(snap)
                        changed = True

    # -- start: a parent full of data, a snapshot of it and a clone --------------------
    @initialize(
        size=st.integers(min_value=1, max_value=MAX_SIZE),
        order=ORDERS,
        pool=st.sampled_from([0, 1]),
        seed=st.integers(1, 254),
    )
    def start_with_a_clone(self, size: int, order: int, pool: int, seed: int) -> None:
        self.create_image(size, order, 0)
        base = self.images[(0, IMAGE_NAMES[0])]
        self._head(base).write(pattern(size, seed), 0)
        base.data[:] = pattern(size, seed)
        self._head(base).create_snap(SNAP_NAMES[0])
        snap = SnapModel(base, SNAP_NAMES[0], bytes(base.data), None)
        base.snaps[snap.name] = snap
        name = IMAGE_NAMES[1]
        self.rbd.clone(self.ioctxs[0], base.name, snap.name, self.ioctxs[pool], name)
        self.images[(pool, name)] = ImageModel(name, pool, order, bytearray(base.data), parent=snap)

    # -- rules: images and data -------------------------------------------------------
    @precondition(
        lambda self: (
            len(self.images) < MAX_IMAGES
            and sum(not i.parent for i in self.images.values()) < MAX_PLAIN_IMAGES
        )
    )
    @rule(size=SIZES, order=ORDERS, pool=st.sampled_from([0, 0, 1]))
    def create_image(self, size: int, order: int, pool: int) -> None:
        name = next(n for n in IMAGE_NAMES if (pool, n) not in self.images)
        self.rbd.create(self.ioctxs[pool], name, size, order=order)
        self.images[(pool, name)] = ImageModel(name, pool, order, bytearray(size))

    @precondition(lambda self: self.images)
    @rule(data=st.data(), seed=st.integers(1, 254))
    def write(self, data: st.DataObject, seed: int) -> None:
        self._write(self._pick_image(data), data, seed)

    @precondition(lambda self: any(i.parent for i in self.images.values()))
    @rule(data=st.data(), seed=st.integers(1, 254))
    def write_clone(self, data: st.DataObject, seed: int) -> None:
        self._write(self._pick_image(data, clones_only=True), data, seed)

    def _write(self, image: ImageModel, data: st.DataObject, seed: int) -> None:
        offset, length = self._range(data, image)
        payload = pattern(length, seed)
        assert self._head(image).write(payload, offset) == length
        image.data[offset : offset + length] = payload

    @precondition(lambda self: self.images)
    @rule(data=st.data(), seed=st.integers(1, 254))
    def fill(self, data: st.DataObject, seed: int) -> None:
        """Write the whole image: parents full of data show what clones must hide."""
        image = self._pick_image(data)
        payload = pattern(len(image.data), seed)
        self._head(image).write(payload, 0)
        image.data[:] = payload

    @precondition(lambda self: self.images)
    @rule(data=st.data(), how=st.sampled_from(["discard", "write_zeroes"]))
    def zero(self, data: st.DataObject, how: str) -> None:
        self._zero(self._pick_image(data), data, how)

    @precondition(lambda self: any(i.parent for i in self.images.values()))
    @rule(data=st.data(), how=st.sampled_from(["discard", "write_zeroes"]))
    def zero_clone(self, data: st.DataObject, how: str) -> None:
        self._zero(self._pick_image(data, clones_only=True), data, how)

    def _zero(self, image: ImageModel, data: st.DataObject, how: str) -> None:
        offset, length = self._range(data, image)
        getattr(self._head(image), how)(offset, length)
        image.data[offset : offset + length] = bytes(length)

    @precondition(lambda self: self.images)
    @rule(data=st.data(), size=SIZES)
    def resize(self, data: st.DataObject, size: int) -> None:
        image = self._pick_image(data)
        self._manager(image, data).resize(size)
        image.set_size(size)

    @precondition(lambda self: self.images)
    @rule(data=st.data(), keep=st.floats(0, 1))
    def shrink_and_grow(self, data: st.DataObject, keep: float) -> None:
        """Shrink, then grow back: what was cut off must read as zeros."""
        image = self._pick_image(data)
        size = len(image.data)
        cut = int(size * keep)
        handle = self._manager(image, data)
        handle.resize(cut)
        handle.resize(size)
        image.set_size(cut)
        image.set_size(size)

    @precondition(lambda self: self.images)
    @rule(data=st.data())
    def reopen(self, data: st.DataObject) -> None:
        """Close every handle of an image; the next access opens fresh ones."""
        self._close_handles(self._pick_image(data))

    @precondition(lambda self: self.images)
    @rule(data=st.data())
    def remove_image(self, data: st.DataObject) -> None:
        image = self._pick_image(data)
        self._close_handles(image)
        ioctx = self._ioctx(image)
        if image.snaps:
            try:
                self.rbd.remove(ioctx, image.name)
            except self.m.ImageHasSnapshots:
                return
            raise AssertionError(f"removed {image} that has snapshots {list(image.snaps)}")
        if any(self._in_use(s) for s in image.trashed):
            try:
                self.rbd.remove(ioctx, image.name)
            except (self.m.ImageBusy, self.m.ImageHasSnapshots):
                return
            raise AssertionError(f"removed {image} whose trashed snapshots have clones")
        self.rbd.remove(ioctx, image.name)
        del self.images[(image.pool, image.name)]
        self._prune_trash()
        assert image.name not in self.rbd.list(ioctx)

    # -- rules: snapshots -------------------------------------------------------------
    @precondition(lambda self: any(len(i.snaps) < MAX_SNAPS for i in self.images.values()))
    @rule(data=st.data(), taken=st.integers(0, 4))
    def create_snap(self, data: st.DataObject, taken: int) -> None:
        candidates = sorted(k for k, v in self.images.items() if len(v.snaps) < MAX_SNAPS)
        image = self.images[data.draw(st.sampled_from(candidates), label="image")]
        handle = self._manager(image, data)
        if image.snaps and not taken:  # now and then, a name that is taken
            name = data.draw(st.sampled_from(sorted(image.snaps)), label="taken name")
            try:
                handle.create_snap(name)
            except self.m.ImageExists:
                return
            raise AssertionError(f"created a second snapshot {name} of {image}")
        free = [n for n in SNAP_NAMES if n not in image.snaps]
        name = data.draw(st.sampled_from(free), label="snap name")
        handle.create_snap(name)
        image.snaps[name] = SnapModel(image, name, bytes(image.data), image.parent)

    @precondition(lambda self: any(i.snaps for i in self.images.values()))
    @rule(data=st.data())
    def remove_snap(self, data: st.DataObject) -> None:
        snap = self._pick_snap(data)
        image = snap.image
        handle = self._manager(image, data)
        if snap.protected:
            try:
                handle.remove_snap(snap.name)
            except self.m.ImageBusy:
                return
            raise AssertionError(f"removed protected snapshot {snap}")
        self._close_snap_handle(snap)
        handle.remove_snap(snap.name)
        del image.snaps[snap.name]
        image.trashed.append(snap)
        self._prune_trash()

    @precondition(lambda self: any(i.snaps for i in self.images.values()))
    @rule(data=st.data())
    def rollback(self, data: st.DataObject) -> None:
        snap = self._pick_snap(data)
        image = snap.image
        self._manager(image, data).rollback_to_snap(snap.name)
        image.data = bytearray(snap.data)
        image.parent = snap.parent
        self._prune_trash()

    @precondition(lambda self: any(i.snaps for i in self.images.values()))
    @rule(data=st.data())
    def protect(self, data: st.DataObject) -> None:
        """Protect an unprotected snapshot, or unprotect a protected one."""
        snap = self._pick_snap(data)
        handle = self._manager(snap.image, data)
        if not snap.protected:
            handle.protect_snap(snap.name)
            snap.protected = True
            assert handle.is_protected_snap(snap.name)
            return
        if self._in_use(snap):
            try:
                handle.unprotect_snap(snap.name)
            except self.m.ImageBusy:
                return
            raise AssertionError(f"unprotected {snap} that has clones")
        handle.unprotect_snap(snap.name)
        snap.protected = False
        assert not handle.is_protected_snap(snap.name)

    # -- rules: layering --------------------------------------------------------------
    @precondition(
        lambda self: (
            len(self.images) < MAX_IMAGES
            and any(i.snaps and i.depth < MAX_DEPTH for i in self.images.values())
        )
    )
    @rule(data=st.data(), pool=st.sampled_from([0, 0, 1]), order=st.none() | ORDERS)
    def clone(self, data: st.DataObject, pool: int, order: int | None) -> None:
        self._clone(data, pool, order)

    @precondition(
        lambda self: (
            len(self.images) < MAX_IMAGES
            and any(i.snaps and i.parent and i.depth < MAX_DEPTH for i in self.images.values())
        )
    )
    @rule(data=st.data(), pool=st.sampled_from([0, 1]))
    def clone_clone(self, data: st.DataObject, pool: int) -> None:
        self._clone(data, pool, None, of_clones=True)

    def _clone(
        self, data: st.DataObject, pool: int, order: int | None, of_clones: bool = False
    ) -> None:
        snaps = [
            s
            for key in sorted(self.images)
            for s in self.images[key].snaps.values()
            if self.images[key].depth < MAX_DEPTH and (self.images[key].parent or not of_clones)
        ]
        snap = data.draw(st.sampled_from(snaps), label="parent snapshot")
        name = next(n for n in IMAGE_NAMES if (pool, n) not in self.images)
        self.rbd.clone(
            self._ioctx(snap.image),
            snap.image.name,
            snap.name,
            self.ioctxs[pool],
            name,
            order=order,
        )
        child = ImageModel(
            name,
            pool,
            order or snap.image.order,
            bytearray(snap.data),
            parent=snap,
        )
        self.images[(pool, name)] = child
        assert self._head(child).parent_info() == (
            self._ioctx(snap.image).get_pool_name(),
            snap.image.name,
            snap.name,
        )

    @precondition(lambda self: any(i.parent for i in self.images.values()))
    @rule(data=st.data())
    def flatten(self, data: st.DataObject) -> None:
        image = self._pick_image(data, clones_only=True)
        handle = self._manager(image, data)
        handle.flatten()
        image.parent = None
        for snap in (*image.snaps.values(), *image.trashed):  # deep-flatten
            snap.parent = None
        self._prune_trash()
        try:
            handle.parent_info()
        except self.m.ImageNotFound:
            pass
        else:
            raise AssertionError(f"{image} still has a parent after flatten")

    @precondition(lambda self: any(not i.parent for i in self.images.values()))
    @rule(data=st.data())
    def flatten_plain_image(self, data: st.DataObject) -> None:
        keys = sorted(k for k, v in self.images.items() if not v.parent)
        image = self.images[data.draw(st.sampled_from(keys), label="image")]
        try:
            self._head(image).flatten()
        except self.m.InvalidArgument:
            return
        raise AssertionError(f"flattened {image}, which has no parent")

    # -- rules: extra observations ----------------------------------------------------
    @precondition(lambda self: self.images)
    @rule(data=st.data())
    def read_fresh_handle(self, data: st.DataObject) -> None:
        """A new read-only handle sees what the open handle wrote (after flush)."""
        image = self._pick_image(data)
        self._head(image).flush()
        offset, length = self._range(data, image)
        with self.m.Image(self._ioctx(image), image.name, read_only=True) as fresh:
            assert fresh.size() == len(image.data)
            got = fresh.read(offset, length)
        assert got == bytes(image.data[offset : offset + length]), (image, offset, length)

    @precondition(lambda self: self.images)
    @rule(data=st.data(), include_parent=st.booleans())
    def diff_all(self, data: st.DataObject, include_parent: bool) -> None:
        """diff_iterate from nothing reports at least every non-zero byte."""
        image = self._pick_image(data)
        if not include_parent and image.parent is not None:
            return  # which bytes are the parent's is not modelled
        size = len(image.data)
        extents: list[tuple[int, int]] = []
        self._head(image).diff_iterate(
            0,
            size,
            None,
            lambda o, n, e: extents.append((o, n)) if e else None,
            include_parent=include_parent,
        )
        for offset, length in extents:
            assert offset >= 0 and offset + length <= size, (offset, length, size)
        for start, end in nonzero_runs(image.data):
            assert covers(extents, start, end), (image, start, end, extents)

    @precondition(lambda self: any(i.snaps for i in self.images.values()))
    @rule(data=st.data(), whole_object=st.booleans(), at_snapshot=st.booleans())
    def diff_since_snapshot(
        self, data: st.DataObject, whole_object: bool, at_snapshot: bool
    ) -> None:
        """diff_iterate from a snapshot reports at least every byte that changed since.

        The end point is the head, or (``at_snapshot``) a newer snapshot.
        """
        snap = self._pick_snap(data)
        image = snap.image
        handle, now = self._head(image), bytes(image.data)
        end_parent = image.parent
        newer = [s for s in image.snaps.values() if s.uid > snap.uid]
        if at_snapshot and newer:
            end = data.draw(st.sampled_from(newer), label="newer snapshot")
            handle, now = self._snap_handle(end), end.data
            end_parent = end.parent
        size = len(now)
        extents: list[tuple[int, int, bool]] = []
        handle.diff_iterate(
            0,
            size,
            snap.name,
            lambda o, n, e: extents.append((o, n, bool(e))),
            whole_object=whole_object,
        )
        runs = [(o, n) for o, n, _ in extents]
        for offset, length, exists in extents:
            assert offset >= 0 and offset + length <= size, (offset, length, size)
            if not exists and end_parent is None and handle is image.handle:
                # "gone" means it reads zeros now
                assert not any(now[offset : offset + length]), (snap, offset, length)
        changed = differing_runs(now, snap.data)
        if len(snap.data) < size:  # grown since: the new area differs where non-zero
            changed += [
                (s + len(snap.data), e + len(snap.data))
                for s, e in nonzero_runs(now[len(snap.data) :])
            ]
        for start, end_ in changed:
            assert covers(runs, start, end_), (snap, start, end_, extents)

    # -- invariants -----------------------------------------------------------------
    @invariant()
    def images_match_the_model(self) -> None:
        if not hasattr(self, "images"):
            return
        for pool, ioctx in enumerate(self.ioctxs):
            names = sorted(n for p, n in self.images if p == pool)
            assert sorted(self.rbd.list(ioctx)) == names
        for image in self.images.values():
            head = self._head(image)
            assert head.size() == len(image.data), image
            got = head.read(0, len(image.data))
            if got != image.data:
                raise AssertionError(f"{image}: head differs at {_first_diff(got, image.data)}")
            listed = [s["name"] for s in head.list_snaps() if s.get("namespace", 0) == 0]
            assert sorted(listed) == sorted(image.snaps), (image, listed)
            for snap in image.snaps.values():
                handle = self._snap_handle(snap)
                assert handle.size() == len(snap.data), snap
                got = handle.read(0, len(snap.data))
                if got != snap.data:
                    raise AssertionError(f"{snap}: differs at {_first_diff(got, snap.data)}")
            if image.parent is None:
                try:
                    head.parent_info()
                except self.m.ImageNotFound:
                    pass
                else:
                    raise AssertionError(f"{image} has a parent, the model none")
            elif image.parent.image.snaps.get(image.parent.name) is image.parent:
                assert head.parent_info() == (
                    self._ioctx(image.parent.image).get_pool_name(),
                    image.parent.image.name,
                    image.parent.name,
                )
            for snap in image.snaps.values():
                expected = sorted(
                    (self._ioctx(child).get_pool_name(), child.name)
                    for child in self.images.values()
                    if child.parent is snap
                    or any(s.parent is snap for s in (*child.snaps.values(), *child.trashed))
                )
                assert sorted(self._snap_handle(snap).list_children()) == expected, snap


def _first_diff(a: bytes | bytearray, b: bytes | bytearray) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"byte {i}: engine {x:#04x}, model {y:#04x}"
    return f"lengths {len(a)} vs {len(b)}"


def run_model(
    factory: EngineFactory, settings: Any, machine: type[EngineModel] = EngineModel
) -> None:
    """Run the state machine (or a subclass with extra checks) on the engine ``factory`` builds."""
    bound = type(f"Bound{machine.__name__}", (machine,), {"factory": staticmethod(factory)})
    run_state_machine_as_test(bound, settings=settings)
