#!/usr/bin/env python3
"""Crash-test worker for the native engine: seeded random operations until killed.

``tests/engine/test_crash.py`` starts this script as a subprocess, kills it
with SIGKILL at some moment (or lets it kill itself, see ``--kill-step``),
and then checks the data directory against the worker's journal.

The worker only drives the engine; it keeps no model of the data. Every
operation is described in the journal *before* it starts and acknowledged
*after* it returns, so the parent can rebuild what must be on disk:

* ``{"t": "ready"}`` once connected;
* ``{"t": "begin", "n": N, "op": {...}}`` before operation ``N``;
* ``{"t": "done", "n": N}`` after it returned (fsynced after a flush and
  after every metadata operation, so the acknowledgement itself is durable);
* ``{"t": "end"}`` when the run finished, or ``{"t": "error", ...}`` (exit
  status 3) when the engine raised.

Data written is never in the journal: block ``b`` (512 bytes) of write
``wid`` holds :func:`block_bytes` ``(wid, b)``, so any block read back names
the write it came from (see :func:`decode_block`).

Operations (``op`` field): create, write, discard, flush, snap, rmsnap,
resize, rollback, clone, flatten, remove. Before any metadata operation on
an image the worker flushes that image, as librbd does before a snapshot.

With ``--kill-step K`` the worker counts the engine's state-changing calls
(renames, unlinks, symlinks, fsyncs, pwrites, truncates, copies, hole
punches, catalog transactions and generation bumps) made while one of the
``--kill-ops`` operations runs, and SIGKILLs itself just before the K-th,
which puts a kill exactly between two steps of an operation. With
``--kill-ops`` alone it only counts, and the ``end`` record says how many
steps there were.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

BLOCK = 512
_HEAD = struct.Struct("<8sQQ")
_MAGIC = b"crashwkr"
POOL = "rbd"
SCENARIOS = ("mixed", "copyup", "clones", "flatten", "rollback", "resize", "one")
# the single operations of scenario "one", run on a small fixture (see Worker.one)
ONE_OPS = (
    "create",
    "write",
    "discard",
    "snap",
    "rmsnap",
    "rmsnap-trash",
    "shrink",
    "grow",
    "rollback",
    "rollback-clone",
    "clone",
    "flatten",
    "flatten-last",
    "remove-clone",
    "remove-last-child",
)


def block_bytes(wid: int, blockno: int) -> bytes:
    """The 512 bytes write ``wid`` puts into image block ``blockno`` (wid 0: zeros)."""
    if wid == 0:
        return bytes(BLOCK)
    head = _HEAD.pack(_MAGIC, wid, blockno)
    filler = hashlib.blake2b(head, digest_size=64).digest()
    unit = head + filler[: 64 - len(head)]
    return unit * (BLOCK // len(unit))


def pattern(wid: int, offset: int, length: int) -> bytes:
    first = offset // BLOCK
    return b"".join(block_bytes(wid, first + i) for i in range(length // BLOCK))


def decode_block(data: bytes) -> str:
    """What a 512-byte block holds: 'zeros', 'w<wid>@<block>' or 'garbage'."""
    if data == bytes(len(data)):
        return "zeros"
    try:
        magic, wid, blockno = _HEAD.unpack_from(data)
    except struct.error:
        return "garbage"
    if magic == _MAGIC and data == block_bytes(wid, blockno):
        return f"w{wid}@{blockno}"
    return "garbage"


# -- kill injection --------------------------------------------------------------------------

_real_fsync = os.fsync


class _Stepper:
    """Counts state-changing engine calls inside armed operations; SIGKILLs at the K-th."""

    def __init__(self, kill_step: int | None) -> None:
        self.kill_step = kill_step
        self.count = 0
        self.armed = False

    def step(self) -> None:
        if not self.armed:
            return
        self.count += 1
        if self.kill_step is not None and self.count >= self.kill_step:
            os.kill(os.getpid(), signal.SIGKILL)

    def install(self) -> None:
        from csi_rbd.engine.native import catalog, header, sparse

        def counted(fn: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                self.step()
                return fn(*args, **kwargs)

            return wrapper

        for name in (
            "rename",
            "replace",
            "unlink",
            "symlink",
            "fsync",
            "pwrite",
            "ftruncate",
            "copy_file_range",
            "makedirs",
        ):
            setattr(os, name, counted(getattr(os, name)))
        shutil.rmtree = counted(shutil.rmtree)
        sparse.punch_hole = counted(sparse.punch_hole)
        header.ImageHeader.bump_generation = counted(header.ImageHeader.bump_generation)
        original = catalog.Catalog.transaction

        @contextlib.contextmanager
        def transaction(catalog_self: Any) -> Iterator[Any]:
            self.step()
            with original(catalog_self) as db:
                yield db
            self.step()

        catalog.Catalog.transaction = transaction  # type: ignore[method-assign]


# -- the plan: what exists, so that every operation chosen is valid --------------------------


@dataclass
class PlanImage:
    size: int
    order: int
    snaps: list[str] = field(default_factory=list)
    parent: tuple[str, str] | None = None
    ever_cloned: bool = False


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        from csi_rbd.engine.native import RBD, Rados

        self.args = args
        self.rng = random.Random(args.seed)
        self.journal = os.open(args.journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.cluster = Rados(data_dir=args.data_dir)
        self.cluster.connect()
        self.ioctx = self.cluster.open_ioctx(POOL)
        self.rbd = RBD()
        self.handles: dict[str, Any] = {}
        self.plan: dict[str, PlanImage] = {}
        # (image, snapshot) -> (size, parent) when the snapshot was taken
        self.snap_info: dict[tuple[str, str], tuple[int, tuple[str, str] | None]] = {}
        self.n = 0
        self.wid = args.seed * 100_000
        self.names = 0
        self.in_fixture = False
        self.stepper = _Stepper(args.kill_step)
        self.kill_ops = set(args.kill_ops.split(",")) if args.kill_ops else None
        if args.kill_step is not None or args.kill_ops:
            self.stepper.install()

    # -- journal ----------------------------------------------------------------------------
    def log(self, record: dict[str, Any], sync: bool = False) -> None:
        os.write(self.journal, (json.dumps(record, sort_keys=True) + "\n").encode())
        if sync:
            _real_fsync(self.journal)

    def handle(self, name: str) -> Any:
        from csi_rbd.engine.native import Image

        image = self.handles.get(name)
        if image is None:
            image = self.handles[name] = Image(self.ioctx, name)
        return image

    def run(self, op: dict[str, Any]) -> None:
        """Journal, perform and acknowledge one operation."""
        self.n += 1
        kind = op["op"]
        self.log({"t": "begin", "n": self.n, "op": op})
        wanted = self.kill_ops is None or kind in self.kill_ops
        self.stepper.armed = wanted and not self.in_fixture
        try:
            self.perform(op)
            self.stepper.step()  # a kill here: done, but not acknowledged
        except Exception as exc:
            self.stepper.armed = False
            self.log({"t": "error", "n": self.n, "error": traceback.format_exc()}, sync=True)
            print(f"operation {self.n} {op} failed: {exc!r}", file=sys.stderr)
            sys.exit(3)
        self.stepper.armed = False
        self.log({"t": "done", "n": self.n}, sync=kind not in ("write", "discard"))

    def perform(self, op: dict[str, Any]) -> None:
        kind, name = op["op"], op["img"]
        if kind == "create":
            self.rbd.create(self.ioctx, name, op["size"], order=op["order"])
        elif kind == "write":
            self.handle(name).write(pattern(op["wid"], op["off"], op["len"]), op["off"])
        elif kind == "discard":
            self.handle(name).discard(op["off"], op["len"])
        elif kind == "flush":
            self.handle(name).flush()
        elif kind == "snap":
            self.handle(name).create_snap(op["snap"])
        elif kind == "rmsnap":
            self.handle(name).remove_snap(op["snap"])
        elif kind == "resize":
            self.handle(name).resize(op["size"])
        elif kind == "rollback":
            self.handle(name).rollback_to_snap(op["snap"])
        elif kind == "clone":
            self.rbd.clone(self.ioctx, op["parent"], op["snap"], self.ioctx, name)
        elif kind == "flatten":
            self.handle(name).flatten()
        elif kind == "remove":
            image = self.handles.pop(name, None)
            if image is not None:
                image.close()
            self.rbd.remove(self.ioctx, name)
        else:
            raise ValueError(f"unknown operation {kind}")

    # -- operations with their plan bookkeeping ---------------------------------------------
    def new_name(self, prefix: str) -> str:
        self.names += 1
        return f"{prefix}{self.names}"

    def create(self, size: int | None = None, order: int | None = None) -> str:
        name = self.new_name("img")
        order = order if order is not None else self.rng.choice((12, 13, 14, 16))
        if size is None:
            size = self.rng.randrange(64, 8 * 1024) * BLOCK  # 32 KiB .. 4 MiB, not aligned
        self.run({"op": "create", "img": name, "size": size, "order": order})
        self.plan[name] = PlanImage(size, order)
        return name

    def write(self, name: str, blocks: int | None = None, off: int | None = None) -> None:
        size = self.plan[name].size
        total = size // BLOCK
        if total == 0:
            return
        if blocks is None:
            blocks = self.rng.choice((1, 1, 2, 3, 8, 16, 64, 200))
        blocks = min(blocks, total)
        start = self.rng.randrange(0, total - blocks + 1) if off is None else off // BLOCK
        self.wid += 1
        self.run(
            {
                "op": "write",
                "img": name,
                "off": start * BLOCK,
                "len": blocks * BLOCK,
                "wid": self.wid,
            }
        )

    def discard(self, name: str) -> None:
        size = self.plan[name].size
        total = size // BLOCK
        if total == 0:
            return
        blocks = min(total, self.rng.choice((1, 4, 8, 32, 128, 512)))
        start = self.rng.randrange(0, total - blocks + 1)
        if self.rng.random() < 0.5:  # align to whole objects now and then
            object_blocks = (1 << self.plan[name].order) // BLOCK
            start -= start % object_blocks
        self.run({"op": "discard", "img": name, "off": start * BLOCK, "len": blocks * BLOCK})

    def flush(self, name: str) -> None:
        self.run({"op": "flush", "img": name})

    def snap(self, name: str) -> str:
        self.flush(name)
        snap = self.new_name("s")
        self.run({"op": "snap", "img": name, "snap": snap})
        image = self.plan[name]
        image.snaps.append(snap)
        self.snap_info[(name, snap)] = (image.size, image.parent)
        return snap

    def rmsnap(self, name: str) -> None:
        snaps = self.plan[name].snaps
        if not snaps:
            return
        snap = self.rng.choice(snaps)
        self.flush(name)
        self.run({"op": "rmsnap", "img": name, "snap": snap})
        snaps.remove(snap)

    def resize(self, name: str, size: int | None = None) -> None:
        image = self.plan[name]
        if size is None:
            factor = self.rng.choice((0.3, 0.5, 0.8, 1.25, 1.6, 2.0))
            size = max(BLOCK, min(int(image.size * factor) // BLOCK * BLOCK, 8 << 20))
        self.flush(name)
        self.run({"op": "resize", "img": name, "size": size})
        image.size = size

    def rollback(self, name: str) -> None:
        snaps = self.plan[name].snaps
        if not snaps:
            return
        snap = self.rng.choice(snaps)
        self.flush(name)
        self.run({"op": "rollback", "img": name, "snap": snap})
        image = self.plan[name]
        image.size, image.parent = self.snap_info[(name, snap)]

    def clone(self, parent: str) -> str | None:
        image = self.plan[parent]
        if not image.snaps:
            return None
        snap = self.rng.choice(image.snaps)
        child = self.new_name("clone")
        self.run({"op": "clone", "img": child, "parent": parent, "snap": snap})
        image.ever_cloned = True
        size = self.snap_info[(parent, snap)][0]
        self.plan[child] = PlanImage(size, image.order, parent=(parent, snap))
        return child

    def flatten(self, name: str) -> None:
        if self.plan[name].parent is None:
            return
        self.flush(name)
        self.run({"op": "flatten", "img": name})
        self.plan[name].parent = None
        for (image, snap), (size, _) in list(self.snap_info.items()):
            if image == name:  # deep-flatten (a default feature) detaches snapshots too
                self.snap_info[(image, snap)] = (size, None)

    def remove(self, name: str) -> None:
        image = self.plan[name]
        if image.snaps or image.ever_cloned:
            return
        self.run({"op": "remove", "img": name})
        del self.plan[name]

    # -- scenarios --------------------------------------------------------------------------
    def fill(self, name: str, chunk_blocks: int = 128) -> None:
        """Write every block of an image, in chunks of ``chunk_blocks``."""
        total = self.plan[name].size // BLOCK
        for start in range(0, total, chunk_blocks):
            self.wid += 1
            count = min(chunk_blocks, total - start)
            self.run(
                {
                    "op": "write",
                    "img": name,
                    "off": start * BLOCK,
                    "len": count * BLOCK,
                    "wid": self.wid,
                }
            )

    def random_op(self, weights: dict[str, float]) -> None:
        kinds = list(weights)
        kind = self.rng.choices(kinds, [weights[k] for k in kinds])[0]
        names = sorted(self.plan)
        if kind == "create" or not names:
            if len(self.plan) < 6:
                self.create()
            return
        name = self.rng.choice(names)
        image = self.plan[name]
        if kind == "write":
            self.write(name)
        elif kind == "discard":
            self.discard(name)
        elif kind == "flush":
            self.flush(name)
        elif kind == "snap" and len(image.snaps) < 4:
            self.snap(name)
        elif kind == "rmsnap":
            self.rmsnap(name)
        elif kind == "resize":
            self.resize(name)
        elif kind == "rollback":
            self.rollback(name)
        elif kind == "clone" and len(self.plan) < 6:
            self.clone(name)
        elif kind == "flatten":
            self.flatten(name)
        elif kind == "remove" and len(self.plan) > 1:
            self.remove(name)

    def scenario(self, name: str) -> None:
        rng = self.rng
        mixed = {
            "create": 1,
            "write": 30,
            "discard": 6,
            "flush": 8,
            "snap": 4,
            "rmsnap": 2,
            "resize": 2,
            "rollback": 2,
            "clone": 2,
            "flatten": 1.5,
            "remove": 1,
        }
        if name == "mixed":
            self.create()
            weights = mixed
        elif name == "copyup":
            image = self.create(size=rng.randrange(512, 4096) * BLOCK, order=rng.choice((12, 14)))
            for _ in range(20):
                self.write(image, blocks=rng.choice((8, 64)))
            weights = {"write": 30, "flush": 6, "snap": 6, "rmsnap": 3, "discard": 4}
        elif name == "clones":
            image = self.create(size=rng.randrange(512, 4096) * BLOCK, order=rng.choice((12, 13)))
            self.fill(image, chunk_blocks=rng.choice((64, 256)))
            self.snap(image)
            self.clone(image)
            weights = dict(mixed, clone=6, write=40, create=0.2)
        elif name == "flatten":
            order = rng.choice((12, 12, 13))
            image = self.create(size=rng.randrange(1024, 4096) * BLOCK, order=order)
            self.fill(image, chunk_blocks=256)
            self.snap(image)
            child = self.clone(image)
            assert child is not None
            for _ in range(rng.randrange(0, 6)):
                self.write(child, blocks=rng.choice((1, 8, 64)))
            if rng.random() < 0.5:
                self.snap(child)
                self.flatten(child)
            weights = dict(mixed, clone=5, flatten=5)
        elif name == "rollback":
            order = rng.choice((12, 13, 14))
            image = self.create(size=rng.randrange(512, 4096) * BLOCK, order=order)
            self.fill(image, chunk_blocks=256)
            self.snap(image)
            for _ in range(rng.randrange(1, 12)):
                self.write(image, blocks=rng.choice((8, 64, 256)))
            self.rollback(image)
            weights = dict(mixed, rollback=8, snap=6, write=40)
        elif name == "resize":
            order = rng.choice((12, 13, 14))
            image = self.create(size=rng.randrange(1024, 8192) * BLOCK, order=order)
            self.fill(image, chunk_blocks=256)
            if rng.random() < 0.5:
                self.snap(image)
                self.resize(image, rng.randrange(1, self.plan[image].size // BLOCK) * BLOCK)
            weights = dict(mixed, resize=10, write=40)
        elif name == "one":
            self.one(self.args.op)
            return
        else:
            raise ValueError(f"unknown scenario {name}")
        while self.n < self.args.max_ops:
            self.random_op(weights)

    def one(self, op: str) -> None:
        """A small fixture, then one operation (the only one a kill step can hit).

        Fixture: ``base`` (order 12, five objects and a bit, every block
        written) with snapshots ``old`` and ``new`` and changes in between;
        ``clone`` of ``base@old`` with one write and its own snapshot
        ``mine``; ``last`` of ``base@old`` with one write and no snapshot.
        """
        self.in_fixture = True
        base = self.create(size=(5 * 8 + 3) * BLOCK, order=12)
        self.fill(base, chunk_blocks=16)
        old = self.snap(base)
        self.write(base, blocks=8, off=4 * BLOCK)
        self.run({"op": "discard", "img": base, "off": 16 * BLOCK, "len": 8 * BLOCK})
        new = self.snap(base)
        self.write(base, blocks=12, off=0)
        clone = self.clone_of(base, old)
        self.write(clone, blocks=1, off=9 * BLOCK)
        mine = self.snap(clone)
        self.write(clone, blocks=2, off=30 * BLOCK)
        last = self.clone_of(base, old)
        self.write(last, blocks=1, off=17 * BLOCK)
        for name in sorted(self.plan):
            self.flush(name)
        self.in_fixture = False
        if op == "create":
            self.create(size=64 * BLOCK, order=12)
        elif op == "write":
            self.write(base, blocks=30, off=5 * BLOCK)
            self.flush(base)
        elif op == "discard":
            self.run({"op": "discard", "img": base, "off": 3 * BLOCK, "len": 30 * BLOCK})
            self.flush(base)
        elif op == "snap":
            self.snap(base)
        elif op == "rmsnap":
            self.flush(base)
            self.run({"op": "rmsnap", "img": base, "snap": new})
        elif op == "rmsnap-trash":
            self.flush(base)
            self.run({"op": "rmsnap", "img": base, "snap": old})
        elif op == "shrink":
            self.resize(base, 13 * BLOCK)
        elif op == "grow":
            self.resize(base, 100 * BLOCK)
        elif op == "rollback":
            self.flush(base)
            self.run({"op": "rollback", "img": base, "snap": old})
        elif op == "rollback-clone":
            self.in_fixture = True
            self.flatten(clone)
            self.write(clone, blocks=20, off=0)
            self.in_fixture = False
            self.flush(clone)
            self.run({"op": "rollback", "img": clone, "snap": mine})
        elif op == "clone":
            self.clone_of(base, new)
        elif op == "flatten":
            self.flatten(clone)
        elif op == "flatten-last":
            self.flatten(last)
        elif op == "remove-clone":
            self.run({"op": "remove", "img": last})
        elif op == "remove-last-child":  # the purge of a trashed snapshot
            self.in_fixture = True
            self.run({"op": "rmsnap", "img": base, "snap": old})  # trashed: clones use it
            self.run({"op": "rmsnap", "img": clone, "snap": mine})
            self.run({"op": "remove", "img": clone})
            self.in_fixture = False
            self.run({"op": "remove", "img": last})  # the last child: "old" goes for good
        else:
            raise ValueError(f"unknown operation {op}")

    def clone_of(self, parent: str, snap: str) -> str:
        child = self.new_name("clone")
        self.run({"op": "clone", "img": child, "parent": parent, "snap": snap})
        self.plan[parent].ever_cloned = True
        size = self.snap_info[(parent, snap)][0]
        self.plan[child] = PlanImage(size, self.plan[parent].order, parent=(parent, snap))
        return child


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--journal", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--scenario", choices=SCENARIOS, default="mixed")
    parser.add_argument("--max-ops", type=int, default=400)
    parser.add_argument("--op", choices=ONE_OPS, default="write", help="for scenario 'one'")
    parser.add_argument("--kill-step", type=int, default=None)
    parser.add_argument("--kill-ops", default="", help="comma-separated operation kinds")
    args = parser.parse_args(argv)
    worker = Worker(args)
    worker.log({"t": "ready", "pid": os.getpid()}, sync=True)
    worker.scenario(args.scenario)
    worker.log({"t": "end", "steps": worker.stepper.count}, sync=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
