"""What is specific to the Ceph engine: bindings, error translation, omap,
credentials, the trash, namespaces, configuration; and librbd's own
behaviour where the engine deliberately adapts it."""

from __future__ import annotations

import errno
import glob
import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest

from csi_rbd.config import ClusterConfig, ConfigError, DriverConfig
from csi_rbd.engine import errors
from csi_rbd.engine.ceph import bindings
from csi_rbd.engine.ceph.client import decode_trash_spec, identity_from_environment
from csi_rbd.engine.ceph.engine import CephEngine, monitor_endpoints
from csi_rbd.engine.ceph.translate import translate
from tests.ceph.cluster import CephCluster
from tests.engine.conformance import pattern

KiB = 1024


def unique(label: str) -> str:
    return f"e{uuid.uuid4().hex[:10]}-{label}"


@pytest.fixture
def ioctx(ceph_rados: Any) -> Any:
    handle = ceph_rados.open_ioctx("rbd")
    yield handle
    handle.close()


@pytest.fixture
def m() -> Any:
    import csi_rbd.engine.ceph as ceph

    return ceph


# -- bindings (no cluster needed) -------------------------------------------------------
def test_bindings_are_debians_extension_modules() -> None:
    if bindings.available() is not None:
        pytest.skip(str(bindings.available()))
    rados, rbd = bindings.load()
    assert bindings.load() == (rados, rbd)  # once per process
    for module in (rados, rbd):
        assert module.__file__ is not None and module.__file__.endswith(".so")


def test_missing_bindings_name_the_debian_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(bindings.ENVIRONMENT, str(tmp_path))
    monkeypatch.setattr(bindings, "SEARCH_PATH", ())
    assert bindings.find("rados") is None
    with pytest.raises(bindings.BindingsUnavailable, match="python3-rados and python3-rbd"):
        bindings._import("csi_rbd_no_such_binding")


def test_monitor_endpoints() -> None:
    assert monitor_endpoints(
        ["mon-a.example:3300", "[v2:10.0.0.1:3300/0,v1:10.0.0.1:6789/0]", "10.0.0.2", "[::1]:3301"]
    ) == [
        ("mon-a.example", 3300),
        ("10.0.0.1", 3300),
        ("10.0.0.1", 6789),
        ("10.0.0.2", 3300),
        ("::1", 3301),
    ]


def test_identity_from_environment() -> None:
    assert identity_from_environment({}) is None
    assert identity_from_environment({"CEPH_ARGS": "--id csi"}) == "csi"
    assert identity_from_environment({"CEPH_ARGS": "--user=csi --keyring /k"}) == "csi"
    assert identity_from_environment({"CEPH_ARGS": "-n client.rbd"}) == "rbd"
    assert identity_from_environment({"CEPH_ARGS": "--name osd.0"}) is None


def test_decode_trash_spec() -> None:
    value = b"\x02\x01 \x00\x00\x00\x04\n\x00\x00\x00x5dabf171av7\x08k\xb7\x8f\x80\x13v7\x08k"
    value += b"\xb7\x8f\x80\x13\x00"
    spec = decode_trash_spec(value)
    assert spec["name"] == "x5dabf171a"
    assert spec["source"] == "USER_PARENT"
    assert spec["state"] == "NORMAL"
    assert spec["deletion_time"].year > 2000


