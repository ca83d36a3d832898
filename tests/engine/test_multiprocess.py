"""Two (or more) processes on one pool of the native engine.

The promise under test: one writer per image across processes (a second
writer gets ``ImageBusy``; read-only opens and snapshots are always allowed),
snapshots taken from another process while an image is being written are
immutable points in time, and processes sharing a pool see each other's
flushed data and metadata changes.

Children are this very file run as a script (``python test_multiprocess.py
ROLE CONFIG``), never forked from pytest: a forked child would share the
parent's open file descriptions and with them its OFD locks.

* ``agent`` executes JSON commands read from stdin, one per line, and
  answers each on stdout (open an image, call a method of a handle or of
  ``RBD``), with the monotonic time before and after the call, so the test
  can drive two processes step by step;
* ``writer`` writes in a loop until a stop file appears, and journals every
  write acknowledged by a completed ``flush()`` with its start and end time
  (``time.monotonic`` is one clock for every process on the machine);
* ``builder`` creates images, snapshots and clones on its own and prints a
  manifest of what it made;
* ``clone_reader`` reads (and writes) a clone while the parent's head changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from csi_rbd.engine.native import (
    RBD,
    RBD_FEATURE_DEEP_FLATTEN,
    RBD_FEATURES_DEFAULT,
    Image,
    ImageNotFound,
    Rados,
)

POOL = "rbd"
BLOCK = 512
ORDER = 12
OBJ = 1 << ORDER
SCRIPT = Path(__file__).resolve()
_RECORD = struct.Struct("<QQ")

# -- data patterns -------------------------------------------------------------------------------


def payload(tag: int, length: int) -> bytes:
    """``length`` bytes that say ``tag`` everywhere (never all zeros for tag > 0)."""
    unit = _RECORD.pack(tag, tag ^ 0x5A5A5A5A5A5A5A5A)
    return (unit * (length // len(unit) + 1))[:length]


def record(n: int, slot: int, length: int) -> bytes:
    """Write ``n`` of the slot writer: (n, slot) repeated."""
    return _RECORD.pack(n, slot) * (length // _RECORD.size)


def decode_record(data: bytes, slot: int) -> int | None:
    """The ``n`` a slot piece holds, 0 if it is zeros, None if torn or foreign."""
    if data == bytes(len(data)):
        return 0
    n, got_slot = _RECORD.unpack_from(data)
    if got_slot != slot or data != record(n, slot, len(data)):
        return None
    return int(n)


def slot_range(slot: int) -> tuple[int, int]:
    """Slot ``k`` straddles the boundary between objects ``k`` and ``k + 1``."""
    return (slot + 1) * OBJ - BLOCK, 2 * BLOCK


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- child processes -------------------------------------------------------------------------------


def _connect(data_dir: str) -> tuple[Rados, Any]:
    cluster = Rados(data_dir=data_dir)
    cluster.connect()
    return cluster, cluster.open_ioctx(POOL)


def _pause_at(at: int, directory: str) -> Any:
    """A progress callback that stops at step ``at`` until the test says go on."""

    def on_progress(done: int, total: int) -> None:
        if done == at:
            Path(directory, "paused").touch()
            while not Path(directory, "resume").exists():
                time.sleep(0.001)

    return on_progress


def _decode_arg(arg: Any) -> Any:
    if isinstance(arg, dict) and "pause_at" in arg:
        return _pause_at(*arg["pause_at"])
    if isinstance(arg, dict) and "payload" in arg:
        tag, length = arg["payload"]
        return payload(tag, length)
    if isinstance(arg, dict) and "hex" in arg:
        return bytes.fromhex(arg["hex"])
    return arg


def _encode_result(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"sha": sha(value), "len": len(value), "hex": value.hex()}
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "__next__"):
        return list(value)
    return value


def agent_main(config: dict[str, Any]) -> None:
    """Answer one JSON command per stdin line on stdout."""
    cluster = Rados(data_dir=config["data_dir"], lock_timeout=config.get("lock_timeout", 30.0))
    cluster.connect()
    ioctx = cluster.open_ioctx(POOL)
    handles: dict[str, Image] = {}
    rbd = RBD()
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        args = [_decode_arg(a) for a in command.get("a", [])]
        kwargs = {k: _decode_arg(v) for k, v in command.get("kw", {}).items()}
        answer: dict[str, Any] = {"t0": time.monotonic()}
        try:
            if op == "open":
                handles[command["h"]] = Image(ioctx, *args, **kwargs)
                result: Any = None
            elif op == "do":
                result = getattr(handles[command["h"]], command["m"])(*args, **kwargs)
            elif op == "rbd":
                result = getattr(rbd, command["m"])(ioctx, *args, **kwargs)
            elif op == "close":
                handles.pop(command["h"]).close()
                result = None
            elif op == "exit":
                break
            else:
                raise ValueError(f"unknown op {op}")
            answer["ok"] = _encode_result(result)
        except Exception as exc:
            answer["error"] = type(exc).__name__
            answer["message"] = str(exc)
        answer["t1"] = time.monotonic()
        print(json.dumps(answer), flush=True)
    for handle in handles.values():
        handle.close()
    cluster.shutdown()


def writer_main(config: dict[str, Any]) -> None:
    """Write, flush, journal; until the stop file appears."""
    cluster, ioctx = _connect(config["data_dir"])
    image = Image(ioctx, config["image"])
    image.lock_acquire()
    mode = config["mode"]
    slots = config.get("slots", 1)
    stop = Path(config["stop"])
    rng = random.Random(config.get("seed", 0))
    with open(config["journal"], "a", buffering=1) as journal:
        journal.write(json.dumps({"ready": os.getpid()}) + "\n")
        n = 0
        while not stop.exists():
            n += 1
            entry: dict[str, Any] = {"n": n, "t0": time.monotonic()}
            if mode == "slots":  # (n, slot) into slot n % slots, one write per record
                slot = n % slots
                offset, length = slot_range(slot)
                image.write(record(n, slot, length), offset)
                entry["slot"] = slot
            elif mode == "tail":  # a slot, then the last block of whatever the size is now
                slot = n % slots
                offset, length = slot_range(slot)
                image.write(record(n, slot, length), offset)
                entry["slot"] = slot
                size = image.size()
                image.write(payload(n, BLOCK), size - BLOCK)
                entry["tail"] = size - BLOCK
            elif mode == "churn":  # discard an object, then fill it again
                objno = rng.randrange(slots)
                image.discard(objno * OBJ, OBJ)
                time.sleep(rng.choice((0, 0, 0.0002, 0.001)))
                image.write(payload(n, OBJ), objno * OBJ)
                entry["obj"] = objno
            elif mode == "parent":  # overwrite whole objects of a clone's parent
                objno = n % slots
                image.write(payload(n, OBJ), objno * OBJ)
                entry["obj"] = objno
                if n % 25 == 0:  # snapshots of our own come and go: copy-ups and GC
                    image.create_snap(f"own{n}")
                    if n > 25:
                        image.remove_snap(f"own{n - 25}")
            else:
                raise ValueError(mode)
            image.flush()
            entry["t1"] = time.monotonic()
            journal.write(json.dumps(entry) + "\n")
    image.close()
    cluster.shutdown()


def builder_main(config: dict[str, Any]) -> None:
    """Create images, snapshots and clones of our own next to another builder."""
    start = config["start"]
    while time.time() < start:
        time.sleep(0.001)
    cluster, ioctx = _connect(config["data_dir"])
    rbd = RBD()
    prefix = config["prefix"]
    rng = random.Random(prefix)
    manifest: dict[str, Any] = {}
    for i in range(config["images"]):
        name = f"{prefix}-img{i}"
        size = rng.randrange(8, 64) * OBJ
        rbd.create(ioctx, name, size, order=ORDER)
        snaps = {}
        with Image(ioctx, name) as image:
            for round_ in range(3):
                for _ in range(rng.randrange(1, 8)):
                    offset = rng.randrange(0, size // BLOCK) * BLOCK
                    length = min(size - offset, rng.randrange(1, 16) * BLOCK)
                    image.write(
                        payload(hash((name, round_, offset)) & 0xFFFFFF | 1, length), offset
                    )
                image.flush()
                image.create_snap(f"s{round_}")
                snaps[f"s{round_}"] = sha(image.read(0, size))
            image.remove_snap("s1")
            del snaps["s1"]
            head = sha(image.read(0, size))
        clone = f"{prefix}-clone{i}"
        rbd.clone(ioctx, name, "s0", ioctx, clone)
        with Image(ioctx, clone) as child:
            child.write(payload(7, BLOCK), 0)
            child.flush()
            clone_head = sha(child.read(0, size))
            if i % 2:
                child.flatten()
        manifest[name] = {"size": size, "head": head, "snaps": snaps}
        manifest[clone] = {"size": size, "head": clone_head, "snaps": {}}
        if i % 3 == 2:
            rbd.remove(ioctx, clone)
            del manifest[clone]
    print(json.dumps(manifest), flush=True)
    cluster.shutdown()


def clone_reader_main(config: dict[str, Any]) -> None:
    """Read a clone over and over (writing into it now and then) while its parent changes."""
    cluster, ioctx = _connect(config["data_dir"])
    image = Image(ioctx, config["image"])
    size = image.size()
    expected = bytearray(Path(config["expected"]).read_bytes())
    stop = Path(config["stop"])
    rng = random.Random(3)
    reads, writes, mismatches = 0, 0, []
    while not stop.exists():
        got = image.read(0, size)
        reads += 1
        if got != expected:
            first = next(i for i in range(size) if got[i] != expected[i])
            mismatches.append({"read": reads, "offset": first})
        if rng.random() < 0.3:
            offset = rng.randrange(0, size // BLOCK) * BLOCK
            data = payload(10_000 + writes, BLOCK)
            image.write(data, offset)  # copy-up from the parent snapshot
            image.flush()
            expected[offset : offset + BLOCK] = data
            writes += 1
    final = image.read(0, size)
    print(
        json.dumps(
            {"reads": reads, "writes": writes, "mismatches": mismatches[:20], "final": sha(final)}
        ),
        flush=True,
    )
    image.close()
    cluster.shutdown()


ROLES = {
    "agent": agent_main,
    "writer": writer_main,
    "builder": builder_main,
    "clone_reader": clone_reader_main,
}


# -- driving children from the test ------------------------------------------------------------


def spawn(role: str, config: dict[str, Any], stdin: bool = False) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), role, json.dumps(config)],
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


_pending: dict[subprocess.Popen[bytes], bytes] = {}


def _readline(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    """One line of a child's stdout, or TimeoutError; never blocks past ``timeout``."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buffer = _pending.pop(proc, b"")
    while b"\n" not in buffer:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            _pending[proc] = buffer
            raise TimeoutError(f"no answer from pid {proc.pid} within {timeout}s")
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            stderr = proc.stderr.read().decode() if proc.stderr else ""
            raise EOFError(f"pid {proc.pid} exited ({proc.wait()}):\n{stderr[-3000:]}")
        buffer += chunk
    line, _, rest = buffer.partition(b"\n")
    if rest:
        _pending[proc] = rest
    return line


