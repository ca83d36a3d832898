"""Benchmark of the native engine: figures and PASS/FAIL per target; it never gates.

    .venv/bin/python bench/engine_bench.py [--quick] [--data-dir DIR] [--cli-wait SECONDS]

The machine is small and shared, so every throughput figure is printed next to
a reference measured in the same run with the same access pattern: plain file
I/O with os.pwrite/os.pread on one sparse file in the same directory, with the
same block sizes, the same offsets and the same flush policy (one flush/fsync
at the end of each write phase). Engine and plain runs alternate (ABBA) over
several rounds and the ratio is the median of the per-round ratios.

Reads are served from the page cache for both (nothing is dropped between the
write and read phases; the benchmark runs as any user).

Metadata latencies (create, snapshot, clone, resize) are taken interleaved,
one of each per iteration, next to a plain 4 KiB append + fsync as the
reference: each of those operations is one SQLite WAL commit, about one fsync.

Sections (``--sections`` picks some): seq, rand, latency, clone-size,
many-clones, flatten, cli (import/export through the ``csi-rbd`` CLI). The
memory sections run the measured operation in a fresh child process, started
through a tiny fork() launcher, and take that process's own peak RSS from
wait4(2) (see ``run_child`` for why not straight from here). ``--cli-wait``
polls for the CLI (every 60 s) when it is not installed yet.

The exit status is always 0: this reports, it does not gate.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csi_rbd.engine.native import RBD, Image, ImageNotFound, IoCtx, Rados

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
BENCH_DIR = Path(__file__).resolve().parent
RSS_CHILD = BENCH_DIR / "rss_child.py"
ALL_SECTIONS = ("seq", "rand", "latency", "clone-size", "many-clones", "flatten", "cli")
LATENCY_TARGET_MS = 2.0
CLONE_RATIO_TARGET = 1.2
THROUGHPUT_RATIO_TARGET = 0.5
RSS_TARGET = 200 * MiB


# -- configuration ---------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    quick: bool
    seq_size: int
    seq_rounds: int
    read_passes: int
    rand_range: int
    rand_ops: int
    rand_rounds: int
    latency_ops: int
    clone_size_ops: int
    many_clones: int
    mem_size: int
    cli_wait: float
    child_timeout: float

    @classmethod
    def make(cls, quick: bool, cli_wait: float) -> Config:
        if quick:
            return cls(
                quick=True,
                seq_size=128 * MiB,
                seq_rounds=2,
                read_passes=2,
                rand_range=64 * MiB,
                rand_ops=5000,
                rand_rounds=2,
                latency_ops=100,
                clone_size_ops=100,
                many_clones=200,
                mem_size=512 * MiB,
                cli_wait=cli_wait,
                child_timeout=120.0,
            )
        return cls(
            quick=False,
            seq_size=512 * MiB,
            seq_rounds=4,
            read_passes=4,
            rand_range=256 * MiB,
            rand_ops=20000,
            rand_rounds=4,
            latency_ops=300,
            clone_size_ops=200,
            many_clones=1000,
            mem_size=4 * GiB,
            cli_wait=cli_wait,
            child_timeout=1800.0,
        )


# -- results -----------------------------------------------------------------------------
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
    """The commit measured, and which engine files differ from it (the tree may be dirty)."""
    repo = BENCH_DIR.parent

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.rstrip() if done.returncode == 0 else ""  # keep porcelain's columns

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--", "csi_rbd/engine").splitlines()
    if not changed:
        return f"{commit} (csi_rbd/engine clean)"
    names = ", ".join(line[3:].removeprefix("csi_rbd/engine/") for line in changed)
    return f"{commit} + uncommitted changes in csi_rbd/engine: {names}"


def source_fingerprint() -> dict[str, str]:
    """A hash per csi_rbd source file, to notice edits made while the benchmark runs
    (children import the code afresh, so a mid-run edit may mix versions)."""
    root = BENCH_DIR.parent
    hashes: dict[str, str] = {}
    for path in sorted((root / "csi_rbd").rglob("*.py")):
        with contextlib.suppress(OSError):
            hashes[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def changed_sources(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(
        name for name in before.keys() | after.keys() if before.get(name) != after.get(name)
    )


def machine_lines(base: Path, config: Config) -> list[str]:
    load = os.getloadavg()
    return [
        f"source      : {source_state()}",
        f"mode        : {'quick' if config.quick else 'full'}",
        f"cpus        : {os.cpu_count()} (usable {len(os.sched_getaffinity(0))})",
        f"memory      : {mem_total()}",
        f"kernel      : {platform.system()} {platform.release()} {platform.machine()}",
        f"python      : {platform.python_version()} ({sys.executable})",
        f"data dir    : {base}",
        f"filesystem  : {filesystem_of(base)}",
        f"load (start): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
    ]


# -- plain-file reference ----------------------------------------------------------------
def _open_sparse(path: Path, size: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    os.ftruncate(fd, size)
    return fd


def plain_write(fd: int, offsets: Sequence[int], data: bytes) -> tuple[float, float]:
    """pwrite ``data`` at each offset, then fsync; (total seconds, of which fsync)."""
    start = time.perf_counter()
    for offset in offsets:
        os.pwrite(fd, data, offset)
    flushing = time.perf_counter()
    os.fsync(fd)
    end = time.perf_counter()
    return end - start, end - flushing


def plain_read(fd: int, offsets: Sequence[int], length: int) -> float:
    start = time.perf_counter()
    for offset in offsets:
        os.pread(fd, length, offset)
    return time.perf_counter() - start


def engine_write(image: Image, offsets: Sequence[int], data: bytes) -> tuple[float, float]:
    """Image.write ``data`` at each offset, then flush; (total seconds, of which flush)."""
    start = time.perf_counter()
    for offset in offsets:
        image.write(data, offset)
    flushing = time.perf_counter()
    image.flush()
    end = time.perf_counter()
    return end - start, end - flushing


def engine_read(image: Image, offsets: Sequence[int], length: int) -> float:
    start = time.perf_counter()
    for offset in offsets:
        image.read(offset, length)
    return time.perf_counter() - start


@dataclass
class Paired:
    """Engine and plain figures of one metric over rounds (higher is better)."""

    engine: list[float] = field(default_factory=list)
    plain: list[float] = field(default_factory=list)
    # for write phases: the share of the time spent in the final flush/fsync
    engine_flush: list[float] = field(default_factory=list)
    plain_flush: list[float] = field(default_factory=list)

    def add(self, kind: str, rate: float, flush_share: float | None = None) -> None:
        (self.plain if kind == "plain" else self.engine).append(rate)
        if flush_share is not None:
            (self.plain_flush if kind == "plain" else self.engine_flush).append(flush_share)

    def flush_note(self, what: str) -> str:
        return (
            f"{what}: share of write-phase time in the final flush/fsync: engine "
            f"{statistics.median(self.engine_flush):.0%}, plain "
            f"{statistics.median(self.plain_flush):.0%} (medians)"
        )

    def ratio(self) -> float:
        return statistics.median(e / p for e, p in zip(self.engine, self.plain, strict=True))

    def ratios(self) -> str:
        return " ".join(f"{e / p:.2f}" for e, p in zip(self.engine, self.plain, strict=True))


# -- benchmark context -------------------------------------------------------------------
class Bench:
    def __init__(self, config: Config, base: Path, report: Report) -> None:
        self.config = config
        self.base = base
        self.report = report
        self.rbd = RBD()
        self.cluster = Rados(data_dir=base / "engine")
        self.cluster.connect()
        self.ioctx: IoCtx = self.cluster.open_ioctx("rbd")
        self.rng = random.Random(20240611)

    def close(self) -> None:
        self.cluster.shutdown()

    def plain_path(self, name: str) -> Path:
        return self.base / f"plain-{name}.dat"

    # -- 1. sequential 1 MiB -------------------------------------------------------------
    def _seq_once(self, kind: str, tag: str, data: bytes) -> tuple[float, float, float]:
        """One sequential write + read passes; (write MiB/s, flush share, read MiB/s)."""
        c = self.config
        offsets = list(range(0, c.seq_size, len(data)))
        volume = c.seq_size / MiB
        if kind == "plain":
            path = self.plain_path(tag)
            fd = _open_sparse(path, c.seq_size)
            try:
                w, f = plain_write(fd, offsets, data)
                r = sum(plain_read(fd, offsets, len(data)) for _ in range(c.read_passes))
            finally:
                os.close(fd)
                path.unlink()
        else:
            self.rbd.create(self.ioctx, tag, c.seq_size)
            with Image(self.ioctx, tag) as image:
                w, f = engine_write(image, offsets, data)
                r = sum(engine_read(image, offsets, len(data)) for _ in range(c.read_passes))
            self.rbd.remove(self.ioctx, tag)
        return volume / w, f / w, volume * c.read_passes / r

    def seq(self) -> None:
        c = self.config
        data = os.urandom(MiB)
        # A discarded warm-up first: on this VM the first touch of fresh guest memory
        # (page cache) is slow, and would otherwise land on whoever goes first.
        for kind in ("plain", "engine"):
            log(f"seq warm-up: {kind}")
            self._seq_once(kind, f"seq-warmup-{kind}", data)
        write, read = Paired(), Paired()
        for rnd in range(c.seq_rounds):
            order = ("plain", "engine") if rnd % 2 == 0 else ("engine", "plain")
            for kind in order:
                log(f"seq round {rnd + 1}/{c.seq_rounds}: {kind}")
                w, f, r = self._seq_once(kind, f"seq{rnd}-{kind}", data)
                write.add(kind, w, f)
                read.add(kind, r)
        table = Table(
            f"1 MiB sequential I/O, {c.seq_size // MiB} MiB image (order 22), "
            f"{c.seq_rounds} rounds",
            ["metric", "engine MiB/s", "plain MiB/s", "engine/plain", "per-round ratios"],
        )
        for label, paired in (("seq write 1 MiB + flush", write), ("seq read 1 MiB", read)):
            table.add(
                label,
                f"{statistics.median(paired.engine):.0f}",
                f"{statistics.median(paired.plain):.0f}",
                fmt_ratio(paired.ratio()),
                paired.ratios(),
            )
        table.notes += [
            "write: fresh thin image vs fresh sparse file (ftruncate), 1 MiB pwrites in order,",
            "       one flush (engine) / fsync (plain) at the end, inside the timing.",
            f"read: {c.read_passes} passes over the data just written; page cache NOT dropped"
            " (warm for both).",
            write.flush_note("write"),
            "one discarded warm-up round first; rounds alternate plain/engine order (ABBA);",
            "figures are medians over rounds; ratio is the median of per-round ratios.",
        ]
        self.report.tables.append(table)
        for label, paired in (("write", write), ("read", read)):
            ratio = paired.ratio()
            self.report.target(
                f"1 MiB sequential {label} >= 50% of plain file",
                ratio >= THROUGHPUT_RATIO_TARGET,
                f"ratio {ratio:.2f} (engine {statistics.median(paired.engine):.0f} MiB/s, "
                f"plain {statistics.median(paired.plain):.0f} MiB/s)",
            )

    # -- 2. random 4 KiB -----------------------------------------------------------------
    def rand(self) -> None:
        c = self.config
        block = 4 * KiB
        data = os.urandom(block)
        slots = c.rand_range // block
        fill = os.urandom(MiB)
        fill_offsets = list(range(0, c.rand_range, MiB))
        log(f"rand: prefilling {c.rand_range // MiB} MiB image and file")
        path = self.plain_path("rand")
        fd = _open_sparse(path, c.rand_range)
        self.rbd.create(self.ioctx, "rand", c.rand_range)
        write, read = Paired(), Paired()
        try:
            with Image(self.ioctx, "rand") as image:
                plain_write(fd, fill_offsets, fill)
                engine_write(image, fill_offsets, fill)
                for rnd in range(c.rand_rounds):
                    w_offsets = [self.rng.randrange(slots) * block for _ in range(c.rand_ops)]
                    r_offsets = [self.rng.randrange(slots) * block for _ in range(c.rand_ops)]
                    order = ("plain", "engine") if rnd % 2 == 0 else ("engine", "plain")
                    for kind in order:
                        log(f"rand round {rnd + 1}/{c.rand_rounds}: {kind}")
                        if kind == "plain":
                            w, f = plain_write(fd, w_offsets, data)
                            r = plain_read(fd, r_offsets, block)
                        else:
                            w, f = engine_write(image, w_offsets, data)
                            r = engine_read(image, r_offsets, block)
                        write.add(kind, c.rand_ops / w, f / w)
                        read.add(kind, c.rand_ops / r)
        finally:
            os.close(fd)
            path.unlink()
            self.rbd.remove(self.ioctx, "rand")
        table = Table(
            f"4 KiB random I/O, single thread, {c.rand_ops} ops over {c.rand_range // MiB} MiB, "
            f"{c.rand_rounds} rounds",
            ["metric", "engine IOPS", "plain IOPS", "engine/plain", "per-round ratios"],
        )
        for label, paired in (("rand write 4 KiB + flush", write), ("rand read 4 KiB", read)):
            table.add(
                label,
                f"{statistics.median(paired.engine):.0f}",
                f"{statistics.median(paired.plain):.0f}",
                fmt_ratio(paired.ratio()),
                paired.ratios(),
            )
        table.notes += [
            "image and file prefilled (untimed); same 4 KiB-aligned random offsets for both;",
            "one flush/fsync at the end of each write phase, inside the timing; reads warm.",
            write.flush_note("write"),
        ]
        self.report.tables.append(table)

    # -- 3. metadata latency -------------------------------------------------------------
    def latency(self) -> None:
        """Each iteration runs every operation once, so a burst of outside load (this
        machine is shared) hits all of them alike instead of one operation's phase;
        a plain 4 KiB append + fsync is timed in the same loop as a reference, since
        each metadata change is one SQLite WAL commit, i.e. about one fsync."""
        n = self.config.latency_ops
        rbd, ioctx = self.rbd, self.ioctx
        labels = {
            "create": "create (1 GiB, thin)",
            "snap": "create_snap (one per image)",
            "snap-nth": "create_snap (Nth on one image)",
            "clone": "clone (of one snapshot)",
            "resize": "resize (grow by 4 MiB)",
            "open": "Image() open+close (info)",
            "ref": "reference: plain 4 KiB append+fsync",
        }
        results: dict[str, list[float]] = {key: [] for key in labels}
        payload = os.urandom(64 * KiB)
        block = os.urandom(4 * KiB)
        rbd.create(ioctx, "lat-base", GiB)
        with Image(ioctx, "lat-base") as image:
            image.write(payload, 0)
            image.flush()
            image.create_snap("s")
        rbd.create(ioctx, "lat-many", GiB)
        rbd.create(ioctx, "lat-grow", GiB)
        ref_path = self.plain_path("latency-ref")
        ref_fd = os.open(ref_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        log(f"latency: {n} iterations of create, snap, snap-nth, clone, resize, open, ref")
        try:
            with Image(ioctx, "lat-many") as many, Image(ioctx, "lat-grow") as grow:
                for i in range(n):
                    with stopwatch() as t:
                        rbd.create(ioctx, f"lat{i}", GiB)
                    results["create"].append(t[0])

                    with Image(ioctx, f"lat{i}") as image:
                        image.write(payload, (i % 16) * 4 * MiB)
                        image.flush()
                        with stopwatch() as t:
                            image.create_snap("s")
                    results["snap"].append(t[0])

                    many.write(payload, (i % 16) * 4 * MiB)
                    with stopwatch() as t:
                        many.create_snap(f"n{i}")
                    results["snap-nth"].append(t[0])

                    with stopwatch() as t:
                        rbd.clone(ioctx, "lat-base", "s", ioctx, f"latc{i}")
                    results["clone"].append(t[0])

                    with stopwatch() as t:
                        grow.resize(GiB + (i + 1) * 4 * MiB)
                    results["resize"].append(t[0])

                    with stopwatch() as t:
                        Image(ioctx, f"lat{i}").close()
                    results["open"].append(t[0])

                    with stopwatch() as t:
                        os.pwrite(ref_fd, block, i * len(block))
                        os.fsync(ref_fd)
                    results["ref"].append(t[0])
        finally:
            os.close(ref_fd)
            ref_path.unlink()

        table = Table(
            f"metadata latency, {n} operations each, interleaved (ms)",
            ["operation", "n", "median", "p99", "max", "mean"],
        )
        for key, label in labels.items():
            values = results[key]
            table.add(
                label,
                len(values),
                ms(statistics.median(values)),
                ms(percentile(values, 0.99)),
                ms(max(values)),
                ms(statistics.fmean(values)),
            )
        table.notes += [
            "create_snap: image opened and 64 KiB written+flushed before, only the call timed;",
            "Nth-on-one-image: the i-th snapshot of one image (cost grows with the list);",
            "resize is grow-only (metadata); clone is of one snapshot of a 1 GiB image.",
        ]
        self.report.tables.append(table)
        reference = statistics.median(results["ref"])
        for op, key in (("create", "create"), ("snapshot", "snap"), ("clone", "clone")):
            median = statistics.median(results[key])
            self.report.target(
                f"{op} median <= {LATENCY_TARGET_MS:g} ms",
                median * 1e3 <= LATENCY_TARGET_MS,
                f"median {ms(median)} ms, p99 {ms(percentile(results[key], 0.99))} ms "
                f"(fsync reference median {ms(reference)} ms)",
            )

    # -- 4. clone latency vs parent size ---------------------------------------------------
    def clone_size(self) -> None:
        n = self.config.clone_size_ops
        rbd, ioctx = self.rbd, self.ioctx
        parents = {"1 GiB": ("cs-1g", GiB), "1 TiB": ("cs-1t", TiB)}
        written: dict[str, dict[int, bytes]] = {}
        for label, (name, size) in parents.items():
            log(f"clone-size: parent {label}")
            rbd.create(ioctx, name, size)
            chunks = {0: os.urandom(MiB), size // 2: os.urandom(MiB), size - MiB: os.urandom(MiB)}
            with Image(ioctx, name) as image:
                for offset, data in chunks.items():
                    image.write(data, offset)
                image.flush()
                image.create_snap("s")
            written[label] = chunks
        times: dict[str, list[float]] = {label: [] for label in parents}
        log(f"clone-size: {n} clones of each, interleaved")
        for i in range(n):
            order = list(parents) if i % 2 == 0 else list(reversed(parents))
            for label in order:
                with stopwatch() as t:
                    rbd.clone(ioctx, parents[label][0], "s", ioctx, f"cs{label[-3:]}-{i}")
                times[label].append(t[0])
        for label, chunks in written.items():
            with Image(ioctx, f"cs{label[-3:]}-{n - 1}", read_only=True) as child:
                ok = all(child.read(o, len(d)) == d for o, d in chunks.items())
            self.report.check(f"a clone of the {label} parent reads the parent's data", ok)
        table = Table(
            f"clone latency vs parent size, {n} clones each, interleaved (ms)",
            ["parent (thin, 3 MiB written)", "n", "median", "p99", "max"],
        )
        for label, values in times.items():
            table.add(
                label,
                len(values),
                ms(statistics.median(values)),
                ms(percentile(values, 0.99)),
                ms(max(values)),
            )
        ratio = statistics.median(times["1 TiB"]) / statistics.median(times["1 GiB"])
        table.notes.append(f"median ratio 1 TiB / 1 GiB = {ratio:.3f}")
        self.report.tables.append(table)
        self.report.target(
            f"clone time independent of parent size (1 TiB/1 GiB <= {CLONE_RATIO_TARGET})",
            ratio <= CLONE_RATIO_TARGET,
            f"ratio {ratio:.3f} (1 GiB {ms(statistics.median(times['1 GiB']))} ms, "
            f"1 TiB {ms(statistics.median(times['1 TiB']))} ms)",
        )

    # -- 5. many clones of one snapshot ------------------------------------------------------
    def many_clones(self) -> None:
        n = self.config.many_clones
        rbd, ioctx = self.rbd, self.ioctx
        log(f"many-clones: {n} clones of one snapshot")
        rbd.create(ioctx, "mc-parent", 10 * GiB)
        marks = {i * GiB + 123 * KiB: os.urandom(64 * KiB) for i in range(10)}
        with Image(ioctx, "mc-parent") as image:
            for offset, data in marks.items():
                image.write(data, offset)
            image.flush()
            image.create_snap("golden")
        times: list[float] = []
        with stopwatch() as total:
            for i in range(n):
                with stopwatch() as t:
                    rbd.clone(ioctx, "mc-parent", "golden", ioctx, f"mc{i}")
                times.append(t[0])
        picks = sorted({0, n // 3, n // 2, 2 * n // 3, n - 1})
        ok = True
        with stopwatch() as reading:
            for i in picks:
                with Image(ioctx, f"mc{i}") as child:
                    ok &= all(child.read(o, len(d)) == d for o, d in marks.items())
                    # and a write to the clone does not show in its siblings
                    child.write(b"x" * 4096, 0)
                    ok &= child.read(0, 4096) == b"x" * 4096
        with Image(ioctx, "mc-parent", snapshot="golden") as snap:
            ok &= snap.read(0, 4096) == bytes(4096)  # the children's writes stay theirs
            with stopwatch() as listing:
                children = snap.list_children()
        untouched = next(i for i in range(n) if i not in picks)
        with Image(ioctx, f"mc{untouched}", read_only=True) as sibling:
            ok &= sibling.read(0, 4096) == bytes(4096)
        self.report.check(
            f"reads from {len(picks)} of {n} clones match the parent snapshot",
            ok,
            f"clones {picks}",
        )
        self.report.check(
            f"list_children of the snapshot lists all {n} clones",
            len(children) == n,
            f"got {len(children)}",
        )
        head, tail = times[: max(1, n // 10)], times[-max(1, n // 10) :]
        table = Table(
            f"{n} clones of one snapshot (ms unless noted)",
            ["metric", "value"],
        )
        table.add("total time", f"{total[0]:.2f} s")
        table.add("per clone median", ms(statistics.median(times)))
        table.add("per clone p99", ms(percentile(times, 0.99)))
        table.add("per clone max", ms(max(times)))
        table.add(f"median of first {len(head)}", ms(statistics.median(head)))
        table.add(f"median of last {len(tail)}", ms(statistics.median(tail)))
        table.add(f"open+read 640 KiB+write 4 KiB, {len(picks)} clones", ms(reading[0]))
        table.add(f"list_children ({n} children)", ms(listing[0]))
        self.report.tables.append(table)

    # -- 6a. flatten memory --------------------------------------------------------------------
    def flatten(self) -> None:
        c = self.config
        rbd, ioctx = self.rbd, self.ioctx
        size = c.mem_size
        objects = size // (4 * MiB)
        log(f"flatten: writing 1 MiB into each of the {objects} objects of a {fmt_mib(size)} image")
        rbd.create(ioctx, "fl-parent", size)
        samples: dict[int, bytes] = {}
        data = os.urandom(MiB)
        with Image(ioctx, "fl-parent") as image:
            for objno in range(objects):
                offset = objno * 4 * MiB + (objno % 4) * MiB
                # vary the content per object without paying for urandom each time
                block = objno.to_bytes(8, "little") + data[8:]
                image.write(block, offset)
                if objno % max(1, objects // 8) == 0 or objno == objects - 1:
                    samples[offset] = block
            image.flush()
            image.create_snap("s")
        rbd.clone(ioctx, "fl-parent", "s", ioctx, "fl-child")
        log("flatten: measuring a child process")
        run = run_child(
            [
                sys.executable,
                str(RSS_CHILD),
                "flatten",
                "--data-dir",
                str(self.base / "engine"),
                "--image",
                "fl-child",
            ],
            c.child_timeout,
        )
        ok = run.returncode == 0
        detail = run.failure()
        if not ok:
            self.report.errors.append(f"flatten child failed:\n         {run.stderr_tail()}")
        if ok:
            with Image(ioctx, "fl-child", read_only=True) as child:
                try:
                    child.parent_info()
                    ok, detail = False, "still has a parent after flatten"
                except ImageNotFound:
                    pass
                for offset, block in samples.items():
                    if child.read(offset, len(block)) != block:
                        ok, detail = False, f"data differs at {offset}"
                if child.read(2 * MiB, 64 * KiB) != bytes(64 * KiB):
                    ok, detail = False, "a hole of the parent does not read as zeros"
        self.report.check("flatten: clone detached and data matches the parent", ok, detail)
        child_info = run.json()
        idle = run_child([sys.executable, str(RSS_CHILD), "baseline"], c.child_timeout)
        table = Table(
            f"flatten of a clone of a {fmt_mib(size)} image ({objects} objects, "
            f"{objects} MiB of data) in a child process",
            ["metric", "value"],
        )
        table.add("peak RSS (wait4 ru_maxrss)", fmt_mib(run.peak_rss))
        table.add("peak RSS (child VmHWM)", fmt_mib(int(child_info.get("vm_hwm_kib", 0)) * KiB))
        table.add("peak RSS of a child that only imports the engine", fmt_mib(idle.peak_rss))
        table.add("flatten() time", f"{float(child_info.get('seconds', math.nan)):.2f} s")
        table.add("child wall time", f"{run.wall:.2f} s")
        table.add("exit code", run.returncode)
        self.report.tables.append(table)
        self.report.target(
            "flatten peak RSS < 200 MiB",
            ok and run.peak_rss < RSS_TARGET,
            f"{fmt_mib(run.peak_rss)}, {run.wall:.1f} s" + ("" if ok else f"; {detail}"),
        )

    # -- 6b. import/export memory through the CLI -------------------------------------------
    def cli(self) -> None:
        c = self.config
        cli = find_cli()
        waited = 0.0
        while not cli_ready(cli) and waited < c.cli_wait:
            pause = min(60.0, c.cli_wait - waited)
            log(f"cli: csi-rbd image import/export not available yet; retrying in {pause:.0f} s")
            time.sleep(pause)
            waited += pause
            cli = find_cli()
        if not cli_ready(cli):
            why = f"csi-rbd CLI with 'image import/export' not available (waited {waited:.0f} s)"
            self.report.errors.append(why)
            for op in ("import", "export"):
                self.report.target(f"{op} peak RSS < 200 MiB", None, f"not measured: {why}")
            return
        assert cli is not None
        size = c.mem_size
        source = self.base / "import-source.img"
        log(f"cli: writing a {fmt_mib(size)} sparse source file")
        written = make_sparse_source(source, size)
        data_dir = self.base / "cli"
        with Rados(data_dir=data_dir):
            pass  # a fresh data directory with pool rbd
        base_cmd = [str(cli), "--data-dir", str(data_dir), "image"]
        table = Table(
            f"import/export of a {fmt_mib(size)} sparse file ({fmt_mib(written)} of data) "
            "through the csi-rbd CLI, each in a child process",
            ["operation", "peak RSS", "wall time", "exit", "result"],
        )
        idle = run_child([*base_cmd, "import", "--help"], c.child_timeout)
        table.add(
            "image import --help (baseline)",
            fmt_mib(idle.peak_rss),
            f"{idle.wall:.2f} s",
            idle.returncode,
            "",
        )
        log("cli: import")
        imp = run_child([*base_cmd, "import", str(source), "rbd/imported"], c.child_timeout)
        imp_ok, imp_detail = imp.returncode == 0, imp.failure()
        if not imp_ok:
            self.report.errors.append(f"csi-rbd image import failed:\n         {imp.stderr_tail()}")
        if imp_ok:
            imp_ok, imp_detail = verify_import(data_dir, source, size)
        table.add("import", fmt_mib(imp.peak_rss), f"{imp.wall:.2f} s", imp.returncode, imp_detail)
        self.report.check("import: image has the source's size and data", imp_ok, imp_detail)
        self.report.target(
            "import peak RSS < 200 MiB",
            imp_ok and imp.peak_rss < RSS_TARGET,
            f"{fmt_mib(imp.peak_rss)}, {imp.wall:.1f} s" + ("" if imp_ok else f"; {imp_detail}"),
        )
        if not imp_ok:
            self.report.target("export peak RSS < 200 MiB", None, "not measured: import failed")
            self.report.tables.append(table)
            return
        exported = self.base / "exported.img"
        log("cli: export")
        exp = run_child([*base_cmd, "export", "rbd/imported", str(exported)], c.child_timeout)
        exp_ok, exp_detail = exp.returncode == 0, exp.failure()
        if not exp_ok:
            self.report.errors.append(f"csi-rbd image export failed:\n         {exp.stderr_tail()}")
        if exp_ok:
            log("cli: comparing the exported file with the source")
            exp_ok, exp_detail = compare_files(source, exported)
            if exp_ok:
                allocated = os.stat(exported).st_blocks * 512
                exp_detail = f"identical; {fmt_mib(allocated)} allocated"
        table.add("export", fmt_mib(exp.peak_rss), f"{exp.wall:.2f} s", exp.returncode, exp_detail)
        self.report.check("export: file identical to the imported source", exp_ok, exp_detail)
        self.report.target(
            "export peak RSS < 200 MiB",
            exp_ok and exp.peak_rss < RSS_TARGET,
            f"{fmt_mib(exp.peak_rss)}, {exp.wall:.1f} s" + ("" if exp_ok else f"; {exp_detail}"),
        )
        self.report.tables.append(table)


# -- children ----------------------------------------------------------------------------
@dataclass
class ChildRun:
    returncode: int
    wall: float
    peak_rss: int  # bytes
    stdout: str
    stderr: str

    def failure(self) -> str:
        if self.returncode == 0:
            return "ok"
        tail = (self.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return f"exit {self.returncode}: {tail[:160]}"

    def stderr_tail(self, lines: int = 8) -> str:
        return "\n         ".join(self.stderr.strip().splitlines()[-lines:])

    def json(self) -> dict[str, Any]:
        for line in reversed(self.stdout.strip().splitlines()):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
        return {}


# The measured command is started by a small launcher that fork()s and exec()s
# it and reports the wait4(2) rusage of that grandchild. Starting it straight
# from this process would be wrong: subprocess uses vfork, and on exec Linux
# folds the *old* address space's high-water mark (ours, with every buffer this
# benchmark ever held) into the new process's ru_maxrss. A real fork() from a
# ~10 MiB launcher only carries the launcher's own pages, below any engine child.
_LAUNCHER = """
import json, os, sys
report, argv = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(report, "w") as out:
    json.dump({"status": status, "maxrss_kib": usage.ru_maxrss}, out)
sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""


def run_child(cmd: list[str], timeout: float) -> ChildRun:
    """Run ``cmd`` in a fresh process and take its own peak RSS from wait4(2)."""
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile(suffix=".json") as report,
    ):
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-S", "-c", _LAUNCHER, report.name, *cmd],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,  # its own process group, to kill on timeout
        )
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        wall = time.perf_counter() - start
        try:
            measured = json.loads(Path(report.name).read_text() or "{}")
        except ValueError:
            measured = {}
        out.seek(0)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
        if "status" in measured:
            returncode = os.waitstatus_to_exitcode(int(measured["status"]))
        else:
            returncode = proc.returncode
            stderr += f"\n(killed after {timeout:g} s, or the launcher failed)"
        return ChildRun(
            returncode,
            wall,
            int(measured.get("maxrss_kib", 0)) * KiB,
            out.read().decode(errors="replace"),
            stderr,
        )


def find_cli() -> Path | None:
    beside = Path(sys.executable).parent / "csi-rbd"
    if beside.exists():
        return beside
    found = shutil.which("csi-rbd")
    return Path(found) if found else None


def cli_ready(cli: Path | None) -> bool:
    """True when ``csi-rbd image import`` and ``image export`` answer --help."""
    if cli is None:
        return False
    for sub in ("import", "export"):
        try:
            done = subprocess.run(
                [str(cli), "image", sub, "--help"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        if done.returncode != 0:
            return False
    return True


def make_sparse_source(path: Path, size: int) -> int:
    """A sparse file: 1 MiB of random data every 16 MiB, plus three dense regions."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    written = 0
    try:
        os.ftruncate(fd, size)
        stride = 16 * MiB
        for n, start in enumerate(range(0, size, stride)):
            os.pwrite(fd, os.urandom(MiB), start + (n % 15) * MiB)
            written += MiB
        dense = min(32 * MiB, size // 16)
        for start in (size // 4 + 5 * MiB, size // 2 + 512 * KiB, size - dense):
            for at in range(start, start + dense, MiB):
                os.pwrite(fd, os.urandom(MiB), at)
                written += MiB
        # and a tiny tail-of-object write that is not block-aligned
        os.pwrite(fd, b"tail", size - 4)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def verify_import(data_dir: Path, source: Path, size: int) -> tuple[bool, str]:
    with Rados(data_dir=data_dir) as cluster:
        ioctx = cluster.open_ioctx("rbd")
        try:
            image = Image(ioctx, "imported", read_only=True)
        except ImageNotFound:
            return False, "no image rbd/imported after import"
        with image, open(source, "rb") as src:
            if image.size() != size:
                return False, f"image size {image.size()} != {size}"
            for offset in (0, size // 4 + 5 * MiB, size // 2, size - 4 * MiB):
                src.seek(offset)
                if image.read(offset, 4 * MiB) != src.read(4 * MiB):
                    return False, f"data differs at {offset}"
    return True, "ok"


def compare_files(a: Path, b: Path) -> tuple[bool, str]:
    """Byte-compare two files in 8 MiB chunks (streaming, as large as they are)."""
    if a.stat().st_size != b.stat().st_size:
        return False, f"size {b.stat().st_size} != {a.stat().st_size}"
    chunk = 8 * MiB
    # reused buffers: a fresh 8 MiB bytes per read would page-fault all the time
    x, y = bytearray(chunk), bytearray(chunk)
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        offset = 0
        while True:
            n, m = fa.readinto(x), fb.readinto(y)
            if n != m or memoryview(x)[:n] != memoryview(y)[:m]:
                return False, f"contents differ in [{offset}, {offset + chunk})"
            if not n:
                return True, "identical"
            offset += n


# -- main --------------------------------------------------------------------------------
def run_section(report: Report, name: str, action: Callable[[], None]) -> None:
    log(f"section {name}")
    start = time.perf_counter()
    try:
        action()
    except Exception as exc:  # a broken section is reported, and the rest still runs
        traceback.print_exc(file=sys.stderr)
        report.errors.append(f"section {name}: {type(exc).__name__}: {exc}")
    log(f"section {name} took {time.perf_counter() - start:.1f} s")


def print_report(report: Report, header: list[str], wall: float) -> None:
    print("csi-rbd native engine benchmark")
    print("\n".join(header))
    load = os.getloadavg()
    print(f"load (end)  : {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"total time  : {wall:.1f} s")
    for table in report.tables:
        print()
        print(table.render())
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
        description="Benchmark the native engine against plain file I/O (reports, never gates)."
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run (~30 s)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where to make the scratch directory (default /tmp); removed afterwards",
    )
    parser.add_argument(
        "--cli-wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to this long (polling every 60 s) for the csi-rbd CLI to appear",
    )
    parser.add_argument(
        "--sections",
        default=",".join(ALL_SECTIONS),
        help=f"comma-separated subset of: {', '.join(ALL_SECTIONS)}",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(ALL_SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = Config.make(args.quick, args.cli_wait)
    parent = args.data_dir if args.data_dir is not None else Path("/tmp")
    parent.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="engine-bench-", dir=parent))
    report = Report()
    header = machine_lines(base, config)
    start = time.perf_counter()
    fingerprint = source_fingerprint()
    bench: Bench | None = None
    try:
        bench = Bench(config, base, report)
        actions: dict[str, Callable[[], None]] = {
            "seq": bench.seq,
            "rand": bench.rand,
            "latency": bench.latency,
            "clone-size": bench.clone_size,
            "many-clones": bench.many_clones,
            "flatten": bench.flatten,
            "cli": bench.cli,
        }
        chosen = set(args.sections.split(","))
        for name in ALL_SECTIONS:
            if name in chosen:
                run_section(report, name, actions[name])
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        report.errors.append(f"setup: {type(exc).__name__}: {exc}")
    finally:
        if bench is not None:
            bench.close()
        if args.keep:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    changed = changed_sources(fingerprint, source_fingerprint())
    if changed:
        shown = ", ".join(changed[:12]) + (f" and {len(changed) - 12} more" if changed[12:] else "")
        report.errors.append(
            f"sources changed while the benchmark ran: {shown}. Figures (and child failures) "
            "may mix code versions if these are engine or CLI modules"
        )
    print_report(report, header, time.perf_counter() - start)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
