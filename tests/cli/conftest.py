"""Fixtures for the csi-rbd CLI tests: in-process and subprocess runners, a populated
data directory, and a fingerprint of everything stored (to prove failures change nothing)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from csi_rbd import cli
from csi_rbd.engine.native import RBD, Image, Rados

CLI = Path(sys.executable).with_name("csi-rbd")
MiB = 1 << 20


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


Runner = Callable[..., Result]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def run(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> Runner:
    """``run(*args)``: csi_rbd.cli.main in-process against ``data_dir``."""

    def run(*args: str) -> Result:
        capsys.readouterr()
        code = cli.main(["--data-dir", str(data_dir), *args])
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


@pytest.fixture
def ok(run: Runner) -> Runner:
    """Like ``run`` but the command must succeed silently on stderr."""

    def ok(*args: str) -> Result:
        result = run(*args)
        assert (result.code, result.err) == (0, ""), result
        return result

    return ok


def run_script(
    data_dir: Path, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """The installed console script, as a user runs it."""
    return subprocess.run(
        [str(CLI), "--data-dir", str(data_dir), *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.fixture
def script(data_dir: Path) -> Runner:
    def script(*args: str) -> Result:
        proc = run_script(data_dir, *args)
        return Result(proc.returncode, proc.stdout.decode(), proc.stderr.decode())

    return script


# -- engine-side helpers ------------------------------------------------------------------
@pytest.fixture
def cluster(data_dir: Path) -> Iterator[Rados]:
    """A direct engine connection to a fresh ``data_dir`` (do not combine with populated)."""
    with Rados(data_dir=data_dir) as rados:
        yield rados


def write(cluster: Rados, spec: str, data: bytes, offset: int) -> None:
    pool, _, name = spec.rpartition("/")
    with Image(cluster.open_ioctx(pool or "rbd"), name) as image:
        image.write(data, offset)
        image.flush()


def read(cluster: Rados, spec: str, offset: int, length: int) -> bytes:
    pool, _, rest = spec.rpartition("/")
    name, _, snap = rest.partition("@")
    with Image(cluster.open_ioctx(pool or "rbd"), name, snapshot=snap or None) as image:
        return image.read(offset, length)


def _populate(cluster: Rados) -> None:
    rbd, ioctx = RBD(), cluster.open_ioctx("rbd")
    rbd.create(ioctx, "a", 16 * MiB)
    with Image(ioctx, "a") as image:
        image.write(b"A" * 4096, 0)
        image.write(b"B" * 8192, 5 * MiB)
        image.create_snap("s1")
        image.protect_snap("s1")
        image.write(b"C" * 4096, 12 * MiB)
        image.create_snap("s2")
    rbd.create(ioctx, "b", 8 * MiB)
    rbd.clone(ioctx, "a", "s1", ioctx, "c")
    cluster.create_pool("p2")
    rbd.create(cluster.open_ioctx("p2"), "x", 4 * MiB, order=20)


def sparse_copy(src: str, dst: str) -> None:
    """Copy a file keeping its holes (shutil's copies fill them in, which would skew du)."""
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        position = 0
        while position < size:
            try:
                start = os.lseek(fin.fileno(), position, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            fout.seek(start)
            fout.write(os.pread(fin.fileno(), end - start, start))
            position = end
        fout.truncate(size)


@pytest.fixture(scope="session")
def populated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    template = tmp_path_factory.mktemp("template") / "data"
    with Rados(data_dir=template) as cluster:
        _populate(cluster)
    return template


@pytest.fixture
def populated(populated_template: Path, data_dir: Path) -> Iterator[Rados]:
    """A copy of: rbd/a (16 MiB, data at 0, 5 MiB and 12 MiB; snapshots s1, protected,
    and s2), rbd/b (8 MiB), rbd/c cloned from a@s1, and p2/x (4 MiB, order 20)."""
    shutil.copytree(populated_template, data_dir, symlinks=True, copy_function=sparse_copy)
    with Rados(data_dir=data_dir) as cluster:
        yield cluster


def fingerprint(data_dir: Path) -> dict[str, Any]:
    """Every catalog row and every stored file (with a hash of its bytes)."""
    state: dict[str, Any] = {}
    for catalog in sorted(data_dir.glob("*/catalog.db")):
        db = sqlite3.connect(catalog)
        try:
            tables = [
                row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            ]
            state[catalog.parent.name] = {
                table: sorted(repr(row) for row in db.execute(f"SELECT * FROM {table}"))
                for table in sorted(tables)
            }
        finally:
            db.close()
    files = {}
    for path in sorted(data_dir.rglob("*")):
        if path.name.startswith("catalog.db") or path.is_dir():
            continue
        key = str(path.relative_to(data_dir))
        if path.is_symlink():
            files[key] = "-> " + os.readlink(path)
        else:
            files[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    state["files"] = files
    return state
