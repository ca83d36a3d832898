"""What the benchmarks in bench/ share: report tables, statistics, the machine
header, and the Ceph cluster a ``--ceph`` run compares against.

Not a benchmark itself; imported by engine_bench.py, csi_bench.py and
nbd_bench.py (run as scripts, so this directory is first on ``sys.path``).

Ceph (``--ceph`` / ``--ceph-conf FILE``): :func:`ceph_target` either starts a
throwaway single-node cluster with ``tests/ceph/cluster.py`` (memstore, 2 GiB,
removed at the end) or describes an existing cluster from a conf file, and
gives a driver config-file entry and the CSI secrets (``userID``, ``userKey``)
for it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
T = TypeVar("T")


# -- results -----------------------------------------------------------------------------
@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        """One row; a short one is padded with empty cells."""
        row = [str(c) for c in cells]
        self.rows.append(row + [""] * (len(self.headers) - len(row)))

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
    skipped: list[str] = field(default_factory=list)  # what was not run, and why

    def target(self, name: str, passed: bool | None, detail: str) -> None:
        status = "SKIP" if passed is None else "PASS" if passed else "FAIL"
        self.targets.append(Target(name, status, detail))

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks.append(Check(name, ok, detail))
        if not ok:
            log(f"CHECK FAILED: {name} {detail}")

    def skip(self, what: str, why: str) -> None:
        self.skipped.append(f"{what}: {why}")
        log(f"skipped {what}: {why}")

    def render_body(self) -> str:
        """Everything after the header: tables, texts, checks, skips, errors, targets."""
        out: list[str] = []
        for table in self.tables:
            out += ["", table.render()]
        for text in self.texts:
            out += ["", text]
        if self.checks:
            out += ["", "== correctness checks"]
            for check in self.checks:
                detail = f"  ({check.detail})" if check.detail else ""
                out.append(f"{'OK ' if check.ok else 'BAD'}  {check.name}{detail}")
        if self.skipped:
            out += ["", "== not measured"]
            out += [f"SKIP   {line}" for line in self.skipped]
        if self.errors:
            out += ["", "== errors"]
            out += [f"ERROR  {error}" for error in self.errors]
        out += ["", "== targets"]
        out += [f"{t.status}  {t.name}: {t.detail}" for t in self.targets]
        return "\n".join(out)


def log(message: str) -> None:
    """Progress to stderr, so the report on stdout stays a clean table."""
    print(f"# [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_step(
    report: Report,
    name: str,
    action: Callable[[], None],
    describe: Callable[[Exception], str] | None = None,
) -> bool:
    """Run one section/step; a failure is reported (and the rest still runs)."""
    log(f"step {name}")
    start = time.perf_counter()
    try:
        action()
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        detail = describe(exc) if describe is not None else ""
        report.errors.append(f"step {name}: {type(exc).__name__}: {exc}{detail}")
        return False
    finally:
        log(f"step {name} took {time.perf_counter() - start:.1f} s")
    return True


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


def fmt_mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """``with stopwatch() as t: ...`` then ``t[0]`` is the elapsed seconds."""
    box = [0.0]
    start = time.perf_counter()
    try:
        yield box
    finally:
        box[0] = time.perf_counter() - start


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


def source_state(scope: str) -> str:
    """The commit measured, and which files under ``scope`` (e.g. ``csi_rbd/engine``)
    differ from it (the tree may be dirty)."""

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.rstrip() if done.returncode == 0 else ""  # keep porcelain's columns

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--", scope).splitlines()
    if not changed:
        return f"{commit} ({scope} clean)"
    names = ", ".join(line[3:].removeprefix(f"{scope}/") for line in changed)
    return f"{commit} + uncommitted changes in {scope}: {names}"


def source_fingerprint() -> dict[str, str]:
    """A hash per csi_rbd source file, to notice edits made while the benchmark runs."""
    hashes: dict[str, str] = {}
    for path in sorted((REPO / "csi_rbd").rglob("*.py")):
        with contextlib.suppress(OSError):
            hashes[str(path.relative_to(REPO))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def changed_sources_error(before: dict[str, str], consequence: str) -> str | None:
    """An error line when csi_rbd sources changed since ``before`` was taken, else None."""
    after = source_fingerprint()
    changed = sorted(
        name for name in before.keys() | after.keys() if before.get(name) != after.get(name)
    )
    if not changed:
        return None
    shown = ", ".join(changed[:12]) + (f" and {len(changed) - 12} more" if changed[12:] else "")
    return f"sources changed while the benchmark ran: {shown}. {consequence}"


def machine_lines(scope: str, mode: str, data_dir: Path, extra: Sequence[str] = ()) -> list[str]:
    """The header every benchmark prints: what was measured, on what."""
    load = os.getloadavg()
    return [
        f"source      : {source_state(scope)}",
        f"mode        : {mode}",
        f"cpus        : {os.cpu_count()} (usable {len(os.sched_getaffinity(0))})",
        f"memory      : {mem_total()}",
        f"kernel      : {platform.system()} {platform.release()} {platform.machine()}",
        f"python      : {platform.python_version()} ({sys.executable})",
        *extra,
        f"data dir    : {data_dir}",
        f"filesystem  : {filesystem_of(data_dir)}",
        f"load (start): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
    ]


def load_line() -> str:
    load = os.getloadavg()
    return f"load (end)  : {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"


# -- Ceph --------------------------------------------------------------------------------
CEPH_CLUSTER_ID = "bench-ceph"
MEMSTORE_BYTES = 2 * GiB  # tests/ceph/cluster.py's "memstore device bytes"


@dataclass
class CephTarget:
    """The Ceph cluster a ``--ceph`` run measures: a config-file entry and credentials."""

    entry: dict[str, Any]  # one ``clusters:`` entry of the driver's config file
    secrets: dict[str, str]  # userID/userKey, as a StorageClass secret holds them
    description: str
    throwaway: Any = None  # the tests.ceph.cluster.CephCluster we started, if any

    @property
    def pool(self) -> str:
        return str(self.entry.get("pool", "rbd"))

    def cluster_config(self) -> Any:
        """The entry as a :class:`csi_rbd.config.ClusterConfig`."""
        from csi_rbd.config import cluster_from_mapping

        return cluster_from_mapping(self.entry, "bench")

    def create_pools(self, pools: Sequence[str]) -> None:
        """Make RBD pools (throwaway cluster only: an existing one must have them)."""
        if self.throwaway is None:
            raise RuntimeError("pools are only made on the throwaway cluster")
        admin = self.throwaway.admin()
        try:
            for pool in pools:
                self.throwaway.create_pool(admin, pool)
        finally:
            admin.shutdown()

    def stop(self) -> None:
        if self.throwaway is not None:
            self.throwaway.stop()
            self.throwaway = None


def _keyring_key(keyring: str, user: str) -> str | None:
    """The key of ``client.<user>`` in the first readable file of a keyring list."""
    for candidate in keyring.replace(";", ",").split(","):
        path = Path(candidate.strip())
        try:
            text = path.read_text()
        except OSError:
            continue
        section = ""
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1].strip()
            elif section == f"client.{user}" and line.split("=", 1)[0].strip() == "key":
                return line.split("=", 1)[1].strip()
    return None


def ceph_target(
    directory: Path, conf: Path | None, user: str = "admin", pool: str = "rbd"
) -> CephTarget:
    """A throwaway cluster in ``directory`` (``conf`` None), or the one ``conf`` names.

    An existing cluster is used as ``client.<user>`` with the key from the
    conf's keyring; the driver's entry names the conf file too.
    """
    if conf is None:
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))  # tests/ is not installed
        from tests.ceph.cluster import CephCluster

        log(f"ceph: starting a throwaway single-node cluster in {directory}")
        cluster = CephCluster.start(directory)
        return CephTarget(
            cluster.config_entry(CEPH_CLUSTER_ID),
            cluster.csi_secrets,
            f"throwaway single-node cluster (tests/ceph/cluster.py: 1 mon, 1 OSD, memstore "
            f"{MEMSTORE_BYTES // GiB} GiB, size-1 pools) at {cluster.monitor}, as client.csi",
            cluster,
        )
    from csi_rbd.engine.ceph import bindings

    rados, _ = bindings.load()
    handle = rados.Rados(conffile=str(conf), rados_id=user)
    try:
        mon_host = str(handle.conf_get("mon_host"))
        keyring = str(handle.conf_get("keyring"))
    finally:
        handle.shutdown()
    key = _keyring_key(keyring, user)
    if not mon_host or key is None:
        raise RuntimeError(f"{conf}: no 'mon host', or no key of client.{user} in {keyring!r}")
    entry = {
        "id": CEPH_CLUSTER_ID,
        "engine": "ceph",
        "monitors": [mon_host],
        "conf": str(conf),
        "pool": pool,
    }
    return CephTarget(
        entry, {"userID": user, "userKey": key}, f"{conf} ({mon_host}), as client.{user}"
    )


def add_ceph_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ceph``, ``--ceph-conf FILE`` and ``--ceph-user NAME`` (see :func:`ceph_target`)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--ceph",
        action="store_true",
        help="also measure the ceph engine, on a throwaway single-node cluster "
        "(tests/ceph/cluster.py; needs ceph-mon, ceph-osd, python3-rados/rbd)",
    )
    group.add_argument(
        "--ceph-conf",
        type=Path,
        default=None,
        metavar="FILE",
        help="also measure the ceph engine, on the existing cluster this conf file names",
    )
    parser.add_argument(
        "--ceph-user",
        default="admin",
        metavar="NAME",
        help="with --ceph-conf: the cephx user (key from the conf's keyring; default admin)",
    )
