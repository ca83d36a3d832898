"""Crash tests of the native engine: SIGKILL a worker process, then check the data directory.

The promise under test: after ``kill -9`` of any process at any moment the
catalog opens cleanly, every write acknowledged by a completed ``flush()``
reads back, and an interrupted create, snapshot, clone, resize, rollback or
flatten either happened or did not.

``crash_worker.py`` runs a seeded sequence of operations and journals each
one before it starts and after it returns. The test kills it (after a random
delay, a random delay into a long operation, or at an exact step inside one
operation) and replays the journal into a model of every image:

* head: each 512-byte block must hold the value it had at the last completed
  flush of that image, or a value written (or discarded) after it, and
  nothing else;
* snapshots and images made by completed operations exist and read exactly
  what they held; an operation in flight at the kill either happened
  completely or not at all (the whole pool must match one of the two);
* clones name their parent as the model says, and the parent's children
  links agree with what the clones refer to;

and then reopens every image for writing: the lock is free, no temp files
or uncommitted versions are left, writes, snapshots and garbage collection
keep working and nothing that was there changes.

Environment knobs for soak runs: ``CSI_RBD_CRASH_ITERATIONS`` (random kills,
default 42), ``CSI_RBD_CRASH_SEED`` (first seed, default 1000),
``CSI_RBD_CRASH_ONLY`` (comma-separated iteration numbers to re-run alone,
as a failure report names them) and ``CSI_RBD_CRASH_STEPS`` (kill points per
operation in the step test, default 0 = every step).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from csi_rbd.engine.native import RBD, Image, ImageNotFound, Rados, gc
from csi_rbd.engine.native.objects import ObjectStore, parse_version_name
from tests.engine import crash_worker
from tests.engine.crash_worker import BLOCK, POOL, block_bytes, decode_block, pattern

WORKER = Path(crash_worker.__file__)
ITERATIONS = int(os.environ.get("CSI_RBD_CRASH_ITERATIONS", "42"))
BASE_SEED = int(os.environ.get("CSI_RBD_CRASH_SEED", "1000"))
STEP_SAMPLES = int(os.environ.get("CSI_RBD_CRASH_STEPS", "0"))
ONLY = [int(i) for i in os.environ.get("CSI_RBD_CRASH_ONLY", "").split(",") if i.strip()]
METADATA_OPS = {"create", "snap", "rmsnap", "resize", "rollback", "clone", "flatten", "remove"}


# -- the model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapModel:
    size: int
    blocks: tuple[int, ...]
    parent: tuple[str, str] | None


@dataclass
class ImageModel:
    size: int
    order: int
    blocks: list[int]  # latest value (write id, 0 = zeros) of every 512-byte block
    durable: list[int]  # the values at the last completed flush or metadata operation
    since: dict[int, set[int]] = field(default_factory=dict)  # values written after that
    snaps: dict[str, SnapModel] = field(default_factory=dict)
    parent: tuple[str, str] | None = None

    def allowed(self, block: int) -> set[int]:
        return {self.durable[block], *self.since.get(block, ())}

    def settle(self) -> None:
        self.durable = list(self.blocks)
        self.since = {}

    def set_blocks(self, first: int, count: int, value: int) -> None:
        for block in range(first, first + count):
            self.blocks[block] = value
            self.since.setdefault(block, set()).add(value)

    def cut(self, size: int) -> None:
        n = size // BLOCK
        self.blocks = (self.blocks + [0] * n)[:n]
        self.durable = (self.durable + [0] * n)[:n]
        self.since = {b: v for b, v in self.since.items() if b < n}
        self.size = size


World = dict[str, ImageModel]


def apply(world: World, op: dict[str, Any]) -> None:
    """What a completed operation does to the model."""
    kind, name = op["op"], op["img"]
    if kind == "create":
        n = op["size"] // BLOCK
        world[name] = ImageModel(op["size"], op["order"], [0] * n, [0] * n)
        return
    if kind == "clone":
        parent = world[op["parent"]]
        snap = parent.snaps[op["snap"]]
        blocks = list(snap.blocks)
        world[name] = ImageModel(
            snap.size, parent.order, blocks, list(blocks), parent=(op["parent"], op["snap"])
        )
        return
    image = world[name]
    if kind == "write":
        image.set_blocks(op["off"] // BLOCK, op["len"] // BLOCK, op["wid"])
    elif kind == "discard":
        first = op["off"] // BLOCK
        count = min(op["len"] // BLOCK, len(image.blocks) - first)
        image.set_blocks(first, count, 0)
    elif kind == "flush":
        image.settle()
    elif kind == "snap":
        image.snaps[op["snap"]] = SnapModel(image.size, tuple(image.blocks), image.parent)
    elif kind == "rmsnap":
        del image.snaps[op["snap"]]
    elif kind == "resize":
        image.cut(op["size"])
    elif kind == "rollback":
        snap = image.snaps[op["snap"]]
        image.size, image.parent = snap.size, snap.parent
        image.blocks = list(snap.blocks)
        image.settle()
    elif kind == "flatten":  # deep-flatten (a default feature): snapshots are detached too
        image.parent = None
        image.snaps = {n: dataclasses.replace(s, parent=None) for n, s in image.snaps.items()}
    elif kind == "remove":
        del world[name]
    else:
        raise AssertionError(f"unknown operation {kind}")


@dataclass
class Replay:
    worlds: list[World]  # the states the pool may be in: one, or before/after an operation
    in_flight: dict[str, Any] | None
    done: int
    finished: bool


def read_journal(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            records.append(json.loads(line))  # a torn last line would be a worker bug
    return records


def replay(records: list[dict[str, Any]]) -> Replay:
    world: World = {}
    in_flight: dict[str, Any] | None = None
    done = 0
    finished = False
    for record in records:
        kind = record["t"]
        if kind == "error":
            pytest.fail(f"the worker's operation {record['n']} raised:\n{record['error']}")
        if kind == "begin":
            assert in_flight is None, record
            in_flight = record["op"]
        elif kind == "done":
            assert in_flight is not None, record
            apply(world, in_flight)
            if in_flight["op"] in METADATA_OPS and in_flight["img"] in world:
                world[in_flight["img"]].settle()
            in_flight = None
            done = record["n"]
        elif kind == "end":
            finished = True
    if in_flight is None:
        return Replay([world], None, done, finished)
    if in_flight["op"] in METADATA_OPS:
        after = copy.deepcopy(world)
        apply(after, in_flight)
        return Replay([world, after], in_flight, done, finished)
    if in_flight["op"] in ("write", "discard"):
        apply(world, in_flight)  # each block: old or new
    return Replay([world], in_flight, done, finished)


# -- observing a data directory ----------------------------------------------------------------


def expected_bytes(blocks: tuple[int, ...] | list[int]) -> bytes:
    return b"".join(block_bytes(wid, b) for b, wid in enumerate(blocks))


def block_value(data: bytes, block: int) -> int | None:
    """The write id a block read back holds (0 for zeros), None for anything else."""
    what = decode_block(data)
    if what == "zeros":
        return 0
    if what == "garbage":
        return None
    wid, at = what[1:].split("@")
    return int(wid) if int(at) == block else None


def describe(data: bytes, block: int) -> str:
    what = decode_block(data[block * BLOCK : (block + 1) * BLOCK])
    return f"block {block}: {what}"


@dataclass
class Observed:
    size: int
    head: bytes
    snaps: dict[str, bytes]
    parent: tuple[str, str, str] | None


def observe(ioctx: Any) -> dict[str, Observed]:
    seen = {}
    for name in RBD().list(ioctx):
        with Image(ioctx, name, read_only=True) as image:
            size = image.size()
            head = image.read(0, size)
            try:
                parent: tuple[str, str, str] | None = image.parent_info()
            except ImageNotFound:
                parent = None
            snap_names = [s["name"] for s in image.list_snaps()]
        snaps = {}
        for snap in snap_names:
            with Image(ioctx, name, snapshot=snap) as view:
                snaps[snap] = view.read(0, view.size())
        seen[name] = Observed(size, head, snaps, parent)
    return seen


def differing_blocks(got: bytes, want: bytes) -> list[int]:
    return [
        b
        for b in range(len(want) // BLOCK)
        if got[b * BLOCK : (b + 1) * BLOCK] != want[b * BLOCK : (b + 1) * BLOCK]
    ]


def compare(world: World, seen: dict[str, Observed]) -> list[str]:
    """Everything in which the pool differs from the model (empty: it matches)."""
    problems = []
    if set(world) != set(seen):
        problems.append(f"images {sorted(seen)}, expected {sorted(world)}")
    for name in sorted(set(world) & set(seen)):
        model, got = world[name], seen[name]
        if got.size != model.size:
            problems.append(f"{name}: size {got.size}, expected {model.size}")
            continue
        expected_parent = (POOL, *model.parent) if model.parent else None
        if got.parent != expected_parent:
            problems.append(f"{name}: parent {got.parent}, expected {expected_parent}")
        if set(got.snaps) != set(model.snaps):
            problems.append(f"{name}: snapshots {sorted(got.snaps)}, want {sorted(model.snaps)}")
        for snap in sorted(set(got.snaps) & set(model.snaps)):
            blocks = model.snaps[snap].blocks
            want = expected_bytes(blocks)
            if got.snaps[snap] == want:
                continue
            bad = differing_blocks(got.snaps[snap], want)
            if len(got.snaps[snap]) != len(want) or not bad:
                problems.append(f"{name}@{snap}: {len(got.snaps[snap])} bytes, want {len(want)}")
            else:
                problems.append(
                    f"{name}@{snap}: {len(bad)} blocks differ, first "
                    f"{describe(got.snaps[snap], bad[0])}, expected w{blocks[bad[0]]}"
                )
        bad_blocks = []
        for block in range(model.size // BLOCK):
            value = block_value(got.head[block * BLOCK : (block + 1) * BLOCK], block)
            if value is None or value not in model.allowed(block):
                bad_blocks.append(block)
        if bad_blocks:
            first = bad_blocks[0]
            problems.append(
                f"{name}: {len(bad_blocks)} head blocks hold neither the flushed value nor a "
                f"later one, first {describe(got.head, first)}, allowed "
                f"{sorted(model.allowed(first))}"
            )
    return problems


def catalog_problems(data_dir: Path, settled: bool = False) -> list[str]:
    """Integrity of the catalog itself and of the children links."""
    problems = []
    db = sqlite3.connect(f"file:{data_dir / POOL / 'catalog.db'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        check = db.execute("PRAGMA integrity_check").fetchone()[0]
        if check != "ok":
            problems.append(f"catalog integrity_check: {check}")
        images = {r["id"]: r for r in db.execute("SELECT * FROM images")}
        names = {i: r["name"] for i, r in images.items()}
        refs: set[tuple[str, int, str]] = set()
        for row in images.values():
            if row["parent_image"] is not None:
                refs.add((row["parent_image"], row["parent_snap"], row["id"]))
            if settled and row["pending_seq"] is not None:
                problems.append(f"image {row['name']}: pending_seq {row['pending_seq']} left")
        for row in db.execute("SELECT * FROM snapshots WHERE parent_image IS NOT NULL"):
            refs.add((row["parent_image"], row["parent_snap"], row["image_id"]))
        links = {
            (r["parent_image"], r["parent_snap"], r["child_image"])
            for r in db.execute("SELECT * FROM children")
        }
        for parent, snap, child in sorted(refs - links):
            problems.append(
                f"clone {names.get(child)} reads {names.get(parent)}@{snap} but the parent "
                "has no children link (its snapshot could be deleted under it)"
            )
        live = {(parent, snap) for parent, snap, child in links & refs if child in images}
        for row in db.execute("SELECT * FROM snapshots WHERE trashed = 1"):
            if (row["image_id"], row["id"]) not in live:
                problems.append(
                    f"trashed snapshot {names.get(row['image_id'])}@{row['id']} ({row['name']}) "
                    "has no clone left and was never purged (its data leaks)"
                )
        for parent, snap, child in sorted(links - refs):
            if child in images:
                problems.append(
                    f"stale children link: {names.get(parent)}@{snap} still lists "
                    f"{names[child]}, which no longer refers to it (unprotect and removal of "
                    "the snapshot are refused forever)"
                )
    finally:
        db.close()
    return problems


# -- running the worker ------------------------------------------------------------------------


@dataclass
class Kill:
    """When to kill: ``delay`` s after ``ready`` or after the first ``begin`` of ``after_op``;
    or from inside, at ``step`` within the ``step_ops`` operations."""

    delay: float | None = None
    after_op: str | None = None
    step: int | None = None
    step_ops: str = ""


def prepare(data_dir: Path) -> None:
    cluster = Rados(data_dir=data_dir)
    cluster.connect()
    cluster.shutdown()


def run_worker(
    tmp: Path, seed: int, scenario: str, kill: Kill, op: str | None = None
) -> tuple[Path, Replay, int]:
    data_dir, journal = tmp / "data", tmp / "journal"
    prepare(data_dir)
    command = [
        sys.executable,
        str(WORKER),
        "--data-dir",
        str(data_dir),
        "--journal",
        str(journal),
        "--seed",
        str(seed),
        "--scenario",
        scenario,
    ]
    if op is not None:
        command += ["--op", op]
    if kill.step_ops:
        command += ["--kill-ops", kill.step_ops]
    if kill.step is not None:
        command += ["--kill-step", str(kill.step)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if kill.delay is not None:
            _kill_later(proc, journal, kill)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        stderr = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
    if proc.returncode not in (0, -signal.SIGKILL):
        pytest.fail(f"worker exited with {proc.returncode}:\n{stderr[-4000:]}")
    return data_dir, replay(read_journal(journal)), proc.returncode


def _kill_later(proc: subprocess.Popen[bytes], journal: Path, kill: Kill) -> None:
    trigger = '"t": "ready"' if kill.after_op is None else f'"op": "{kill.after_op}"'
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if journal.exists() and trigger in journal.read_text():
            break
        time.sleep(0.001)
    assert kill.delay is not None
    time.sleep(kill.delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)


# -- checking after the kill -------------------------------------------------------------------


def verify(data_dir: Path, result: Replay, context: str) -> None:
    cluster = Rados(data_dir=data_dir)
    cluster.connect()  # the catalog opens cleanly
    try:
        ioctx = cluster.open_ioctx(POOL)
        seen = observe(ioctx)
        attempts = [compare(world, seen) for world in result.worlds]
        if all(attempts):
            flight = f"in flight: {result.in_flight}" if result.in_flight else "nothing in flight"
            report = "\n".join(
                f"  against state {i} ({'before' if i == 0 else 'after'} the operation):\n    "
                + "\n    ".join(problems)
                for i, problems in enumerate(attempts)
            )
            pytest.fail(f"{context}: {result.done} operations done, {flight}\n{report}")
        problems = catalog_problems(data_dir)
        assert not problems, f"{context}: " + "; ".join(problems)
        reopen_and_use(ioctx, seen, context)
        problems = catalog_problems(data_dir, settled=True)
        assert not problems, f"{context}, after reopening: " + "; ".join(problems)
    finally:
        cluster.shutdown()


def image_directory(ioctx: Any, name: str) -> tuple[Path, Any]:
    record = ioctx.catalog.image_by_name(name)
    return Path(ioctx.image_directory(record.id)), record


def leftovers(ioctx: Any, name: str) -> list[str]:
    """Temp files and versions of uncommitted epochs in an image's folder."""
    directory, record = image_directory(ioctx, name)
    epochs = set(ioctx.catalog.epochs(record.id))
    found = []
    for entry in os.listdir(directory):
        if entry.startswith(".tmp"):
            found.append(entry)
            continue
        parsed = parse_version_name(entry)
        if parsed is not None and (parsed[1] > record.seq or parsed[1] not in epochs):
            found.append(f"{entry} (epoch {parsed[1]}, seq {record.seq})")
    return found


