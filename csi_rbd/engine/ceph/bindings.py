"""Loading Debian's librados/librbd bindings into the project's virtualenv.

PyPI has no binding for librados or librbd: the only ones are the Cython
extension modules Ceph itself builds, shipped on Debian by ``python3-rados``
and ``python3-rbd`` as two files::

    /usr/lib/python3/dist-packages/rados.cpython-311-x86_64-linux-gnu.so
    /usr/lib/python3/dist-packages/rbd.cpython-311-x86_64-linux-gnu.so

They are built for Debian's CPython (3.11 on bookworm) and import into any
CPython with the same ABI tag, a virtualenv included. A venv does not see
``dist-packages`` though, and putting that whole directory on ``sys.path``
would shadow the venv's own packages (yaml, grpc, ...) with Debian's.

So :func:`load` imports exactly those two files and nothing else: it looks
for ``rados<suffix>`` and ``rbd<suffix>`` (``<suffix>`` being one of this
interpreter's extension suffixes, so an ABI mismatch is "not found", never a
crash) in ``$CSI_RBD_CEPH_BINDINGS`` (a directory, if set) and then in
Debian's dist-packages directories, and loads each with the standard
extension-module loader under its own name (``rados`` first: ``rbd`` imports
it). Nothing is written to disk and ``sys.path`` is left alone. If plain
``import rados`` already works (a system Python, or a venv made with
``--system-site-packages``) that module is used as is.

Missing packages raise :class:`BindingsUnavailable` (an ``ImportError``)
naming the packages to install; callers turn it into a configuration error
(``csi-rbd serve``) or a skip reason (tests).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import threading
from pathlib import Path
from types import ModuleType

DEBIAN_PACKAGES = ("python3-rados", "python3-rbd")
SEARCH_PATH = (
    Path("/usr/lib/python3/dist-packages"),
    Path(f"/usr/lib/python3.{sys.version_info.minor}/dist-packages"),
    Path("/usr/local/lib/python3/dist-packages"),
)
ENVIRONMENT = "CSI_RBD_CEPH_BINDINGS"

_lock = threading.Lock()


class BindingsUnavailable(ImportError):
    """librados/librbd's Python bindings cannot be imported here."""


def candidate_directories() -> list[Path]:
    chosen = os.environ.get(ENVIRONMENT)
    return ([Path(chosen)] if chosen else []) + list(SEARCH_PATH)


def find(module: str) -> Path | None:
    """The extension file of ``module`` built for this interpreter, if any."""
    for directory in candidate_directories():
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = directory / f"{module}{suffix}"
            if path.is_file():
                return path
    return None


def _import(module: str) -> ModuleType:
    loaded = sys.modules.get(module)
    if loaded is not None:
        return loaded
    try:
        return importlib.import_module(module)
    except ImportError:
        pass
    path = find(module)
    if path is None:
        where = ", ".join(str(d) for d in candidate_directories())
        raise BindingsUnavailable(
            f"the Python binding {module!r} of Ceph is not installed for this Python "
            f"({sys.version.split()[0]}; looked in {where}); install the Debian packages "
            f"{' and '.join(DEBIAN_PACKAGES)} (apt-get install {' '.join(DEBIAN_PACKAGES)})"
        )
    spec = importlib.util.spec_from_file_location(module, path)
    if spec is None or spec.loader is None:  # pragma: no cover - a broken file
        raise BindingsUnavailable(f"cannot load {path}")
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[module] = loaded
    try:
        spec.loader.exec_module(loaded)
    except Exception as exc:  # e.g. librados2 itself missing: an undefined symbol
        del sys.modules[module]
        raise BindingsUnavailable(f"cannot load {path}: {exc}") from exc
    return loaded


def load() -> tuple[ModuleType, ModuleType]:
    """``(rados, rbd)``, imported once per process."""
    with _lock:
        rados = _import("rados")  # first: rbd imports it
        rbd = _import("rbd")
    return rados, rbd


def available() -> str | None:
    """None when the bindings load, else why not (a skip reason)."""
    try:
        load()
    except BindingsUnavailable as exc:
        return str(exc)
    return None
