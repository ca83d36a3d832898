"""Benchmark of the storage engines: figures and PASS/FAIL per target; it never gates.

    .venv/bin/python bench/engine_bench.py [--quick] [--data-dir DIR] [--cli-wait SECONDS]
        [--sections seq,rand,...] [--ceph | --ceph-conf FILE [--ceph-user NAME]
        [--ceph-pool POOL]] [--keep]

Measures the native engine (csi_rbd/engine/native) and, with ``--ceph`` or
``--ceph-conf``, the ceph engine (csi_rbd/engine/ceph, librbd) in the same run
through the same python-rbd-shaped API (both built by
``csi_rbd.engine.factory.build_engine``). ``--ceph`` starts a throwaway
single-node cluster (tests/ceph/cluster.py: one monitor, one memstore OSD of
2 GiB, size-1 pools; removed at the end) and connects as its ``client.csi``
user; ``--ceph-conf FILE`` uses an existing cluster as ``client.<--ceph-user>``
(default admin, key from the conf's keyring) in ``--ceph-pool`` (default
``rbd``), which must be an empty scratch pool: the benchmark leaves its images
there. Every figure is then printed for native, ceph, and the ratio
native/ceph (above 1: native is faster, or uses more, for latencies and memory).

The machine is small and shared, so every throughput figure is printed next to
a reference measured in the same run with the same access pattern: plain file
I/O with os.pwrite/os.pread on one sparse file in the same directory, with the
same block sizes, the same offsets and the same flush policy (one flush/fsync
at the end of each write phase). Plain and engine runs alternate (ABBA: plain,
native, ceph, then ceph, native, plain) over several rounds and each ratio is
the median of the per-round ratios.

Reads are served from the page cache for plain and native (nothing is dropped
between the write and read phases; the benchmark runs as any user); the ceph
engine's reads come from the OSD (memstore: RAM) through librbd.

Metadata latencies (create, snapshot, clone, resize) are taken interleaved,
one of each per iteration and engine, next to a plain 4 KiB append + fsync as
the reference: each of those native operations is one SQLite WAL commit,
about one fsync; on Ceph they are monitor/OSD round trips.

Sections (``--sections`` picks some): seq, rand, latency, clone-size,
many-clones, flatten, cli (import/export through the ``csi-rbd`` CLI). The
memory sections run the measured operation in a fresh child process, started
through a tiny fork() launcher, and take that process's own peak RSS from
wait4(2) (see ``run_child`` for why not straight from here); on Ceph that is
the librbd client's memory only, not the OSD's. Skipped on Ceph, with the
reason printed: cli (the ``csi-rbd image`` commands work on native data
directories only), and flatten when the image (4 GiB in a full run) does not
fit the throwaway cluster's memstore. ``--cli-wait`` polls for the CLI (every
60 s) when it is not installed yet.

The targets (PASS/FAIL) are the native engine's. The exit status is always 0:
this reports, it does not gate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from common import (
    BENCH_DIR,
    MEMSTORE_BYTES,
    CephTarget,
    GiB,
    KiB,
    MiB,
    Report,
    Table,
    TiB,
    add_ceph_arguments,
    ceph_target,
    changed_sources_error,
    fmt_mib,
    fmt_ratio,
    load_line,
    log,
    machine_lines,
    ms,
    percentile,
    ratio_text,
    run_step,
    source_fingerprint,
    stopwatch,
)

from csi_rbd.config import ClusterConfig
from csi_rbd.engine.base import Engine
from csi_rbd.engine.factory import build_engine
from csi_rbd.engine.native import Image, ImageNotFound, Rados

RSS_CHILD = BENCH_DIR / "rss_child.py"
ALL_SECTIONS = ("seq", "rand", "latency", "clone-size", "many-clones", "flatten", "cli")
LATENCY_TARGET_MS = 2.0
CLONE_RATIO_TARGET = 1.2
THROUGHPUT_RATIO_TARGET = 0.5
RSS_TARGET = 200 * MiB
PLAIN, NATIVE, CEPH = "plain", "native", "ceph"
SECRETS_ENV = "CSI_RBD_BENCH_SECRETS"  # how rss_child.py gets the Ceph credentials
T = TypeVar("T")


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


# -- the engines under test -----------------------------------------------------------------
class Side:
    """One engine under test: a connected handle and an IoCtx on its pool, for the run."""

    def __init__(self, name: str, engine: Engine, secrets: dict[str, str] | None) -> None:
        self.name = name
        self.engine = engine
        self.secrets = secrets
        self.stack = contextlib.ExitStack()
        self.cluster: Any = self.stack.enter_context(engine.session(secrets))
        self.ioctx: Any = self.cluster.open_ioctx(engine.default_pool)
        self.rbd: Any = engine.rbd

    def image(self, name: str, **kwargs: Any) -> Any:
        return self.engine.open_image(self.ioctx, name, **kwargs)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ioctx.close()
        self.stack.close()
        self.engine.close()


def order_of(kinds: Sequence[T], rnd: int) -> list[T]:
    """ABBA over any number of kinds: in order on even rounds, reversed on odd ones."""
    return list(kinds) if rnd % 2 == 0 else list(reversed(kinds))


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


def engine_write(image: Any, offsets: Sequence[int], data: bytes) -> tuple[float, float]:
    """Image.write ``data`` at each offset, then flush; (total seconds, of which flush)."""
    start = time.perf_counter()
    for offset in offsets:
        image.write(data, offset)
    flushing = time.perf_counter()
    image.flush()
    end = time.perf_counter()
    return end - start, end - flushing


def engine_read(image: Any, offsets: Sequence[int], length: int) -> float:
    start = time.perf_counter()
    for offset in offsets:
        image.read(offset, length)
    return time.perf_counter() - start


@dataclass
class Rounds:
    """One metric over rounds, per kind (plain, native, ceph); higher is better."""

    rate: dict[str, list[float]] = field(default_factory=dict)
    # for write phases: the share of the time spent in the final flush/fsync
    flush: dict[str, list[float]] = field(default_factory=dict)

    def add(self, kind: str, rate: float, flush_share: float | None = None) -> None:
        self.rate.setdefault(kind, []).append(rate)
        if flush_share is not None:
            self.flush.setdefault(kind, []).append(flush_share)

    def median(self, kind: str) -> float:
        return statistics.median(self.rate[kind])

    def per_round(self, a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(self.rate[a], self.rate[b], strict=True)]

    def ratio(self, a: str, b: str) -> float:
        """The median of the per-round ratios a/b (each round measured both)."""
        return statistics.median(self.per_round(a, b))

    def ratios(self, a: str, b: str) -> str:
        return " ".join(f"{r:.2f}" for r in self.per_round(a, b))

    def flush_note(self, what: str) -> str:
        shares = ", ".join(
            f"{kind} {statistics.median(values):.0%}" for kind, values in self.flush.items()
        )
        return f"{what}: share of write-phase time in the final flush/fsync: {shares} (medians)"


def throughput_table(title: str, unit: str, kinds: Sequence[str]) -> Table:
    """Columns: each kind's figure, each engine / plain, and native/ceph when both ran."""
    engines = [k for k in kinds if k != PLAIN]
    headers = ["metric", *(f"{k} {unit}" for k in kinds)]
    headers += [f"{k}/plain" for k in engines]
    if CEPH in engines:
        headers += ["native/ceph", "per-round native/ceph"]
    else:
        headers += ["per-round native/plain"]
    return Table(title, headers)


