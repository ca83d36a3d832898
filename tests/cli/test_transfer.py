"""``image import`` / ``image export``: sparse round trips, snapshots, streams, cleanup."""

from __future__ import annotations

import errno
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tqdm import tqdm

from csi_rbd.admin import transfer
from csi_rbd.engine import errors
from csi_rbd.engine.native import RBD, Image, Rados
from tests.cli.conftest import MiB, Runner, fingerprint, read, run_script, write

BLOCK = 4096
SIZE = 10 * MiB + 1234  # not a multiple of the block or object size
PIECES = [
    (MiB + 100, os.urandom(100_000)),  # unaligned, several blocks
    (4 * MiB - 2000, b"\1" * 5000),  # across an object boundary
    (8 * MiB + 4095, b"\2"),  # one byte at the end of a block
    (SIZE - 10, b"tail-bytes"),  # in the partial last block
]
ALLOCATED_ZEROS = [(6 * MiB, MiB)]  # written zeros: allocated in the file, not data


def make_sparse(path: Path, size: int = SIZE) -> int:
    """Write the test file; returns the bytes of its 4 KiB blocks holding non-zero data."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in ALLOCATED_ZEROS:
            f.seek(offset)
            f.write(bytes(length))
        for offset, data in PIECES:
            f.seek(offset)
            f.write(data)
    blocks = {
        b
        for offset, data in PIECES
        for b in range(offset // BLOCK, (offset + len(data) - 1) // BLOCK + 1)
    }
    return sum(min(BLOCK, size - b * BLOCK) for b in blocks)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def du(ok: Runner, target: str) -> dict[str, Any]:
    result: dict[str, Any] = ok("image", "du", "--format", "json", target).json()
    return result


@pytest.fixture
def sparse_file(tmp_path: Path) -> tuple[Path, int]:
    path = tmp_path / "disk.img"
    used = make_sparse(path)
    assert allocated(path) >= MiB + used  # the file really holds its allocated zeros
    return path, used


def test_import_export_round_trip(
    cluster: Rados, ok: Runner, tmp_path: Path, sparse_file: tuple[Path, int]
) -> None:
    source, used = sparse_file
    ok("image", "import", str(source), "rbd/disk")
    info = ok("image", "info", "--format", "json", "disk").json()
    assert info["size"] == SIZE
    # holes and all-zero blocks stayed unallocated in the image
    usage = du(ok, "rbd/disk")
    assert usage["images"] == [
        {"name": "disk", "id": info["id"], "provisioned_size": SIZE, "used_size": used}
    ]
    assert usage["total_used_size"] == used

    out = tmp_path / "out.img"
    ok("image", "export", "rbd/disk", str(out))
    assert out.read_bytes() == source.read_bytes()
    assert os.stat(out).st_size == SIZE
    # only the data blocks were written: the zeros became holes
    assert used <= allocated(out) <= used + BLOCK
    assert allocated(out) < allocated(source) - MiB // 2


def test_import_default_name_and_pool(
    populated: Rados, ok: Runner, sparse_file: tuple[Path, int]
) -> None:
    source, _ = sparse_file
    ok("image", "import", str(source))
    ok("image", "import", "--object-size", "1M", "--image-feature", "layering", str(source), "p2/d")
    assert RBD().list(populated.open_ioctx("rbd")) == ["a", "b", "c", "disk.img"]
    info = ok("image", "info", "--format", "json", "p2/d").json()
    assert (info["order"], info["features"], info["objects"]) == (20, ["layering"], 11)
    assert read(populated, "p2/d", SIZE - 10, 10) == b"tail-bytes"


@pytest.mark.parametrize("sparse_size", ["4K", "512", "64K"])
def test_import_skips_zero_blocks_of_dense_file(
    cluster: Rados, ok: Runner, tmp_path: Path, sparse_size: str
) -> None:
    """A file without holes: only blocks (of --sparse-size) holding data are written."""
    sparse = tmp_path / "sparse.img"
    used = make_sparse(sparse)
    dense = tmp_path / "dense.img"
    dense.write_bytes(sparse.read_bytes())
    assert allocated(dense) >= SIZE - BLOCK  # no holes at all
    ok("image", "import", "--sparse-size", sparse_size, str(dense), "img")
    got = du(ok, "img")["total_used_size"]
    if sparse_size == "64K":  # coarser blocks: the zeros next to the data are written too
        assert used < got <= used + len(PIECES) * 2 * 64 * 1024
    else:
        assert sum(len(d) for _, d in PIECES) <= got <= used
    assert read(cluster, "rbd/img", 0, SIZE) == dense.read_bytes()


def test_export_snapshot(populated: Rados, ok: Runner, tmp_path: Path) -> None:
    write(populated, "rbd/a", b"Z" * 4096, 0)  # after both snapshots
    for spec, name in (("a@s1", "s1.img"), ("a@s2", "s2.img"), ("a", "head.img")):
        ok("image", "export", spec, str(tmp_path / name))
    s1, s2, head = ((tmp_path / n).read_bytes() for n in ("s1.img", "s2.img", "head.img"))
    assert len(s1) == len(s2) == len(head) == 16 * MiB
    assert s1[:4] == s2[:4] == b"AAAA" and head[:4] == b"ZZZZ"
    assert s1[5 * MiB : 5 * MiB + 8192] == b"B" * 8192
    assert s1[12 * MiB : 12 * MiB + 4] == bytes(4)  # written after s1
    assert s2[12 * MiB : 12 * MiB + 4] == head[12 * MiB : 12 * MiB + 4] == b"CCCC"
    assert allocated(tmp_path / "s1.img") <= 3 * BLOCK


def test_export_clone_includes_parent(populated: Rados, ok: Runner, tmp_path: Path) -> None:
    write(populated, "rbd/c", b"mine", 4 * MiB)
    ok("image", "export", "c", str(tmp_path / "c.img"))
    data = (tmp_path / "c.img").read_bytes()
    assert data[:4] == b"AAAA" and data[5 * MiB : 5 * MiB + 4] == b"BBBB"
    assert data[4 * MiB : 4 * MiB + 4] == b"mine"
    assert data.count(0) == len(data) - 4096 - 8192 - 4


def test_export_empty_image_is_all_hole(populated: Rados, ok: Runner, tmp_path: Path) -> None:
    ok("image", "export", "b", str(tmp_path / "b.img"))
    assert os.stat(tmp_path / "b.img").st_size == 8 * MiB
    assert allocated(tmp_path / "b.img") == 0


def test_export_to_stdout_and_import_from_stdin(
    cluster: Rados, data_dir: Path, sparse_file: tuple[Path, int]
) -> None:
    source, used = sparse_file
    content = source.read_bytes()
    cluster.shutdown()
    proc = run_script(data_dir, "image", "import", "-", "rbd/piped", stdin=content)
    assert (proc.returncode, proc.stderr) == (0, b"")
    proc = run_script(data_dir, "image", "export", "piped", "-")
    assert (proc.returncode, proc.stderr) == (0, b"")
    assert proc.stdout == content
    proc = run_script(data_dir, "image", "du", "--format", "json", "rbd/piped")
    images = json.loads(proc.stdout)["images"]
    assert [(i["provisioned_size"], i["used_size"]) for i in images] == [(SIZE, used)]


def test_import_from_stdin_empty(data_dir: Path) -> None:
    proc = run_script(data_dir, "image", "import", "-", "empty", stdin=b"")
    assert (proc.returncode, proc.stderr) == (0, b"")
    with Rados(data_dir=data_dir) as cluster, Image(cluster.open_ioctx("rbd"), "empty") as image:
        assert image.size() == 0


def test_import_stream_grows_image(cluster: Rados, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream path (unknown size) in-process: small chunks, sizes not aligned."""
    monkeypatch.setattr(transfer, "CHUNK", 64 * 1024)
    monkeypatch.setattr(transfer, "_GROW_MAX", 256 * 1024)
    payload = bytearray(1_000_003)
    payload[70_000:70_010] = b"0123456789"
    payload[-3:] = b"end"
    RBD().create(cluster.open_ioctx("rbd"), "s", 0)
    with Image(cluster.open_ioctx("rbd"), "s") as image:
        bar = tqdm(disable=True)
        transfer._import_stream(image, io.BytesIO(bytes(payload)), 4096, bar)
        assert image.size() == len(payload)
        assert image.read(0, len(payload)) == bytes(payload)


