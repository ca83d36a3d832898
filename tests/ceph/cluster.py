"""A throwaway single-node Ceph cluster for the Ceph engine's tests.

One monitor and one OSD on 127.0.0.1 in a temporary directory, made from
Debian's ``ceph-mon``/``ceph-osd`` (no ceph-mgr, no systemd, no root needed
beyond what the daemons need):

* ``osd objectstore = memstore`` (data in RAM), pools of size 1
  (``mon allow pool size one``), CRUSH choosing OSDs, not hosts;
* cephx on, msgr2 only, everything bound to 127.0.0.1 (the monitor on a free
  port picked at start);
* ``paxos propose interval = 0.01`` and ``paxos min wait = 0.001`` (without
  them every snapshot create waits about a second for the monitor);
* ``rbd default clone format = 2``.

Keys: ``client.admin`` (all caps), and ``client.csi`` with ``profile rbd``
caps: the credentials a StorageClass secret would carry. Pools ``rbd`` and
``second`` are made and initialised for RBD.

Stopping kills only this cluster's own daemons, by the pids in its pid files,
and removes the directory. From a shell::

    python -m tests.ceph.cluster start /tmp/ceph-test   # prints the conf path
    python -m tests.ceph.cluster stop /tmp/ceph-test
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csi_rbd.engine.native.objects import process_alive

DAEMONS = ("ceph-mon", "ceph-osd", "ceph-authtool", "monmaptool", "setpriv")
DEBIAN_PACKAGES = (
    "ceph-mon",
    "ceph-osd",
    "ceph-common",
    "python3-rados",
    "python3-rbd",
    "util-linux",
)
POOLS = ("rbd", "second")
CSI_USER = "csi"
# entity -> (service, capability) pairs
CAPS = {
    "client.admin": (("mon", "allow *"), ("osd", "allow *"), ("mgr", "allow *")),
    "osd.0": (("mon", "allow profile osd"), ("osd", "allow *"), ("mgr", "allow profile osd")),
    f"client.{CSI_USER}": (("mon", "profile rbd"), ("osd", "profile rbd")),
}


class ClusterUnavailable(RuntimeError):
    """The Ceph daemons or bindings are not installed: a reason to skip."""


def missing() -> str | None:
    """None when a cluster can be started here, else what is missing."""
    absent = [d for d in DAEMONS if shutil.which(d) is None]
    if absent:
        return (
            f"Ceph daemons/tools not installed ({', '.join(absent)}); "
            f"apt-get install {' '.join(DEBIAN_PACKAGES)}"
        )
    from csi_rbd.engine.ceph import bindings

    return bindings.available()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


@dataclass
class CephCluster:
    """A running test cluster; :meth:`start` makes one, :meth:`stop` removes it."""

    directory: Path
    port: int = 0
    fsid: str = ""
    keys: dict[str, str] = field(default_factory=dict)
    bound: bool = False  # daemons die with this process (see _daemon)
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)

    # -- paths --------------------------------------------------------------------
    @property
    def conf(self) -> Path:
        return self.directory / "ceph.conf"

    @property
    def admin_keyring(self) -> Path:
        return self.directory / "admin.keyring"

    @property
    def monitor(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def csi_secrets(self) -> dict[str, str]:
        """What a StorageClass's secret would hold for the CSI user."""
        return {"userID": CSI_USER, "userKey": self.keys[CSI_USER]}

    @property
    def admin_secrets(self) -> dict[str, str]:
        return {"userID": "admin", "userKey": self.keys["admin"]}

    def config_entry(self, cluster_id: str = "ceph-it") -> dict[str, Any]:
        """This cluster as an entry of the driver's config file (no conf file)."""
        return {
            "id": cluster_id,
            "engine": "ceph",
            "monitors": [f"v2:{self.monitor}"],
            "pool": POOLS[0],
        }

    def client_conf(self, user: str = CSI_USER) -> Path:
        """A client's conf file: monitors and the user's keyring (as /etc/ceph would hold)."""
        path = self.directory / f"client.{user}.conf"
        if not path.exists():
            path.write_text(
                f"[global]\nmon host = [v2:127.0.0.1:{self.port}]\n"
                f"keyring = {self.directory / f'client.{user}.keyring'}\n"
            )
        return path

    def pid_files(self) -> list[Path]:
        return sorted((self.directory / "run").glob("*.pid"))

    # -- start --------------------------------------------------------------------
    @classmethod
    def start(
        cls, directory: Path | None = None, timeout: float = 60.0, bound: bool = True
    ) -> CephCluster:
        """A new cluster in ``directory`` (default: a new temporary one).

        ``bound``: the daemons run as children of this process and die with it
        (the test fixtures); otherwise they daemonize (the command line).
        """
        reason = missing()
        if reason:
            raise ClusterUnavailable(reason)
        if directory is None:
            directory = Path(tempfile.mkdtemp(prefix="csi-rbd-ceph-"))
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / "ceph.conf").exists():
            raise FileExistsError(f"{directory} already holds a cluster; stop it first")
        cluster = cls(directory, _free_port(), str(uuid.uuid4()), bound=bound)
        try:
            cluster._bootstrap(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _write_conf(self) -> None:
        d = self.directory
        self.conf.write_text(
            f"""[global]
fsid = {self.fsid}
mon host = [v2:127.0.0.1:{self.port}]
public addr = 127.0.0.1
ms bind msgr1 = false
ms bind msgr2 = true
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = {self.admin_keyring}
run dir = {d}/run
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
log file = {d}/log/$name.log
log to stderr = false
err to stderr = false
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = {2 << 30}
rbd default clone format = 2
client mount timeout = 10

[mon]
mon data = {d}/mon.$id
paxos propose interval = 0.01
paxos min wait = 0.001
mon osd reporter subtree level = osd

[osd]
osd data = {d}/osd.$id
osd op num shards = 2
osd op num threads per shard = 1
osd memory target = 536870912
"""
        )

    def _bootstrap(self, timeout: float) -> None:
        d = self.directory
        for sub in ("run", "log", "mon.a", "osd.0"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        self._write_conf()
        # One keyring seeds the monitor's auth database with every key we need.
        mon_keyring = d / "mon.keyring"
        _run("ceph-authtool", "--create-keyring", str(mon_keyring), "--gen-key", "-n", "mon.",
             "--cap", "mon", "allow *")  # fmt: skip
        for entity, pairs in CAPS.items():
            caps = [word for service, cap in pairs for word in ("--cap", service, cap)]
            keyring = d / f"{entity}.keyring"
            _run("ceph-authtool", "--create-keyring", str(keyring), "--gen-key", "-n", entity,
                 *caps)  # fmt: skip
            _run("ceph-authtool", str(mon_keyring), "--import-keyring", str(keyring))
            key = _run("ceph-authtool", str(keyring), "-p", "-n", entity).strip()
            self.keys[entity.split(".", 1)[1] if entity.startswith("client.") else entity] = key
        shutil.copy(d / "client.admin.keyring", self.admin_keyring)
        for entity in CAPS:
            os.chmod(d / f"{entity}.keyring", 0o600)
        monmap = d / "monmap"
        _run("monmaptool", "--create", "--fsid", self.fsid, "--addv", "a",
             f"[v2:127.0.0.1:{self.port}]", str(monmap))  # fmt: skip
        _run("ceph-mon", "--mkfs", "-c", str(self.conf), "-i", "a", "--monmap", str(monmap),
             "--keyring", str(mon_keyring))  # fmt: skip
        self._daemon("ceph-mon", "-c", str(self.conf), "-i", "a")
        deadline = time.monotonic() + timeout
        admin = self.admin()
        try:
            osd_uuid = str(uuid.uuid4())
            self.command(admin, {"prefix": "osd new", "uuid": osd_uuid, "id": 0})
            _run("ceph-osd", "-c", str(self.conf), "-i", "0", "--mkfs", "--osd-uuid", osd_uuid,
                 "--keyring", str(d / "osd.0.keyring"))  # fmt: skip
            shutil.copy(d / "osd.0.keyring", d / "osd.0" / "keyring")
            self._daemon("ceph-osd", "-c", str(self.conf), "-i", "0", "--keyring",
                         str(d / "osd.0" / "keyring"))  # fmt: skip
            while self.osds_up(admin) < 1:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the OSD did not come up; see {d}/log")
                time.sleep(0.05)
            for pool in POOLS:
                self.create_pool(admin, pool)
        finally:
            admin.shutdown()

    def _daemon(self, *argv: str) -> None:
        """Start a daemon: in the background, or (``bound``) in the foreground as a
        child that the kernel kills when this process dies (util-linux's
        ``setpriv --pdeathsig``), so that a test run killed before its teardown
        leaves no cluster behind."""
        if not self.bound:
            _run(*argv)
            return
        name = f"{argv[0].removeprefix('ceph-')}.{argv[argv.index('-i') + 1]}"
        with open(self.directory / "log" / f"{name}.out", "ab") as out:
            process = subprocess.Popen(
                ["setpriv", "--pdeathsig", "KILL", "--", *argv, "-f"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.children.append(process)
        pid_file = self.directory / "run" / f"{name}.pid"
        if not pid_file.exists():
            pid_file.write_text(f"{process.pid}\n")

    # -- clients ------------------------------------------------------------------
    def admin(self, timeout: int = 10) -> Any:
        """A connected ``rados.Rados`` as client.admin (callers shut it down)."""
        from csi_rbd.engine.ceph import bindings

        rados, _ = bindings.load()
        handle = rados.Rados(conffile=str(self.conf), rados_id="admin")
        handle.conf_set("client_mount_timeout", str(timeout))
        handle.connect()
        return handle

    def osds_up(self, handle: Any) -> int:
        stat = json.loads(self.command(handle, {"prefix": "osd stat", "format": "json"}))
        return int(stat["num_up_osds"])

    @staticmethod
    def command(handle: Any, command: dict[str, Any]) -> str:
        code, out, status = handle.mon_command(json.dumps(command), b"", timeout=30)
        if code != 0:
            raise RuntimeError(f"{command['prefix']} failed ({code}): {status}")
        return bytes(out).decode()

    def create_pool(self, handle: Any, pool: str) -> None:
        from csi_rbd.engine.ceph import bindings

        _, rbd = bindings.load()
        self.command(handle, {"prefix": "osd pool create", "pool": pool, "pg_num": 8})
        self.command(
            handle,
            {"prefix": "osd pool application enable", "pool": pool, "app": "rbd"},
        )
        ioctx = handle.open_ioctx(pool)
        try:
            rbd.RBD().pool_init(ioctx, True)
        finally:
            ioctx.close()

    # -- stop ---------------------------------------------------------------------
    def stop(self, remove: bool = True) -> None:
        """Kill this cluster's daemons (by pid file only), then remove its directory.

        When the directory goes anyway the daemons get SIGKILL at once (a
        memstore OSD otherwise spends seconds writing its store out); else
        SIGTERM, and SIGKILL after 10 seconds.
        """
        pids = []
        for pid_file in self.pid_files():
            with contextlib.suppress(ValueError, OSError):
                pids.append(int(pid_file.read_text().strip()))
        first = signal.SIGKILL if remove else signal.SIGTERM
        for pid in pids:
            if _is_ours(pid, self.directory):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, first)
        deadline = time.monotonic() + 10
        for pid in pids:
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if _alive(pid) and _is_ours(pid, self.directory):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=1)  # reap
        if remove:
            shutil.rmtree(self.directory, ignore_errors=True)


def _alive(pid: int) -> bool:
    if not process_alive(pid):
        return False
    # a zombie child of ours counts as gone
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _is_ours(pid: int, directory: Path) -> bool:
    """Whether ``pid`` is a Ceph daemon started with this cluster's conf (pids get reused)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(str(directory).encode() in arg for arg in argv)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python -m tests.ceph.cluster start|stop DIRECTORY", file=sys.stderr)
        return 2
    directory = Path(argv[1]).resolve()
    if argv[0] == "start":
        cluster = CephCluster.start(directory, bound=False)
        (directory / "keys.json").write_text(json.dumps(cluster.keys))
        print(cluster.conf)
        return 0
    CephCluster(directory).stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