def throughput_row(table: Table, label: str, rounds: Rounds, kinds: Sequence[str]) -> None:
    engines = [k for k in kinds if k != PLAIN]
    cells = [label, *(f"{rounds.median(k):.0f}" for k in kinds)]
    cells += [fmt_ratio(rounds.ratio(k, PLAIN)) for k in engines]
    if CEPH in engines:
        cells += [fmt_ratio(rounds.ratio(NATIVE, CEPH)), rounds.ratios(NATIVE, CEPH)]
    else:
        cells += [rounds.ratios(NATIVE, PLAIN)]
    table.add(*cells)


def latency_columns(sides: Sequence[Side]) -> list[str]:
    cols = [f"{s.name} {what}" for s in sides for what in ("median", "p99")]
    return cols + (["native/ceph (median)"] if len(sides) > 1 else [])


def latency_cells(values: dict[str, list[float]], sides: Sequence[Side]) -> list[str]:
    cells = []
    for side in sides:
        cells += [ms(statistics.median(values[side.name])), ms(percentile(values[side.name], 0.99))]
    if len(sides) > 1:
        cells.append(ratio_text(statistics.median(values[NATIVE]), statistics.median(values[CEPH])))
    return cells


# -- benchmark context -------------------------------------------------------------------
class Bench:
    def __init__(self, config: Config, base: Path, report: Report, ceph: CephTarget | None) -> None:
        self.config = config
        self.base = base
        self.report = report
        self.ceph = ceph
        self.native = Side(
            NATIVE, build_engine(ClusterConfig(NATIVE, "native", data_dir=base / "engine")), None
        )
        self.sides = [self.native]
        if ceph is not None:
            self.sides.append(Side(CEPH, build_engine(ceph.cluster_config()), ceph.secrets))
            found = self.sides[-1].rbd.list(self.sides[-1].ioctx)
            if found:
                raise RuntimeError(
                    f"ceph pool {ceph.pool} holds {len(found)} images: the benchmark needs an "
                    "empty scratch pool (--ceph-pool)"
                )
        self.kinds = [PLAIN, *(s.name for s in self.sides)]
        self.rng = random.Random(20240611)

    def close(self) -> None:
        for side in self.sides:
            side.close()

    def side(self, name: str) -> Side:
        return next(s for s in self.sides if s.name == name)

    def plain_path(self, name: str) -> Path:
        return self.base / f"plain-{name}.dat"

    # -- 1. sequential 1 MiB -------------------------------------------------------------
    def _seq_once(self, kind: str, tag: str, data: bytes) -> tuple[float, float, float]:
        """One sequential write + read passes; (write MiB/s, flush share, read MiB/s)."""
        c = self.config
        offsets = list(range(0, c.seq_size, len(data)))
        volume = c.seq_size / MiB
        if kind == PLAIN:
            path = self.plain_path(tag)
            fd = _open_sparse(path, c.seq_size)
            try:
                w, f = plain_write(fd, offsets, data)
                r = sum(plain_read(fd, offsets, len(data)) for _ in range(c.read_passes))
            finally:
                os.close(fd)
                path.unlink()
        else:
            side = self.side(kind)
            side.rbd.create(side.ioctx, tag, c.seq_size)
            with side.image(tag) as image:
                w, f = engine_write(image, offsets, data)
                r = sum(engine_read(image, offsets, len(data)) for _ in range(c.read_passes))
            side.rbd.remove(side.ioctx, tag)
        return volume / w, f / w, volume * c.read_passes / r

    def seq(self) -> None:
        c = self.config
        data = os.urandom(MiB)
        # A discarded warm-up first: on this VM the first touch of fresh guest memory
        # (page cache) is slow, and would otherwise land on whoever goes first.
        for kind in self.kinds:
            log(f"seq warm-up: {kind}")
            self._seq_once(kind, f"seq-warmup-{kind}", data)
        write, read = Rounds(), Rounds()
        for rnd in range(c.seq_rounds):
            for kind in order_of(self.kinds, rnd):
                log(f"seq round {rnd + 1}/{c.seq_rounds}: {kind}")
                w, f, r = self._seq_once(kind, f"seq{rnd}-{kind}", data)
                write.add(kind, w, f)
                read.add(kind, r)
        table = throughput_table(
            f"1 MiB sequential I/O, {c.seq_size // MiB} MiB image (order 22), "
            f"{c.seq_rounds} rounds",
            "MiB/s",
            self.kinds,
        )
        for label, rounds in (("seq write 1 MiB + flush", write), ("seq read 1 MiB", read)):
            throughput_row(table, label, rounds, self.kinds)
        table.notes += [
            "write: fresh thin image vs fresh sparse file (ftruncate), 1 MiB pwrites in order,",
            "       one flush (engine) / fsync (plain) at the end, inside the timing.",
            f"read: {c.read_passes} passes over the data just written; page cache NOT dropped"
            " (warm for plain and native; ceph reads from the OSD).",
            write.flush_note("write"),
            "one discarded warm-up round first; rounds alternate the order (ABBA);",
            "figures are medians over rounds; ratios are medians of per-round ratios.",
        ]
        self.report.tables.append(table)
        for label, rounds in (("write", write), ("read", read)):
            ratio = rounds.ratio(NATIVE, PLAIN)
            self.report.target(
                f"1 MiB sequential {label} >= 50% of plain file",
                ratio >= THROUGHPUT_RATIO_TARGET,
                f"ratio {ratio:.2f} (native {rounds.median(NATIVE):.0f} MiB/s, "
                f"plain {rounds.median(PLAIN):.0f} MiB/s)",
            )

    # -- 2. random 4 KiB -----------------------------------------------------------------
    def rand(self) -> None:
        c = self.config
        block = 4 * KiB
        data = os.urandom(block)
        slots = c.rand_range // block
        fill = os.urandom(MiB)
        fill_offsets = list(range(0, c.rand_range, MiB))
        log(f"rand: prefilling {c.rand_range // MiB} MiB images and file")
        path = self.plain_path("rand")
        fd = _open_sparse(path, c.rand_range)
        write, read = Rounds(), Rounds()
        with contextlib.ExitStack() as stack:
            stack.callback(path.unlink)
            stack.callback(os.close, fd)
            images: dict[str, Any] = {}
            for side in self.sides:
                side.rbd.create(side.ioctx, "rand", c.rand_range)
                stack.callback(side.rbd.remove, side.ioctx, "rand")
                images[side.name] = stack.enter_context(side.image("rand"))
            plain_write(fd, fill_offsets, fill)
            for image in images.values():
                engine_write(image, fill_offsets, fill)
            for rnd in range(c.rand_rounds):
                w_offsets = [self.rng.randrange(slots) * block for _ in range(c.rand_ops)]
                r_offsets = [self.rng.randrange(slots) * block for _ in range(c.rand_ops)]
                for kind in order_of(self.kinds, rnd):
                    log(f"rand round {rnd + 1}/{c.rand_rounds}: {kind}")
                    if kind == PLAIN:
                        w, f = plain_write(fd, w_offsets, data)
                        r = plain_read(fd, r_offsets, block)
                    else:
                        w, f = engine_write(images[kind], w_offsets, data)
                        r = engine_read(images[kind], r_offsets, block)
                    write.add(kind, c.rand_ops / w, f / w)
                    read.add(kind, c.rand_ops / r)
        table = throughput_table(
            f"4 KiB random I/O, single thread, {c.rand_ops} ops over {c.rand_range // MiB} MiB, "
            f"{c.rand_rounds} rounds",
            "IOPS",
            self.kinds,
        )
        for label, rounds in (("rand write 4 KiB + flush", write), ("rand read 4 KiB", read)):
            throughput_row(table, label, rounds, self.kinds)
        table.notes += [
            "images and file prefilled (untimed); same 4 KiB-aligned random offsets for all;",
            "one flush/fsync at the end of each write phase, inside the timing; reads warm.",
            write.flush_note("write"),
        ]
        self.report.tables.append(table)

    # -- 3. metadata latency -------------------------------------------------------------
    def latency(self) -> None:
        """Each iteration runs every operation once on every engine, so a burst of
        outside load (this machine is shared) hits all of them alike instead of one
        operation's phase; a plain 4 KiB append + fsync is timed in the same loop as
        a reference, since each native metadata change is one SQLite WAL commit,
        i.e. about one fsync."""
        n = self.config.latency_ops
        labels = {
            "create": "create (1 GiB, thin)",
            "snap": "create_snap (one per image)",
            "snap-nth": "create_snap (Nth on one image)",
            "clone": "clone (of one snapshot)",
            "resize": "resize (grow by 4 MiB)",
            "open": "Image() open+close (info)",
        }
        results: dict[str, dict[str, list[float]]] = {
            key: {s.name: [] for s in self.sides} for key in labels
        }
        reference: list[float] = []
        payload = os.urandom(64 * KiB)
        block = os.urandom(4 * KiB)
        ref_path = self.plain_path("latency-ref")
        ref_fd = os.open(ref_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        log(f"latency: {n} iterations of create, snap, snap-nth, clone, resize, open, ref")
        with contextlib.ExitStack() as stack:
            stack.callback(ref_path.unlink)
            stack.callback(os.close, ref_fd)
            many: dict[str, Any] = {}
            grow: dict[str, Any] = {}
            for side in self.sides:
                rbd, ioctx = side.rbd, side.ioctx
                rbd.create(ioctx, "lat-base", GiB)
                with side.image("lat-base") as image:
                    image.write(payload, 0)
                    image.flush()
                    image.create_snap("s")
                rbd.create(ioctx, "lat-many", GiB)
                rbd.create(ioctx, "lat-grow", GiB)
                many[side.name] = stack.enter_context(side.image("lat-many"))
                grow[side.name] = stack.enter_context(side.image("lat-grow"))
            for i in range(n):
                for side in order_of(self.sides, i):
                    rbd, ioctx, name = side.rbd, side.ioctx, side.name
                    with stopwatch() as t:
                        rbd.create(ioctx, f"lat{i}", GiB)
                    results["create"][name].append(t[0])

                    with side.image(f"lat{i}") as image:
                        image.write(payload, (i % 16) * 4 * MiB)
                        image.flush()
                        with stopwatch() as t:
                            image.create_snap("s")
                    results["snap"][name].append(t[0])

                    many[name].write(payload, (i % 16) * 4 * MiB)
                    with stopwatch() as t:
                        many[name].create_snap(f"n{i}")
                    results["snap-nth"][name].append(t[0])

                    with stopwatch() as t:
                        rbd.clone(ioctx, "lat-base", "s", ioctx, f"latc{i}")
                    results["clone"][name].append(t[0])

                    with stopwatch() as t:
                        grow[name].resize(GiB + (i + 1) * 4 * MiB)
                    results["resize"][name].append(t[0])

                    with stopwatch() as t:
                        side.image(f"lat{i}").close()
                    results["open"][name].append(t[0])

                with stopwatch() as t:
                    os.pwrite(ref_fd, block, i * len(block))
                    os.fsync(ref_fd)
                reference.append(t[0])

        table = Table(
            f"metadata latency, {n} operations each per engine, interleaved (ms)",
            ["operation", *latency_columns(self.sides)],
        )
        for key, label in labels.items():
            table.add(label, *latency_cells(results[key], self.sides))
        ref_cells = [ms(statistics.median(reference)), ms(percentile(reference, 0.99))]
        table.add("reference: plain 4 KiB append+fsync", *ref_cells)
        table.notes += [
            "create_snap: image opened and 64 KiB written+flushed before, only the call timed;",
            "Nth-on-one-image: the i-th snapshot of one image (cost grows with the list);",
            "resize is grow-only (metadata); clone is of one snapshot of a 1 GiB image;",
            "each iteration runs the engines in turn (ABBA); the reference once per iteration.",
        ]
        if len(self.sides) > 1:
            table.notes.append("native/ceph below 1: native is faster.")
        self.report.tables.append(table)
        ref = statistics.median(reference)
        for op, key in (("create", "create"), ("snapshot", "snap"), ("clone", "clone")):
            values = results[key][NATIVE]
            median = statistics.median(values)
            self.report.target(
                f"{op} median <= {LATENCY_TARGET_MS:g} ms",
                median * 1e3 <= LATENCY_TARGET_MS,
                f"median {ms(median)} ms, p99 {ms(percentile(values, 0.99))} ms "
                f"(fsync reference median {ms(ref)} ms)",
            )

    # -- 4. clone latency vs parent size ---------------------------------------------------
    def clone_size(self) -> None:
        n = self.config.clone_size_ops
        parents = {"1 GiB": ("cs-1g", GiB), "1 TiB": ("cs-1t", TiB)}
        written: dict[str, dict[int, bytes]] = {}
        for label, (name, size) in parents.items():
            chunks = {0: os.urandom(MiB), size // 2: os.urandom(MiB), size - MiB: os.urandom(MiB)}
            written[label] = chunks
            for side in self.sides:
                log(f"clone-size: parent {label} ({side.name})")
                side.rbd.create(side.ioctx, name, size)
                with side.image(name) as image:
                    for offset, data in chunks.items():
                        image.write(data, offset)
                    image.flush()
                    image.create_snap("s")
        times: dict[str, dict[str, list[float]]] = {
            label: {s.name: [] for s in self.sides} for label in parents
        }
        log(f"clone-size: {n} clones of each, interleaved")
        pairs = [(label, side) for label in parents for side in self.sides]
        for i in range(n):
            for label, side in order_of(pairs, i):
                with stopwatch() as t:
                    side.rbd.clone(
                        side.ioctx, parents[label][0], "s", side.ioctx, f"cs{label[-3:]}-{i}"
                    )
                times[label][side.name].append(t[0])
        for side in self.sides:
            for label, chunks in written.items():
                with side.image(f"cs{label[-3:]}-{n - 1}", read_only=True) as child:
                    ok = all(child.read(o, len(d)) == d for o, d in chunks.items())
                self.report.check(f"{side.name}: a clone of the {label} parent reads its data", ok)
        table = Table(
            f"clone latency vs parent size, {n} clones each per engine, interleaved (ms)",
            ["parent (thin, 3 MiB written)", *latency_columns(self.sides)],
        )
        for label, values in times.items():
            table.add(label, *latency_cells(values, self.sides))
        ratios: dict[str, float] = {}
        for side in self.sides:
            ratios[side.name] = statistics.median(times["1 TiB"][side.name]) / statistics.median(
                times["1 GiB"][side.name]
            )
        table.notes.append(
            "median ratio 1 TiB / 1 GiB: "
            + ", ".join(f"{name} {value:.3f}" for name, value in ratios.items())
        )
        self.report.tables.append(table)
        native = times["1 GiB"][NATIVE], times["1 TiB"][NATIVE]
        self.report.target(
            f"clone time independent of parent size (1 TiB/1 GiB <= {CLONE_RATIO_TARGET})",
            ratios[NATIVE] <= CLONE_RATIO_TARGET,
            f"ratio {ratios[NATIVE]:.3f} (1 GiB {ms(statistics.median(native[0]))} ms, "
            f"1 TiB {ms(statistics.median(native[1]))} ms)",
        )

    # -- 5. many clones of one snapshot ------------------------------------------------------
    def many_clones(self) -> None:
        n = self.config.many_clones
        marks = {i * GiB + 123 * KiB: os.urandom(64 * KiB) for i in range(10)}
        for side in self.sides:
            log(f"many-clones: parent ({side.name})")
            side.rbd.create(side.ioctx, "mc-parent", 10 * GiB)
            with side.image("mc-parent") as image:
                for offset, data in marks.items():
                    image.write(data, offset)
                image.flush()
                image.create_snap("golden")
        log(f"many-clones: {n} clones of one snapshot per engine, interleaved")
        times: dict[str, list[float]] = {s.name: [] for s in self.sides}
        totals = dict.fromkeys(times, 0.0)
        for i in range(n):
            for side in order_of(self.sides, i):
                with stopwatch() as t:
                    side.rbd.clone(side.ioctx, "mc-parent", "golden", side.ioctx, f"mc{i}")
                times[side.name].append(t[0])
                totals[side.name] += t[0]
        picks = sorted({0, n // 3, n // 2, 2 * n // 3, n - 1})
        figures: dict[str, dict[str, float]] = {}
        for side in self.sides:
            ok = True
            with stopwatch() as reading:
                for i in picks:
                    with side.image(f"mc{i}") as child:
                        ok &= all(child.read(o, len(d)) == d for o, d in marks.items())
                        # and a write to the clone does not show in its siblings
                        child.write(b"x" * 4096, 0)
                        ok &= child.read(0, 4096) == b"x" * 4096
            with side.image("mc-parent", snapshot="golden") as snap:
                ok &= snap.read(0, 4096) == bytes(4096)  # the children's writes stay theirs
                with stopwatch() as listing:
                    children = snap.list_children()
            untouched = next(i for i in range(n) if i not in picks)
            with side.image(f"mc{untouched}", read_only=True) as sibling:
                ok &= sibling.read(0, 4096) == bytes(4096)
            self.report.check(
                f"{side.name}: reads from {len(picks)} of {n} clones match the parent snapshot",
                ok,
                f"clones {picks}",
            )
            self.report.check(
                f"{side.name}: list_children of the snapshot lists all {n} clones",
                len(children) == n,
                f"got {len(children)}",
            )
            values = times[side.name]
            head, tail = values[: max(1, n // 10)], values[-max(1, n // 10) :]
            figures[side.name] = {
                "total of the clone calls": totals[side.name],
                "per clone median": statistics.median(values),
                "per clone p99": percentile(values, 0.99),
                "per clone max": max(values),
                f"median of first {len(head)}": statistics.median(head),
                f"median of last {len(tail)}": statistics.median(tail),
                f"open+read 640 KiB+write 4 KiB, {len(picks)} clones": reading[0],
                f"list_children ({n} children)": listing[0],
            }
        table = Table(
            f"{n} clones of one snapshot (ms unless noted)",
            ["metric", *(s.name for s in self.sides)]
            + (["native/ceph"] if len(self.sides) > 1 else []),
        )
        for metric in figures[NATIVE]:
            cells = [ms(figures[s.name][metric]) for s in self.sides]
            if len(self.sides) > 1:
                cells.append(ratio_text(figures[NATIVE][metric], figures[CEPH][metric]))
            table.add(metric, *cells)
        if len(self.sides) > 1:
            table.notes.append("clones interleaved per engine (ABBA); below 1: native is faster.")
        self.report.tables.append(table)

    # -- 6a. flatten memory --------------------------------------------------------------------
    def flatten(self) -> None:
        c = self.config
        size = c.mem_size
        objects = size // (4 * MiB)
        sides = list(self.sides)
        if (
            self.ceph is not None
            and self.ceph.throwaway is not None
            and 2 * size > MEMSTORE_BYTES // 2
        ):
            self.report.skip(
                "flatten on ceph",
                f"a {fmt_mib(size)} image and its flattened clone do not fit the throwaway "
                f"cluster's {fmt_mib(MEMSTORE_BYTES)} memstore (use --quick or --ceph-conf)",
            )
            sides = [self.native]
        columns: dict[str, dict[str, str]] = {}
        peaks: dict[str, dict[str, float]] = {}
        for side in sides:
            figures = self._flatten_one(side, size, objects)
            columns[side.name] = {k: v[0] for k, v in figures.items()}
            peaks[side.name] = {k: v[1] for k, v in figures.items()}
        table = Table(
            f"flatten of a clone of a {fmt_mib(size)} image ({objects} objects, "
            f"{objects} MiB of data) in a child process",
            ["metric", *columns] + (["native/ceph"] if len(columns) > 1 else []),
        )
        for metric in columns[NATIVE]:
            cells = [columns[name][metric] for name in columns]
            if len(columns) > 1:
                cells.append(ratio_text(peaks[NATIVE][metric], peaks[CEPH][metric]))
            table.add(metric, *cells)
        if len(columns) > 1:
            table.notes.append(
                "ceph: the librbd client's memory only (the OSD copies the data); the baseline "
                "child builds the engine and connects (ceph: loads librados/librbd)."
            )
        self.report.tables.append(table)

    def _child_command(self, side: Side, *args: str) -> tuple[list[str], dict[str, str] | None]:
        """rss_child.py argv for ``side``, and the environment carrying its secrets."""
        cmd = [sys.executable, str(RSS_CHILD), *args]
        if side.name == NATIVE:
            return [*cmd, "--data-dir", str(self.base / "engine")], None
        assert self.ceph is not None
        env = {**os.environ, SECRETS_ENV: json.dumps(self.ceph.secrets)}
        return [*cmd, "--cluster", json.dumps(self.ceph.entry)], env

    def _flatten_one(self, side: Side, size: int, objects: int) -> dict[str, tuple[str, float]]:
        """Flatten a clone on ``side`` in a child; (printed, number) per metric."""
        c = self.config
        rbd, ioctx = side.rbd, side.ioctx
        log(
            f"flatten ({side.name}): writing 1 MiB into each of the {objects} objects of a "
            f"{fmt_mib(size)} image"
        )
        rbd.create(ioctx, "fl-parent", size)
        samples: dict[int, bytes] = {}
        data = os.urandom(MiB)
        with side.image("fl-parent") as image:
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
        log(f"flatten ({side.name}): measuring a child process")
        cmd, env = self._child_command(side, "flatten", "--image", "fl-child")
        run = run_child(cmd, c.child_timeout, env)
        ok = run.returncode == 0
        detail = run.failure()
        if not ok:
            self.report.errors.append(
                f"flatten child ({side.name}) failed:\n         {run.stderr_tail()}"
            )
        if ok:
            with side.image("fl-child", read_only=True) as child:
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
        self.report.check(
            f"{side.name}: flatten: clone detached and data matches the parent", ok, detail
        )
        child_info = run.json()
        cmd, env = self._child_command(side, "baseline")
        idle = run_child(cmd, c.child_timeout, env)
        hwm = int(child_info.get("vm_hwm_kib", 0)) * KiB
        seconds = float(child_info.get("seconds", math.nan))
        if side.name == NATIVE:
            self.report.target(
                "flatten peak RSS < 200 MiB",
                ok and run.peak_rss < RSS_TARGET,
                f"{fmt_mib(run.peak_rss)}, {run.wall:.1f} s" + ("" if ok else f"; {detail}"),
            )
        return {
            "peak RSS (wait4 ru_maxrss)": (fmt_mib(run.peak_rss), run.peak_rss),
            "peak RSS (child VmHWM)": (fmt_mib(hwm), hwm),
            "peak RSS of a child that only connects (baseline)": (
                fmt_mib(idle.peak_rss),
                idle.peak_rss,
            ),
            "flatten() time": (f"{seconds:.2f} s", seconds),
            "child wall time": (f"{run.wall:.2f} s", run.wall),
            "exit code": (str(run.returncode), math.nan),
        }

    # -- 6b. import/export memory through the CLI -------------------------------------------
    def cli(self) -> None:
        c = self.config
        if self.ceph is not None:
            self.report.skip(
                "cli on ceph",
                "the csi-rbd image import/export commands work on native data directories "
                "only (Ceph's own is `rbd import/export`); measured on native",
            )
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


def run_child(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> ChildRun:
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
            env=env,
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
def print_report(report: Report, header: list[str], wall: float) -> None:
    print("csi-rbd engine benchmark")
    print("\n".join(header))
    print(load_line())
    print(f"total time  : {wall:.1f} s")
    print(report.render_body())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the native engine (and with --ceph the ceph engine) against "
        "plain file I/O (reports, never gates)."
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
    add_ceph_arguments(parser)
    parser.add_argument(
        "--ceph-pool",
        default="rbd",
        metavar="POOL",
        help="with --ceph-conf: an empty scratch pool to fill (default rbd)",
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
    engines = "native and ceph" if args.ceph or args.ceph_conf else "native"
    header = machine_lines(
        "csi_rbd/engine", f"{'quick' if config.quick else 'full'}, engines: {engines}", base
    )
    start = time.perf_counter()
    fingerprint = source_fingerprint()
    bench: Bench | None = None
    ceph: CephTarget | None = None
    try:
        if args.ceph or args.ceph_conf:
            ceph = ceph_target(base / "ceph", args.ceph_conf, args.ceph_user, args.ceph_pool)
            header.append(f"ceph        : {ceph.description}, pool {ceph.pool}")
        bench = Bench(config, base, report, ceph)
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
                run_step(report, name, actions[name])
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        report.errors.append(f"setup: {type(exc).__name__}: {exc}")
    finally:
        if bench is not None:
            bench.close()
        if ceph is not None:
            ceph.stop()
        if args.keep:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    changed = changed_sources_error(
        fingerprint,
        "Figures (and child failures) may mix code versions if these are engine or CLI modules",
    )
    if changed:
        report.errors.append(changed)
    print_report(report, header, time.perf_counter() - start)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