def test_transfer_is_chunked(
    cluster: Rados, ok: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory stays bounded: no single read or write is larger than one chunk."""
    source = tmp_path / "random.img"
    source.write_bytes(os.urandom(3 * transfer.CHUNK + 12345))
    sizes: dict[str, list[int]] = {"pread": [], "write": [], "read": []}
    real_pread, real_write, real_read = os.pread, Image.write, Image.read

    def pread(fd: int, n: int, offset: int) -> bytes:
        sizes["pread"].append(n)
        return real_pread(fd, n, offset)

    def image_write(self: Image, data: bytes, offset: int, *args: Any) -> int:
        sizes["write"].append(len(data))
        return real_write(self, data, offset, *args)

    def image_read(self: Image, offset: int, length: int, *args: Any) -> bytes:
        sizes["read"].append(length)
        return real_read(self, offset, length, *args)

    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(Image, "write", image_write)
    monkeypatch.setattr(Image, "read", image_read)
    ok("image", "import", str(source), "big")
    ok("image", "export", "big", str(tmp_path / "back.img"))
    assert (tmp_path / "back.img").read_bytes() == source.read_bytes()
    for name, seen in sizes.items():
        assert seen and max(seen) <= transfer.CHUNK, name
    assert sum(sizes["write"]) == source.stat().st_size


FailingPatch = Callable[[pytest.MonkeyPatch], None]


def _fail_second_write(monkeypatch: pytest.MonkeyPatch) -> None:
    real = Image.write
    calls = []

    def write(self: Image, data: bytes, offset: int, *args: Any) -> int:
        calls.append(offset)
        if len(calls) == 2:
            raise errors.IOError("injected write failure")
        return real(self, data, offset, *args)

    monkeypatch.setattr(Image, "write", write)


def _interrupt_second_write(monkeypatch: pytest.MonkeyPatch) -> None:
    real = Image.write
    calls = []

    def write(self: Image, data: bytes, offset: int, *args: Any) -> int:
        calls.append(offset)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, data, offset, *args)

    monkeypatch.setattr(Image, "write", write)


@pytest.mark.parametrize(
    ("inject", "code", "message"),
    [
        (_fail_second_write, errno.EIO, "injected write failure"),
        (_interrupt_second_write, 130, "interrupted"),
    ],
)
def test_failed_import_leaves_nothing(
    populated: Rados,
    run: Runner,
    data_dir: Path,
    sparse_file: tuple[Path, int],
    monkeypatch: pytest.MonkeyPatch,
    inject: FailingPatch,
    code: int,
    message: str,
) -> None:
    source, _ = sparse_file
    before = fingerprint(data_dir)
    inject(monkeypatch)
    result = run("image", "import", str(source), "doomed")
    assert (result.code, result.err) == (code, f"csi-rbd: error: {message}\n")
    assert fingerprint(data_dir) == before


def test_failed_export_removes_the_file(
    populated: Rados, run: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def read(self: Image, offset: int, length: int, *args: Any) -> bytes:
        raise errors.IOError("injected read failure")

    monkeypatch.setattr(Image, "read", read)
    result = run("image", "export", "a", str(tmp_path / "partial.img"))
    assert (result.code, result.err) == (errno.EIO, "csi-rbd: error: injected read failure\n")
    assert not (tmp_path / "partial.img").exists()


def test_import_block_granularity() -> None:
    runs = list(transfer.nonzero_runs(bytes(8192) + b"x" + bytes(10_000) + b"y", 0, 4096))
    assert runs == [(8192, 4096), (16384, 18194 - 16384)]
    # alignment follows the absolute offset, not the buffer start
    assert list(transfer.nonzero_runs(b"\0" * 100 + b"z", 4000, 4096)) == [(96, 5)]
    assert list(transfer.nonzero_runs(bytes(5000), 0, 4096)) == []


def test_data_segments_of_sparse_file(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(b"x" * 10)
    fd = os.open(path, os.O_RDONLY)
    try:
        segments = list(transfer.data_segments(fd, 4 * MiB))
    finally:
        os.close(fd)
    assert len(segments) == 1
    start, length = segments[0]
    assert start <= MiB and MiB + 10 <= start + length <= 2 * MiB


def test_import_reads_only_data_segments(
    cluster: Rados,
    ok: Runner,
    sparse_file: tuple[Path, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Holes are found with SEEK_DATA/SEEK_HOLE and never read."""
    source, _ = sparse_file
    read_bytes = []
    real_pread = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        data = real_pread(fd, n, offset)
        read_bytes.append(len(data))
        return data

    monkeypatch.setattr(os, "pread", pread)
    ok("image", "import", str(source), "img")
    # the data pieces plus the 1 MiB of written zeros, block-rounded; not the 10 MiB file
    assert sum(read_bytes) <= 2 * MiB


def test_export_skips_allocated_zeros(cluster: Rados, ok: Runner, tmp_path: Path) -> None:
    """Zeros the image holds as data still become holes in the exported file."""
    RBD().create(cluster.open_ioctx("rbd"), "z", 8 * MiB)
    write(cluster, "rbd/z", bytes(2 * MiB), MiB)
    write(cluster, "rbd/z", b"x", 5 * MiB)
    ok("image", "export", "z", str(tmp_path / "z.img"))
    assert allocated(tmp_path / "z.img") <= BLOCK
    assert (tmp_path / "z.img").read_bytes() == bytes(5 * MiB) + b"x" + bytes(3 * MiB - 1)