# -- error translation -------------------------------------------------------------------
def test_translation_table() -> None:
    if bindings.available() is not None:
        pytest.skip(str(bindings.available()))
    rados, rbd = bindings.load()
    cases = [
        (rbd.ImageNotFound("x", errno=errno.ENOENT), errors.ImageNotFound),
        (rbd.ImageExists("x", errno=errno.EEXIST), errors.ImageExists),
        (rbd.ImageBusy("x", errno=errno.EBUSY), errors.ImageBusy),
        (rbd.ImageHasSnapshots("x", errno=errno.ENOTEMPTY), errors.ImageHasSnapshots),
        (rbd.ReadOnlyImage("x", errno=errno.EROFS), errors.ReadOnlyImage),
        (rbd.InvalidArgument("x", errno=errno.EINVAL), errors.InvalidArgument),
        (rbd.ArgumentOutOfRange("x", errno=errno.EDOM), errors.ArgumentOutOfRange),
        (rbd.Timeout("x", errno=errno.ETIMEDOUT), errors.Timeout),
        (rados.ObjectNotFound("x", errno=errno.ENOENT), errors.ObjectNotFound),
        (rados.ObjectExists("x", errno=errno.EEXIST), errors.ObjectExists),
        (rados.PermissionDeniedError("x", errno=errno.EACCES), errors.PermissionError),
        (rados.PermissionError("x", errno=errno.EPERM), errors.PermissionError),
        (rados.TimedOut("x", errno=errno.ETIMEDOUT), errors.Timeout),
        (rados.ConnectionShutdown("x", errno=errno.ESHUTDOWN), errors.ConnectionShutdown),
        (rados.OSError("x", errno=errno.ECONNREFUSED), errors.ConnectionShutdown),
        (rados.OSError("x", errno=errno.ENOSPC), errors.NoSpace),
        (rbd.OSError("x", errno=errno.EOPNOTSUPP), errors.OperationNotSupported),
    ]
    for source, target in cases:
        result = translate(source)
        assert type(result) is target, (source, result)
        assert isinstance(result, errors.OSError) and result.errno == source.errno
        assert str(result) == str(source)
    key_error = KeyError("k")
    assert translate(key_error) is key_error  # not the bindings': untouched
    # every exception class the bindings define becomes an engine error
    for module in (rados, rbd):
        for name in dir(module):
            kind = getattr(module, name)
            if isinstance(kind, type) and issubclass(kind, module.Error):
                for args in (("x",), ("x", errno.EIO), ("x", errno.EIO, 0)):
                    try:
                        instance = kind(*args)
                        break
                    except TypeError:
                        continue
                assert isinstance(translate(instance), errors.Error), name


# -- omap ------------------------------------------------------------------------------
def test_omap(ioctx: Any) -> None:
    obj = unique("omap")
    assert ioctx.omap_get(obj) == {}
    assert ioctx.omap_get(obj, ["a"]) == {}
    ioctx.omap_remove(obj, ["a"])  # absent object: fine
    ioctx.omap_remove(obj)
    ioctx.omap_set(obj, {"a": b"1", "b": b"2"}, exclusive=True)
    assert ioctx.omap_get(obj) == {"a": b"1", "b": b"2"}
    assert ioctx.omap_get(obj, ["b", "missing"]) == {"b": b"2"}
    with pytest.raises(errors.ObjectExists):
        ioctx.omap_set(obj, {"c": b"3", "a": b"x"}, exclusive=True)
    assert ioctx.omap_get(obj) == {"a": b"1", "b": b"2"}  # all or nothing
    ioctx.omap_set(obj, {"a": b"x"})  # not exclusive: overwrites
    ioctx.omap_remove(obj, ["b"])
    assert ioctx.omap_get(obj) == {"a": b"x"}
    ioctx.omap_remove(obj)
    assert ioctx.omap_get(obj) == {}
    many = {f"k{i:05d}": str(i).encode() for i in range(2500)}  # more than one page
    ioctx.omap_set(obj, many)
    assert ioctx.omap_get(obj) == many
    ioctx.omap_remove(obj)


def test_name_journal_on_rados(ioctx: Any) -> None:
    from csi_rbd.control.journal import NameJournal

    journal = NameJournal(ioctx, "volume")
    name = unique("pvc")
    reservation = journal.reserve(name, {"size": 1})
    assert journal.lookup(name) == reservation
    with pytest.raises(errors.ObjectExists):
        journal.reserve(name, {"size": 1})
    journal.release(reservation)
    assert journal.lookup(name) is None


# -- credentials -------------------------------------------------------------------------
def _keyring_dirs() -> list[str]:
    return glob.glob("/dev/shm/csi-rbd-keyring-*") + glob.glob("/tmp/csi-rbd-keyring-*")


