"""Benchmark of the CSI controller through gRPC: latency with few and with many volumes,
on the native engine and, with ``--ceph``, on the ceph engine in the same run.

    .venv/bin/python bench/csi_bench.py [--quick] [--sequential] [--background clones]
        [--profile FILE [--profile-clock cpu]] [--small N] [--large N] [--ops N]
        [--ceph | --ceph-conf FILE [--ceph-user NAME] [--ceph-pools SMALL,LARGE]]
        [--ceph-large N] [--keep]

A real ``csi-rbd serve --mode controller`` runs as a subprocess on a unix
socket over a fresh temporary data directory (started from this checkout);
this process is only a gRPC client, and every latency is the client's (what
the external-provisioner and external-snapshotter sidecars wait for), gRPC
round trip included.

``--ceph`` also starts a throwaway single-node Ceph cluster
(tests/ceph/cluster.py: one monitor, one memstore OSD of 2 GiB, size-1 pools;
removed at the end) with pools ``small`` and ``large``, and a second server,
``csi-rbd serve --config FILE`` where FILE is ``{"clusters": [entry]}`` for that
cluster (the ceph engine, librbd); every request that has a ``secrets`` field
carries the cluster's CSI user (``userID``, ``userKey``), as a StorageClass
secret would. ``--ceph-conf FILE`` uses an existing cluster instead, as
``client.<--ceph-user>`` (default admin, key from the conf's keyring), in the
pools ``--ceph-pools`` (default ``csi-bench-small,csi-bench-large``), which must
exist and hold no images: the background volumes are left there. Both servers
are measured in the same loop and every figure is printed for native, ceph and
the ratio native/ceph (below 1: native is faster). The Ceph daemons' own CPU
time is not in the "server CPU" figures: those are the csi-rbd server's.

Two pools are filled first, *through gRPC* with the same CreateVolume request
the measured one sends: pool ``small`` with 100 volumes and pool ``large`` with
10,000 (``--quick``: 100 and 1,000). On Ceph the large pool gets
``--ceph-large`` volumes (default 2,000; ``--quick``: 1,000; the header and
tables print what was used): filling is slower there. By default they are
empty 1 GiB volumes, four calls in flight; ``--background clones`` makes one
golden volume and a snapshot of it per pool and restores every other volume
from that snapshot, one at a time (the driver refuses a second call on the
same source with ABORTED), as VM disks cloned from a golden image are. Each
native pool has its own catalog and name journal, so an operation in
``large`` sees a pool of 10,000 volumes and one in ``small`` a pool of 100;
nothing in the measured paths is shared between pools but the process, its
locks and the disk.

Then each iteration runs, in one pool, the lifecycle a PVC snapshot/restore
goes through, timing every call: CreateVolume (empty), CreateSnapshot of it,
CreateVolume from that snapshot, DeleteVolume of the restored clone,
DeleteSnapshot, DeleteVolume of the (now plain) source. The pool therefore
stays at its size. The machine is small and shared, so:

* by default the pools (and engines) alternate per iteration (small, large,
  then large, small, ...; with Ceph: native-small, native-large, ceph-small,
  ceph-large, then the reverse), so that a burst of outside load lands on all
  alike and the ratios compare like with like; ``--sequential`` runs every
  iteration on ``small`` first and then every one on ``large`` (per engine),
  the literal "first with 100 volumes, then with 10,000" (more exposed to
  drift);
* in the same loop, after every lifecycle, references: a trivial RPC
  (GetPluginInfo; Probe too, which lists the pools) for the gRPC round trip, a
  plain 4 KiB append + fsync in the scratch directory (each native catalog
  change is a SQLite WAL commit with synchronous=FULL, about one fsync) and a
  fixed piece of pure-Python work. Their figures per pool tell what the
  machine did while that pool was measured;
* around every call the server's threads' /proc schedstat is read: the CPU
  time the server spent on the call (a measure of its work that other load
  hardly changes) and how long it sat runnable without a CPU (what other load
  cost it). The header shows the kernel's CPU pressure and how busy the CPUs
  were while measuring.

``--profile FILE`` runs the server(s) under cProfile (one profiler per gRPC
worker thread, merged when it stops; the ceph server's goes to FILE.ceph) and
prints the hottest functions; ``--profile-clock cpu`` profiles each thread's
CPU time instead of elapsed time. The latencies of such a run are inflated by
the profiler.

The targets (PASS/FAIL) are the native engine's. The exit status is always 0:
this reports, it does not gate.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import grpc
from common import (
    REPO,
    CephTarget,
    GiB,
    KiB,
    MiB,
    Report,
    Table,
    add_ceph_arguments,
    ceph_target,
    changed_sources_error,
    fmt_ratio,
    load_line,
    log,
    machine_lines,
    ms,
    percentile,
    ratio_text,
    run_step,
    source_fingerprint,
    timed,
)

from csi_rbd._proto import csi_pb2 as csi
from csi_rbd._proto import csi_pb2_grpc
from csi_rbd.config import ClusterConfig
from csi_rbd.engine.factory import build_engine
from csi_rbd.engine.native import Rados
from csi_rbd.ids import SNAPSHOT_PREFIX, VOLUME_PREFIX

LATENCY_TARGET_MS = 5.0
SCALE_RATIO_TARGET = 1.5
RPC_TIMEOUT = 120.0
SMALL, LARGE = "small", "large"  # the pools, by role
NATIVE, CEPH = "native", "ceph"
T = TypeVar("T")

# The measured operations, in the order one iteration runs them; the first
# four are the ones the targets are about, DeleteVolume in both of its forms.
OPS: dict[str, str] = {
    "create": "CreateVolume (empty, 1 GiB)",
    "snapshot": "CreateSnapshot",
    "restore": "CreateVolume from snapshot",
    "delete-clone": "DeleteVolume (restored clone)",
    "delete-snapshot": "DeleteSnapshot",
    "delete": "DeleteVolume (plain volume)",
}
TARGET_OPS = ("create", "snapshot", "restore", "delete-clone", "delete")
REFS: dict[str, str] = {
    "info": "reference: GetPluginInfo RPC",
    "probe": "reference: Probe RPC",
    "fsync": "reference: 4 KiB append+fsync",
    "cpu": "reference: fixed Python CPU work",
}


# -- configuration ---------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    quick: bool
    small: int  # volumes in pool "small"
    large: int  # volumes in pool "large" (native)
    ceph_large: int  # volumes in pool "large" on Ceph
    ops: int  # measured iterations per pool and engine
    warmup: int  # discarded iterations per pool and engine
    workers: int  # CreateVolume calls in flight while filling the pools
    sequential: bool
    background: str  # "plain" or "clones"
    profile: Path | None
    profile_clock: str  # "wall" or "cpu"

    @classmethod
    def make(cls, args: argparse.Namespace) -> Config:
        quick = bool(args.quick)
        large = args.large if args.large is not None else (1000 if quick else 10_000)
        ceph_default = min(large, 1000 if quick else 2000)
        return cls(
            quick=quick,
            small=args.small if args.small is not None else 100,
            large=large,
            ceph_large=args.ceph_large if args.ceph_large is not None else ceph_default,
            ops=args.ops if args.ops is not None else (30 if quick else 200),
            warmup=3 if quick else 10,
            workers=args.workers,
            sequential=bool(args.sequential),
            background=args.background,
            profile=args.profile,
            profile_clock=args.profile_clock,
        )

    def volumes(self, engine: str, pool: str) -> int:
        if pool == SMALL:
            return self.small
        return self.ceph_large if engine == CEPH else self.large


def mode_line(config: Config, engines: Sequence[str]) -> str:
    order = "sequential (small first, then large)" if config.sequential else "interleaved"
    return (
        f"{'quick' if config.quick else 'full'}, {order}, {config.background} background "
        f"volumes, engines: {' and '.join(engines)}"
        + (f", server under cProfile ({config.profile_clock} clock)" if config.profile else "")
    )


# -- machine -----------------------------------------------------------------------------
def cpu_ticks() -> tuple[int, int, int]:
    """(busy, total, steal) jiffies of all CPUs since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    steal = fields[7] if len(fields) > 7 else 0
    total = sum(fields[:8])
    return total - idle, total, steal


