"""``image import`` and ``image export``: sparse, streaming, memory-bounded copies.

Import reads only the data segments of the file (SEEK_DATA/SEEK_HOLE) and skips
all-zero blocks, so holes stay unallocated in the image. Export writes only the
extents ``diff_iterate`` reports (skipping all-zero blocks there too) and then
sets the file's size, so the file gets holes where the image has none. Data moves
in chunks of ``CHUNK`` bytes; nothing holds a whole image or file in memory.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import stat
import sys
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

from tqdm import tqdm

from csi_rbd.admin import errors as cli_errors
from csi_rbd.admin.command import add_command
from csi_rbd.admin.context import Context
from csi_rbd.admin.images import add_layout_options, layout_kwargs
from csi_rbd.admin.specs import Snap, parse_image_spec, parse_size
from csi_rbd.engine import errors
from csi_rbd.engine.native import Image

if TYPE_CHECKING:
    from csi_rbd.admin.command import Subparsers

CHUNK = 4 << 20
_GROW_MAX = 1 << 30  # a streamed import grows the image by at most this much at a time
_MIN_SPARSE, _DEFAULT_SPARSE = 512, "4K"


def register(subparsers: Subparsers) -> None:
    imp = add_command(subparsers, "import", import_image, "create an image from a file")
    add_layout_options(imp)
    imp.add_argument(
        "--sparse-size",
        default=_DEFAULT_SPARSE,
        help="all-zero blocks of this size are not written (default: 4K)",
    )
    imp.add_argument("path", metavar="FILE", help="a file or block device, or - for stdin")
    imp.add_argument("spec", metavar="POOL/IMAGE", nargs="?", help="default: rbd/<file name>")

    exp = add_command(subparsers, "export", export_image, "write an image to a new file")
    exp.add_argument("spec", metavar="POOL/IMAGE[@SNAP]")
    exp.add_argument("path", metavar="FILE", help="a file to create, or - for stdout")


# -- helpers --------------------------------------------------------------------------
def data_segments(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) runs of ``fd`` below ``size`` that may hold data."""
    position = 0
    while position < size:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but a hole up to the end
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no hole support
                yield position, size - position
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end - start
        position = end


