"""Benchmark of the CSI controller through gRPC: latency with few and with many volumes.

    .venv/bin/python bench/csi_bench.py [--quick] [--sequential] [--background clones]
        [--profile FILE [--profile-clock cpu]] [--small N] [--large N] [--ops N]

A real ``csi-rbd serve --mode controller`` runs as a subprocess on a unix
socket over a fresh temporary data directory (started from this checkout);
this process is only a gRPC client, and every latency is the client's (what
the external-provisioner and external-snapshotter sidecars wait for), gRPC
round trip included.

Two pools in that data directory are filled first, *through gRPC* with the
same CreateVolume request the measured one sends: pool ``small`` with 100
volumes and pool ``large`` with 10,000 (``--quick``: 100 and 1,000). By default
they are empty 1 GiB volumes, four calls in flight; ``--background clones``
makes one golden volume and a snapshot of it per pool and restores every other
volume from that snapshot, one at a time (the driver refuses a second call on
the same source with ABORTED), as VM disks cloned from a golden image are.
Each pool has its own catalog and name journal, so an operation in ``large``
sees a pool of 10,000 volumes and one in ``small`` a pool of 100; nothing in
the measured paths is shared between pools but the process, its locks and the
disk.

Then each iteration runs, in one pool, the lifecycle a PVC snapshot/restore
goes through, timing every call: CreateVolume (empty), CreateSnapshot of it,
CreateVolume from that snapshot, DeleteVolume of the restored clone,
DeleteSnapshot, DeleteVolume of the (now plain) source. The pool therefore
stays at its size. The machine is small and shared, so:

* by default the pools alternate per iteration (small, large, large, small,
  ...), so that a burst of outside load lands on both alike and the ratio
  10k/100 compares like with like; ``--sequential`` runs every iteration on
  ``small`` first and then every one on ``large``, the literal "first with 100
  volumes, then with 10,000" (more exposed to drift);
* in the same loop, after every lifecycle, references: a trivial RPC
  (GetPluginInfo; Probe too, which lists the pools) for the gRPC round trip, a
  plain 4 KiB append + fsync in the data directory (each catalog change is a
  SQLite WAL commit with synchronous=FULL, about one fsync) and a fixed piece
  of pure-Python work. Their figures per pool tell what the machine did while
  that pool was measured;
* around every call the server's threads' /proc schedstat is read: the CPU
  time the server spent on the call (a measure of its work that other load
  hardly changes) and how long it sat runnable without a CPU (what other load
  cost it). The header shows the kernel's CPU pressure and how busy the CPUs
  were while measuring.

``--profile FILE`` runs the server under cProfile (one profiler per gRPC
worker thread, merged when it stops) and prints the hottest functions;
``--profile-clock cpu`` profiles each thread's CPU time instead of elapsed
time. The latencies of such a run are inflated by the profiler.

The exit status is always 0: this reports, it does not gate.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import math
import os
import platform
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
from pathlib import Path
from typing import TypeVar

import grpc

from csi_rbd._proto import csi_pb2 as csi
from csi_rbd._proto import csi_pb2_grpc
from csi_rbd.engine.native import RBD, Rados
from csi_rbd.ids import SNAPSHOT_PREFIX, VOLUME_PREFIX

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
LATENCY_TARGET_MS = 5.0
SCALE_RATIO_TARGET = 1.5
RPC_TIMEOUT = 120.0
SMALL, LARGE = "small", "large"  # pool names
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
    large: int  # volumes in pool "large"
    ops: int  # measured iterations per pool
    warmup: int  # discarded iterations per pool
    workers: int  # CreateVolume calls in flight while filling the pools
    sequential: bool
    background: str  # "plain" or "clones"
    profile: Path | None
    profile_clock: str  # "wall" or "cpu"

    @classmethod
    def make(cls, args: argparse.Namespace) -> Config:
        quick = bool(args.quick)
        return cls(
            quick=quick,
            small=args.small if args.small is not None else 100,
            large=args.large if args.large is not None else (1000 if quick else 10_000),
            ops=args.ops if args.ops is not None else (30 if quick else 200),
            warmup=3 if quick else 10,
            workers=args.workers,
            sequential=bool(args.sequential),
            background=args.background,
            profile=args.profile,
            profile_clock=args.profile_clock,
        )

    def volumes(self, pool: str) -> int:
        return self.small if pool == SMALL else self.large


# -- results (the same shape as engine_bench.py) ---------------------------------------
@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])

    def render(self) -> str:
        widths = [len(h) for h in self.headers]
        for row in self.rows:
            for i, cell in enumerate(row):
                widths[i] = max(widths[i], len(cell))
        rule = "  ".join("-" * w for w in widths)

        def line(cells: Sequence[str]) -> str:
            first = cells[0].ljust(widths[0])
            rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
            return "  ".join([first, *rest]).rstrip()

        out = [f"== {self.title}", line(self.headers), rule]
        out += [line(row) for row in self.rows]
        out += [f"   {note}" for note in self.notes]
        return "\n".join(out)


@dataclass
class Target:
    name: str
    status: str  # PASS, FAIL or SKIP (not measured)
    detail: str


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Report:
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # free-form blocks (profiles)

    def target(self, name: str, passed: bool | None, detail: str) -> None:
        status = "SKIP" if passed is None else "PASS" if passed else "FAIL"
        self.targets.append(Target(name, status, detail))

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks.append(Check(name, ok, detail))
        if not ok:
            log(f"CHECK FAILED: {name} {detail}")


def log(message: str) -> None:
    """Progress to stderr, so the report on stdout stays a clean table."""
    print(f"# [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- statistics --------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}x"


def ratio_text(numerator: float, denominator: float) -> str:
    return fmt_ratio(numerator / denominator) if denominator > 0 else "n/a"


def timed(call: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


# -- machine -----------------------------------------------------------------------------
def filesystem_of(path: Path) -> str:
    """'fstype on mountpoint (device)' of the mount holding ``path``."""
    best = ("?", "", "?")
    target = str(path.resolve())
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                device, mount, fstype = line.split()[:3]
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best[1]):
                    best = (device, mount, fstype)
    except OSError:
        pass
    return f"{best[2]} on {best[1]} ({best[0]})"


def mem_total() -> str:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    except OSError:
        pass
    return "?"


def source_state() -> str:
    """The commit measured, and which driver files differ from it (the tree may be dirty)."""

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.rstrip() if done.returncode == 0 else ""  # keep porcelain's columns

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--", "csi_rbd").splitlines()
    if not changed:
        return f"{commit} (csi_rbd clean)"
    names = ", ".join(line[3:].removeprefix("csi_rbd/") for line in changed)
    return f"{commit} + uncommitted changes in csi_rbd: {names}"


def source_fingerprint() -> dict[str, str]:
    """A hash per csi_rbd source file, to notice edits made while the benchmark runs."""
    hashes: dict[str, str] = {}
    for path in sorted((REPO / "csi_rbd").rglob("*.py")):
        with contextlib.suppress(OSError):
            hashes[str(path.relative_to(REPO))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def changed_sources(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(
        name for name in before.keys() | after.keys() if before.get(name) != after.get(name)
    )


def machine_lines(base: Path, config: Config) -> list[str]:
    load = os.getloadavg()
    order = "sequential (small first, then large)" if config.sequential else "interleaved"
    return [
        f"source      : {source_state()}",
        f"mode        : {'quick' if config.quick else 'full'}, {order}, "
        f"{config.background} background volumes"
        + (f", server under cProfile ({config.profile_clock} clock)" if config.profile else ""),
        f"cpus        : {os.cpu_count()} (usable {len(os.sched_getaffinity(0))})",
        f"memory      : {mem_total()}",
        f"kernel      : {platform.system()} {platform.release()} {platform.machine()}",
        f"python      : {platform.python_version()} ({sys.executable})",
        f"grpcio      : {grpc.__version__}",
        f"data dir    : {base / 'data'}",
        f"filesystem  : {filesystem_of(base)}",
        f"load (start): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        f"cpu pressure: {cpu_pressure()} (start)",
    ]


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

    def __init__(self, base: Path, profile: Path | None, clock: str = "wall") -> None:
        self.base = base
        self.clock = clock
        self.data_dir = base / "data"
        self.socket = base / "csi.sock"
        self.log_path = base / "server.log"
        self.profile = profile
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


def volume_request(name: str, pool: str, snapshot_id: str = "") -> csi.CreateVolumeRequest:
    """What the external-provisioner sends (with --extra-create-metadata)."""
    request = csi.CreateVolumeRequest(
        name=name,
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


def snapshot_request(name: str, volume_id: str) -> csi.CreateSnapshotRequest:
    """What the external-snapshotter sends (with --extra-create-metadata)."""
    return csi.CreateSnapshotRequest(
        name=name,
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


class Bench:
    def __init__(self, config: Config, base: Path, report: Report) -> None:
        self.config = config
        self.base = base
        self.report = report
        self.server = Server(base, config.profile, config.profile_clock)
        self.samples = {SMALL: Samples(), LARGE: Samples()}
        self.fill: dict[str, list[float]] = {}
        self.rss: dict[str, str] = {}
        self.busy = "?"  # how busy the machine was while measuring
        self.ref_path = self.server.data_dir / "bench-fsync-reference.dat"
        self.ref_fd = -1
        self.block = os.urandom(4 * KiB)

    # -- setup ---------------------------------------------------------------------------
    def prepare(self) -> None:
        """Make the data directory and the two pools (engine API, before the server)."""
        with Rados(data_dir=self.server.data_dir) as cluster:
            for pool in (SMALL, LARGE):
                cluster.create_pool(pool)
        log(f"starting the server ({' '.join(self.server.command()[-9:])})")
        self.server.start()
        self.rss["started"] = rss_of(self.server.pid)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        self.ref_fd = os.open(self.ref_path, flags, 0o644)

    def close(self) -> None:
        if self.ref_fd >= 0:
            os.close(self.ref_fd)
            self.ref_fd = -1
        code = self.server.stop()
        if code not in (None, 0):
            self.report.errors.append(
                f"the server exited with status {code}:\n         {self.server.log_tail()}"
            )

    def populate(self, pool: str) -> None:
        """Fill a pool through gRPC CreateVolume.

        ``plain``: empty volumes, ``--workers`` calls in flight. ``clones``: one
        golden volume and a snapshot of it, and every other volume restored from
        that snapshot, one call at a time (VM disks cloned from a golden image).
        """
        count = self.config.volumes(pool)
        controller = self.server.controller
        clones = self.config.background == "clones"
        log(f"populate: {count} {self.config.background} volumes in pool {pool}")
        golden = ""
        if clones:
            source = controller.CreateVolume(
                volume_request(f"bg-{pool}-golden", pool), timeout=RPC_TIMEOUT
            ).volume.volume_id
            golden = controller.CreateSnapshot(
                snapshot_request(f"bg-{pool}-golden-snap", source), timeout=RPC_TIMEOUT
            ).snapshot.snapshot_id

        def create(index: int) -> float:
            request = volume_request(f"bg-{pool}-{index:05d}", pool, golden)
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
                    log(f"populate {pool}: {index}/{count} ({rate:.0f} volumes/s)")
        self.fill[pool] = latencies
        self.fill[pool + "-wall"] = [time.perf_counter() - start]
        self.rss[pool] = rss_of(self.server.pid)

    # -- one iteration ---------------------------------------------------------------------
    def lifecycle(self, pool: str, tag: str, samples: Samples | None) -> None:
        """Create, snapshot, restore, delete all three; timed into ``samples`` if given."""
        controller, identity = self.server.controller, self.server.identity
        mine = f"/proc/self/task/{threading.get_native_id()}/schedstat"

        def call(key: str, rpc: Callable[[], T]) -> T:
            """Time one call, and what the server's threads did meanwhile (schedstat).

            CPU: the server's threads' CPU time, summed. Wait for a CPU: the longest
            wait of one server thread (the handler's, as a rule) plus this thread's
            own; summing every server thread's wait would count overlapping waits
            twice. Both may include a little of what the server does right after it
            replied (logging, returning the thread to the pool).
            """
            server_before = self.server.schedstat()
            client_before = read_schedstat(mine)
            start = time.perf_counter()
            result = rpc()
            wall = time.perf_counter() - start
            client_after = read_schedstat(mine)
            server_after = self.server.schedstat()
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
        volume_id = call(
            "create",
            lambda: controller.CreateVolume(volume_request(name, pool), timeout=RPC_TIMEOUT),
        ).volume.volume_id
        snapshot_id = call(
            "snapshot",
            lambda: controller.CreateSnapshot(
                snapshot_request(f"{name}-snap", volume_id), timeout=RPC_TIMEOUT
            ),
        ).snapshot.snapshot_id
        restored = call(
            "restore",
            lambda: controller.CreateVolume(
                volume_request(f"{name}-restored", pool, snapshot_id), timeout=RPC_TIMEOUT
            ),
        ).volume
        if samples is not None and restored.content_source.snapshot.snapshot_id != snapshot_id:
            self.report.check("a restored volume names its source snapshot", False, name)
        call(
            "delete-clone",
            lambda: controller.DeleteVolume(
                csi.DeleteVolumeRequest(volume_id=restored.volume_id), timeout=RPC_TIMEOUT
            ),
        )
        call(
            "delete-snapshot",
            lambda: controller.DeleteSnapshot(
                csi.DeleteSnapshotRequest(snapshot_id=snapshot_id), timeout=RPC_TIMEOUT
            ),
        )
        call(
            "delete",
            lambda: controller.DeleteVolume(
                csi.DeleteVolumeRequest(volume_id=volume_id), timeout=RPC_TIMEOUT
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

    def schedule(self) -> Iterator[tuple[int, str]]:
        """(iteration, pool) in the measuring order."""
        n = self.config.ops
        if self.config.sequential:
            for pool in (SMALL, LARGE):
                for i in range(n):
                    yield i, pool
            return
        for i in range(n):
            yield from ((i, p) for p in ((SMALL, LARGE) if i % 2 == 0 else (LARGE, SMALL)))

    def measure(self) -> None:
        c = self.config
        for pool in (SMALL, LARGE):
            log(f"warm-up: {c.warmup} discarded iterations in pool {pool}")
            for i in range(c.warmup):
                self.lifecycle(pool, f"warm{i:04d}", None)
        log(f"measuring: {c.ops} iterations per pool")
        ticks = cpu_ticks()
        server = sum(run for run, _ in self.server.schedstat().values())
        start = time.perf_counter()
        for done, (i, pool) in enumerate(self.schedule(), 1):
            self.lifecycle(pool, f"m{i:04d}", self.samples[pool])
            if done % 100 == 0:
                log(f"measured {done}/{2 * c.ops}")
        elapsed = time.perf_counter() - start
        server = sum(run for run, _ in self.server.schedstat().values()) - server
        after = cpu_ticks()
        busy, total, steal = (a - b for a, b in zip(after, ticks, strict=True))
        if total > 0:
            share = server / 1e9 / elapsed / len(os.sched_getaffinity(0))
            self.busy = (
                f"{busy / total:.0%} of {os.cpu_count()} CPUs busy over {elapsed:.1f} s "
                f"(steal {steal / total:.1%}); the server's share {share:.0%}"
            )
        self.rss["end"] = rss_of(self.server.pid)

    # -- after ---------------------------------------------------------------------------------
    def verify(self) -> None:
        """With the server stopped: each pool holds exactly its background volumes."""
        with Rados(data_dir=self.server.data_dir) as cluster:
            rbd = RBD()
            for pool in (SMALL, LARGE):
                ioctx = cluster.open_ioctx(pool)
                names = rbd.list(ioctx)
                volumes = sum(1 for n in names if n.startswith(VOLUME_PREFIX))
                snapshots = sum(1 for n in names if n.startswith(SNAPSHOT_PREFIX))
                trash = len(rbd.trash_list(ioctx))
                journal = len(ioctx.omap_get("csi.volumes"))
                snap_journal = len(ioctx.omap_get("csi.snapshots"))
                want = self.config.volumes(pool)
                snaps = 1 if self.config.background == "clones" else 0
                found = (volumes, len(names) - volumes - snapshots, snapshots, trash)
                journals = (journal, snap_journal)
                self.report.check(
                    f"pool {pool}: {want} volumes and {snaps} snapshots left, nothing else",
                    found == (want, 0, snaps, 0) and journals == (want, snaps),
                    f"{volumes} volume images, {snapshots} snapshot images, "
                    f"{found[1]} other images, {trash} in trash, journal {journal} volume / "
                    f"{snap_journal} snapshot names",
                )

    def tables(self) -> None:
        c = self.config
        small, large = self.samples[SMALL], self.samples[LARGE]
        n_small, n_large = c.small, c.large
        table = Table(
            f"gRPC latency with {n_small} vs {n_large} volumes in the pool, "
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
        order = (
            f"all {n_small}-volume iterations first, then all {n_large}-volume ones"
            if c.sequential
            else "the pools alternate per iteration (small, large, large, small, ...)"
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
            "server CPU time and waits for a CPU, medians over the same calls (ms)",
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
        self.report.tables.append(split)

        fill = Table(
            f"pools ({c.background} background volumes, created through gRPC CreateVolume)",
            ["pool", "volumes", "wall", "per volume median", "first 10% median", "last 10% median"],
        )
        for pool in (SMALL, LARGE):
            values = self.fill.get(pool, [])
            if not values:
                continue
            tenth = max(1, len(values) // 10)
            fill.add(
                pool,
                c.volumes(pool),
                f"{self.fill[pool + '-wall'][0]:.1f} s",
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
        fill.notes += [
            f"{in_flight} CreateVolume call(s) in flight (the server has 16 workers); per-volume",
            "figures are client latencies under that concurrency, not comparable with the above.",
            f"files: small: {pool_files(self.server.data_dir, SMALL)}; "
            f"large: {pool_files(self.server.data_dir, LARGE)}",
            f"server RSS: started {self.rss.get('started', '?')}, after filling small "
            f"{self.rss.get(SMALL, '?')}, large {self.rss.get(LARGE, '?')}, "
            f"end {self.rss.get('end', '?')}",
        ]
        self.report.tables.append(fill)

    def targets(self) -> None:
        c = self.config
        small, large = self.samples[SMALL], self.samples[LARGE]
        for pool, samples in ((SMALL, small), (LARGE, large)):
            refs = (
                f"same loop: fsync {ms(samples.median('fsync'))}, "
                f"GetPluginInfo {ms(samples.median('info'))}, "
                f"CPU work {ms(samples.median('cpu'))} ms"
            )
            within = f"<= {LATENCY_TARGET_MS:g} ms with {c.volumes(pool)} volumes"
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
        path = self.config.profile
        if path is None:
            return
        if not path.exists():
            self.report.errors.append(f"no profile written to {path} (did the server stop?)")
            return
        for order, count in (("tottime", 30), ("cumulative", 40)):
            out = io.StringIO()
            stats = pstats.Stats(str(path), stream=out)
            stats.strip_dirs().sort_stats(order).print_stats(count)
            text = "\n".join(line.rstrip() for line in out.getvalue().strip().splitlines())
            self.report.texts.append(
                f"== server profile ({self.config.profile_clock} clock, all gRPC worker "
                f"threads, whole run: filling and measuring), by {order}\n{text}"
            )


# -- main --------------------------------------------------------------------------------
def run_step(report: Report, name: str, action: Callable[[], None]) -> bool:
    log(f"step {name}")
    start = time.perf_counter()
    try:
        action()
    except Exception as exc:  # a broken step is reported, and the report still prints
        traceback.print_exc(file=sys.stderr)
        detail = ""
        if isinstance(exc, grpc.RpcError):
            detail = f" ({exc.code()}: {exc.details()})"
        report.errors.append(f"step {name}: {type(exc).__name__}: {exc}{detail}")
        return False
    finally:
        log(f"step {name} took {time.perf_counter() - start:.1f} s")
    return True


def print_report(report: Report, header: list[str], wall: float, busy: str) -> None:
    print("csi-rbd CSI controller benchmark (gRPC, csi-rbd serve --mode controller)")
    print("\n".join(header))
    load = os.getloadavg()
    print(f"load (end)  : {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"cpu pressure: {cpu_pressure()} (end)")
    print(f"measuring   : {busy}")
    print(f"total time  : {wall:.1f} s")
    for table in report.tables:
        print()
        print(table.render())
    for text in report.texts:
        print()
        print(text)
    if report.checks:
        print()
        print("== correctness checks")
        for check in report.checks:
            detail = f"  ({check.detail})" if check.detail else ""
            print(f"{'OK ' if check.ok else 'BAD'}  {check.name}{detail}")
    if report.errors:
        print()
        print("== errors")
        for error in report.errors:
            print(f"ERROR  {error}")
    print()
    print("== targets")
    for target in report.targets:
        print(f"{target.status}  {target.name}: {target.detail}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark CSI controller calls with few and many volumes "
        "(reports, never gates)."
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
        "--ops", type=int, default=None, help="measured iterations per pool (200; quick 30)"
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
        help="run the server under cProfile, write pstats to FILE and print the hot functions",
    )
    parser.add_argument(
        "--profile-clock",
        choices=("wall", "cpu"),
        default="wall",
        help="what the profile measures: elapsed time (default; includes fsync and waits "
        "for a CPU) or each thread's CPU time",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    for name in ("small", "large", "ops", "workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1")
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
    header = machine_lines(base, config)
    start = time.perf_counter()
    fingerprint = source_fingerprint()
    bench = Bench(config, base, report)
    measured = False
    try:
        measured = (
            run_step(report, "start", bench.prepare)
            and run_step(report, f"populate {SMALL}", lambda: bench.populate(SMALL))
            and run_step(report, f"populate {LARGE}", lambda: bench.populate(LARGE))
            and run_step(report, "measure", bench.measure)
        )
        if not measured and bench.server.process is not None and not bench.server.alive():
            report.errors.append(f"the server died:\n         {bench.server.log_tail()}")
    finally:
        bench.close()
    if measured:
        run_step(report, "verify", bench.verify)
        run_step(report, "tables", bench.tables)
        run_step(report, "targets", bench.targets)
    else:
        report.target("latency and scaling targets", None, "not measured (see errors)")
    run_step(report, "profile", bench.profile_text)
    if args.keep:
        log(f"kept {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    changed = changed_sources(fingerprint, source_fingerprint())
    if changed:
        shown = ", ".join(changed[:12]) + (f" and {len(changed) - 12} more" if changed[12:] else "")
        report.errors.append(
            f"sources changed while the benchmark ran: {shown} (the server imported the code "
            "at its start; the verify step later)"
        )
    print_report(report, header, time.perf_counter() - start, bench.busy)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