def unreachable(ioctx: Any, name: str) -> list[str]:
    """Versions that no view reads (garbage a collection should have removed)."""
    directory, record = image_directory(ioctx, name)
    snap_ids = [s.id for s in ioctx.catalog.snapshots(record.id, include_trashed=True)]
    found = []
    for objno, versions in ObjectStore(directory).scan().items():
        keep = {gc.newest(versions, lambda e: e <= record.seq)}
        for snap_id in snap_ids:
            keep.add(gc.newest(versions, lambda e, s=snap_id: e < s))
        found += [f"{objno}.{v.epoch}" for v in versions if v not in keep]
    return found


def reopen_and_use(ioctx: Any, seen: dict[str, Observed], context: str) -> None:
    """Every image takes a writer again and keeps working; nothing that was there changes."""
    rng = random.Random(context)
    wid = 900_000_000
    for name in sorted(seen):
        got = seen[name]
        with Image(ioctx, name) as image:
            image.lock_acquire()  # the killed writer's lock is gone; leftovers are cleaned
            left = leftovers(ioctx, name)
            assert not left, f"{context}: {name} after a writer reopened it: {left}"
            head = bytearray(got.head)
            if got.size >= BLOCK:
                blocks = rng.randint(1, min(24, got.size // BLOCK))
                offset = rng.randrange(0, got.size // BLOCK - blocks + 1) * BLOCK
                wid += 1
                first = pattern(wid, offset, blocks * BLOCK)
                image.write(first, offset)
                image.flush()
                assert image.read(offset, len(first)) == first, f"{context}: {name} write"
                image.create_snap("after-crash")
                wid += 1
                second = pattern(wid, offset, blocks * BLOCK)
                image.write(second, offset)
                image.flush()
                with Image(ioctx, name, snapshot="after-crash") as snap:
                    assert snap.read(offset, len(first)) == first, f"{context}: {name} copy-up"
                image.remove_snap("after-crash")
                head[offset : offset + len(second)] = second
            record = ioctx.catalog.image_by_name(name)
            gc.collect_garbage(ioctx, record.id)
            garbage = unreachable(ioctx, name)
            assert not garbage, f"{context}: {name} keeps unreachable versions {garbage[:8]}"
            assert image.read(0, got.size) == bytes(head), f"{context}: {name} head changed"
    for name in sorted(seen):  # after everyone's GC: snapshots and clones unchanged
        for snap, data in seen[name].snaps.items():
            with Image(ioctx, name, snapshot=snap) as view:
                assert view.read(0, len(data)) == data, f"{context}: {name}@{snap} changed"


# -- the tests ---------------------------------------------------------------------------------

SCENARIOS = ("mixed", "copyup", "clones", "flatten", "rollback", "resize")
LONG_OP = {"flatten": "flatten", "rollback": "rollback", "resize": "resize", "clones": "flatten"}
STEP_OPS = {
    "mixed": "snap,rmsnap,resize,rollback,clone,flatten,remove,create",
    "copyup": "write,discard,snap,rmsnap",
    "clones": "write,clone,flatten,remove,rmsnap",
    "flatten": "flatten",
    "rollback": "rollback",
    "resize": "resize",
}


def plan(iteration: int) -> tuple[int, str, Kill]:
    """Seed, scenario and kill policy of one iteration; all derived from the seed."""
    seed = BASE_SEED + iteration
    rng = random.Random(seed)
    scenario = SCENARIOS[iteration % len(SCENARIOS)]
    policy = (iteration // len(SCENARIOS)) % 3
    if policy == 0:
        return seed, scenario, Kill(delay=rng.uniform(0.01, 0.35))
    if policy == 1 and scenario in LONG_OP:
        return seed, scenario, Kill(delay=rng.uniform(0.0, 0.12), after_op=LONG_OP[scenario])
    step = rng.choice((rng.randint(1, 12), rng.randint(1, 60), rng.randint(1, 400)))
    return seed, scenario, Kill(step=step, step_ops=STEP_OPS[scenario])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_random_kills(tmp_path: Path) -> None:
    """Kill a worker ITERATIONS times at random moments; every state must be consistent.

    All iterations run even when one fails; the failure lists every bad seed.
    """
    started = time.monotonic()
    stats: dict[str, int] = {}
    failures = []
    for iteration in ONLY or range(ITERATIONS):
        seed, scenario, kill = plan(iteration)
        context = f"seed={seed} scenario={scenario} kill={kill}"
        work = tmp_path / f"i{iteration}"
        work.mkdir()
        try:
            data_dir, result, code = run_worker(work, seed, scenario, kill)
            flight = result.in_flight["op"] if result.in_flight else "idle"
            stats[flight if code else "end"] = stats.get(flight if code else "end", 0) + 1
            verify(data_dir, result, context)
        except (AssertionError, pytest.fail.Exception) as exc:
            failures.append(f"iteration {iteration}, {context}:\n{exc}")
    elapsed = time.monotonic() - started
    print(f"\n{ITERATIONS} kills in {elapsed:.1f}s; in flight at the kill: {sorted(stats.items())}")
    if failures:
        pytest.fail(
            f"{len(failures)} of {ITERATIONS} iterations failed:\n\n" + "\n\n".join(failures)
        )


def _step_points(total: int) -> list[int]:
    if STEP_SAMPLES <= 0 or total <= STEP_SAMPLES:
        return list(range(1, total + 1))
    rng = random.Random(total)
    # the last steps are the commits and the clean-up after them: always kill there
    last = list(range(max(1, total - 3), total + 1))
    return sorted({1, *last, *rng.sample(range(1, total + 1), STEP_SAMPLES)})


ONE_KILL_OPS = {
    "create": "create",
    "write": "write",
    "discard": "discard",
    "snap": "snap",
    "rmsnap": "rmsnap",
    "rmsnap-trash": "rmsnap",
    "shrink": "resize",
    "grow": "resize",
    "rollback": "rollback",
    "rollback-clone": "rollback",
    "clone": "clone",
    "flatten": "flatten",
    "flatten-last": "flatten",
    "remove-clone": "remove",
    "remove-last-child": "remove",
}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("op", crash_worker.ONE_OPS)
def test_kill_at_every_step(tmp_path: Path, op: str) -> None:
    """Kill one operation just before each of its steps (renames, fsyncs, commits, ...)."""
    kill_ops = ONE_KILL_OPS[op]
    count = tmp_path / "count"
    count.mkdir()
    data_dir, result, code = run_worker(count, 7, "one", Kill(step_ops=kill_ops), op=op)
    assert code == 0 and result.finished
    verify(data_dir, result, f"op={op} without a kill")
    total = read_journal(count / "journal")[-1]["steps"]
    assert total > 0, f"{op}: the operation made no counted step"
    for step in _step_points(total):  # the last step: done, but not acknowledged
        work = tmp_path / f"k{step}"
        work.mkdir()
        data_dir, result, code = run_worker(
            work, 7, "one", Kill(step=step, step_ops=kill_ops), op=op
        )
        assert code == -signal.SIGKILL, f"op={op}: step {step} of {total} was not reached"
        verify(data_dir, result, f"op={op} killed before step {step} of {total}")


FIRST_CONNECT_KILLS = {
    # where a first connect to a new data directory dies: the fsid written or not yet,
    # the pool folder made, the catalog file created but without its tables
    "fsid-link": "os.link",
    "create_pool": "csi_rbd.engine.native.rados.Rados.create_pool",
    "catalog": "csi_rbd.engine.native.rados.Catalog",
    "schema": "csi_rbd.engine.native.catalog.Catalog.transaction",
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "point",
    sorted(FIRST_CONNECT_KILLS),
)
def test_kill_during_first_connect(tmp_path: Path, point: str) -> None:
    """The first process on a node dies while it sets up the data directory."""
    data_dir = tmp_path / "data"
    target = FIRST_CONNECT_KILLS[point]
    module, _, attribute = target.rpartition(".")
    code = (
        "import importlib, operator, os, signal\n"
        "from csi_rbd.engine.native import Rados\n"
        f"path = {module!r}.split('.')\n"
        "owner = importlib.import_module(path[0])\n"
        "for part in path[1:]:\n"
        "    owner = getattr(owner, part, None) or importlib.import_module(\n"
        "        owner.__name__ + '.' + part)\n"
        "def die(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        f"setattr(owner, {attribute!r}, die)\n"
        f"Rados(data_dir={str(data_dir)!r}).connect()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    cluster = Rados(data_dir=data_dir)
    cluster.connect()
    try:
        ioctx = cluster.open_ioctx(POOL)  # the default pool is there, as on a clean start
        RBD().create(ioctx, "after", 1 << 20, order=12)
        with Image(ioctx, "after") as image:
            image.write(b"x" * BLOCK, 0)
            image.flush()
            assert image.read(0, BLOCK) == b"x" * BLOCK
    finally:
        cluster.shutdown()
