"""Regenerate (or verify) the committed CSI Python stubs from ``protos/csi.proto``.

Usage::

    python -m csi_rbd._proto.generate           # rewrite the committed stubs
    python -m csi_rbd._proto.generate --check   # exit 1 if they are stale

The stubs are produced by ``python -m grpc_tools.protoc`` (with the well-known
types shipped inside grpcio-tools on the include path) with ``--python_out``,
``--grpc_python_out`` and ``--pyi_out``. The one post-processing step makes the
``csi_pb2`` import in ``csi_pb2_grpc.py`` package-relative, since protoc emits a
top-level ``import csi_pb2``.

``--check`` regenerates into a temporary directory and compares with the
committed files, ignoring only the lines that record the generator's version.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.resources
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import descriptor_pb2

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parents[1]
PROTO_DIR = REPO_ROOT / "protos"
PROTO_FILE = PROTO_DIR / "csi.proto"
GENERATED_FILES = ("csi_pb2.py", "csi_pb2.pyi", "csi_pb2_grpc.py")

_GRPC_ABSOLUTE_IMPORT = re.compile(r"^import csi_pb2 as csi__pb2$", re.MULTILINE)
_GRPC_RELATIVE_IMPORT = "from . import csi_pb2 as csi__pb2"

# Generator-version records that may differ between otherwise identical outputs.
_VERSION_PATTERNS = (
    (re.compile(r"^# Protobuf Python Version: .*$", re.MULTILINE), "# Protobuf Python Version: *"),
    (
        re.compile(
            r"^_runtime_version\.ValidateProtobufRuntimeVersion\(\n(?:.*\n)*?\)$", re.MULTILINE
        ),
        "_runtime_version.ValidateProtobufRuntimeVersion(*)",
    ),
    (re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.MULTILINE), "GRPC_GENERATED_VERSION = *"),
)


class GenerationError(RuntimeError):
    """protoc failed or produced output this script does not expect."""


def include_dir() -> Path:
    """The directory holding the well-known ``google/protobuf/*.proto`` files."""
    return Path(str(importlib.resources.files("grpc_tools") / "_proto"))


def _protoc(*args: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{include_dir()}",
        *args,
        str(PROTO_FILE),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise GenerationError(f"protoc failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")


def generate_into(out_dir: Path) -> dict[str, str]:
    """Run protoc into ``out_dir``, post-process, and return ``{file name: text}``."""
    out = str(out_dir)
    _protoc(f"--python_out={out}", f"--grpc_python_out={out}", f"--pyi_out={out}")
    grpc_file = out_dir / "csi_pb2_grpc.py"
    text, count = _GRPC_ABSOLUTE_IMPORT.subn(_GRPC_RELATIVE_IMPORT, grpc_file.read_text())
    if count != 1:
        raise GenerationError(
            f"expected one 'import csi_pb2 as csi__pb2' in {grpc_file}, found {count}"
        )
    grpc_file.write_text(text)
    return {name: (out_dir / name).read_text() for name in GENERATED_FILES}


def compile_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """Compile ``protos/csi.proto`` and return its FileDescriptorProto (no source info)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "csi.binpb"
        _protoc(f"--descriptor_set_out={out}")
        file_set = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    (proto,) = file_set.file
    return proto


def normalize(text: str) -> str:
    """Blank out the generator-version records of a generated file."""
    for pattern, replacement in _VERSION_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def stale_files(target_dir: Path = PACKAGE_DIR) -> dict[str, str]:
    """Regenerate in a temp dir; return ``{file name: diff}`` for files that differ."""
    problems: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate_into(Path(tmp))
    for name, expected in fresh.items():
        path = target_dir / name
        if not path.exists():
            problems[name] = f"{path} is missing"
            continue
        committed = path.read_text()
        if normalize(committed) != normalize(expected):
            diff = difflib.unified_diff(
                normalize(committed).splitlines(),
                normalize(expected).splitlines(),
                f"committed/{name}",
                f"regenerated/{name}",
                lineterm="",
            )
            problems[name] = "\n".join(list(diff)[:60])
    return problems


def write(target_dir: Path = PACKAGE_DIR) -> list[str]:
    """Regenerate the stubs into ``target_dir``; return the names of files that changed."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate_into(Path(tmp))
    changed = []
    for name, text in fresh.items():
        path = target_dir / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            changed.append(name)
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m csi_rbd._proto.generate",
        description="Regenerate the CSI Python stubs from protos/csi.proto.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 if the committed stubs differ from a fresh generation",
    )
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = stale_files()
            for name, detail in problems.items():
                print(f"stale: {name}\n{detail}", file=sys.stderr)
            if problems:
                print("run: python -m csi_rbd._proto.generate", file=sys.stderr)
                return 1
            print(f"up to date: {', '.join(GENERATED_FILES)}")
            return 0
        changed = write()
    except GenerationError as err:
        print(err, file=sys.stderr)
        return 2
    print(f"regenerated: {', '.join(changed)}" if changed else "unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
