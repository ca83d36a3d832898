"""A QEMU guest on NBD exports: ``csi-rbd nbd serve`` and ``csi-rbd qemu drive``.

Three volumes made by the real controller, one per cache mode (StorageClass
parameter ``cache``; for one of them changed by ControllerModifyVolume, which
records it as image metadata ``csi.cache``), are each
exported by a ``csi-rbd nbd serve --cache <mode>`` process on a unix socket.
The guest's disks are exactly what ``csi-rbd qemu drive`` prints for them
(plus ``if=virtio``): QEMU's NBD client with the volume's cache and
``discard=unmap``. The guest does what :mod:`tests.vm.disk_checks` says on
each disk; the host checks the engine while the servers still run (so what
the guest flushed went through the servers' caches) and that the trims freed
engine space.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from csi_rbd._proto import csi_pb2 as csi
from csi_rbd.engine.native import Rados
from csi_rbd.ids import ResourceId
from tests.csi.conftest import block_capability
from tests.csi.driver import Driver
from tests.vm import disk_checks, guest
from tests.vm.conftest import QEMU_IMG, needs_guest, needs_qemu_tools

pytestmark = [needs_guest, needs_qemu_tools]
MODES = ("none", "writethrough", "writeback")
CACHE_FLAGS = {  # how QEMU reports its cache modes (query-block)
    "none": {"writeback": True, "direct": True, "no-flush": False},
    "writethrough": {"writeback": False, "direct": False, "no-flush": False},
    "writeback": {"writeback": True, "direct": False, "no-flush": False},
}


def csi_rbd(data_dir: Path, *argv: str) -> list[str]:
    return [sys.executable, "-m", "csi_rbd.cli", "--data-dir", str(data_dir), *argv]


@contextmanager
def nbd_server(
    data_dir: Path, spec: str, socket: Path, cache: str, log: Path
) -> Iterator[subprocess.Popen[str]]:
    """``csi-rbd nbd serve`` until the block ends; it must stop cleanly on SIGTERM."""
    with open(log, "w") as errors:
        process = subprocess.Popen(
            csi_rbd(data_dir, "nbd", "serve", spec, "--socket", str(socket), "--cache", cache),
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # "serving SPEC at URI" once it listens
        assert line.startswith(f"serving {spec}"), (line, log.read_text())
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        assert code == 0, log.read_text()


def drive_for(data_dir: Path, spec: str, socket: Path) -> dict[str, str]:
    answer = subprocess.run(
        csi_rbd(data_dir, "--format", "json", "qemu", "drive", spec, "--socket", str(socket)),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    drive: dict[str, str] = json.loads(answer.stdout)
    return drive


def test_guest_on_nbd_exports(driver: Driver) -> None:
    volumes = []
    for mode in MODES:
        # `qemu drive` finds the mode as the node does: the writeback volume through the
        # metadata ControllerModifyVolume writes, the others through the volume context
        created_as = "none" if mode == "writeback" else mode
        volume = driver.create(
            f"vm-{mode}",
            disk_checks.DISK_SIZE,
            block_capability(),
            parameters={"cache": created_as},
        )
        if mode != created_as:
            driver.controller.ControllerModifyVolume(
                csi.ControllerModifyVolumeRequest(
                    volume_id=volume.volume_id, mutable_parameters={"cache": mode}
                )
            )
        volumes.append(volume)
    specs = [f"rbd/{ResourceId.decode(v.volume_id).volume_image()}" for v in volumes]
    sockets = [driver.root / f"nbd-{mode}.sock" for mode in MODES]
    with (
        nbd_server(driver.data_dir, specs[0], sockets[0], MODES[0], driver.root / "nbd-0.log"),
        nbd_server(driver.data_dir, specs[1], sockets[1], MODES[1], driver.root / "nbd-1.log"),
        nbd_server(driver.data_dir, specs[2], sockets[2], MODES[2], driver.root / "nbd-2.log"),
    ):
        drives = []
        for mode, spec, socket in zip(MODES, specs, sockets, strict=True):
            drive = drive_for(driver.data_dir, spec, socket)
            assert (drive["cache"], drive["discard"]) == (mode, "unmap")
            info = subprocess.run(
                [str(QEMU_IMG), "info", "--output=json", "--image-opts", drive["image_opts"]],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            assert json.loads(info.stdout)["virtual-size"] == disk_checks.DISK_SIZE
            opened = guest.query_drive(drive["drive"])["inserted"]  # QEMU takes the value
            assert opened["image"]["virtual-size"] == disk_checks.DISK_SIZE
            assert opened["cache"] == CACHE_FLAGS[mode] and not opened["ro"]
            drives.append(drive["drive"] + ",if=virtio")
        print("\n" + "\n".join(drives))
        devices = [f"vd{'abc'[i]}" for i in range(len(MODES))]
        started = time.monotonic()
        run = guest.boot(
            drives, "".join(map(disk_checks.guest_script, devices)), driver.root / "guest"
        )
        print(f"guest: {run.seconds:.1f}s wall, script done at {run.result('done')}s (guest)")
        assert "error" not in run.results, run.results["error"]
        with Rados(data_dir=driver.data_dir) as cluster:
            ioctx = cluster.open_ioctx("rbd")
            for mode, device, spec in zip(MODES, devices, specs, strict=True):
                assert run.result(f"disk-{device}") == "ok"
                used = disk_checks.check_disk(
                    ioctx, spec.split("/")[1], device, driver.root / "check"
                )
                print(f"cache={mode}: {device} ok, engine used {used / (1 << 20):.1f} MiB")
        print(f"checks done {time.monotonic() - started:.1f}s after the boot started")
    for volume in volumes:
        driver.controller.DeleteVolume(csi.DeleteVolumeRequest(volume_id=volume.volume_id))