def test_credentials_hygiene(
    ceph_engine: Any,
    ceph_cluster: CephCluster,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    before = _keyring_dirs()
    key = ceph_cluster.keys["csi"]
    with ceph_engine.session({"userID": "client.csi", "userKey": key}) as cluster:
        assert _keyring_dirs() == before  # gone as soon as connected
        assert "rbd" in cluster.list_pools()
    bad_key = key[:-6] + ("AAAAA=" if not key.endswith("AAAAA=") else "BBBBB=")
    for secrets in (
        {"userID": "csi", "userKey": bad_key},
        {"userID": "csi", "userKey": key + "]\n[client.admin]"},  # no keyring injection
        {"userID": "csi", "userKey": "garbage!"},
        {"userID": "a b", "userKey": key},
        {"userID": "", "userKey": key},
        {"userKey": key},
    ):
        with pytest.raises(errors.PermissionError) as failure:
            ceph_engine.session(secrets).__enter__()
        assert key not in str(failure.value) and bad_key not in str(failure.value)
    assert _keyring_dirs() == before
    out, err = capfd.readouterr()
    for text in (out, err, caplog.text):
        assert key not in text and bad_key not in text and "garbage!" not in text


def test_own_identity_from_the_conf_file(
    ceph_cluster: CephCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_conf = CephEngine("c", [f"v2:{ceph_cluster.monitor}"])
    with pytest.raises(errors.PermissionError, match="no credentials"):
        no_conf.session(None).__enter__()
    assert no_conf.free_bytes("rbd") == 0  # unknown without an identity
    no_conf.probe()  # without an identity: the monitors accept connections
    engine = CephEngine("c", [], conf=ceph_cluster.client_conf("csi"))
    try:
        with pytest.raises(errors.PermissionError):  # client.admin's key is not in that keyring
            engine.session(None).__enter__()
        monkeypatch.setenv("CEPH_ARGS", "--id csi")
        with engine.session(None) as cluster:
            assert "rbd" in cluster.list_pools()
        engine.probe()
    finally:
        engine.close()  # the pooled client, while the cluster runs


def test_wrong_credentials_and_dead_monitors_fail_fast(ceph_cluster: CephCluster) -> None:
    import time

    live = CephEngine("c", [f"v2:{ceph_cluster.monitor}"], connect_timeout=2)
    started = time.monotonic()
    with pytest.raises(errors.PermissionError):
        live.session({"userID": "csi", "userKey": ceph_cluster.keys["admin"]}).__enter__()
    assert time.monotonic() - started < 2
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    dead = CephEngine("c", [f"127.0.0.1:{closed}"], connect_timeout=1)
    started = time.monotonic()
    with pytest.raises(errors.Timeout):
        dead.session(ceph_cluster.csi_secrets).__enter__()
    assert time.monotonic() - started < 4


# -- the trash ---------------------------------------------------------------------------
def _parent_with_clone(m: Any, ioctx: Any, snapshot_kept: bool) -> tuple[str, str]:
    rbd = m.RBD()
    parent, child = unique("p"), unique("c")
    rbd.create(ioctx, parent, 8 * KiB, order=12)
    with m.Image(ioctx, parent) as image:
        image.write(pattern(8 * KiB), 0)
        image.create_snap("s")
    rbd.clone(ioctx, parent, "s", ioctx, child)
    if not snapshot_kept:
        with m.Image(ioctx, parent) as image:
            image.remove_snap("s")  # clone v2: to the trash namespace
    return parent, child


def _in_trash(m: Any, ioctx: Any, name: str) -> list[dict[str, Any]]:
    return [e for e in m.RBD().trash_list(ioctx) if e["name"] == name]


def test_librbd_keeps_a_plain_trashed_parent(m: Any, ioctx: Any) -> None:
    """The difference the engine's trash_move works around: librbd's own trash_move
    keeps the image in the trash after its last clone is gone."""
    parent, child = _parent_with_clone(m, ioctx, snapshot_kept=False)
    rbd = m.RBD()
    rbd.raw.trash_move(ioctx.raw, parent, 0)  # python-rbd itself
    rbd.raw.remove(ioctx.raw, child)
    (entry,) = _in_trash(m, ioctx, parent)
    assert entry["source"] == "USER"
    rbd.trash_remove(ioctx, entry["id"])  # nothing needs it: removable by hand


def test_trash_move_removes_the_parent_with_its_last_clone(m: Any, ioctx: Any) -> None:
    parent, child = _parent_with_clone(m, ioctx, snapshot_kept=False)
    rbd = m.RBD()
    with pytest.raises(errors.ImageBusy):  # only trashed snapshots, still used
        rbd.remove(ioctx, parent)
    rbd.trash_move(ioctx, parent)
    assert parent not in rbd.list(ioctx)
    (entry,) = _in_trash(m, ioctx, parent)
    assert entry["source"] == "USER_PARENT"
    with pytest.raises(errors.ImageBusy):
        rbd.trash_remove(ioctx, entry["id"])
    with m.Image(ioctx, child) as image:
        assert image.read(0, 8 * KiB) == pattern(8 * KiB)
    rbd.raw.remove(ioctx.raw, child)  # even by another client: librbd cleans up
    assert _in_trash(m, ioctx, parent) == []


def test_trash_move_with_user_snapshots_purges_on_demand(m: Any, ioctx: Any) -> None:
    parent, child = _parent_with_clone(m, ioctx, snapshot_kept=True)
    rbd = m.RBD()
    with pytest.raises(errors.ImageHasSnapshots):
        rbd.remove(ioctx, parent)
    rbd.trash_move(ioctx, parent)
    (entry,) = _in_trash(m, ioctx, parent)
    assert entry["source"] == "USER"
    with m.Image(ioctx, child) as image:
        image.flatten()  # through the engine: the parent is purged at once
    assert _in_trash(m, ioctx, parent) == []

    parent, child = _parent_with_clone(m, ioctx, snapshot_kept=True)
    rbd.trash_move(ioctx, parent)
    rbd.raw.remove(ioctx.raw, child)  # behind the engine's back
    (entry,) = _in_trash(m, ioctx, parent)
    assert entry["id"] in rbd.purge_trash(ioctx)
    assert _in_trash(m, ioctx, parent) == []


def test_trash_move_without_clones_removes_at_once(m: Any, ioctx: Any) -> None:
    rbd = m.RBD()
    name = unique("a")
    rbd.create(ioctx, name, 4 * KiB, order=12)
    rbd.trash_move(ioctx, name)
    assert name not in rbd.list(ioctx)
    assert _in_trash(m, ioctx, name) == []


def test_other_trash_entries_are_left_alone(m: Any, ioctx: Any, ceph_engine: Any) -> None:
    rbd = m.RBD()
    name = unique("admin")
    rbd.create(ioctx, name, 4 * KiB, order=12)
    rbd.raw.trash_move(ioctx.raw, name, 0)  # an administrator's
    rbd.purge_trash(ioctx)
    (entry,) = _in_trash(m, ioctx, name)
    rbd.trash_remove(ioctx, entry["id"])


# -- librbd behaviour the model avoids -------------------------------------------------
def test_clone_shrunk_to_zero_reports_no_parent(m: Any, ioctx: Any) -> None:
    parent, child = _parent_with_clone(m, ioctx, snapshot_kept=True)
    with m.Image(ioctx, child) as image:
        image.resize(0)
        with pytest.raises(errors.ImageNotFound):
            image.parent_info()
        image.resize(8 * KiB)
        assert image.read(0, 8 * KiB) == bytes(8 * KiB)
        with m.Image(ioctx, parent, snapshot="s") as snap:
            assert snap.list_children() == [("rbd", child)]  # still a child
        image.flatten()  # detaches it
    with m.Image(ioctx, parent, snapshot="s") as snap:
        assert snap.list_children() == []


def test_rollback_from_a_second_handle_leaves_the_writer_writing(m: Any, ioctx: Any) -> None:
    name = unique("a")
    m.RBD().create(ioctx, name, 8 * KiB, order=12)
    writer, other = m.Image(ioctx, name), m.Image(ioctx, name)
    try:
        writer.write(b"one", 0)
        writer.create_snap("s")
        writer.write(b"two", 0)
        for _ in range(2):
            other.rollback_to_snap("s")
            other.resize(16 * KiB)
            assert writer.read(0, 3) == b"one"
            writer.write(b"three", 0)  # the writer gets the lock back
        assert writer.size() == 16 * KiB
    finally:
        writer.close()
        other.close()


# -- namespaces and configuration ---------------------------------------------------------
def test_rados_namespace(ceph_cluster: CephCluster, m: Any, ioctx: Any) -> None:
    namespace = unique("ns")
    m.RBD().namespace_create(ioctx, namespace)
    engine = CephEngine("c", [f"v2:{ceph_cluster.monitor}"], namespace=namespace)
    name = unique("img")
    try:
        with engine.session(ceph_cluster.csi_secrets) as cluster:
            scoped = cluster.open_ioctx("rbd")
            assert scoped.get_namespace() == namespace
            engine.rbd.create(scoped, name, 4 * KiB, order=12)
            scoped.omap_set("csi.volumes", {"k": b"v"})
            assert list(engine.images(cluster, iter(["rbd"]))) == [("rbd", name)]
            scoped.close()
    finally:
        engine.close()
    assert name not in m.RBD().list(ioctx)
    assert "k" not in ioctx.omap_get("csi.volumes")


def test_build_engines(ceph_cluster: CephCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    from csi_rbd.serve import build_engines

    cluster = ClusterConfig(
        "ceph-a", "ceph", monitors=(f"v2:{ceph_cluster.monitor}",), rados_namespace=""
    )
    config = DriverConfig(endpoint="unix:///x", node_id="n", clusters=(cluster,))
    engine = build_engines(config)["ceph-a"]
    assert isinstance(engine, CephEngine) and engine.kind == "ceph"
    assert engine.monitors == (f"v2:{ceph_cluster.monitor}",)
    monkeypatch.setattr(bindings, "available", lambda: "python3-rados is not installed")
    with pytest.raises(ConfigError, match="python3-rados"):
        build_engines(config)


def test_keyring_directory_is_private(m: Any) -> None:
    from csi_rbd.engine.ceph.client import private_keyring

    with private_keyring("csi", "AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==") as path:
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert os.stat(path.parent).st_mode & 0o777 == 0o700
    assert not path.exists() and not path.parent.exists()


def test_engine_purge_trash(ceph_driver: Any, m: Any, ioctx: Any) -> None:
    _, _, engine = ceph_driver  # has its own identity (a conf file)
    parent, child = _parent_with_clone(m, ioctx, snapshot_kept=True)
    m.RBD().trash_move(ioctx, parent)
    m.RBD().raw.remove(ioctx.raw, child)
    (entry,) = _in_trash(m, ioctx, parent)
    assert entry["id"] in engine.purge_trash(None)
    assert _in_trash(m, ioctx, parent) == []


def test_exclusive_lock_is_cooperative_until_acquired(m: Any, ioctx: Any) -> None:
    """librbd hands the lock between writers; after lock_acquire a second writer is busy."""
    name = unique("a")
    m.RBD().create(ioctx, name, 8 * KiB, order=12)
    first, second = m.Image(ioctx, name), m.Image(ioctx, name)
    try:
        first.write(b"1", 0)
        second.write(b"2", 1)  # the lock moves over (the native engine: ImageBusy)
        first.write(b"3", 2)
        assert first.read(0, 3) == b"123"
        first.lock_acquire(m.RBD_LOCK_MODE_EXCLUSIVE)
        with pytest.raises(errors.ImageBusy):
            second.write(b"x", 0)
        first.close()
        second.write(b"4", 3)  # a closed holder frees it
        assert second.read(0, 4) == b"1234"
    finally:
        first.close()
        second.close()


def test_empty_whole_object_diff(m: Any, ioctx: Any) -> None:
    """librbd 16.2 aborts the process on this (a failed ceph_assert); the engine answers."""
    found: list[Any] = []
    for size in (0, 8 * KiB):
        name = unique("a")
        m.RBD().create(ioctx, name, size, order=12)
        with m.Image(ioctx, name) as image:
            image.diff_iterate(0, 0, None, lambda *extent: found.append(extent), whole_object=True)
    assert found == []


def test_rollbacks_from_two_clients_keep_writers_writing(
    m: Any, ioctx: Any, ceph_engine: Any, csi_secrets: dict[str, str]
) -> None:
    """Sequences the model found: rollbacks, snapshots and a failed flatten through
    handles of two clients, then writes and flushes on either one."""
    peer = ceph_engine.connect(csi_secrets)
    peer_ioctx = peer.open_ioctx("rbd")
    try:
        for plan in (
            [("admin", "create_snap", "s1"), ("head", "rollback_to_snap", "s0")],
            [("admin", "rollback_to_snap", "s0"), ("head", "rollback_to_snap", "s0")],
        ):
            name = unique("a")
            m.RBD().create(ioctx, name, 1, order=12)
            with m.Image(ioctx, name) as image:
                image.write(b"\x02", 0)
                image.create_snap("s0")
            handles = {"head": m.Image(ioctx, name), "admin": m.Image(peer_ioctx, name)}
            try:
                for who, operation, argument in plan:
                    getattr(handles[who], operation)(argument)
                with pytest.raises(errors.InvalidArgument):
                    handles["head"].flatten()  # no parent
                handles["head"].write(b"", 0)
                handles["admin"].rollback_to_snap("s0")
                handles["head"].write(b"y", 0)
                handles["head"].flush()
                assert handles["admin"].read(0, 1) == b"y"
                handles["admin"].rollback_to_snap("s0")
                assert handles["head"].read(0, 1) == b"\x02"
            finally:
                for handle in handles.values():
                    handle.close()
    finally:
        peer_ioctx.close()
        peer.shutdown()
