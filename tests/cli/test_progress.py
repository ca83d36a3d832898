"""Progress bars: on stderr for a terminal, gone with --no-progress or without a terminal."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from csi_rbd import cli
from csi_rbd.engine.native import Rados
from tests.cli.conftest import MiB, write


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(data_dir: Path, stderr: io.StringIO, *args: str) -> str:
    real = sys.stderr
    sys.stderr = stderr
    try:
        assert cli.main(["--data-dir", str(data_dir), *args]) == 0
    finally:
        sys.stderr = real
    return stderr.getvalue()


def _commands(tmp_path: Path) -> list[tuple[str, list[str]]]:
    source = tmp_path / "src.img"
    source.write_bytes(b"x" * (2 * MiB))
    return [
        ("Importing image", ["image", "import", str(source), "imported"]),
        ("Exporting image", ["image", "export", "a", str(tmp_path / "out.img")]),
        ("Image flatten", ["image", "flatten", "c"]),
        ("Rolling back to snapshot", ["snap", "rollback", "a@s2"]),
    ]


@pytest.mark.parametrize("index", range(4))
def test_progress_on_a_terminal(
    populated: Rados, data_dir: Path, tmp_path: Path, index: int
) -> None:
    write(populated, "rbd/a", b"new", 0)
    label, args = _commands(tmp_path)[index]
    shown = _run(data_dir, Terminal(), *args)
    assert label in shown
    assert "100%" in shown


@pytest.mark.parametrize(
    ("where", "stderr"),
    [("global", Terminal), ("command", Terminal), ("no-terminal", io.StringIO)],
)
@pytest.mark.parametrize("index", range(4))
def test_no_progress(
    populated: Rados,
    data_dir: Path,
    tmp_path: Path,
    where: str,
    stderr: type[io.StringIO],
    index: int,
) -> None:
    _, args = _commands(tmp_path)[index]
    if where == "global":
        args = ["--no-progress", *args]
    elif where == "command":
        args = [*args, "--no-progress"]
    assert _run(data_dir, stderr(), *args) == ""
