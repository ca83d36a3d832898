"""``csi-rbd qemu drive``: the -drive value, and that QEMU accepts what it prints."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from csi_rbd import cli
from csi_rbd.engine.native import RBD, Image, Rados
from csi_rbd.vm.drive import (
    DiskSettings,
    DriveError,
    ceph_spec,
    nbd_drive,
    nbd_uri,
    quote_option,
    rbd_drive,
)
from csi_rbd.vm.rbd_spec import parse
from tests.vm.conftest import QEMU_IMG, needs_qemu_system, needs_qemu_tools
from tests.vm.guest import QEMU

MiB = 1 << 20


# -- settings --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("metadata", "context", "flags", "expected"),
    [
        ({}, {}, {}, ("none", "unmap")),
        ({"csi.cache": "writeback", "csi.discard": "ignore"}, {}, {}, ("writeback", "ignore")),
        ({}, {"cache": "writethrough", "discard": "ignore"}, {}, ("writethrough", "ignore")),
        ({"csi.cache": "writeback"}, {"cache": "none"}, {}, ("writeback", "unmap")),
        ({"csi.cache": "writeback"}, {}, {"cache": "writethrough"}, ("writethrough", "unmap")),
        ({"csi.cache": "bogus"}, {"cache": "writeback"}, {}, ("writeback", "unmap")),
        ({"csi.cache": "bogus", "csi.discard": "bogus"}, {}, {}, ("none", "unmap")),
        ({}, {}, {"discard": "ignore"}, ("none", "ignore")),
    ],
    ids=["defaults", "metadata", "context", "metadata-wins", "flag-wins", "bad-metadata",
         "bad-everything", "flag"],
)  # fmt: skip
def test_settings(
    metadata: dict[str, str],
    context: dict[str, str],
    flags: dict[str, str],
    expected: tuple[str, str],
) -> None:
    settings = DiskSettings.from_metadata(metadata, context=context, **flags)
    assert (settings.cache, settings.discard) == expected


def test_bad_settings_are_refused() -> None:
    with pytest.raises(DriveError):
        DiskSettings("unsafe")
    with pytest.raises(DriveError):
        DiskSettings.from_metadata({}, discard="always")


# -- values ----------------------------------------------------------------------------------
def test_nbd_drive_value() -> None:
    uri = nbd_uri("/run/csi rbd,x/vm.sock", "rbd/vm-1@base")
    assert uri == "nbd+unix:///rbd%2Fvm-1%40base?socket=/run/csi%20rbd%2Cx/vm.sock"
    drive = nbd_drive("/run/a,b.sock", "rbd/vm", DiskSettings("writeback"), read_only=True)
    assert drive.value() == (
        "file=nbd+unix:///rbd%2Fvm?socket=/run/a%2Cb.sock,format=raw,cache=writeback,"
        "discard=unmap,readonly=on"
    )
    assert drive.image_opts() == (
        "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=/run/a,,b.sock,"
        "file.export=rbd/vm,cache.direct=off,cache.no-flush=off,discard=unmap,read-only=on"
    )
    with pytest.raises(DriveError):
        nbd_uri("relative.sock", "x")


def test_rbd_drive_value_doubles_commas() -> None:
    spec = ceph_spec(
        "rbd",
        "vm:1",
        namespace="tenant",
        user="csi",
        conf=None,
        monitors=("127.0.0.1:3300", "[::1]:3300"),
    )
    drive = rbd_drive(spec, DiskSettings())
    assert drive.filename == (
        "rbd:rbd/tenant/vm\\:1:id=csi:mon_host=127.0.0.1\\:3300,[\\:\\:1]\\:3300"
    )
    assert drive.value() == (
        "file=rbd:rbd/tenant/vm\\:1:id=csi:mon_host=127.0.0.1\\:3300,,[\\:\\:1]\\:3300,"
        "format=raw,cache=none,discard=unmap"
    )
    assert parse(drive.filename) == spec
    assert quote_option("a,b,,c") == "a,,b,,,,c"
    assert rbd_drive(ceph_spec("p", "i", "s"), DiskSettings()).read_only


# -- the command ------------------------------------------------------------------------------
def run_cli(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out.strip(), err.strip()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    with Rados(data_dir=data) as cluster:
        ioctx = cluster.open_ioctx("rbd")
        RBD().create(ioctx, "vm", 16 * MiB)
        with Image(ioctx, "vm") as image:
            image.metadata_set("csi.cache", "writeback")
            image.metadata_set("csi.discard", "ignore")
            image.create_snap("base")
    return data


def test_command_reads_the_metadata(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(
        "--data-dir", str(data_dir), "qemu", "drive", "rbd/vm", "--socket", "/run/s.sock",
        capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    assert (
        out
        == "file=nbd+unix:///rbd%2Fvm?socket=/run/s.sock,format=raw,cache=writeback,discard=ignore"
    )
    code, out, _ = run_cli(
        "--data-dir", str(data_dir), "qemu", "drive", "vm@base", "--socket", "/run/s.sock",
        "--cache", "none", "--format", "json", capsys=capsys,
    )  # fmt: skip
    answer = json.loads(out)
    assert code == 0
    assert answer["cache"] == "none" and answer["discard"] == "ignore" and answer["read_only"]
    assert answer["drive"].endswith(",readonly=on")
    assert answer["filename"] == "nbd+unix:///rbd%2Fvm%40base?socket=/run/s.sock"


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (("rbd/vm",), 22, "pass --socket"),
        (("rbd/nope", "--socket", "/s"), 2, "does not exist"),
        (("rbd/vm@nope", "--socket", "/s"), 2, "does not exist"),
        (("nopool/vm", "--socket", "/s"), 2, "does not exist"),
        (("rbd/vm", "--socket", "/s", "--cache", "unsafe"), 2, "invalid choice"),
        (("rbd/vm", "--socket", "/s", "--cluster", "elsewhere"), 2, "not configured"),
    ],
)
def test_command_errors(
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    argv: tuple[str, ...],
    code: int,
    message: str,
) -> None:
    answer, _, err = run_cli("--data-dir", str(data_dir), "qemu", "drive", *argv, capsys=capsys)
    assert answer == code and message in err, err


def test_command_for_a_ceph_cluster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "clusters.yaml"
    config.write_text(
        "clusters:\n"
        "  - id: ceph-a\n    engine: ceph\n    monitors: ['10.0.0.1:3300', '10.0.0.2:3300']\n"
        "    pool: vms\n    radosNamespace: tenant-a\n"
    )
    code, out, err = run_cli(
        "qemu", "drive", "disk@gold", "--config", str(config), "--cluster", "ceph-a",
        "--id", "csi", "--keyring", "/etc/ceph/k=1", "--cache", "writeback", "--discard", "unmap",
        capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    assert out == (
        "file=rbd:vms/tenant-a/disk@gold:id=csi:keyring=/etc/ceph/k\\=1:"
        "mon_host=10.0.0.1\\:3300,,10.0.0.2\\:3300,format=raw,cache=writeback,discard=unmap,"
        "readonly=on"
    )


# -- QEMU accepts it --------------------------------------------------------------------------
@needs_qemu_tools
@needs_qemu_system
def test_qemu_parses_the_rbd_drive(tmp_path: Path) -> None:
    """Without a cluster QEMU cannot open the image, but it must get as far as reading
    the conf file named in the spec: the name it reports proves how it parsed the rest."""
    conf = str(tmp_path / "no such, dir" / "ceph:a@b=c.conf")
    spec = ceph_spec(
        "rbd", "vm@1:x", user="csi", conf=conf, monitors=("127.0.0.1:3300", "127.0.0.2:3300")
    )
    drive = rbd_drive(spec, DiskSettings("writeback", "unmap"))
    info = subprocess.run(
        [str(QEMU_IMG), "info", "--image-opts", drive.image_opts()],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert f"error reading conf file {conf}" in info.stderr, info.stderr
    system = subprocess.run(
        [str(QEMU), "-machine", "none", "-nodefaults", "-display", "none", "-S",
         "-drive", drive.value() + ",if=none,id=disk0"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert f"error reading conf file {conf}" in system.stderr, system.stderr
