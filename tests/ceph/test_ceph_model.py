"""The Hypothesis state machine of :mod:`tests.engine.model`, on librbd (a short run).

Every example gets two fresh RADOS namespaces (one in each pool), so image
names and listings start empty without creating pools. Length:
``CSI_RBD_CEPH_MODEL_EXAMPLES`` (default 25) examples of
``CSI_RBD_CEPH_MODEL_STEPS`` (default 30) steps.

Image operations go through a second handle of the same connection; with
``CSI_RBD_CEPH_MODEL_PEER=1`` through a second connection (another client)
instead. That mode is not the default: with two librados clients in one
process exchanging exclusive-lock requests, librbd 16.2.15 crashed about once
in 30,000 steps in long runs here (SIGSEGV copying the config in
``rbd_clone3``, an abort on ``std::system_error`` EINVAL from a background
thread, once a deadlock in ``rbd_remove`` on a mutex owned by an exited
thread); 40,000 steps with one client did not. The hand-over sequences
themselves are tested in ``test_ceph_engine``.

``CephModel`` adapts the model where librbd legitimately differs (see
``LIBRBD_DIFFERENCES`` in :mod:`tests.ceph.test_ceph_conformance`):

* a clone never gets smaller objects than its parent, and snapshots of size 0
  are never cloned (librbd refuses both);
* a clone is never shrunk to 0 bytes: librbd then reports no parent
  (``parent_info`` is ImageNotFound) while the parent still lists it as a
  child until it is flattened or removed (see ``test_ceph_engine``);
* unprotecting a snapshot that clones use succeeds (clone v2);
* after a flatten every handle is reopened: handles opened before a deep
  flatten may read through stale parent links once the old parent snapshot
  is gone.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

from tests.ceph.cluster import CephCluster
from tests.engine.conformance import EngineUnderTest
from tests.engine.model import (
    IMAGE_NAMES,
    MAX_DEPTH,
    SIZES,
    EngineModel,
    ImageModel,
    run_model,
)

CEPH_MODEL_SETTINGS = settings(
    max_examples=int(os.environ.get("CSI_RBD_CEPH_MODEL_EXAMPLES", 25)),
    stateful_step_count=int(os.environ.get("CSI_RBD_CEPH_MODEL_STEPS", 30)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class CephModel(EngineModel):
    # -- clones: no smaller objects than the parent's, no snapshot of size 0 ----------
    def _clone(
        self, data: st.DataObject, pool: int, order: int | None, of_clones: bool = False
    ) -> None:
        snaps = [
            s
            for key in sorted(self.images)
            for s in self.images[key].snaps.values()
            if self.images[key].depth < MAX_DEPTH
            and (self.images[key].parent or not of_clones)
            and s.data  # librbd refuses to clone a snapshot of size 0
        ]
        if not snaps:
            return
        snap = data.draw(st.sampled_from(snaps), label="parent snapshot")
        name = next(n for n in IMAGE_NAMES if (pool, n) not in self.images)
        if order is not None:
            order = max(order, snap.image.order)  # librbd: never smaller objects
        self.rbd.clone(
            self._ioctx(snap.image),
            snap.image.name,
            snap.name,
            self.ioctxs[pool],
            name,
            order=order,
        )
        child = ImageModel(name, pool, order or snap.image.order, bytearray(snap.data), parent=snap)
        self.images[(pool, name)] = child
        assert self._head(child).parent_info() == (
            self._ioctx(snap.image).get_pool_name(),
            snap.image.name,
            snap.name,
        )

    # -- a clone is never shrunk to 0 (librbd then reports no parent) -----------------
    @precondition(lambda self: self.images)
    @rule(data=st.data(), size=SIZES)
    def resize(self, data: st.DataObject, size: int) -> None:
        image = self._pick_image(data)
        if image.parent is not None:
            size = max(size, 1)
        self._manager(image, data).resize(size)
        image.set_size(size)

    @precondition(lambda self: self.images)
    @rule(data=st.data(), keep=st.floats(0, 1))
    def shrink_and_grow(self, data: st.DataObject, keep: float) -> None:
        image = self._pick_image(data)
        size = len(image.data)
        cut = int(size * keep)
        if image.parent is not None:
            cut = max(cut, min(size, 1))
        handle = self._manager(image, data)
        handle.resize(cut)
        handle.resize(size)
        image.set_size(cut)
        image.set_size(size)

    # -- reopen every handle after a flatten (stale parent links) ---------------------
    @precondition(lambda self: any(i.parent for i in self.images.values()))
    @rule(data=st.data())
    def flatten(self, data: st.DataObject) -> None:
        super().flatten(data)
        for image in self.images.values():
            self._close_handles(image)

    # -- clone v2: unprotect works with clones ----------------------------------------
    @precondition(lambda self: any(i.snaps for i in self.images.values()))
    @rule(data=st.data())
    def protect(self, data: st.DataObject) -> None:
        snap = self._pick_snap(data)
        handle = self._manager(snap.image, data)
        if not snap.protected:
            handle.protect_snap(snap.name)
        else:
            handle.unprotect_snap(snap.name)
        snap.protected = not snap.protected
        assert handle.is_protected_snap(snap.name) == snap.protected


def test_ceph_engine_matches_model(ceph_cluster: CephCluster, ceph_engine: Any) -> None:
    import csi_rbd.engine.ceph as ceph

    # long-lived connections (a second client with CSI_RBD_CEPH_MODEL_PEER=1),
    # fresh namespaces per example
    clients = 2 if os.environ.get("CSI_RBD_CEPH_MODEL_PEER") == "1" else 1
    connections = [ceph_engine.connect(ceph_cluster.csi_secrets) for _ in range(clients)]

    def factory(_: Path) -> tuple[Any, Callable[[], None]]:
        namespace = "model-" + uuid.uuid4().hex[:12]
        rbd = ceph.RBD()
        ioctxs = []
        for cluster in connections:
            for pool in ("rbd", "second"):
                ioctx = cluster.open_ioctx(pool)
                if cluster is connections[0]:
                    rbd.namespace_create(ioctx, namespace)
                ioctx.raw.set_namespace(namespace)
                ioctxs.append(ioctx)
        engine = EngineUnderTest(
            rados=connections[0],
            ioctx=ioctxs[0],
            second_ioctx=ioctxs[1],
            module=ceph,
            peer_ioctxs=(ioctxs[2], ioctxs[3]) if clients == 2 else None,
        )

        def close() -> None:
            for ioctx in ioctxs:
                ioctx.close()

        return engine, close

    try:
        run_model(factory, CEPH_MODEL_SETTINGS, CephModel)
    finally:
        for cluster in connections:
            cluster.shutdown()