def nonzero_runs(data: bytes, base: int, block: int) -> Iterator[tuple[int, int]]:
    """(offset in data, length) runs of ``data`` (at ``base``) not made of all-zero blocks.

    Blocks are aligned to multiples of ``block`` in the image or file.
    """
    size = len(data)
    if data.count(0) == size:
        return
    start: int | None = None
    position = 0
    while position < size:
        end = min(size, (base + position) // block * block + block - base)
        if data.count(0, position, end) == end - position:
            if start is not None:
                yield start, position - start
                start = None
        elif start is None:
            start = position
        position = end
    if start is not None:
        yield start, size - start


def _sparse_size(text: str) -> int:
    value = parse_size(text, 1, "sparse size")
    if value < _MIN_SPARSE or value > CHUNK or value & (value - 1):
        raise cli_errors.invalid(
            f"invalid sparse size {text!r}: a power of two from 512 bytes to 4 MiB is required"
        )
    return value


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


# -- import ---------------------------------------------------------------------------
def import_image(ctx: Context, args: argparse.Namespace) -> None:
    if args.spec is None and args.path == "-":
        raise cli_errors.invalid("importing from stdin needs a destination POOL/IMAGE")
    spec = parse_image_spec(args.spec or os.path.basename(args.path), Snap.FORBIDDEN)
    kwargs = layout_kwargs(args)
    block = _sparse_size(args.sparse_size)
    ioctx = ctx.ioctx(spec.pool)
    if args.path == "-":
        fd, owned = sys.stdin.buffer.fileno(), False
    else:
        try:
            fd, owned = os.open(args.path, os.O_RDONLY | os.O_CLOEXEC), True
        except OSError as exc:
            message = f"cannot open {args.path}: {exc.strerror}"
            raise cli_errors.CliError(message, exc.errno or errno.EIO) from None
    try:
        size = _source_size(fd, args.path)
        try:
            ctx.rbd.create(ioctx, spec.image, size or 0, **kwargs)
        except errors.ImageExists:
            raise cli_errors.exists(f"image {spec} already exists") from None
        try:
            with Image(ioctx, spec.image) as image, ctx.progress("Importing image", size) as bar:
                if size is None:
                    _import_stream(image, sys.stdin.buffer, block, bar)
                else:
                    _import_file(image, fd, size, block, bar)
                image.flush()
        except BaseException:
            with contextlib.suppress(errors.Error):
                ctx.rbd.remove(ioctx, spec.image)
            raise
    finally:
        if owned:
            os.close(fd)


def _source_size(fd: int, path: str) -> int | None:
    """The size of a regular file or block device; None for a pipe or terminal."""
    status = os.fstat(fd)
    if stat.S_ISREG(status.st_mode):
        return status.st_size
    if stat.S_ISBLK(status.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    if stat.S_ISDIR(status.st_mode):
        raise cli_errors.CliError(f"cannot import {path}: it is a directory", errno.EISDIR)
    return None


def _import_file(image: Image, fd: int, size: int, block: int, bar: tqdm[Any]) -> None:
    for start, length in data_segments(fd, size):
        bar.update(start - bar.n)
        end = start + length
        position = start
        while position < end:
            count = min(CHUNK - position % CHUNK, end - position)
            data = os.pread(fd, count, position)
            if not data:
                break  # the file shrank under us: the rest reads as zeros
            for offset, run in nonzero_runs(data, position, block):
                image.write(data[offset : offset + run], position + offset)
            position += len(data)
            bar.update(position - bar.n)
    bar.update(size - bar.n)


def _import_stream(image: Image, stream: IO[bytes], block: int, bar: tqdm[Any]) -> None:
    """Import data of unknown size: grow the image as data arrives, then trim it."""
    position = capacity = 0
    while data := stream.read(CHUNK):
        runs = list(nonzero_runs(data, position, block))
        end = position + len(data)
        if runs and end > capacity:
            capacity = max(end, min(2 * capacity, capacity + _GROW_MAX))
            image.resize(capacity)
        for offset, run in runs:
            image.write(data[offset : offset + run], position + offset)
        position = end
        bar.update(len(data))
    if capacity != position:
        image.resize(position, allow_shrink=True)


# -- export ---------------------------------------------------------------------------
def export_image(ctx: Context, args: argparse.Namespace) -> None:
    spec = parse_image_spec(args.spec, Snap.PERMITTED)
    with ctx.open_image(spec, read_only=True) as image:
        size = image.size()
        extents = _allocated_extents(image, size)
        with ctx.progress("Exporting image", size) as bar:
            if args.path == "-":
                _export_stream(image, size, extents, sys.stdout.buffer, bar)
            else:
                _export_file(image, size, extents, args.path, bar)


def _allocated_extents(image: Image, size: int) -> list[tuple[int, int]]:
    """Sorted, merged (offset, length) extents holding data, parent data included."""
    found: list[tuple[int, int]] = []
    image.diff_iterate(0, size, None, lambda o, n, exists: found.append((o, n)) if exists else None)
    merged: list[tuple[int, int]] = []
    for offset, length in sorted(found):
        if merged and offset <= merged[-1][0] + merged[-1][1]:
            last_offset, last_length = merged[-1]
            merged[-1] = (last_offset, max(last_length, offset + length - last_offset))
        else:
            merged.append((offset, length))
    return merged


def _chunks(image: Image, offset: int, length: int) -> Iterator[tuple[int, bytes]]:
    end = offset + length
    while offset < end:
        count = min(CHUNK - offset % CHUNK, end - offset)
        yield offset, image.read(offset, count)
        offset += count


def _export_file(
    image: Image, size: int, extents: list[tuple[int, int]], path: str, bar: tqdm[Any]
) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise cli_errors.exists(f"file {path} already exists") from None
    except OSError as exc:
        raise cli_errors.CliError(
            f"cannot create {path}: {exc.strerror}", exc.errno or errno.EIO
        ) from None
    try:
        for offset, length in extents:
            for at, data in _chunks(image, offset, length):
                for start, run in nonzero_runs(data, at, 4096):
                    _pwrite_all(fd, data[start : start + run], at + start)
                bar.update(at + len(data) - bar.n)
        os.ftruncate(fd, size)
        os.fsync(fd)
        bar.update(size - bar.n)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def _export_stream(
    image: Image, size: int, extents: list[tuple[int, int]], out: IO[bytes], bar: tqdm[Any]
) -> None:
    zeros = bytes(CHUNK)
    position = 0
    for offset, length in [*extents, (size, 0)]:
        while position < offset:
            count = min(CHUNK, offset - position)
            out.write(zeros[:count])
            position += count
            bar.update(count)
        for _, data in _chunks(image, offset, length):
            out.write(data)
            position += len(data)
            bar.update(len(data))
    out.flush()
