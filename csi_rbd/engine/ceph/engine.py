"""The Ceph engine behind the :class:`~csi_rbd.engine.base.Engine` interface.

Sessions
--------
A :meth:`CephEngine.session` is a librados connection made with the call's
credentials: CSI secrets ``userID`` and ``userKey`` (the names ceph-csi
uses). Connections are kept and shared by the calls of the same identity
(see :mod:`.connections`); a new one is made when none is kept. The key
goes into a 0600 keyring in a private directory (in /dev/shm when there is
one) that is deleted as soon as ``connect`` returns; keys are checked for
shape first, and never logged or put in messages.
Connects are bounded by ``client_mount_timeout`` (``connect_timeout``),
since librados ignores the Python ``connect(timeout=)``.

A call without secrets (ListVolumes, ControllerGetVolume, GetCapacity: the CSI
spec gives them none) uses the driver's own identity: the cluster's conf file
(its ``keyring``, the client name from ``CEPH_ARGS``, e.g. ``--id csi``,
else ``client.admin``). Without a conf file such calls fail with
``PermissionError`` (UNAUTHENTICATED).

Errors: wrong or missing credentials are ``PermissionError``; no monitor
answering within the timeout is ``Timeout`` (UNAVAILABLE); a missing pool is
``ObjectNotFound``.

Capacity
--------
:meth:`CephEngine.free_bytes` reads ``ceph df`` (the pool's ``max_avail``,
bounded by a pool quota). Those statistics come from ceph-mgr: a cluster
without a running mgr reports zero for everything, totals included. Then the
pool quota is reported if there is one, else 0, with a warning in the log
(every real cluster runs a mgr). GetCapacity carries no secrets, so without a
conf file (the driver's own identity) the free space is unknown: 0 as well.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from csi_rbd.engine import errors
from csi_rbd.engine.base import Engine, ImageLocator
from csi_rbd.engine.ceph.client import RBD, Image, Rados, connect
from csi_rbd.engine.ceph.connections import ConnectionPool, identity
from csi_rbd.engine.ceph.translate import BY_ERRNO

log = logging.getLogger(__name__)

USER_ID = "userID"
USER_KEY = "userKey"

# A volume's cache mode as librbd settings (Ceph's QEMU page: QEMU's cache
# option sets these when it opens an rbd: drive).
LIBRBD_CACHE_OPTIONS: dict[str, dict[str, str]] = {
    "writeback": {"rbd_cache": "true"},
    "writethrough": {"rbd_cache": "true", "rbd_cache_max_dirty": "0"},
    "none": {"rbd_cache": "false"},
}


def monitor_endpoints(monitors: tuple[str, ...] | list[str]) -> list[tuple[str, int]]:
    """(host, port) of every address in mon_host-style strings.

    Accepts ``host``, ``host:port``, ``v2:ip:port``, ``[v2:ip:port,v1:ip:port]``
    and bracketed IPv6; a missing port is 3300 (msgr2).
    """
    found = []
    for monitor in monitors:
        text = monitor.strip()
        if text.startswith("[") and text.endswith("]") and ("v1:" in text or "v2:" in text):
            text = text[1:-1]
        for part in text.replace(" ", ",").split(","):
            part = part.strip()
            if not part:
                continue
            for prefix in ("v1:", "v2:"):
                if part.startswith(prefix):
                    part = part[len(prefix) :]
            part = part.split("/", 1)[0]  # a nonce
            if part.startswith("["):  # [ipv6]:port
                host, _, rest = part[1:].partition("]")
                port = int(rest[1:]) if rest.startswith(":") else 3300
            elif part.count(":") == 1:
                host, port_text = part.split(":")
                port = int(port_text)
            else:
                host, port = part, 3300
            found.append((host, port))
    return found


class CephEngine(Engine):
    """One Ceph cluster: monitors, an optional conf file and RADOS namespace."""

    kind = "ceph"
    io_threads = 16

    def __init__(
        self,
        cluster_id: str,
        monitors: tuple[str, ...] | list[str],
        default_pool: str = "rbd",
        conf: Path | None = None,
        namespace: str = "",
        connect_timeout: float = 10.0,
        options: Mapping[str, str] | None = None,
    ) -> None:
        self.cluster_id = cluster_id
        self.monitors = tuple(monitors)
        self.default_pool = default_pool
        self.conf = conf
        self.namespace = namespace
        self.connect_timeout = connect_timeout
        self.options = dict(options or {})
        self.rbd = RBD()
        self.image_class = Image
        self._warned_no_stats = False
        self._connections = ConnectionPool()

    @classmethod
    def from_config(cls, cluster: Any, connect_timeout: float = 10.0) -> CephEngine:
        """From a :class:`csi_rbd.config.ClusterConfig` with ``engine: ceph``."""
        return cls(
            cluster.id,
            cluster.monitors,
            cluster.pool,
            conf=cluster.conf,
            namespace=cluster.rados_namespace,
            connect_timeout=connect_timeout,
        )

    def for_data_path(self, cache: str) -> tuple[CephEngine, str]:
        """librbd's own cache implements the mode (see ``LIBRBD_CACHE_OPTIONS``)."""
        if cache not in LIBRBD_CACHE_OPTIONS:
            raise errors.InvalidArgument(f"unknown cache mode {cache!r}")
        engine = CephEngine(
            self.cluster_id,
            self.monitors,
            self.default_pool,
            conf=self.conf,
            namespace=self.namespace,
            connect_timeout=self.connect_timeout,
            options={**self.options, **LIBRBD_CACHE_OPTIONS[cache]},
        )
        return engine, "none"

    # -- connections --------------------------------------------------------------
    def _credentials(self, secrets: Mapping[str, str] | None) -> tuple[str | None, str | None]:
        """(user, key) of a call's secrets; (None, None) for the conf file's identity."""
        if secrets and (secrets.get(USER_ID) or secrets.get(USER_KEY)):
            user, key = secrets.get(USER_ID), secrets.get(USER_KEY)
            if not user or not key:
                raise errors.PermissionError(
                    f"cluster {self.cluster_id}: the secret needs both {USER_ID} and {USER_KEY}"
                )
            return user, key
        if self.conf is None:
            raise errors.PermissionError(
                f"cluster {self.cluster_id}: no credentials (the call carries no {USER_ID}/"
                f"{USER_KEY} secret and the cluster has no conf file with a keyring)"
            )
        return None, None

    def connect(self, secrets: Mapping[str, str] | None = None) -> Rados:
        """A new connected handle for ``secrets`` (see the module notes); the caller
        shuts it down. Calls use :meth:`session`, which shares connections."""
        user, key = self._credentials(secrets)
        started = time.monotonic()
        try:
            return connect(
                self.monitors,
                user=user,
                key=key,
                conf=self.conf,
                namespace=self.namespace,
                timeout=self.connect_timeout,
                options=self.options,
            )
        except errors.Error as exc:
            log.info(
                "cluster %s: connecting as %s failed after %.1fs: %s",
                self.cluster_id,
                f"client.{user}" if user else "the conf file's identity",
                time.monotonic() - started,
                type(exc).__name__,
            )
            raise

    @contextlib.contextmanager
    def session(self, secrets: Mapping[str, str] | None = None) -> Iterator[Rados]:
        """A connected handle for one call, shared with other calls of the same identity."""
        user, key = self._credentials(secrets)
        with self._connections.use(identity(user, key), lambda: self.connect(secrets)) as cluster:
            yield cluster

    def data_path_settings(self, cluster: Any) -> dict[str, str]:
        """librbd's cache settings as the connected client has them."""
        names = ("rbd_cache", "rbd_cache_max_dirty", "rbd_cache_max_dirty_age")
        return {name: str(cluster.raw.conf_get(name)) for name in names}

    # -- exclusive locks of dead clients -------------------------------------------
    def lock_owner(self, image: Any) -> str | None:
        """The client address holding the exclusive lock (``ip:port/nonce``)."""
        for owner in image.lock_get_owners():
            return str(owner["owner"])
        return None

    def break_lock(self, image: Any, owner: str) -> bool:
        """Break (and blocklist) ``owner``'s lock: librbd would otherwise wait for
        the dead client's watch to time out (about 30 s) before taking it over."""
        for held in image.lock_get_owners():
            if held["owner"] == owner:
                image.lock_break(held["mode"], owner)
                log.warning(
                    "cluster %s: broke the exclusive lock of dead client %s", self.cluster_id, owner
                )
                return True
        return False

    # -- the rest of the interface ---------------------------------------------------
    def free_bytes(self, pool: str) -> int:
        if self.conf is None:
            # GetCapacity carries no secrets: without the driver's own identity
            # the free space is unknown, reported as 0 (as without ceph-mgr)
            self._warn_once(f"has no conf file with a keyring to read pool {pool}'s free space")
            return 0
        with self.session(None) as cluster:
            df = _json_command(cluster, {"prefix": "df", "format": "json"})
            quota = 0
            dump = _json_command(cluster, {"prefix": "osd dump", "format": "json"})
            for entry in dump.get("pools", []):
                if entry.get("pool_name") == pool:
                    quota = int(entry.get("quota_max_bytes", 0))
                    break
            else:
                raise errors.ObjectNotFound(f"pool {pool} does not exist")
        stats = next((p for p in df.get("pools", []) if p.get("name") == pool), None)
        if int(df.get("stats", {}).get("total_bytes", 0)) == 0 or stats is None:
            self._warn_once(
                f"reports no usage statistics (is ceph-mgr running?); reporting "
                f"{'its quota' if quota else '0'} as the free space of pool {pool}"
            )
            return quota
        free = int(stats["stats"].get("max_avail", 0))
        if quota:
            used = int(stats["stats"].get("stored", stats["stats"].get("bytes_used", 0)))
            free = min(free, max(0, quota - used))
        return free

    def _warn_once(self, problem: str) -> None:
        if not self._warned_no_stats:
            log.warning("cluster %s %s", self.cluster_id, problem)
            self._warned_no_stats = True

    def probe(self) -> None:
        """With the driver's own identity: connect. Without: a monitor must accept TCP."""
        if self.conf is not None:
            with self.session(None) as cluster:
                cluster.get_fsid()
            return
        endpoints = monitor_endpoints(self.monitors)
        failures = []
        for host, port in endpoints:
            try:
                with socket.create_connection((host, port), timeout=self.connect_timeout):
                    return
            except OSError as exc:
                failures.append(f"{host}:{port}: {exc}")
        raise errors.ConnectionShutdown(
            f"cluster {self.cluster_id}: no monitor reachable ({'; '.join(failures) or 'none'})"
        )

    def locator(self, pool: str, image: str) -> ImageLocator:
        """Cluster id, pool and image: a node finds monitors, conf and namespace by the id."""
        return ImageLocator(self.cluster_id, self.kind, pool, image, None)

    def images(self, cluster: Any, pools: Iterator[str] | None = None) -> Iterator[tuple[str, str]]:
        """Like the base, skipping pools this identity cannot list (not RBD pools, no caps)."""
        for pool in pools if pools is not None else cluster.list_pools():
            try:
                ioctx = cluster.open_ioctx(pool)
            except (errors.ObjectNotFound, errors.PermissionError):
                continue
            try:
                names = self.rbd.list(ioctx)
            except (errors.ObjectNotFound, errors.PermissionError):
                continue
            finally:
                ioctx.close()
            for name in names:
                yield pool, name

    def purge_trash(self, secrets: Mapping[str, str] | None = None) -> list[str]:
        """Remove images this engine trashed that no clone needs (see ``RBD.trash_move``)."""
        removed: list[str] = []
        with self.session(secrets) as cluster:
            for pool in cluster.list_pools():
                try:
                    ioctx = cluster.open_ioctx(pool)
                except errors.Error:
                    continue
                try:
                    removed += self.rbd.purge_trash(ioctx)
                except errors.Error as exc:
                    log.info("cluster %s: purging the trash of %s: %s", self.cluster_id, pool, exc)
                finally:
                    ioctx.close()
        return removed

    def close(self) -> None:
        """Shut down the connections kept for sessions."""
        self._connections.close()


def _json_command(cluster: Rados, command: dict[str, Any]) -> dict[str, Any]:
    code, out, status = cluster.mon_command(json.dumps(command), b"", timeout=30)
    if code != 0:
        kind = BY_ERRNO.get(abs(code), errors.OSError)
        raise kind(f"{command['prefix']}: {status}", errno=abs(code))
    result = json.loads(out or b"{}")
    return result if isinstance(result, dict) else {}