def cpu_pressure() -> str:
    """The kernel's CPU pressure (share of time some task waited for a CPU)."""
    try:
        with open("/proc/pressure/cpu") as pressure:
            some = pressure.readline().split()
    except OSError:
        return "?"
    values = dict(item.split("=") for item in some[1:] if "=" in item)
    return f"some avg10 {values.get('avg10', '?')}% avg60 {values.get('avg60', '?')}%"


def rss_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return f"{int(line.split()[1]) / 1024:.1f} MiB"
    except OSError:
        pass
    return "?"


def pool_files(data_dir: Path, pool: str) -> str:
    """Size of a pool's catalog (database + WAL) and how many image folders it has."""
    directory = data_dir / pool
    size = 0
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            size += (directory / f"catalog.db{suffix}").stat().st_size
    try:
        folders = sum(1 for _ in os.scandir(directory / "images"))
    except OSError:
        folders = -1
    return f"catalog {size / MiB:.1f} MiB, {folders} image folders"


# -- the server --------------------------------------------------------------------------
# ``--profile``: the server started through this launcher; every worker thread of
# the gRPC executor (where handlers run) gets its own cProfile profiler, and at
# exit, after the executor's threads are joined, the profiles are merged into one
# pstats file. cProfile alone (python -m cProfile) would only see the main thread,
# which just waits for SIGTERM.
_PROFILED_SERVER = """
import atexit, cProfile, pstats, sys, threading, time
import concurrent.futures.thread as pool_threads
out, clock, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
profiles = []
guard = threading.Lock()
inner = pool_threads._worker
def _worker(*args, **kwargs):
    # cpu: the thread's own CPU time, so waits (fsync, locks, other load) cost nothing
    profile = cProfile.Profile(time.thread_time) if clock == "cpu" else cProfile.Profile()
    with guard:
        profiles.append(profile)
    profile.enable()
    try:
        inner(*args, **kwargs)
    finally:
        profile.disable()
pool_threads._worker = _worker
def _dump():
    with guard:
        merged = None
        for profile in profiles:
            try:
                merged = pstats.Stats(profile) if merged is None else merged.add(profile)
            except (TypeError, ValueError):
                pass  # a thread that never ran anything
        if merged is not None:
            merged.dump_stats(out)
atexit.register(_dump)
from csi_rbd.cli import main
sys.exit(main(argv))
"""