class Agent:
    """A child process that runs engine calls for the test, one at a time."""

    def __init__(self, data_dir: Path, lock_timeout: float = 30.0) -> None:
        config = {"data_dir": str(data_dir), "lock_timeout": lock_timeout}
        self.proc = spawn("agent", config, stdin=True)
        self.pid = json.loads(_readline(self.proc, 30))["ready"]

    def send(self, op: str, *args: Any, timeout: float = 60, **fields: Any) -> dict[str, Any]:
        self.start(op, *args, **fields)
        return self.answer(timeout)

    def start(self, op: str, *args: Any, **fields: Any) -> None:
        """Send a command without waiting for its answer (see :meth:`answer`)."""
        assert self.proc.stdin is not None
        command = {"op": op, "a": list(args), **fields}
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        self.proc.stdin.flush()

    def answer(self, timeout: float = 60) -> dict[str, Any]:
        answer: dict[str, Any] = json.loads(_readline(self.proc, timeout))
        return answer

    def ok(self, op: str, *args: Any, **fields: Any) -> Any:
        answer = self.send(op, *args, **fields)
        assert "error" not in answer, f"{op} {args} {fields}: {answer}"
        return answer["ok"]

    def open(self, handle: str, name: str, **kwargs: Any) -> None:
        self.ok("open", name, h=handle, kw=kwargs)

    def do(self, handle: str, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.ok("do", *args, h=handle, m=method, kw=kwargs)

    def try_do(self, handle: str, method: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.send("do", *args, h=handle, m=method, kw=kwargs)

    def rbd(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.ok("rbd", *args, m=method, kw=kwargs)

    def exit(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.write(b'{"op": "exit"}\n')
                self.proc.stdin.flush()
            self.proc.wait(timeout=30)
        self.close_pipes()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.close_pipes()

    def close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def pat(tag: int, length: int) -> dict[str, Any]:
    """A payload argument for an agent (built on the other side)."""
    return {"payload": [tag, length]}


def new_agent(agents: list[Agent], data_dir: Path, lock_timeout: float = 30.0) -> Agent:
    agent = Agent(data_dir, lock_timeout)
    agents.append(agent)
    return agent


class Loop:
    """A looping child (writer, clone reader) stopped by a file."""

    def __init__(self, tmp: Path, role: str, config: dict[str, Any], name: str) -> None:
        self.stop = tmp / f"{name}.stop"
        self.journal = tmp / f"{name}.journal"
        self.config = dict(config, stop=str(self.stop), journal=str(self.journal))
        self.proc = spawn(role, self.config)

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.journal.exists() and self.journal.read_text().strip():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.005)
        raise AssertionError(f"{self.config} did not start: {self.finish()}")

    def entries(self) -> list[dict[str, Any]]:
        lines = self.journal.read_text().splitlines() if self.journal.exists() else []
        return [json.loads(line) for line in lines if line.strip()][1:]  # without "ready"

    def finish(self) -> str:
        self.stop.touch()
        try:
            out, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        assert self.proc.returncode == 0, f"{self.config}: exit {self.proc.returncode}\n{err!r}"
        return out.decode()


# -- (a) one writer per image --------------------------------------------------------------------


def _assert_busy(answer: dict[str, Any], what: str) -> None:
    assert answer.get("error") == "ImageBusy", f"{what}: expected ImageBusy, got {answer}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["exit", "close", "lock_release", "sigkill"])
def test_second_writer_is_busy_until_first_lets_go(
    data_dir: Path, local: Any, agents: list[Agent], how: str
) -> None:
    RBD().create(local, "img", 16 * OBJ, order=ORDER)
    a, b = new_agent(agents, data_dir), new_agent(agents, data_dir)
    a.open("w", "img")
    a.do("w", "write", pat(1, OBJ), 0)
    a.do("w", "flush")
    assert a.do("w", "is_exclusive_lock_owner") is True

    b.open("w", "img")  # opening for writing is fine; writing is not
    _assert_busy(b.try_do("w", "write", pat(2, OBJ), OBJ), "second writer's write")
    _assert_busy(b.try_do("w", "lock_acquire"), "second writer's lock_acquire")
    _assert_busy(b.try_do("w", "discard", 0, OBJ), "second writer's discard")
    assert b.do("w", "is_exclusive_lock_owner") is False
    remove = b.send("rbd", "img", m="remove")
    assert remove.get("error") in ("ImageBusy", "ImageHasSnapshots"), remove

    # read-only opens and snapshots are always allowed
    b.open("ro", "img", read_only=True)
    assert b.do("ro", "read", 0, 16)["hex"] == payload(1, 16).hex()
    assert b.try_do("ro", "write", pat(3, 16), 0).get("error") == "ReadOnlyImage"
    b.do("w", "create_snap", "from-b")
    a.do("w", "write", pat(4, OBJ), 0)  # the writer goes on after B's snapshot
    a.do("w", "flush")
    b.open("snap", "img", snapshot="from-b")
    assert b.do("snap", "read", 0, 16)["hex"] == payload(1, 16).hex()
    assert b.do("ro", "read", 0, 16)["hex"] == payload(4, 16).hex()
    _assert_busy(b.try_do("w", "write", pat(2, OBJ), OBJ), "second writer after a snapshot")

    if how == "exit":
        a.exit()
    elif how == "close":
        a.ok("close", h="w")
    elif how == "lock_release":
        a.do("w", "lock_release")
        assert a.do("w", "is_exclusive_lock_owner") is False
    else:
        a.kill()
    b.do("w", "write", pat(5, OBJ), OBJ)
    b.do("w", "flush")
    assert b.do("w", "is_exclusive_lock_owner") is True
    assert b.do("ro", "read", 0, 16)["hex"] == payload(4, 16).hex()
    assert b.do("ro", "read", OBJ, 16)["hex"] == payload(5, 16).hex()
    if how in ("close", "lock_release"):  # A is still alive: now it is the one refused
        if how == "close":
            a.open("w", "img")
        _assert_busy(a.try_do("w", "write", pat(6, 16), 0), "first writer after handing over")
        b.ok("close", h="w")
        a.do("w", "write", pat(6, 16), 0)  # and it can take the lock back
        a.do("w", "flush")
    with Image(local, "img", read_only=True) as image:
        want = payload(6, 16) if how in ("close", "lock_release") else payload(4, 16)
        assert image.read(0, 16) == want
        assert image.read(OBJ, 16) == payload(5, 16)


@pytest.mark.timeout(120)
def test_killed_writer_leaves_no_lock_and_no_leftovers(
    data_dir: Path, local: Any, agents: list[Agent]
) -> None:
    """SIGKILL a writer right after a copy-up-heavy burst; the next writer finds a clean image."""
    RBD().create(local, "img", 64 * OBJ, order=ORDER)
    a = new_agent(agents, data_dir)
    a.open("w", "img")
    a.do("w", "write", pat(1, 64 * OBJ), 0)
    a.do("w", "flush")
    a.do("w", "create_snap", "s")
    a.do("w", "write", pat(2, 64 * OBJ), 0)  # copy-up of every object
    a.do("w", "flush")
    a.kill()
    with Image(local, "img") as image:
        image.lock_acquire()
        assert image.read(0, 64 * OBJ) == payload(2, 64 * OBJ)
        image.write(payload(3, OBJ), 0)
        image.flush()
        directory = Path(local.image_directory(image.id()))
        assert not [n for n in os.listdir(directory) if n.startswith(".tmp")]
    with Image(local, "img", snapshot="s") as snap:
        assert snap.read(0, 64 * OBJ) == payload(1, 64 * OBJ)


# -- (b) snapshots from another process while one writes -------------------------------------------


def _slot_values(data: bytes, slots: int) -> list[int | None]:
    values = []
    for slot in range(slots):
        offset, length = slot_range(slot)
        left = decode_record(data[offset : offset + length // 2], slot)
        right = decode_record(data[offset + length // 2 : offset + length], slot)
        values.append(left if left == right else None)  # None: a write torn across objects
    return values


def _prefix_problems(values: list[int | None], slots: int) -> list[str]:
    """A point in time of one sequential writer: every slot shows the newest write <= max."""
    if None in values:
        return [f"torn or foreign slot in {values}"]
    newest = max(v for v in values if v is not None)
    problems = []
    for slot, value in enumerate(values):
        want = max((n for n in range(1, newest + 1) if n % slots == slot), default=0)
        if value != want:
            problems.append(f"slot {slot} holds write {value}, but write {newest} is there")
    return problems


@pytest.mark.timeout(180)
def test_snapshots_from_another_process_are_points_in_time(
    tmp_path: Path, data_dir: Path, local: Any, agents: list[Agent]
) -> None:
    slots = 6
    RBD().create(local, "img", (slots + 2) * OBJ, order=ORDER)
    config = {"data_dir": str(data_dir), "image": "img", "mode": "slots", "slots": slots}
    writer = Loop(tmp_path, "writer", config, "a")
    writer.wait_ready()
    b = new_agent(agents, data_dir)
    b.open("w", "img")  # not the writer: B never writes, it only takes snapshots
    rng = random.Random(11)
    taken: list[dict[str, Any]] = []
    for i in range(30):
        time.sleep(rng.uniform(0.002, 0.03))
        answer = b.send("do", f"s{i}", h="w", m="create_snap")
        assert "error" not in answer, answer
        b.open(f"s{i}", "img", snapshot=f"s{i}")
        right_after = b.do(f"s{i}", "read", 0, (slots + 2) * OBJ)
        taken.append({"name": f"s{i}", "t0": answer["t0"], "t1": answer["t1"], **right_after})
        b.ok("close", h=f"s{i}")
        if i % 4 == 3:  # removing snapshots while the writer runs: GC next to copy-ups
            b.do("w", "remove_snap", f"s{i - 2}")
            taken = [t for t in taken if t["name"] != f"s{i - 2}"]
    writer.finish()
    acked = writer.entries()
    assert len(acked) > 30, "the writer barely ran"

    problems = []
    for snap in taken:
        with Image(local, "img", snapshot=snap["name"]) as view:
            later = view.read(0, (slots + 2) * OBJ)
        if sha(later) != snap["sha"]:
            problems.append(f"{snap['name']} changed after it was taken")
        values = _slot_values(later, slots)
        problems += [f"{snap['name']}: {p}" for p in _prefix_problems(values, slots)]
        newest = max((v for v in values if v is not None), default=0)
        before = max((e["n"] for e in acked if e["t1"] < snap["t0"]), default=0)
        after = min((e["n"] for e in acked if e["t0"] > snap["t1"]), default=10**9)
        if not before <= newest < after:
            problems.append(
                f"{snap['name']} shows write {newest}; writes up to {before} were flushed "
                f"before it started and {after} began after it returned"
            )
    with Image(local, "img", read_only=True) as image:
        final = _slot_values(image.read(0, (slots + 2) * OBJ), slots)
    last = {e["slot"]: e["n"] for e in acked}
    assert final == [last.get(s, 0) for s in range(slots)], "head lost a flushed write"
    assert not problems, "\n".join(problems)


@pytest.mark.timeout(240)
def test_killing_a_snapshotter_mid_operation_leaves_the_writer_unharmed(
    tmp_path: Path, data_dir: Path, local: Any
) -> None:
    """B takes snapshots and shrinks/grows the tail of an image A is writing, and is
    SIGKILLed at a random moment, over and over. A never notices; every snapshot that
    exists is a point in time of A's writes; the tail was either cut or not."""
    slots, head, full = 6, 8 * OBJ, 16 * OBJ
    RBD().create(local, "img", full, order=ORDER)
    with Image(local, "img") as image:
        image.write(payload(99, full - head), head)  # the tail, which only B touches
        image.flush()
    config = {"data_dir": str(data_dir), "image": "img", "mode": "slots", "slots": slots}
    writer = Loop(tmp_path, "writer", config, "a")
    writer.wait_ready()
    rng = random.Random(12)
    for round_ in range(int(os.environ.get("CSI_RBD_KILL_ROUNDS", "16"))):
        b = Agent(data_dir)
        try:
            b.open("w", "img")
            b.start("do", f"k{round_}", h="w", m="create_snap")
            b.start("do", head, h="w", m="resize")
            b.start("do", full, h="w", m="resize")
            time.sleep(rng.uniform(0.0, 0.02))
        finally:
            b.kill()
    writer.finish()
    acked = writer.entries()
    assert len(acked) > 10, "the writer barely ran"
    with Image(local, "img") as image:
        image.lock_acquire()  # B's leftovers (pending epochs, temp files) are cleaned now
        size = image.size()
        data = image.read(0, size)
        directory = Path(local.image_directory(image.id()))
        snaps = [s["name"] for s in image.list_snaps()]
    assert not [n for n in os.listdir(directory) if n.startswith(".tmp")]
    last = {e["slot"]: e["n"] for e in acked}
    assert _slot_values(data, slots) == [last.get(s, 0) for s in range(slots)], "lost a write"
    assert size in (head, full), size
    tail = data[head:]
    assert tail in (payload(99, len(tail)), bytes(len(tail))), "a shrink was half done"
    problems = []
    for snap in snaps:
        with Image(local, "img", snapshot=snap) as view:
            got = view.read(0, view.size())
        problems += [f"{snap}: {p}" for p in _prefix_problems(_slot_values(got, slots), slots)]
        rest = got[head:]
        if rest not in (payload(99, len(rest)), bytes(len(rest))):
            problems.append(f"{snap}: the tail is half cut")
    assert not problems, "\n".join(problems)


# -- (c) resizes from another process while one writes ---------------------------------------------


@pytest.mark.timeout(180)
def test_grow_from_another_process_while_writing(
    tmp_path: Path, data_dir: Path, local: Any, agents: list[Agent]
) -> None:
    """A writes slots and the last block of whatever the size is; B keeps growing the image."""
    slots, size = 4, 8 * OBJ
    RBD().create(local, "img", size, order=ORDER)
    config = {"data_dir": str(data_dir), "image": "img", "mode": "tail", "slots": slots}
    writer = Loop(tmp_path, "writer", config, "a")
    writer.wait_ready()
    b = new_agent(agents, data_dir)
    b.open("w", "img")
    rng = random.Random(5)
    for _ in range(25):
        time.sleep(rng.uniform(0.002, 0.02))
        size += rng.choice((BLOCK, 3 * BLOCK, OBJ, 5 * OBJ + BLOCK))
        b.do("w", "resize", size)
    writer.finish()
    acked = writer.entries()
    tails = {e["tail"] for e in acked}
    assert len(tails) > 3, f"the writer saw only sizes {tails}: no overlap with the resizes"
    with Image(local, "img", read_only=True) as image:
        assert image.size() == size
        data = image.read(0, size)
    last_slot = {e["slot"]: e["n"] for e in acked}
    assert _slot_values(data, slots) == [last_slot.get(s, 0) for s in range(slots)]
    last_tail: dict[int, int] = {}
    for entry in acked:
        last_tail[entry["tail"]] = entry["n"]
    for offset, n in sorted(last_tail.items()):
        assert data[offset : offset + BLOCK] == payload(n, BLOCK), f"tail write {n} at {offset}"
    written = {o for o in last_tail} | {slot_range(s)[0] for s in range(slots)}
    for offset in range(0, size, BLOCK):  # everything else: zeros
        covered = any(o <= offset < o + 2 * BLOCK for o in written)
        if not covered:
            assert data[offset : offset + BLOCK] == bytes(BLOCK), f"garbage at {offset}"


@pytest.mark.timeout(180)
def test_shrink_and_grow_from_another_process_while_writing(
    tmp_path: Path, data_dir: Path, local: Any, agents: list[Agent]
) -> None:
    """B shrinks and grows the part A does not write; A's flushed writes all stay."""
    slots = 6
    RBD().create(local, "img", 64 * OBJ, order=ORDER)
    with Image(local, "img") as image:
        image.write(payload(99, 56 * OBJ), 8 * OBJ)  # a tail for the shrinks to cut
        image.flush()
        image.create_snap("before")
    config = {"data_dir": str(data_dir), "image": "img", "mode": "slots", "slots": slots}
    writer = Loop(tmp_path, "writer", config, "a")
    writer.wait_ready()
    b = new_agent(agents, data_dir)
    b.open("w", "img")
    rng = random.Random(6)
    for _ in range(12):
        time.sleep(rng.uniform(0.002, 0.02))
        b.do("w", "resize", rng.randrange(8 * OBJ, 40 * OBJ, BLOCK))
        time.sleep(rng.uniform(0.002, 0.02))
        b.do("w", "resize", 64 * OBJ)
    writer.finish()
    acked = writer.entries()
    with Image(local, "img", read_only=True) as image:
        data = image.read(0, 64 * OBJ)
    last = {e["slot"]: e["n"] for e in acked}
    assert _slot_values(data, slots) == [last.get(s, 0) for s in range(slots)]
    with Image(local, "img", snapshot="before") as snap:
        assert snap.read(8 * OBJ, 56 * OBJ) == payload(99, 56 * OBJ)


# -- (d) two processes building in one pool ------------------------------------------------------


@pytest.mark.timeout(180)
def test_two_processes_create_images_and_snapshots_at_once(data_dir: Path, local: Any) -> None:
    start = time.time() + 0.5
    procs = {
        prefix: spawn(
            "builder",
            {"data_dir": str(data_dir), "prefix": prefix, "images": 6, "start": start},
        )
        for prefix in ("p", "q", "r")
    }
    manifests = {}
    for prefix, proc in procs.items():
        out, err = proc.communicate(timeout=150)
        assert proc.returncode == 0, f"builder {prefix}: {err.decode()[-3000:]}"
        manifests.update(json.loads(out))
    assert sorted(RBD().list(local)) == sorted(manifests)
    for name, want in manifests.items():
        with Image(local, name, read_only=True) as image:
            assert image.size() == want["size"]
            assert sha(image.read(0, want["size"])) == want["head"], name
            assert sorted(s["name"] for s in image.list_snaps()) == sorted(want["snaps"])
        for snap, digest in want["snaps"].items():
            with Image(local, name, snapshot=snap) as view:
                assert sha(view.read(0, want["size"])) == digest, f"{name}@{snap}"


def _first_connect(data_dir: Path, start: float, name: str) -> subprocess.Popen[bytes]:
    code = (
        "import sys, time\n"
        "from csi_rbd.engine.native import RBD, Rados\n"
        f"while time.time() < {start}: pass\n"
        f"cluster = Rados(data_dir={str(data_dir)!r})\n"
        "cluster.connect()\n"
        f"RBD().create(cluster.open_ioctx('rbd'), {name!r}, 1 << 20, order=12)\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


@pytest.mark.timeout(180)
def test_two_processes_start_on_a_fresh_data_directory(tmp_path: Path) -> None:
    """Two processes (say, the node plugin and the CLI) connect to a new data directory at once."""
    failures = []
    attempts, racers = 30, ("a", "b", "c")
    for attempt in range(attempts):
        directory = tmp_path / f"fresh{attempt}"
        start = time.time() + 0.15
        procs = [_first_connect(directory, start, name) for name in racers]
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            if proc.returncode:
                failures.append(err.decode().strip().splitlines()[-1])
    total = attempts * len(racers)
    assert not failures, (
        f"{len(failures)} of {total} first connects failed: {sorted(set(failures))}"
    )


# -- (e) read-only opens see another process's flushed data ---------------------------------------


@pytest.mark.timeout(120)
def test_read_only_opens_see_flushed_writes_of_another_process(
    data_dir: Path, local: Any, agents: list[Agent]
) -> None:
    RBD().create(local, "img", 32 * OBJ, order=ORDER)
    a, b = new_agent(agents, data_dir), new_agent(agents, data_dir)
    a.open("w", "img")
    b.open("long", "img", read_only=True)  # opened once, kept across everything A does
    rng = random.Random(8)
    expected = bytearray(32 * OBJ)

    def check(step: str) -> None:
        for handle in ("long", "fresh"):
            if handle == "fresh":
                b.open("fresh", "img", read_only=True)
            got = b.do(handle, "read", 0, len(expected))
            assert got["sha"] == sha(bytes(expected)), f"{handle} handle after {step}"
            assert b.do(handle, "size") == len(expected), f"{handle} size after {step}"
        b.ok("close", h="fresh")

    check("nothing")
    for i in range(1, 41):
        action = rng.choice(("write", "write", "write", "discard", "snap", "shrink-grow"))
        if action == "write":
            offset = rng.randrange(0, len(expected) // BLOCK) * BLOCK
            length = min(len(expected) - offset, rng.randrange(1, 3 * OBJ // BLOCK) * BLOCK)
            a.do("w", "write", pat(i, length), offset)
            expected[offset : offset + length] = payload(i, length)
        elif action == "discard":
            objno = rng.randrange(32)
            a.do("w", "discard", objno * OBJ, OBJ)
            expected[objno * OBJ : (objno + 1) * OBJ] = bytes(OBJ)
        elif action == "snap":
            a.do("w", "create_snap", f"s{i}")
            b.open(f"s{i}", "img", snapshot=f"s{i}")
            assert b.do(f"s{i}", "read", 0, len(expected))["sha"] == sha(bytes(expected))
        else:
            cut = rng.randrange(1, 32) * OBJ - BLOCK
            a.do("w", "resize", cut)
            a.do("w", "resize", len(expected))
            expected[cut:] = bytes(len(expected) - cut)
        a.do("w", "flush")
        check(f"step {i} ({action})")


# -- (f) a clone reads through while the parent's head is written ---------------------------------


@pytest.mark.timeout(180)
def test_clone_reads_through_while_parent_head_is_written(
    tmp_path: Path, data_dir: Path, local: Any
) -> None:
    objects = 24
    RBD().create(local, "parent", objects * OBJ, order=ORDER)
    with Image(local, "parent") as image:
        for objno in range(objects):
            if objno % 5 != 4:  # a few holes: the clone reads zeros there
                image.write(payload(1000 + objno, OBJ), objno * OBJ)
        image.flush()
        image.create_snap("gold")
        golden = image.read(0, objects * OBJ)
    RBD().clone(local, "parent", "gold", local, "child")
    config = {"data_dir": str(data_dir), "image": "parent", "mode": "parent", "slots": objects}
    writer = Loop(tmp_path, "writer", config, "a")
    writer.wait_ready()
    (tmp_path / "golden").write_bytes(golden)
    config = {"data_dir": str(data_dir), "image": "child", "expected": str(tmp_path / "golden")}
    reader = Loop(tmp_path, "clone_reader", config, "b")
    time.sleep(1.5)
    summary = json.loads(reader.finish())
    writer.finish()
    assert len(writer.entries()) > 25, "the parent's writer barely ran"
    assert summary["reads"] > 5
    assert not summary["mismatches"], summary
    with Image(local, "parent", snapshot="gold") as snap:
        assert snap.read(0, objects * OBJ) == golden
    with Image(local, "child", read_only=True) as child:
        assert sha(child.read(0, objects * OBJ)) == summary["final"]


# -- more races: metadata operations and garbage collection next to a writer -----------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "deep",
    [
        pytest.param(True, id="deep-flatten"),
        pytest.param(False, id="no-deep-flatten"),
    ],
)
def test_rollback_from_another_process_during_flatten(
    tmp_path: Path, data_dir: Path, local: Any, agents: list[Agent], deep: bool
) -> None:
    """B rolls the clone back to its first snapshot while A is halfway through a flatten.

    Whichever way it ends, every byte must still be what the parent snapshot
    holds: a clone must never end up detached with objects it has not copied.
    A pauses in its progress callback (outside the barrier) so that B's
    rollback lands between two objects.
    """
    objects = 32
    RBD().create(local, "parent", objects * OBJ, order=ORDER)
    with Image(local, "parent") as image:
        image.write(payload(5, objects * OBJ), 0)
        image.flush()
        image.create_snap("gold")
    features = RBD_FEATURES_DEFAULT if deep else RBD_FEATURES_DEFAULT & ~RBD_FEATURE_DEEP_FLATTEN
    RBD().clone(local, "parent", "gold", local, "child", features=features)
    with Image(local, "child") as child:
        child.create_snap("fresh")  # the clone as it was made: everything from the parent
    a, b = new_agent(agents, data_dir), new_agent(agents, data_dir)
    a.open("w", "child")
    b.open("w", "child")
    a.start("do", {"pause_at": [objects // 2, str(tmp_path)]}, h="w", m="flatten")
    deadline = time.monotonic() + 60
    while not (tmp_path / "paused").exists():
        assert time.monotonic() < deadline, "the flatten did not get halfway"
        time.sleep(0.001)
    b.do("w", "rollback_to_snap", "fresh")
    (tmp_path / "resume").touch()
    answer = a.answer(120)
    assert "error" not in answer, answer
    with Image(local, "child", read_only=True) as child:
        data = child.read(0, objects * OBJ)
        try:
            parent = child.parent_info()
        except ImageNotFound:
            parent = None
    bad = [o for o in range(objects) if data[o * OBJ : (o + 1) * OBJ] != payload(5, OBJ)]
    assert not bad, (
        f"{len(bad)} of {objects} objects of the clone read zeros instead of the parent's data "
        f"(parent now {parent}): objects {bad}"
    )


@pytest.mark.timeout(180)
def test_io_and_snapshots_of_another_process_are_not_starved_by_a_flatten(
    data_dir: Path, local: Any, agents: list[Agent]
) -> None:
    """A flattens a big clone (object by object, each inside the barrier). B reads and
    takes snapshots meanwhile: each must get its turn between two objects, within a
    fraction of the flatten's time. (Waiting for the whole flatten means ImageBusy
    once a flatten runs longer than the lock timeout, 30 s by default.)"""
    objects = 2048
    RBD().create(local, "parent", objects * OBJ, order=ORDER)
    with Image(local, "parent") as image:
        image.write(payload(5, objects * OBJ), 0)
        image.flush()
        image.create_snap("gold")
    RBD().clone(local, "parent", "gold", local, "child")
    a, b = new_agent(agents, data_dir), new_agent(agents, data_dir)
    a.open("w", "child")
    b.open("w", "child")
    b.open("ro", "child", read_only=True)
    a.start("do", h="w", m="flatten")
    time.sleep(0.1)
    waits = []
    flatten: dict[str, Any] | None = None
    i = 0
    while flatten is None:  # reads and snapshots, back to back, until the flatten returns
        i += 1
        if i % 4:
            answer = b.send("do", i % objects * OBJ, BLOCK, h="ro", m="read", timeout=120)
        else:
            answer = b.send("do", f"during{i}", h="w", m="create_snap", timeout=120)
        assert "error" not in answer, answer
        waits.append(answer["t1"] - answer["t0"])
        with contextlib.suppress(TimeoutError):
            flatten = a.answer(0.001)
    assert "error" not in flatten, flatten
    took = flatten["t1"] - flatten["t0"]
    assert took > 1.0, f"the flatten took only {took:.2f}s: too short to tell"
    assert max(waits) < took / 5, (
        f"a read or create_snap of another process waited {max(waits):.2f}s of a "
        f"{took:.2f}s flatten ({len(waits)} calls, {sum(waits):.2f}s blocked in all)"
    )


@pytest.mark.timeout(240)
def test_snapshot_removal_next_to_discard_and_rewrite(
    tmp_path: Path, data_dir: Path, local: Any, agents: list[Agent]
) -> None:
    """A discards and rewrites objects; B takes and removes snapshots (GC) meanwhile.

    Every object must hold the last write A flushed to it.
    """
    objects = 64
    RBD().create(local, "img", objects * OBJ, order=ORDER)
    config = {"data_dir": str(data_dir), "image": "img", "mode": "churn", "slots": objects}
    writer = Loop(tmp_path, "writer", config, "a")
    writer.wait_ready()
    b = new_agent(agents, data_dir)
    b.open("w", "img")
    deadline = time.monotonic() + float(os.environ.get("CSI_RBD_RACE_SECONDS", "6"))
    rounds = 0
    while time.monotonic() < deadline:
        b.do("w", "create_snap", "s")
        time.sleep(0.005)
        b.do("w", "remove_snap", "s")
        rounds += 1
    writer.finish()
    acked = writer.entries()
    last = {e["obj"]: e["n"] for e in acked}
    with Image(local, "img", read_only=True) as image:
        data = image.read(0, objects * OBJ)
    lost = {}
    for objno, n in sorted(last.items()):
        got = data[objno * OBJ : (objno + 1) * OBJ]
        if got != payload(n, OBJ):
            holds = "zeros" if got == bytes(OBJ) else f"write {_RECORD.unpack_from(got)[0]}"
            lost[objno] = f"write {n} flushed, reads {holds}"
    assert not lost, f"{len(lost)} flushed writes lost in {rounds} snapshot rounds: {lost}"


@pytest.mark.timeout(180)
def test_flatten_from_another_process_while_writing_the_clone(
    tmp_path: Path, data_dir: Path, local: Any, agents: list[Agent]
) -> None:
    """A writes slots of a clone; B flattens it meanwhile. Nothing A flushed or the parent
    held may go missing."""
    slots, objects = 6, 128
    RBD().create(local, "parent", objects * OBJ, order=ORDER)
    with Image(local, "parent") as image:
        image.write(payload(3, objects * OBJ), 0)
        image.flush()
        image.create_snap("gold")
    RBD().clone(local, "parent", "gold", local, "child")
    config = {"data_dir": str(data_dir), "image": "child", "mode": "slots", "slots": slots}
    writer = Loop(tmp_path, "writer", config, "a")
    writer.wait_ready()
    b = new_agent(agents, data_dir)
    b.open("w", "child")
    b.do("w", "flatten")
    time.sleep(0.05)
    writer.finish()
    acked = writer.entries()
    with Image(local, "child", read_only=True) as child:
        with pytest.raises(ImageNotFound):
            child.parent_info()
        data = child.read(0, objects * OBJ)
    last = {e["slot"]: e["n"] for e in acked}
    assert _slot_values(data, slots) == [last.get(s, 0) for s in range(slots)]
    expected = bytearray(payload(3, objects * OBJ))
    for slot, n in last.items():
        offset, length = slot_range(slot)
        expected[offset : offset + length] = record(n, slot, length)
    bad = [
        o
        for o in range(objects)
        if data[o * OBJ : (o + 1) * OBJ] != expected[o * OBJ : (o + 1) * OBJ]
    ]
    assert not bad, f"objects {bad[:8]} of the flattened clone differ"


@pytest.mark.timeout(120)
def test_reading_a_snapshot_that_another_process_removes(
    data_dir: Path, local: Any, agents: list[Agent]
) -> None:
    """B reads a snapshot; A removes it (and its versions are collected). B's next read must
    fail or return what the snapshot held, never another snapshot's data."""
    RBD().create(local, "img", 8 * OBJ, order=ORDER)
    a, b = new_agent(agents, data_dir), new_agent(agents, data_dir)
    a.open("w", "img")
    for tag in (1, 2, 3):
        a.do("w", "write", pat(tag, 8 * OBJ), 0)
        a.do("w", "flush")
        a.do("w", "create_snap", f"s{tag}")
    a.do("w", "write", pat(4, 8 * OBJ), 0)
    a.do("w", "flush")
    b.open("snap", "img", snapshot="s2")
    assert b.do("snap", "read", 0, 8 * OBJ)["sha"] == sha(payload(2, 8 * OBJ))
    a.do("w", "remove_snap", "s2")
    answer = b.try_do("snap", "read", 0, 8 * OBJ)
    if "error" not in answer:
        got = bytes.fromhex(answer["ok"]["hex"])
        holds = {sha(payload(t, 8 * OBJ)): f"write {t}" for t in (1, 2, 3, 4)}
        assert answer["ok"]["sha"] == sha(payload(2, 8 * OBJ)), (
            "a read of the removed snapshot s2 returned "
            f"{holds.get(sha(got), 'other data')} instead of an error"
        )


@pytest.mark.timeout(120)
def test_clone_while_another_process_removes_the_snapshot(
    tmp_path: Path, data_dir: Path, local: Any
) -> None:
    """CreateVolume-from-snapshot next to DeleteSnapshot: every clone that was created
    must stay readable, with the data of the snapshot it was made from."""
    RBD().create(local, "img", 16 * OBJ, order=ORDER)
    with Image(local, "img") as image:
        image.write(payload(9, 16 * OBJ), 0)
        image.flush()
    seconds = float(os.environ.get("CSI_RBD_RACE_SECONDS", "6")) / 2
    code = (
        "import sys, time\n"
        "from csi_rbd.engine.native import RBD, Image, ImageNotFound, Rados\n"
        f"cluster = Rados(data_dir={str(data_dir)!r})\n"
        "cluster.connect()\n"
        "ioctx = cluster.open_ioctx('rbd')\n"
        f"end = time.monotonic() + {seconds}\n"
        "n = 0\n"
        "if sys.argv[1] == 'snapper':\n"
        "    image = Image(ioctx, 'img')\n"
        "    while time.monotonic() < end:\n"
        "        image.create_snap('s')\n"
        "        image.remove_snap('s')\n"
        "else:\n"
        "    while time.monotonic() < end:\n"
        "        n += 1\n"
        "        try:\n"
        "            RBD().clone(ioctx, 'img', 's', ioctx, f'c{n}')\n"
        "        except ImageNotFound:\n"
        "            pass\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, role], stderr=subprocess.PIPE)
        for role in ("snapper", "cloner")
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-3000:]
    clones = [n for n in RBD().list(local) if n != "img"]
    assert clones, "no clone was ever made: the race was not exercised"
    broken = {}
    for name in clones:
        with Image(local, name, read_only=True) as clone:
            try:
                if clone.read(0, 16 * OBJ) != payload(9, 16 * OBJ):
                    broken[name] = "wrong data"
            except Exception as exc:
                broken[name] = f"{type(exc).__name__}: {exc}"
    assert not broken, (
        f"{len(broken)} of {len(clones)} clones lost their parent snapshot, e.g. "
        f"{sorted(broken.items())[:3]}"
    )


if __name__ == "__main__":
    ROLES[sys.argv[1]](json.loads(sys.argv[2]))
