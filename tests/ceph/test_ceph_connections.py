"""Connections kept per identity (csi_rbd.engine.ceph.connections), on a real cluster."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from csi_rbd.engine import errors
from csi_rbd.engine.ceph.connections import ConnectionPool, identity
from tests.ceph.cluster import CephCluster


class Client:
    """Stands for a librados handle: the pool only ever calls ``shutdown``."""

    def __init__(self) -> None:
        self.down = False

    def shutdown(self) -> None:
        self.down = True


def test_identity_never_holds_the_key() -> None:
    who = identity("csi", "AQB-secret-key")
    assert "AQB-secret-key" not in repr(who)
    assert who == identity("csi", "AQB-secret-key") != identity("csi", "another")
    assert identity(None, None) == ("", "")


def test_one_client_per_identity_shared_by_concurrent_calls() -> None:
    pool = ConnectionPool()
    made: list[Client] = []
    gate = threading.Barrier(4)

    def connect() -> Client:
        time.sleep(0.05)  # a slow connect: the others must wait for it, not make their own
        made.append(Client())
        return made[-1]

    seen: list[Any] = []

    def call() -> None:
        gate.wait()
        with pool.use(("csi", "k"), connect) as client:
            seen.append(client)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(made) == 1 and all(client is made[0] for client in seen)
    with pool.use(("admin", "k2"), connect) as other:
        assert other is not made[0]
    assert len(pool) == 2
    pool.close()
    assert all(client.down for client in made) and len(pool) == 0


def test_failed_connect_keeps_nothing_and_lost_connection_is_dropped() -> None:
    pool = ConnectionPool()

    def refuse() -> Client:
        raise errors.PermissionError("wrong key")

    with pytest.raises(errors.PermissionError), pool.use(("csi", "bad"), refuse):
        pass
    assert len(pool) == 0
    first = Client()
    with pytest.raises(errors.ConnectionShutdown), pool.use(("csi", "k"), lambda: first):
        raise errors.ConnectionShutdown("cluster went away")
    assert first.down and len(pool) == 0
    second = Client()
    with pool.use(("csi", "k"), lambda: second) as client:
        assert client is second


def test_idle_clients_are_shut_down_at_the_next_call() -> None:
    pool = ConnectionPool(idle_seconds=0.05)
    old = Client()
    with pool.use(("csi", "k"), lambda: old):
        time.sleep(0.1)  # in use: never expired meanwhile
    assert not old.down
    time.sleep(0.1)
    fresh = Client()
    with pool.use(("admin", "k"), lambda: fresh):
        pass
    assert old.down and not fresh.down


def test_engine_sessions_share_a_connection(
    ceph_cluster: CephCluster, csi_secrets: dict[str, str]
) -> None:
    from csi_rbd.engine.ceph import CephEngine

    engine = CephEngine("ceph-pool", [f"v2:{ceph_cluster.monitor}"])
    try:
        with engine.session(csi_secrets) as first:
            instance = first.raw.get_instance_id()
        with engine.session(csi_secrets) as second:
            assert second is first and second.raw.get_instance_id() == instance
            assert "rbd" in second.list_pools()
        wrong = {"userID": "csi", "userKey": "AQAAAAAAAAAAABAAAAAAAAAAAAAAAAAAAAAAAA=="}
        with pytest.raises(errors.PermissionError), engine.session(wrong):
            pass
        with engine.session(ceph_cluster.admin_secrets) as admin:
            assert admin is not first
    finally:
        engine.close()
