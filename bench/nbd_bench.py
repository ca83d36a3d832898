"""Benchmark of the VM-disk data paths: the NBD server and the FUSE/loop block device.

    .venv/bin/python bench/nbd_bench.py [--quick] [--cache MODE] [--dir DIR]
        [--sections nbd,fuse] [--ceph-conf FILE] [--keep]

One run, one set of data (an image of random bytes, 1 GiB; 256 MiB with
``--quick``), every figure next to a reference measured in the same run:

* **NBD** - ``csi-rbd nbd serve`` (cache ``--cache``, writeback by default)
  beside ``nbdkit file`` serving a raw file with the same bytes on the same
  filesystem. Sequential: ``qemu-img convert`` of a raw file into the export
  and of the export out to tmpfs, after a first, unmeasured pass that
  allocates both (a first write of fresh space measures the kernel's page and
  block allocation more than either server). Random: ``qemu-img bench`` 4 KiB, queue
  depth 16, ``-t none``, a step of 1 MiB + 4 KiB (odd in pages: every page is
  visited once, scattered over the image; ``qemu-img bench`` has no random
  mode), writes with a flush every 4096 requests, as a guest would; plus
  ``fio --ioengine=nbd`` truly random, for the record. Runs alternate ours and
  nbdkit (ABBA); a figure is the median over rounds (full run: 5 for the
  image copies, which take a second or two each, 3 for the random tests).
* **FUSE/loop** - a block volume staged by :class:`NodeStager` (attach daemon
  with the same cache mode, loop device with direct I/O) beside a loop device
  on a plain file; ``fio`` libaio ``direct=1``: 4 KiB random at depth 16 and
  1 MiB sequential at depth 4.

Targets (PASS/FAIL): NBD sequential >= 90% of nbdkit, each direction; NBD
4 KiB random >= 2x librbd on a single-node memstore cluster. That reference is
a recorded figure (9.7k write / 18k read IOPS, measured with fio's rbd engine
at depth 16 on this kind of machine) unless ``--ceph-conf`` names a reachable
cluster, where it is measured once (fio ``--ioengine=rbd``, pool ``rbd``) and
used by both sections (the FUSE/loop figures are compared with it too, for
information).

Also printed: the NBD server's CPU time per request (from /proc), which says
whether a figure is bound by the server or by waiting. The machine may be
shared: the load average is printed at the start and the end. Needs root (loop
devices, FUSE) for the FUSE section, qemu-utils, nbdkit and fio. The exit
status is always 0: this reports, it does not gate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common import GiB, KiB, MiB, log

CLI = Path(sys.executable).with_name("csi-rbd")
LIBRBD_RECORDED = {"write": 9700.0, "read": 18000.0}  # IOPS, 4 KiB random, depth 16
SEQ_TARGET = 0.90
RAND_TARGET = 2.0
STEP = MiB + 4 * KiB  # qemu-img bench step: 257 pages, odd


@dataclass(frozen=True)
class Config:
    size: int
    rounds: int
    bench_ops: int
    fio_ops: int
    fio_seq: int
    seq_rounds: int  # image copies take a second or two: more rounds against the noise
    flush_interval: int = 4096

    @classmethod
    def make(cls, quick: bool) -> Config:
        if quick:
            return cls(
                size=256 * MiB,
                rounds=1,
                bench_ops=20000,
                fio_ops=20000,
                fio_seq=128 * MiB,
                seq_rounds=1,
            )
        return cls(
            size=GiB, rounds=3, bench_ops=100000, fio_ops=60000, fio_seq=512 * MiB, seq_rounds=5
        )


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    targets: list[tuple[str, str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def row(self, text: str) -> None:
        self.lines.append(text)
        print(text, flush=True)

    def target(self, name: str, passed: bool | None, detail: str) -> None:
        status = "SKIP" if passed is None else "PASS" if passed else "FAIL"
        self.targets.append((status, name, detail))


def run(*argv: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({result.returncode}): {result.stderr[-2000:]}"
        )
    return result


def timed(*argv: str) -> float:
    start = time.perf_counter()
    run(*argv)
    return time.perf_counter() - start


def wait_socket(path: Path, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server for {path} did not start")
        time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- servers ------------------------------------------------------------------------------
@dataclass
class Export:
    name: str
    uri: str
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_ours(data_dir: Path, sock: Path, cache: str) -> Export:
    argv = [str(CLI), "--data-dir", str(data_dir), "nbd", "serve", "rbd/bench"]
    process = subprocess.Popen(
        [*argv, "--socket", str(sock), "--cache", cache], stdout=subprocess.DEVNULL
    )
    wait_socket(sock, process)
    return Export(f"csi-rbd ({cache})", f"nbd+unix:///?socket={sock}", process)


def start_nbdkit(file: Path, sock: Path) -> Export:
    process = subprocess.Popen(
        ["nbdkit", "-f", "-U", str(sock), "file", f"file={file}"], stdout=subprocess.DEVNULL
    )
    wait_socket(sock, process)
    return Export("nbdkit file", f"nbd+unix:///?socket={sock}", process)


# -- measurements --------------------------------------------------------------------------
def qemu_bench(uri: str, ops: int, write: bool, flush_interval: int) -> float:
    argv = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-d", "16", "-s", "4096"]
    argv += ["-S", str(STEP), "-c", str(ops)]
    if write:
        argv += ["-w", f"--flush-interval={flush_interval}"]
    output = run(*argv, uri).stdout
    match = re.search(r"Run completed in ([\d.]+) seconds", output)
    if match is None:
        raise RuntimeError(f"unexpected qemu-img bench output: {output}")
    return ops / float(match.group(1))


def fio(job: dict[str, object], name: str = "job") -> dict[str, float]:
    """Run one fio job; IOPS and bytes/s of its reads and writes."""
    with tempfile.NamedTemporaryFile("w", suffix=".fio", delete=False) as handle:
        handle.write(f"[{name}]\n" + "".join(f"{k}={v}\n" for k, v in job.items()))
        path = handle.name
    out = path + ".json"
    try:
        run("fio", "--output-format=json", f"--output={out}", path)
        data = json.loads(Path(out).read_text())["jobs"][0]
    finally:
        for leftover in (path, out):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
    return {
        "iops": float(data["read"]["iops"] + data["write"]["iops"]),
        "bw": float(data["read"]["bw_bytes"] + data["write"]["bw_bytes"]),
    }


class Bench:
    def __init__(self, config: Config, base: Path, cache: str, report: Report) -> None:
        self.config = config
        self.base = base
        self.cache = cache
        self.report = report
        self.data_dir = base / "data"
        self.source = base / "source.raw"
        self.plain = base / "plain.raw"
        self.tmpfs = Path(tempfile.mkdtemp(prefix="nbd-bench-", dir="/dev/shm"))
        self.sock_dir = Path(tempfile.mkdtemp(prefix="nbdb-", dir="/tmp"))

    def create_image(self, spec: str, size: int) -> None:
        run(
            str(CLI),
            "--data-dir",
            str(self.data_dir),
            "image",
            "create",
            "--size",
            f"{size >> 20}M",
            spec,
        )

    def close(self) -> None:
        shutil.rmtree(self.tmpfs, ignore_errors=True)
        shutil.rmtree(self.sock_dir, ignore_errors=True)

    # -- setup -------------------------------------------------------------------------
    def prepare(self) -> None:
        size = self.config.size
        log(f"creating {size >> 20} MiB of random data and the image")
        with open(self.source, "wb") as handle:
            for _ in range(size // (16 * MiB)):
                handle.write(os.urandom(16 * MiB))
        with open(self.plain, "wb") as handle:
            handle.truncate(size)
        self.create_image("rbd/bench", size)

    @contextlib.contextmanager
    def exports(self) -> Iterator[tuple[Export, Export]]:
        ours = start_ours(self.data_dir, self.sock_dir / "ours.sock", self.cache)
        try:
            kit = start_nbdkit(self.plain, self.sock_dir / "kit.sock")
            try:
                yield ours, kit
            finally:
                kit.stop()
        finally:
            ours.stop()

    def _rounds(
        self, measure: Callable[[Export], float], a: Export, b: Export, rounds: int
    ) -> tuple[list[float], list[float], float]:
        """ABBA rounds; the values for a and b, and a's server CPU seconds per round."""
        first: list[float] = []
        second: list[float] = []
        cpu: list[float] = []
        for i in range(rounds):
            order = (a, b) if i % 2 == 0 else (b, a)
            for export in order:
                before = cpu_seconds(a.process.pid) if export is a else 0.0
                value = measure(export)
                if export is a:
                    cpu.append(cpu_seconds(a.process.pid) - before)
                    first.append(value)
                else:
                    second.append(value)
        return first, second, median(cpu)

    # -- NBD ---------------------------------------------------------------------------
    def nbd(self) -> None:
        size = self.config.size
        report = self.report
        with self.exports() as (ours, kit):
            report.row(f"== NBD: {ours.name} vs {kit.name}, {size >> 20} MiB image")
            report.row(f"{'test':34} {'ours':>12} {'nbdkit':>12} {'ratio':>7} {'cpu/op':>9}")
            if self.config.rounds > 1:
                report.row(
                    f"{'':34} (min..max below a figure: {self.config.seq_rounds} rounds "
                    f"sequential, {self.config.rounds} random)"
                )
            with open(self.source, "rb") as handle:  # warm the page cache
                while handle.read(16 * MiB):
                    pass

            def convert_in(export: Export) -> float:
                secs = timed(
                    "qemu-img",
                    "convert",
                    "-n",
                    "-f",
                    "raw",
                    "-O",
                    "raw",
                    str(self.source),
                    export.uri,
                )
                return size / secs

            def convert_out(export: Export) -> float:
                out = self.tmpfs / "out.raw"
                secs = timed("qemu-img", "convert", "-f", "raw", "-O", "raw", export.uri, str(out))
                out.unlink()
                return size / secs

            log("first pass: allocating the image and the plain file (not measured)")
            convert_in(ours)
            convert_in(kit)
            for label, measure in (
                ("seq write (convert in)", convert_in),
                ("seq read (convert out)", convert_out),
            ):
                mine, theirs, cpu = self._rounds(measure, ours, kit, self.config.seq_rounds)
                ratio = median(mine) / median(theirs)
                chunks = size / (2 * MiB)
                report.row(
                    f"{label:34} {median(mine) / MiB:8.0f} MiB/s {median(theirs) / MiB:6.0f} MiB/s "
                    f"{ratio:6.2f}x {cpu / chunks * 1e6:6.0f}us*"
                )
                self._spread(mine, theirs, MiB)
                report.target(
                    f"NBD {label} >= {SEQ_TARGET:.0%} of nbdkit",
                    ratio >= SEQ_TARGET,
                    f"{ratio:.2f}x",
                )
            self._check_same_data(ours)

            ops = self.config.bench_ops
            results: dict[str, float] = {}
            for kind in ("write", "read"):

                def bench(export: Export, write: bool = kind == "write") -> float:
                    return qemu_bench(export.uri, ops, write, self.config.flush_interval)

                mine, theirs, cpu = self._rounds(bench, ours, kit, self.config.rounds)
                results[kind] = median(mine)
                report.row(
                    f"{'4k rand ' + kind + ' (qemu-img bench)':34} {median(mine):7.0f} IOPS "
                    f"{median(theirs):7.0f} IOPS {median(mine) / median(theirs):6.2f}x "
                    f"{cpu / ops * 1e6:6.1f}us"
                )
                self._spread(mine, theirs)
            for kind in ("randwrite", "randread"):

                def fio_nbd(export: Export, rw: str = kind) -> float:
                    job = {
                        "ioengine": "nbd",
                        "uri": export.uri,
                        "rw": rw,
                        "bs": "4k",
                        "iodepth": 16,
                        "size": size,
                        "number_ios": self.config.fio_ops,
                        "norandommap": 1,
                    }
                    return fio(job)["iops"]

                mine, theirs, cpu = self._rounds(fio_nbd, ours, kit, self.config.rounds)
                report.row(
                    f"{'4k ' + kind + ' (fio nbd engine)':34} {median(mine):7.0f} IOPS "
                    f"{median(theirs):7.0f} IOPS {median(mine) / median(theirs):6.2f}x "
                    f"{cpu / self.config.fio_ops * 1e6:6.1f}us"
                )
                self._spread(mine, theirs)
        report.row("   cpu/op: the csi-rbd server's CPU time per request (* per 2 MiB chunk)")
        reference, source = self.librbd_reference()
        for kind in ("write", "read"):
            ratio = results[kind] / reference[kind]
            report.target(
                f"NBD 4k random {kind} >= {RAND_TARGET:.0f}x librbd ({source})",
                ratio >= RAND_TARGET,
                f"{results[kind]:.0f} IOPS = {ratio:.2f}x of {reference[kind]:.0f}",
            )

    def _spread(self, mine: list[float], theirs: list[float], unit: float = 1.0) -> None:
        if len(mine) > 1:
            self.report.row(
                f"{'':34} ({min(mine) / unit:.0f}..{max(mine) / unit:.0f})"
                f" ({min(theirs) / unit:.0f}..{max(theirs) / unit:.0f})"
            )

    def _check_same_data(self, ours: Export) -> None:
        out = self.tmpfs / "check.raw"
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", ours.uri, str(out))
        same = (
            subprocess.run(["cmp", "-s", str(out), str(self.source)], check=False).returncode == 0
        )
        out.unlink()
        self.report.row(f"   data check: the export holds exactly the source: {same}")
        if not same:
            self.report.errors.append("the export does not hold the source data")

    # -- librbd ------------------------------------------------------------------------
    ceph_conf: Path | None = None
    _librbd: tuple[dict[str, float], str] | None = None

    def librbd_reference(self) -> tuple[dict[str, float], str]:
        """The librbd figures every section compares with, and where they come from:
        measured once per run (by the first section that asks) when ``--ceph-conf``
        names a cluster, else the recorded ones."""
        if self._librbd is None:
            self._librbd = self._librbd_reference()
        return self._librbd

    def _librbd_reference(self) -> tuple[dict[str, float], str]:
        if self.ceph_conf is None:
            return LIBRBD_RECORDED, "recorded figure; no Ceph cluster given"
        try:
            return self._measure_librbd(self.ceph_conf), f"measured on {self.ceph_conf}"
        except Exception as exc:
            log(f"librbd measurement failed: {exc}")
            return LIBRBD_RECORDED, f"recorded figure; measuring failed: {exc}"

    def _measure_librbd(self, conf: Path) -> dict[str, float]:
        env = ["-c", str(conf)]
        name = f"nbd-bench-{os.getpid()}"
        run("rbd", *env, "create", "--size", f"{self.config.size >> 20}M", f"rbd/{name}")
        try:
            figures = {}
            for kind, rw in (("write", "randwrite"), ("read", "randread")):
                job = {
                    "ioengine": "rbd",
                    "pool": "rbd",
                    "rbdname": name,
                    "clientname": "admin",
                    "rw": rw,
                    "bs": "4k",
                    "iodepth": 16,
                    "size": self.config.size,
                    "number_ios": self.config.fio_ops,
                }
                os.environ["CEPH_CONF"] = str(conf)
                figures[kind] = fio(job)["iops"]
            return figures
        finally:
            run("rbd", *env, "rm", "--no-progress", f"rbd/{name}")

    # -- FUSE/loop ---------------------------------------------------------------------
    def fuse(self) -> None:
        from csi_rbd.engine.base import ImageLocator
        from csi_rbd.node import loop
        from csi_rbd.node.stager import NodeStager
        from csi_rbd.node.stash import load_stash

        size = self.config.size
        report = self.report
        reference, source = self.librbd_reference()  # measured before anything is staged
        self.create_image("rbd/fuse", size)
        stager = NodeStager(self.base / "state", [self.base])
        staging = self.base / "staging"
        locator = ImageLocator("bench", "native", "rbd", "fuse", str(self.data_dir))
        plain_file = self.base / "loop.raw"
        with open(plain_file, "wb") as handle:
            handle.truncate(size)
        log("staging a block volume (attach daemon + loop device)")
        stager.stage(
            "bench-vol",
            locator,
            staging,
            block=True,
            fstype=None,
            mkfs_options="",
            mount_flags=[],
            read_only=False,
            cache=self.cache,
        )
        plain = loop.attach(plain_file)
        try:
            record = load_stash(staging)
            assert record is not None and record.loop_device is not None
            devices = {"fuse": record.loop_device, "plain": plain.path}
            report.row(f"== FUSE/loop block device (cache {self.cache}) vs loop on a plain file")
            report.row(f"{'test':34} {'fuse':>12} {'plain':>12} {'ratio':>7}")
            jobs = [
                (
                    "4k randwrite qd16",
                    {
                        "rw": "randwrite",
                        "bs": "4k",
                        "iodepth": 16,
                        "number_ios": self.config.fio_ops,
                    },
                    "iops",
                ),
                (
                    "4k randread qd16",
                    {
                        "rw": "randread",
                        "bs": "4k",
                        "iodepth": 16,
                        "number_ios": self.config.fio_ops,
                    },
                    "iops",
                ),
                (
                    "1M seq write qd4",
                    {"rw": "write", "bs": "1M", "iodepth": 4, "size": self.config.fio_seq},
                    "bw",
                ),
                (
                    "1M seq read qd4",
                    {"rw": "read", "bs": "1M", "iodepth": 4, "size": self.config.fio_seq},
                    "bw",
                ),
            ]
            for label, job, metric in jobs:
                values: dict[str, list[float]] = {"fuse": [], "plain": []}
                for i in range(self.config.rounds):
                    for which in ("fuse", "plain") if i % 2 == 0 else ("plain", "fuse"):
                        full = {
                            "ioengine": "libaio",
                            "direct": 1,
                            "filename": devices[which],
                            "size": size,
                            "norandommap": 1,
                            **job,
                        }
                        values[which].append(fio(full)[metric])
                fuse, flat = median(values["fuse"]), median(values["plain"])
                unit, scale = ("IOPS", 1.0) if metric == "iops" else ("MiB/s", 1 / MiB)
                report.row(
                    f"{label:34} {fuse * scale:7.0f} {unit} {flat * scale:7.0f} {unit} "
                    f"{fuse / flat:6.2f}x"
                )
                if metric == "iops":
                    kind = "write" if "write" in label else "read"
                    ratio = fuse / reference[kind]
                    report.target(
                        f"FUSE/loop 4k random {kind} >= {RAND_TARGET:.0f}x librbd ({source})",
                        ratio >= RAND_TARGET,
                        f"{fuse:.0f} IOPS = {ratio:.2f}x of {reference[kind]:.0f} (informational)",
                    )
        finally:
            loop.detach(plain.path, plain.backing_file)
            stager.unstage("bench-vol", staging)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB, one round, fewer ops")
    parser.add_argument(
        "--cache", choices=("none", "writethrough", "writeback"), default="writeback"
    )
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where data goes")
    parser.add_argument("--sections", default="nbd,fuse")
    parser.add_argument("--ceph-conf", type=Path, help="measure librbd on this cluster")
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = Config.make(args.quick)
    args.dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="nbd-bench-", dir=args.dir))
    report = Report()
    report.row(
        f"# nbd_bench: {'quick' if args.quick else 'full'}, cache {args.cache}, "
        f"{config.rounds} round(s), {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, "
        f"data in {base}"
    )
    bench = Bench(config, base, args.cache, report)
    bench.ceph_conf = args.ceph_conf
    try:
        bench.prepare()
        sections = {"nbd": bench.nbd, "fuse": bench.fuse}
        for name in args.sections.split(","):
            try:
                sections[name]()
            except Exception as exc:
                log(f"section {name} failed: {exc}")
                report.errors.append(f"{name}: {type(exc).__name__}: {exc}")
    finally:
        bench.close()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    report.row(f"== targets (load at the end {os.getloadavg()[0]:.1f})")
    for status, name, detail in report.targets:
        report.row(f"{status:4}  {name}: {detail}")
    for error in report.errors:
        report.row(f"ERROR {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
