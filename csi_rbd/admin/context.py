"""What a command runs against: the data directory, the output and progress settings.

The engine is opened lazily, so commands that never touch it (and a future
``serve``) pay nothing. Engine lookups that fail are turned into messages that
name the pool, image or snapshot the user typed.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from csi_rbd.admin import errors as cli_errors
from csi_rbd.admin.errors import CliError
from csi_rbd.admin.output import Output
from csi_rbd.admin.specs import ImageSpec, check_name
from csi_rbd.engine import errors
from csi_rbd.engine.native import RBD, Image, IoCtx, Rados

DEFAULT_DATA_DIR = "/var/lib/csi-rbd"
DATA_DIR_ENV = "CSI_RBD_DATA_DIR"


class Context:
    def __init__(self, data_dir: str, output: Output, progress: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.output = output
        self.progress_enabled = progress
        self.rbd = RBD()
        self._rados: Rados | None = None

    # -- engine ---------------------------------------------------------------------
    @property
    def rados(self) -> Rados:
        if self._rados is None:
            rados = Rados(data_dir=self.data_dir)
            try:
                rados.connect()
            except OSError as exc:
                reason = exc.strerror or str(exc)
                raise CliError(
                    f"cannot open data directory {self.data_dir}: {reason}", exc.errno or errno.EIO
                ) from exc
            self._rados = rados
        return self._rados

    def close(self) -> None:
        if self._rados is not None:
            self._rados.shutdown()
            self._rados = None

    def ioctx(self, pool: str) -> IoCtx:
        check_name(pool, "pool")
        try:
            return self.rados.open_ioctx(pool)
        except errors.ObjectNotFound:
            raise cli_errors.not_found(f"pool {pool} does not exist") from None

    def image_exists(self, spec: ImageSpec) -> bool:
        return spec.image in self.rbd.list(self.ioctx(spec.pool))

    def missing(self, spec: ImageSpec) -> CliError | None:
        """The error for whichever part of ``spec`` does not exist, or None if all do."""
        ioctx = self.ioctx(spec.pool)  # raises for a missing pool
        if not self.image_exists(spec):
            return cli_errors.not_found(f"image {spec.image_spec} does not exist")
        if spec.snap is not None:
            with Image(ioctx, spec.image, read_only=True) as image:
                if spec.snap not in {s["name"] for s in image.list_snaps()}:
                    return cli_errors.not_found(f"snapshot {spec} does not exist")
        return None

    def require(self, spec: ImageSpec) -> None:
        """Fail with a clear message unless the pool, image and snapshot of ``spec`` exist."""
        error = self.missing(spec)
        if error is not None:
            raise error

    @contextmanager
    def open_image(self, spec: ImageSpec, read_only: bool = False) -> Iterator[Image]:
        """The image (or its snapshot, read-only) named by ``spec``."""
        ioctx = self.ioctx(spec.pool)
        try:
            image = Image(ioctx, spec.image, snapshot=spec.snap, read_only=read_only)
        except errors.ImageNotFound as exc:
            raise (self.missing(spec) or exc) from None
        try:
            yield image
        finally:
            image.close()

    @contextmanager
    def explain(self, *specs: ImageSpec) -> Iterator[None]:
        """Turn an engine ImageNotFound into "image/snapshot ... does not exist"."""
        try:
            yield
        except errors.ImageNotFound as exc:
            for spec in specs:
                error = self.missing(spec)
                if error is not None:
                    raise error from None
            raise exc

    # -- progress -------------------------------------------------------------------
    def progress(self, description: str, total: int | None, unit: str = "B") -> tqdm[Any]:
        """A progress bar on stderr; hidden with --no-progress or when stderr is no TTY."""
        scaled = unit == "B"
        return tqdm(
            total=total,
            desc=description,
            unit=unit,
            unit_scale=scaled,
            unit_divisor=1024 if scaled else 1000,
            file=sys.stderr,
            disable=None if self.progress_enabled else True,
        )


class ProgressCallback:
    """An engine ``on_progress(done, total)`` callback driving a tqdm bar."""

    def __init__(self, bar: tqdm[Any]) -> None:
        self.bar = bar

    def __call__(self, done: int, total: int) -> None:
        if self.bar.total != total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)
