"""Every bad input: a non-zero errno exit, exactly one line on stderr, nothing changed."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from csi_rbd import cli
from csi_rbd.engine.native import Rados
from tests.cli.conftest import Result, Runner, fingerprint, run_script

ENOENT, EINVAL, EEXIST = errno.ENOENT, errno.EINVAL, errno.EEXIST
EBUSY, ENOTEMPTY = errno.EBUSY, errno.ENOTEMPTY
SIZE_HINT = "expected a number with an optional K/M/G/T suffix"

# (id, arguments, exit status, the message after "csi-rbd: error: ")
BAD_INPUTS: list[tuple[str, list[str], int, str]] = [
    # missing pool / image / snapshot
    ("info-no-image", ["image", "info", "rbd/nope"], ENOENT, "image rbd/nope does not exist"),
    ("info-no-pool", ["image", "info", "nopool/a"], ENOENT, "pool nopool does not exist"),
    ("info-no-snap", ["image", "info", "a@nope"], ENOENT, "snapshot rbd/a@nope does not exist"),
    ("ls-no-pool", ["image", "ls", "nopool"], ENOENT, "pool nopool does not exist"),
    ("create-no-pool", ["image", "create", "-s", "1M", "no/x"], ENOENT, "pool no does not exist"),
    ("rm-no-image", ["image", "rm", "nope"], ENOENT, "image rbd/nope does not exist"),
    ("resize-no-image", ["image", "resize", "-s", "1G", "z"], ENOENT, "image rbd/z does not exist"),
    ("rename-no-image", ["image", "rename", "nope", "z"], ENOENT, "image rbd/nope does not exist"),
    ("flatten-no-image", ["image", "flatten", "p2/a"], ENOENT, "image p2/a does not exist"),
    ("children-no-snap", ["image", "children", "a@zz"], ENOENT, "snapshot rbd/a@zz does not exist"),
    ("du-no-pool", ["image", "du", "nopool"], ENOENT, "pool nopool does not exist"),
    ("du-no-image", ["image", "du", "rbd/nope"], ENOENT, "image rbd/nope does not exist"),
    ("du-no-snap", ["image", "du", "a@nope"], ENOENT, "snapshot rbd/a@nope does not exist"),
    ("diff-no-image", ["image", "diff", "nope"], ENOENT, "image rbd/nope does not exist"),
    (
        "diff-no-from-snap",
        ["image", "diff", "--from-snap", "zz", "a"],
        ENOENT,
        "snapshot rbd/a@zz does not exist",
    ),
    (
        "clone-no-snap",
        ["image", "clone", "a@nope", "z"],
        ENOENT,
        "snapshot rbd/a@nope does not exist",
    ),
    ("clone-no-parent", ["image", "clone", "q@s1", "z"], ENOENT, "image rbd/q does not exist"),
    ("clone-no-dest-pool", ["image", "clone", "a@s1", "np/z"], ENOENT, "pool np does not exist"),
    ("snap-create-no-image", ["snap", "create", "nope@s"], ENOENT, "image rbd/nope does not exist"),
    ("snap-rm-no-snap", ["snap", "rm", "a@nope"], ENOENT, "snapshot rbd/a@nope does not exist"),
    ("rollback-no-snap", ["snap", "rollback", "a@no"], ENOENT, "snapshot rbd/a@no does not exist"),
    ("protect-no-snap", ["snap", "protect", "a@no"], ENOENT, "snapshot rbd/a@no does not exist"),
    ("snap-ls-no-image", ["snap", "ls", "p2/nope"], ENOENT, "image p2/nope does not exist"),
    ("pool-rm-no-pool", ["pool", "rm", "nopool"], ENOENT, "pool nopool does not exist"),
    # bad sizes and layouts
    (
        "size-10Q",
        ["image", "create", "--size", "10Q", "new"],
        EINVAL,
        f"invalid size '10Q': {SIZE_HINT}",
    ),
    (
        "size-neg",
        ["image", "create", "--size=-1", "new"],
        EINVAL,
        f"invalid size '-1': {SIZE_HINT}",
    ),
    (
        "size-frac",
        ["image", "create", "-s", "1.5G", "new"],
        EINVAL,
        f"invalid size '1.5G': {SIZE_HINT}",
    ),
    (
        "resize-10Q",
        ["image", "resize", "-s", "10Q", "a"],
        EINVAL,
        f"invalid size '10Q': {SIZE_HINT}",
    ),
    (
        "size-huge",
        ["image", "create", "-s", "9E", "new"],
        EINVAL,
        "invalid size '9E': larger than 9223372036854775807 bytes",
    ),
    (
        "order-26",
        ["image", "create", "-s", "1M", "--order", "26", "new"],
        EINVAL,
        "invalid order 26: expected 12 to 25",
    ),
    (
        "object-size-3M",
        ["image", "create", "-s", "1M", "--object-size", "3M", "new"],
        EINVAL,
        "invalid object size 3145728: a power of two from 4 KiB to 32 MiB is required",
    ),
    (
        "feature-unknown",
        ["image", "create", "-s", "1M", "--image-feature", "bogus", "new"],
        EINVAL,
        "unknown image feature 'bogus' (known: layering, striping, exclusive-lock, object-map, "
        "fast-diff, deep-flatten, journaling, data-pool)",
    ),
    (
        "feature-deps",
        ["image", "create", "-s", "1M", "--image-feature", "layering,fast-diff", "new"],
        EINVAL,
        "image feature fast-diff needs object-map",
    ),
    (
        "feature-unsupported",
        ["image", "create", "-s", "1M", "--image-feature", "exclusive-lock,journaling", "new"],
        EINVAL,
        "features not supported: journaling",
    ),
    # invalid names and specs
    (
        "spec-namespace",
        ["image", "create", "-s", "1M", "a/b/c"],
        EINVAL,
        "invalid image spec 'a/b/c': namespaces are not supported",
    ),
    ("spec-empty-image", ["image", "create", "-s", "1M", "rbd/"], EINVAL, "image name is empty"),
    ("spec-empty-pool", ["image", "info", "/a"], EINVAL, "pool name is empty"),
    (
        "spec-reserved",
        ["image", "create", "-s", "1M", ".."],
        EINVAL,
        "invalid image name '..': it is reserved",
    ),
    (
        "spec-too-long",
        ["image", "create", "-s", "1M", "x" * 251],
        EINVAL,
        "invalid image name: longer than 250 bytes",
    ),
    (
        "create-with-snap",
        ["image", "create", "-s", "1M", "new@s"],
        EINVAL,
        "a snapshot is not allowed here: 'new@s'",
    ),
    (
        "snap-create-no-name",
        ["snap", "create", "a"],
        EINVAL,
        "snapshot name was not specified in 'a' (use image@snapshot)",
    ),
    (
        "snap-ls-with-snap",
        ["snap", "ls", "a@s1"],
        EINVAL,
        "a snapshot is not allowed here: 'a@s1'",
    ),
    (
        "clone-no-snap-name",
        ["image", "clone", "a", "z"],
        EINVAL,
        "snapshot name was not specified in 'a' (use image@snapshot)",
    ),
    (
        "pool-create-bad",
        ["pool", "create", "a/b"],
        EINVAL,
        "invalid pool name 'a/b': it contains '/'",
    ),
    ("pool-create-empty", ["pool", "create", ""], EINVAL, "pool name is empty"),
    # operations the state forbids
    (
        "shrink-no-flag",
        ["image", "resize", "--size", "1M", "a"],
        EINVAL,
        "shrinking image rbd/a from 16 MiB to 1 MiB needs --allow-shrink",
    ),
    (
        "resize-snapshot",
        ["image", "resize", "-s", "1G", "a@s1"],
        EINVAL,
        "a snapshot is not allowed here: 'a@s1'",
    ),
    (
        "rm-with-snaps",
        ["image", "rm", "a"],
        ENOTEMPTY,
        "image rbd/a has 2 snapshots; remove them first (csi-rbd snap purge rbd/a)",
    ),
    ("create-exists", ["image", "create", "-s", "1M", "a"], EEXIST, "image rbd/a already exists"),
    ("rename-exists", ["image", "rename", "a", "b"], EEXIST, "image rbd/b already exists"),
    (
        "rename-cross-pool",
        ["image", "mv", "a", "p2/z"],
        EINVAL,
        "cannot rename rbd/a to p2/z: renaming across pools",
    ),
    ("clone-exists", ["image", "clone", "a@s1", "b"], EEXIST, "image rbd/b already exists"),
    (
        "clone-no-layering",
        ["image", "clone", "--image-feature", "deep-flatten", "a@s1", "z"],
        EINVAL,
        "a clone needs the layering feature",
    ),
    ("flatten-not-clone", ["image", "flatten", "a"], EINVAL, "image rbd/a is not a clone"),
    ("snap-exists", ["snap", "create", "a@s1"], EEXIST, "snapshot rbd/a@s1 already exists"),
    (
        "snap-rm-protected",
        ["snap", "rm", "a@s1"],
        EBUSY,
        "snapshot rbd/a@s1 is protected; unprotect it first",
    ),
    ("protect-twice", ["snap", "protect", "a@s1"], EBUSY, "snapshot rbd/a@s1 is already protected"),
    (
        "unprotect-twice",
        ["snap", "unprotect", "a@s2"],
        EINVAL,
        "snapshot rbd/a@s2 is not protected",
    ),
    (
        "unprotect-with-clones",
        ["snap", "unprotect", "a@s1"],
        EBUSY,
        "snapshot rbd/a@s1 has clones (rbd/c); flatten or remove them first",
    ),
    (
        "purge-protected",
        ["snap", "purge", "a"],
        EBUSY,
        "image rbd/a has protected snapshots (s1); unprotect them first",
    ),
    ("pool-exists", ["pool", "create", "p2"], EEXIST, "pool p2 already exists"),
    (
        "pool-rm-not-empty",
        ["pool", "rm", "rbd"],
        ENOTEMPTY,
        "pool rbd is not empty (3 images); remove them first or pass --force",
    ),
    (
        "pool-rm-one-image",
        ["pool", "rm", "p2"],
        ENOTEMPTY,
        "pool p2 is not empty (1 image); remove it first or pass --force",
    ),
    # files
    (
        "import-no-file",
        ["image", "import", "{tmp}/missing.img", "z"],
        ENOENT,
        "cannot open {tmp}/missing.img: No such file or directory",
    ),
    (
        "import-directory",
        ["image", "import", "{tmp}", "z"],
        errno.EISDIR,
        "cannot import {tmp}: it is a directory",
    ),
    (
        "import-exists",
        ["image", "import", "{tmp}/small.img", "a"],
        EEXIST,
        "image rbd/a already exists",
    ),
    (
        "import-no-pool",
        ["image", "import", "{tmp}/small.img", "np/z"],
        ENOENT,
        "pool np does not exist",
    ),
    (
        "import-bad-sparse-size",
        ["image", "import", "--sparse-size", "3K", "{tmp}/small.img", "z"],
        EINVAL,
        "invalid sparse size '3K': a power of two from 512 bytes to 4 MiB is required",
    ),
    (
        "import-stdin-no-name",
        ["image", "import", "-"],
        EINVAL,
        "importing from stdin needs a destination POOL/IMAGE",
    ),
    (
        "export-exists",
        ["image", "export", "a", "{tmp}/small.img"],
        EEXIST,
        "file {tmp}/small.img already exists",
    ),
    (
        "export-no-snap",
        ["image", "export", "a@nope", "{tmp}/out.img"],
        ENOENT,
        "snapshot rbd/a@nope does not exist",
    ),
    (
        "export-no-dir",
        ["image", "export", "a", "{tmp}/no/such/dir.img"],
        ENOENT,
        "cannot create {tmp}/no/such/dir.img: No such file or directory",
    ),
]

# run through the installed console script as well
SCRIPT_SUBSET = {
    "info-no-image",
    "info-no-pool",
    "size-10Q",
    "size-neg",
    "shrink-no-flag",
    "rm-with-snaps",
    "clone-no-snap",
    "create-exists",
    "spec-namespace",
    "import-no-file",
}


def _expand(args: list[str], message: str, tmp: Path) -> tuple[list[str], str]:
    return [a.replace("{tmp}", str(tmp)) for a in args], message.replace("{tmp}", str(tmp))


def _check(result: Result, code: int, message: str) -> None:
    assert result.err == f"csi-rbd: error: {message}\n"
    assert result.code == code
    assert result.out == ""


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "small.img").write_bytes(b"small" * 100)
    return tmp_path


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [pytest.param(a, c, m, id=i) for i, a, c, m in BAD_INPUTS],
)
def test_bad_input_in_process(
    populated: Rados,
    run: Runner,
    data_dir: Path,
    files: Path,
    args: list[str],
    code: int,
    message: str,
) -> None:
    args, message = _expand(args, message, files)
    before = fingerprint(data_dir)
    listing = sorted(p.name for p in files.iterdir())
    _check(run(*args), code, message)
    assert fingerprint(data_dir) == before
    assert sorted(p.name for p in files.iterdir()) == listing


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [pytest.param(a, c, m, id=i) for i, a, c, m in BAD_INPUTS if i in SCRIPT_SUBSET],
)
def test_bad_input_console_script(
    populated: Rados,
    script: Runner,
    data_dir: Path,
    files: Path,
    args: list[str],
    code: int,
    message: str,
) -> None:
    args, message = _expand(args, message, files)
    before = fingerprint(data_dir)
    result = script(*args)
    _check(result, code, message)
    assert "Traceback" not in result.err
    assert fingerprint(data_dir) == before


def test_subset_names_exist() -> None:
    assert {i for i, *_ in BAD_INPUTS} >= SCRIPT_SUBSET


# argparse's own usage errors: exit 2, "usage: ..." and "csi-rbd ...: error: ..."
USAGE_ERRORS = [
    ([], "the following arguments are required: COMMAND"),
    (["image"], "the following arguments are required: COMMAND"),
    (["image", "frobnicate"], "invalid choice: 'frobnicate'"),
    (["image", "create", "img"], "the following arguments are required: --size/-s"),
    (["image", "create", "-s", "1M", "--order", "22", "--object-size", "4M", "x"], "not allowed"),
    (["image", "ls", "--format", "xml"], "invalid choice: 'xml'"),
    (["image", "create", "-s", "1M", "--order", "x", "y"], "invalid int value: 'x'"),
]


@pytest.mark.parametrize(("args", "fragment"), USAGE_ERRORS)
def test_usage_errors(run: Runner, data_dir: Path, args: list[str], fragment: str) -> None:
    result = run(*args)
    assert result.code == 2
    assert result.err.startswith("usage: csi-rbd")
    assert fragment in result.err.splitlines()[-1]
    assert not data_dir.exists()  # parsing failed before anything was opened


def test_usage_error_console_script(data_dir: Path) -> None:
    proc = run_script(data_dir, "image", "create", "img")
    assert proc.returncode == 2
    assert b"required: --size" in proc.stderr
    assert b"Traceback" not in proc.stderr


def test_data_dir_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["--data-dir", str(blocker), "image", "ls"]) == errno.ENOTDIR
    out, err = capsys.readouterr()
    assert (out, err) == (
        "",
        f"csi-rbd: error: cannot open data directory {blocker}: Not a directory\n",
    )
    assert blocker.read_text() == "x"