class Server:
    """A ``csi-rbd serve --mode controller`` process and stubs for it."""

    def __init__(
        self,
        base: Path,
        profile: Path | None,
        clock: str = "wall",
        config_file: Path | None = None,
    ) -> None:
        """A server in ``base``: on the native data directory ``base/data``, or
        (``config_file``) on the clusters that file lists."""
        base.mkdir(parents=True, exist_ok=True)
        self.base = base
        self.clock = clock
        self.data_dir = base / "data"
        self.socket = base / "csi.sock"
        self.log_path = base / "server.log"
        self.profile = profile
        self.config_file = config_file
        self.process: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None

    def command(self) -> list[str]:
        serve = [
            "--data-dir",
            str(self.data_dir),
            "serve",
            "--endpoint",
            f"unix://{self.socket}",
            "--mode",
            "controller",
            "--node-id",
            "bench-node",
        ]
        if self.config_file is not None:
            serve += ["--config", str(self.config_file)]
        if self.profile is not None:
            return [sys.executable, "-c", _PROFILED_SERVER, str(self.profile), self.clock, *serve]
        return [sys.executable, "-m", "csi_rbd.cli", *serve]

    def start(self) -> None:
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited at start:\n{self.log_tail()}")
            try:
                if self.identity.Probe(csi.ProbeRequest(), timeout=1).ready.value:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
        raise RuntimeError(f"the server did not become ready in 60 s:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def schedstat(self) -> dict[str, tuple[int, int]]:
        """Per server thread: nanoseconds it ran, and waited runnable for a CPU.

        From /proc/PID/task/*/schedstat; the gRPC worker threads live as long as
        the server, so differences over a call are what happened during it.
        """
        found: dict[str, tuple[int, int]] = {}
        try:
            tasks = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return found
        for task in tasks:
            with contextlib.suppress(OSError, ValueError, IndexError):
                found[task] = read_schedstat(f"/proc/{self.pid}/task/{task}/schedstat")
        return found

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> int | None:
        """SIGTERM (a clean stop, which also writes the profile); SIGKILL after 60 s."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n         ".join(text.strip().splitlines()[-lines:])


# -- requests ----------------------------------------------------------------------------
MOUNT = csi.VolumeCapability(
    mount=csi.VolumeCapability.MountVolume(fs_type="ext4"),
    access_mode=csi.VolumeCapability.AccessMode(
        mode=csi.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
    ),
)


def volume_request(
    name: str, pool: str, secrets: dict[str, str], snapshot_id: str = ""
) -> csi.CreateVolumeRequest:
    """What the external-provisioner sends (with --extra-create-metadata)."""
    request = csi.CreateVolumeRequest(
        name=name,
        secrets=secrets,
        capacity_range=csi.CapacityRange(required_bytes=GiB),
        volume_capabilities=[MOUNT],
        parameters={
            "pool": pool,
            "csi.storage.k8s.io/fstype": "ext4",
            "csi.storage.k8s.io/pvc/name": name,
            "csi.storage.k8s.io/pvc/namespace": "bench",
            "csi.storage.k8s.io/pv/name": name,
        },
    )
    if snapshot_id:
        request.volume_content_source.snapshot.snapshot_id = snapshot_id
    return request


def snapshot_request(
    name: str, volume_id: str, secrets: dict[str, str]
) -> csi.CreateSnapshotRequest:
    """What the external-snapshotter sends (with --extra-create-metadata)."""
    return csi.CreateSnapshotRequest(
        name=name,
        secrets=secrets,
        source_volume_id=volume_id,
        parameters={
            "csi.storage.k8s.io/volumesnapshot/name": name,
            "csi.storage.k8s.io/volumesnapshot/namespace": "bench",
            "csi.storage.k8s.io/volumesnapshotcontent/name": name,
        },
    )


# -- the benchmark -----------------------------------------------------------------------
@dataclass
class Samples:
    """Per key: wall seconds, and server on-CPU / waiting-for-CPU seconds meanwhile."""

    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    wait: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, wall: float, cpu_ns: int, wait_ns: int) -> None:
        self.wall.setdefault(key, []).append(wall)
        self.cpu.setdefault(key, []).append(cpu_ns / 1e9)
        self.wait.setdefault(key, []).append(wait_ns / 1e9)

    def median(self, key: str) -> float:
        return statistics.median(self.wall[key])

    def p99(self, key: str) -> float:
        return percentile(self.wall[key], 0.99)

    def cpu_median(self, key: str) -> float:
        return statistics.median(self.cpu[key])

    def wait_median(self, key: str) -> float:
        return statistics.median(self.wait[key])


def read_schedstat(path: str) -> tuple[int, int]:
    """(ns on a CPU, ns runnable but waiting for one) of one thread."""
    with open(path) as stat:
        fields = stat.read().split()
    return int(fields[0]), int(fields[1])


def cpu_work() -> int:
    """A fixed amount of pure-Python work (about 1 ms on an idle core): the CPU reference."""
    return sum(i * i for i in range(20_000))


class Side:
    """One engine under test: its server, its pools, credentials and figures."""

    def __init__(
        self,
        name: str,
        server: Server,
        pools: dict[str, str],
        secrets: dict[str, str],
        cluster: ClusterConfig,
    ) -> None:
        self.name = name
        self.server = server
        self.pools = pools  # role (small, large) -> the pool's name on this engine
        self.secrets = secrets
        self.cluster = cluster  # for the engine API (setup and verify)
        self.samples = {SMALL: Samples(), LARGE: Samples()}
        self.fill: dict[str, list[float]] = {}
        self.fill_wall: dict[str, float] = {}
        self.rss: dict[str, str] = {}


class Bench:
    def __init__(
        self,
        config: Config,
        base: Path,
        report: Report,
        ceph: CephTarget | None = None,
        ceph_pools: tuple[str, str] = (SMALL, LARGE),
    ) -> None:
        self.config = config
        self.base = base
        self.report = report
        self.ceph = ceph
        native = Server(base / NATIVE, config.profile, config.profile_clock)
        self.sides = [
            Side(
                NATIVE,
                native,
                {SMALL: SMALL, LARGE: LARGE},
                {},
                ClusterConfig(NATIVE, "native", data_dir=native.data_dir),
            )
        ]
        if ceph is not None:
            config_file = base / "ceph-clusters.yaml"
            config_file.write_text(json.dumps({"clusters": [ceph.entry]}))  # JSON is YAML
            profile = config.profile
            server = Server(
                base / CEPH,
                None if profile is None else profile.with_name(profile.name + ".ceph"),
                config.profile_clock,
                config_file,
            )
            self.sides.append(
                Side(
                    CEPH,
                    server,
                    {SMALL: ceph_pools[0], LARGE: ceph_pools[1]},
                    ceph.secrets,
                    ceph.cluster_config(),
                )
            )
        self.busy = "?"  # how busy the machine was while measuring
        self.ref_path = base / "bench-fsync-reference.dat"
        self.ref_fd = -1
        self.block = os.urandom(4 * KiB)

    def side(self, name: str) -> Side:
        return next(s for s in self.sides if s.name == name)

    # -- setup ---------------------------------------------------------------------------
    def prepare(self) -> None:
        """Make (native, throwaway Ceph) or check (existing Ceph) the pools, then start
        the servers."""
        for side in self.sides:
            if side.name == NATIVE:
                with Rados(data_dir=side.server.data_dir) as cluster:
                    for pool in side.pools.values():
                        cluster.create_pool(pool)
            else:
                assert self.ceph is not None
                if self.ceph.throwaway is not None:
                    self.ceph.create_pools(list(side.pools.values()))
                self.check_empty(side)
            log(f"starting the {side.name} server ({' '.join(side.server.command()[-11:])})")
            side.server.start()
            side.rss["started"] = rss_of(side.server.pid)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        self.ref_fd = os.open(self.ref_path, flags, 0o644)

    def check_empty(self, side: Side) -> None:
        engine = build_engine(side.cluster)
        try:
            with engine.session(side.secrets) as cluster:
                for pool in side.pools.values():
                    if not cluster.pool_exists(pool):
                        raise RuntimeError(f"{side.name}: pool {pool} does not exist")
                    ioctx = cluster.open_ioctx(pool)
                    try:
                        found = engine.rbd.list(ioctx)
                    finally:
                        ioctx.close()
                    if found:
                        raise RuntimeError(
                            f"{side.name}: pool {pool} holds {len(found)} images; the benchmark "
                            "needs empty pools (--ceph-pools)"
                        )
        finally:
            engine.close()

    def close(self) -> None:
        if self.ref_fd >= 0:
            os.close(self.ref_fd)
            self.ref_fd = -1
        for side in self.sides:
            code = side.server.stop()
            if code not in (None, 0):
                self.report.errors.append(
                    f"the {side.name} server exited with status {code}:\n         "
                    f"{side.server.log_tail()}"
                )

    def populate(self, side: Side, pool: str) -> None:
        """Fill a pool through gRPC CreateVolume.

        ``plain``: empty volumes, ``--workers`` calls in flight. ``clones``: one
        golden volume and a snapshot of it, and every other volume restored from
        that snapshot, one call at a time (VM disks cloned from a golden image).
        """
        count = self.config.volumes(side.name, pool)
        controller = side.server.controller
        clones = self.config.background == "clones"
        name = side.pools[pool]
        log(f"populate: {count} {self.config.background} volumes in {side.name} pool {name}")
        golden = ""
        if clones:
            source = controller.CreateVolume(
                volume_request(f"bg-{pool}-golden", name, side.secrets), timeout=RPC_TIMEOUT
            ).volume.volume_id
            golden = controller.CreateSnapshot(
                snapshot_request(f"bg-{pool}-golden-snap", source, side.secrets),
                timeout=RPC_TIMEOUT,
            ).snapshot.snapshot_id

        def create(index: int) -> float:
            request = volume_request(f"bg-{pool}-{index:05d}", name, side.secrets, golden)
            _, seconds = timed(lambda: controller.CreateVolume(request, timeout=RPC_TIMEOUT))
            return seconds

        latencies: list[float] = []
        start = time.perf_counter()
        # Calls on one source are refused with ABORTED while another one runs (one
        # operation per volume or snapshot at a time), so clones go one by one.
        workers = 1 if clones else self.config.workers
        with ThreadPoolExecutor(workers) as executor:
            first = 1 if clones else 0  # the golden volume is one of them
            for index, seconds in enumerate(executor.map(create, range(first, count)), 1):
                latencies.append(seconds)
                if index % 1000 == 0:
                    rate = index / (time.perf_counter() - start)
                    log(f"populate {side.name} {pool}: {index}/{count} ({rate:.0f} volumes/s)")
        side.fill[pool] = latencies
        side.fill_wall[pool] = time.perf_counter() - start
        side.rss[pool] = rss_of(side.server.pid)

    # -- one iteration ---------------------------------------------------------------------
    def lifecycle(self, side: Side, pool: str, tag: str, samples: Samples | None) -> None:
        """Create, snapshot, restore, delete all three; timed into ``samples`` if given."""
        server, secrets = side.server, side.secrets
        controller, identity = server.controller, server.identity
        mine = f"/proc/self/task/{threading.get_native_id()}/schedstat"

        def call(key: str, rpc: Callable[[], T]) -> T:
            """Time one call, and what the server's threads did meanwhile (schedstat).

            CPU: the server's threads' CPU time, summed. Wait for a CPU: the longest
            wait of one server thread (the handler's, as a rule) plus this thread's
            own; summing every server thread's wait would count overlapping waits
            twice. Both may include a little of what the server does right after it
            replied (logging, returning the thread to the pool).
            """
            server_before = server.schedstat()
            client_before = read_schedstat(mine)
            start = time.perf_counter()
            result = rpc()
            wall = time.perf_counter() - start
            client_after = read_schedstat(mine)
            server_after = server.schedstat()
            if samples is not None:
                cpu = waited = 0
                for task, (run, wait) in server_after.items():
                    run_before, wait_before = server_before.get(task, (0, 0))
                    cpu += run - run_before
                    waited = max(waited, wait - wait_before)
                waited += client_after[1] - client_before[1]
                samples.add(key, wall, cpu, waited)
            return result

        name = f"{tag}-{pool}"
        pool_name = side.pools[pool]
        volume_id = call(
            "create",
            lambda: controller.CreateVolume(
                volume_request(name, pool_name, secrets), timeout=RPC_TIMEOUT
            ),
        ).volume.volume_id
        snapshot_id = call(
            "snapshot",
            lambda: controller.CreateSnapshot(
                snapshot_request(f"{name}-snap", volume_id, secrets), timeout=RPC_TIMEOUT
            ),
        ).snapshot.snapshot_id
        restored = call(
            "restore",
            lambda: controller.CreateVolume(
                volume_request(f"{name}-restored", pool_name, secrets, snapshot_id),
                timeout=RPC_TIMEOUT,
            ),
        ).volume
        if samples is not None and restored.content_source.snapshot.snapshot_id != snapshot_id:
            self.report.check(f"{side.name}: a restored volume names its source snapshot", False)
        call(
            "delete-clone",
            lambda: controller.DeleteVolume(
                csi.DeleteVolumeRequest(volume_id=restored.volume_id, secrets=secrets),
                timeout=RPC_TIMEOUT,
            ),
        )
        call(
            "delete-snapshot",
            lambda: controller.DeleteSnapshot(
                csi.DeleteSnapshotRequest(snapshot_id=snapshot_id, secrets=secrets),
                timeout=RPC_TIMEOUT,
            ),
        )
        call(
            "delete",
            lambda: controller.DeleteVolume(
                csi.DeleteVolumeRequest(volume_id=volume_id, secrets=secrets),
                timeout=RPC_TIMEOUT,
            ),
        )
        # the references, in the same loop
        call("info", lambda: identity.GetPluginInfo(csi.GetPluginInfoRequest(), timeout=60))
        call("probe", lambda: identity.Probe(csi.ProbeRequest(), timeout=60))
        call("fsync", self.append_fsync)
        call("cpu", cpu_work)

    def append_fsync(self) -> None:
        os.write(self.ref_fd, self.block)
        os.fsync(self.ref_fd)

    def schedule(self) -> Iterator[tuple[int, Side, str]]:
        """(iteration, engine, pool) in the measuring order."""
        n = self.config.ops
        if self.config.sequential:
            for pool in (SMALL, LARGE):
                for i in range(n):
                    for side in self.sides if i % 2 == 0 else reversed(self.sides):
                        yield i, side, pool
            return
        units = [(side, pool) for side in self.sides for pool in (SMALL, LARGE)]
        for i in range(n):
            for side, pool in units if i % 2 == 0 else reversed(units):
                yield i, side, pool

    def measure(self) -> None:
        c = self.config
        for side in self.sides:
            for pool in (SMALL, LARGE):
                log(f"warm-up: {c.warmup} discarded iterations in {side.name} pool {pool}")
                for i in range(c.warmup):
                    self.lifecycle(side, pool, f"warm{i:04d}", None)
        total = c.ops * 2 * len(self.sides)
        log(f"measuring: {c.ops} iterations per pool and engine")
        ticks = cpu_ticks()
        servers = {s.name: sum(run for run, _ in s.server.schedstat().values()) for s in self.sides}
        start = time.perf_counter()
        for done, (i, side, pool) in enumerate(self.schedule(), 1):
            self.lifecycle(side, pool, f"m{i:04d}", side.samples[pool])
            if done % 100 == 0:
                log(f"measured {done}/{total}")
        elapsed = time.perf_counter() - start
        after = cpu_ticks()
        busy, total_ticks, steal = (a - b for a, b in zip(after, ticks, strict=True))
        if total_ticks > 0:
            cpus = len(os.sched_getaffinity(0))
            shares = ", ".join(
                f"{s.name} "
                f"{(sum(r for r, _ in s.server.schedstat().values()) - servers[s.name]) / 1e9 / elapsed / cpus:.0%}"  # noqa: E501
                for s in self.sides
            )
            self.busy = (
                f"{busy / total_ticks:.0%} of {os.cpu_count()} CPUs busy over {elapsed:.1f} s "
                f"(steal {steal / total_ticks:.1%}); the servers' shares: {shares}"
            )
        for side in self.sides:
            side.rss["end"] = rss_of(side.server.pid)

    # -- after ---------------------------------------------------------------------------------
    def verify(self) -> None:
        """With the servers stopped: each pool holds exactly its background volumes."""
        for side in self.sides:
            engine = build_engine(side.cluster)
            try:
                with engine.session(side.secrets) as cluster:
                    for pool in (SMALL, LARGE):
                        ioctx = cluster.open_ioctx(side.pools[pool])
                        try:
                            self.verify_pool(side, pool, engine.rbd, ioctx)
                        finally:
                            ioctx.close()
            finally:
                engine.close()

    def verify_pool(self, side: Side, pool: str, rbd: Any, ioctx: Any) -> None:
        names = rbd.list(ioctx)
        volumes = sum(1 for n in names if n.startswith(VOLUME_PREFIX))
        snapshots = sum(1 for n in names if n.startswith(SNAPSHOT_PREFIX))
        trash = len(rbd.trash_list(ioctx))
        journal = len(ioctx.omap_get("csi.volumes"))
        snap_journal = len(ioctx.omap_get("csi.snapshots"))
        want = self.config.volumes(side.name, pool)
        snaps = 1 if self.config.background == "clones" else 0
        found = (volumes, len(names) - volumes - snapshots, snapshots, trash)
        journals = (journal, snap_journal)
        self.report.check(
            f"{side.name} pool {side.pools[pool]}: {want} volumes and {snaps} snapshots left, "
            "nothing else",
            found == (want, 0, snaps, 0) and journals == (want, snaps),
            f"{volumes} volume images, {snapshots} snapshot images, "
            f"{found[1]} other images, {trash} in trash, journal {journal} volume / "
            f"{snap_journal} snapshot names",
        )

    def tables(self) -> None:
        for side in self.sides:
            self.scaling_tables(side)
        if len(self.sides) > 1:
            self.engine_table()
        self.fill_table()

    def scaling_tables(self, side: Side) -> None:
        c = self.config
        small, large = side.samples[SMALL], side.samples[LARGE]
        n_small, n_large = c.volumes(side.name, SMALL), c.volumes(side.name, LARGE)
        table = Table(
            f"{side.name}: gRPC latency with {n_small} vs {n_large} volumes in the pool, "
            f"{c.ops} operations each (ms, client side)",
            [
                "operation",
                f"{n_small} median",
                f"{n_small} p99",
                f"{n_large} median",
                f"{n_large} p99",
                "ratio (median)",
            ],
        )
        for key, label in {**OPS, **REFS}.items():
            table.add(
                label,
                ms(small.median(key)),
                ms(small.p99(key)),
                ms(large.median(key)),
                ms(large.p99(key)),
                fmt_ratio(large.median(key) / small.median(key)),
            )
        units = "engines and pools" if len(self.sides) > 1 else "pools"
        order = (
            f"all {n_small}-volume iterations first, then all {n_large}-volume ones"
            if c.sequential
            else f"the {units} alternate per iteration (ABBA)"
        )
        rank = math.ceil(0.99 * c.ops)
        table.notes += [
            "one iteration: the six calls above in order, in one pool, then the references;",
            f"{order};",
            f"{c.warmup} discarded warm-up iterations per pool first;",
            "ratio = median with the large pool / median with the small pool; for the",
            "references it shows how the machine drifted between the two pools' turns;",
            f"p99 is nearest-rank: sample {rank} of {c.ops} in ascending order.",
        ]
        self.report.tables.append(table)

        split = Table(
            f"{side.name}: server CPU time and waits for a CPU, medians over the same calls (ms)",
            [
                "operation",
                f"{n_small}: server CPU",
                "CPU wait",
                f"{n_large}: server CPU",
                "CPU wait",
                "ratio (server CPU)",
            ],
        )
        for key, label in {**OPS, **REFS}.items():
            split.add(
                label,
                ms(small.cpu_median(key)),
                ms(small.wait_median(key)),
                ms(large.cpu_median(key)),
                ms(large.wait_median(key)),
                ratio_text(large.cpu_median(key), small.cpu_median(key)),
            )
        split.notes += [
            "from /proc/PID/task/*/schedstat read around each call: server CPU = the CPU",
            "time of all the server's threads, summed (the work a call costs, whatever the",
            "load); CPU wait = the longest time one server thread (the handler, as a rule)",
            "spent runnable but not running, plus the client thread's own: time lost to",
            "other load on the machine. Both may include a little of what the server does",
            "just after replying. The client-side references show the client's wait only.",
        ]
        if side.name == CEPH:
            split.notes.append("ceph: the csi-rbd server's CPU only, not the Ceph daemons'.")
        self.report.tables.append(split)

    def engine_table(self) -> None:
        """native vs ceph, per operation and pool: medians and their ratio."""
        c = self.config
        native, ceph = self.side(NATIVE), self.side(CEPH)
        headers = ["operation"]
        for pool in (SMALL, LARGE):
            n, k = c.volumes(NATIVE, pool), c.volumes(CEPH, pool)
            sizes = f"{n}" if n == k else f"{n}/{k}"
            headers += [f"{pool} ({sizes}): native", "ceph", "native/ceph"]
        headers.append("server CPU native/ceph (small)")
        table = Table(
            f"native vs ceph: median gRPC latency, {c.ops} operations each (ms, client side)",
            headers,
        )
        for key, label in {**OPS, **REFS}.items():
            cells = [label]
            for pool in (SMALL, LARGE):
                a, b = native.samples[pool].median(key), ceph.samples[pool].median(key)
                cells += [ms(a), ms(b), ratio_text(a, b)]
            if key in OPS:  # the references are client-side work: no server CPU to compare
                cells.append(
                    ratio_text(
                        native.samples[SMALL].cpu_median(key), ceph.samples[SMALL].cpu_median(key)
                    )
                )
            table.add(*cells)
        table.notes += [
            "ratio = native median / ceph median: below 1, native is faster;",
            "the column headers give the volumes in the pool (native/ceph when they differ:",
            f"the large Ceph pool holds {c.ceph_large}, see --ceph-large);",
            "both servers measured in the same loop, engines and pools alternating (ABBA);",
            f"ceph: {self.ceph.description if self.ceph else '?'}.",
        ]
        self.report.tables.append(table)

    def fill_table(self) -> None:
        c = self.config
        fill = Table(
            f"pools ({c.background} background volumes, created through gRPC CreateVolume)",
            [
                "engine",
                "pool",
                "volumes",
                "wall",
                "per volume median",
                "first 10% median",
                "last 10% median",
            ],
        )
        for side in self.sides:
            for pool in (SMALL, LARGE):
                values = side.fill.get(pool, [])
                if not values:
                    continue
                tenth = max(1, len(values) // 10)
                fill.add(
                    side.name,
                    side.pools[pool],
                    c.volumes(side.name, pool),
                    f"{side.fill_wall[pool]:.1f} s",
                    f"{ms(statistics.median(values))} ms",
                    f"{ms(statistics.median(values[:tenth]))} ms",
                    f"{ms(statistics.median(values[-tenth:]))} ms",
                )
        in_flight = 1 if c.background == "clones" else c.workers
        if c.background == "clones":
            fill.notes.append(
                "per pool: one golden volume and a snapshot of it first (not in the figures),"
            )
            fill.notes.append("then every other volume restored from that snapshot;")
        native = self.side(NATIVE).server.data_dir
        fill.notes += [
            f"{in_flight} CreateVolume call(s) in flight (the server has 16 workers); per-volume",
            "figures are client latencies under that concurrency, not comparable with the above.",
            f"native files: small: {pool_files(native, SMALL)}; large: {pool_files(native, LARGE)}",
        ]
        for side in self.sides:
            fill.notes.append(
                f"{side.name} server RSS: started {side.rss.get('started', '?')}, after filling "
                f"small {side.rss.get(SMALL, '?')}, large {side.rss.get(LARGE, '?')}, "
                f"end {side.rss.get('end', '?')}"
            )
        self.report.tables.append(fill)

    def targets(self) -> None:
        """The native engine's targets."""
        c = self.config
        side = self.side(NATIVE)
        small, large = side.samples[SMALL], side.samples[LARGE]
        for pool, samples in ((SMALL, small), (LARGE, large)):
            refs = (
                f"same loop: fsync {ms(samples.median('fsync'))}, "
                f"GetPluginInfo {ms(samples.median('info'))}, "
                f"CPU work {ms(samples.median('cpu'))} ms"
            )
            within = f"<= {LATENCY_TARGET_MS:g} ms with {c.volumes(NATIVE, pool)} volumes"
            for key in TARGET_OPS:
                median = samples.median(key)
                self.report.target(
                    f"{OPS[key]} median {within}",
                    median * 1e3 <= LATENCY_TARGET_MS,
                    f"median {ms(median)} ms, p99 {ms(samples.p99(key))} ms; server CPU "
                    f"{ms(samples.cpu_median(key))} ms, CPU wait {ms(samples.wait_median(key))} "
                    f"ms ({refs})",
                )

        def drift(key: str) -> str:
            return f"{large.median(key) / small.median(key):.2f}"

        for key in TARGET_OPS:
            ratio = large.median(key) / small.median(key)
            cpu = ratio_text(large.cpu_median(key), small.cpu_median(key))
            self.report.target(
                f"{OPS[key]}: {c.large} volumes <= {SCALE_RATIO_TARGET:g}x of {c.small} (median)",
                ratio <= SCALE_RATIO_TARGET,
                f"ratio {ratio:.2f} ({ms(small.median(key))} -> {ms(large.median(key))} ms; "
                f"server CPU {cpu}; reference ratios: fsync {drift('fsync')}, "
                f"CPU work {drift('cpu')})",
            )

    def profile_text(self) -> None:
        if self.config.profile is None:
            return
        for side in self.sides:
            path = side.server.profile
            assert path is not None
            if not path.exists():
                self.report.errors.append(
                    f"no {side.name} profile written to {path} (did the server stop?)"
                )
                continue
            for order, count in (("tottime", 30), ("cumulative", 40)):
                out = io.StringIO()
                stats = pstats.Stats(str(path), stream=out)
                stats.strip_dirs().sort_stats(order).print_stats(count)
                text = "\n".join(line.rstrip() for line in out.getvalue().strip().splitlines())
                self.report.texts.append(
                    f"== {side.name} server profile ({self.config.profile_clock} clock, all gRPC "
                    f"worker threads, whole run: filling and measuring), by {order}\n{text}"
                )


# -- main --------------------------------------------------------------------------------
def describe_rpc_error(exc: Exception) -> str:
    return f" ({exc.code()}: {exc.details()})" if isinstance(exc, grpc.RpcError) else ""


def print_report(report: Report, header: list[str], wall: float, busy: str) -> None:
    print("csi-rbd CSI controller benchmark (gRPC, csi-rbd serve --mode controller)")
    print("\n".join(header))
    print(load_line())
    print(f"cpu pressure: {cpu_pressure()} (end)")
    print(f"measuring   : {busy}")
    print(f"total time  : {wall:.1f} s")
    print(report.render_body())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark CSI controller calls with few and many volumes, on the native "
        "engine and with --ceph on the ceph engine too (reports, never gates)."
    )
    parser.add_argument(
        "--quick", action="store_true", help="1,000 volumes, 30 iterations: a smoke run (~30 s)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where to make the scratch directory (default /tmp); removed afterwards",
    )
    parser.add_argument("--small", type=int, default=None, help="volumes in the small pool (100)")
    parser.add_argument(
        "--large", type=int, default=None, help="volumes in the large pool (10,000; quick 1,000)"
    )
    parser.add_argument(
        "--ops",
        type=int,
        default=None,
        help="measured iterations per pool and engine (200; quick 30)",
    )
    parser.add_argument(
        "--workers", type=int, default=4, help="CreateVolume calls in flight while filling (4)"
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="measure the small pool first, then the large one (default: alternate)",
    )
    parser.add_argument(
        "--background",
        choices=("plain", "clones"),
        default="plain",
        help="the pools' volumes: empty ones (default), or clones of one golden snapshot",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="FILE",
        help="run the server(s) under cProfile, write pstats to FILE (and FILE.ceph) and "
        "print the hot functions",
    )
    parser.add_argument(
        "--profile-clock",
        choices=("wall", "cpu"),
        default="wall",
        help="what the profile measures: elapsed time (default; includes fsync and waits "
        "for a CPU) or each thread's CPU time",
    )
    add_ceph_arguments(parser)
    parser.add_argument(
        "--ceph-pools",
        default="csi-bench-small,csi-bench-large",
        metavar="SMALL,LARGE",
        help="with --ceph-conf: two existing, empty pools to fill (default "
        "csi-bench-small,csi-bench-large)",
    )
    parser.add_argument(
        "--ceph-large",
        type=int,
        default=None,
        help="volumes in the large pool on Ceph (2,000; quick 1,000; at most --large)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    for name in ("small", "large", "ops", "workers", "ceph_large"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    pools = args.ceph_pools.split(",")
    if len(pools) != 2 or not all(pools):
        parser.error("--ceph-pools takes two pool names: SMALL,LARGE")
    args.ceph_pools = (pools[0], pools[1])
    if args.profile is not None:
        args.profile = args.profile.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = Config.make(args)
    parent = args.data_dir if args.data_dir is not None else Path("/tmp")
    parent.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="csi-bench-", dir=parent))
    report = Report()
    with_ceph = bool(args.ceph or args.ceph_conf)
    engines = [NATIVE, CEPH] if with_ceph else [NATIVE]
    header = machine_lines(
        "csi_rbd",
        mode_line(config, engines),
        base,
        extra=[f"grpcio      : {grpc.__version__}"],
    )
    header.append(f"cpu pressure: {cpu_pressure()} (start)")
    header.append(
        f"volumes     : native small {config.small}, large {config.large}"
        + (f"; ceph small {config.small}, large {config.ceph_large}" if with_ceph else "")
    )
    start = time.perf_counter()
    fingerprint = source_fingerprint()
    ceph: CephTarget | None = None
    bench: Bench | None = None
    measured = False
    try:
        if with_ceph:
            ceph = ceph_target(base / "ceph-cluster", args.ceph_conf, args.ceph_user)
            header.append(f"ceph        : {ceph.description}")
        pools = (SMALL, LARGE) if ceph is None or ceph.throwaway else args.ceph_pools
        bench = Bench(config, base, report, ceph, pools)
        steps: list[tuple[str, Callable[[], None]]] = [("start", bench.prepare)]
        for side in bench.sides:
            for pool in (SMALL, LARGE):
                steps.append((f"populate {side.name} {pool}", partial(bench.populate, side, pool)))
        steps.append(("measure", bench.measure))
        measured = all(run_step(report, n, a, describe_rpc_error) for n, a in steps)
        if not measured:
            for side in bench.sides:
                if side.server.process is not None and not side.server.alive():
                    report.errors.append(
                        f"the {side.name} server died:\n         {side.server.log_tail()}"
                    )
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        report.errors.append(f"setup: {type(exc).__name__}: {exc}")
    finally:
        if bench is not None:
            bench.close()
    if bench is not None and measured:
        run_step(report, "verify", bench.verify)
        run_step(report, "tables", bench.tables)
        run_step(report, "targets", bench.targets)
    else:
        report.target("latency and scaling targets", None, "not measured (see errors)")
    if bench is not None:
        run_step(report, "profile", bench.profile_text)
    if ceph is not None:
        ceph.stop()
    if args.keep:
        log(f"kept {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    changed = changed_sources_error(
        fingerprint, "(The servers imported the code at their start; the verify step later.)"
    )
    if changed:
        report.errors.append(changed)
    print_report(report, header, time.perf_counter() - start, bench.busy if bench else "?")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
