"""Tiny Linux guests under QEMU (TCG) for the VM tests.

A guest is Debian's kernel (``/boot/vmlinuz-*``, package linux-image-amd64)
and an initramfs built here: a static busybox (busybox-static), the few
kernel modules a virtio disk and ext4 need (resolved through
``modules.dep``), and ``/init``, a shell script made of the test's commands.
The script's output goes to the serial console, a file; lines
``CSI <key> <value...>`` are the results the test reads. The guest ends with
``poweroff -f``; with ``-no-reboot`` a kernel panic (``panic=-1``) ends QEMU
too, and a hard timeout kills it whatever happens.

KVM is not used: on this kind of machine it cannot boot a Linux guest;
TCG boots this one in a few seconds.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QEMU = shutil.which("qemu-system-x86_64")


def _is_static(path: str) -> bool:
    """A static ELF has no PT_INTERP; busybox from busybox-static is one."""
    try:
        data = Path(path).read_bytes()[:4096]
    except OSError:
        return False
    return data[:4] == b"\x7fELF" and b"ld-linux" not in data  # the interpreter's name


BUSYBOX = next(
    (p for p in ("/bin/busybox", "/usr/bin/busybox") if os.path.exists(p) and _is_static(p)),
    None,
)
MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")


def kernel() -> tuple[Path, Path] | None:
    """(vmlinuz, its modules directory) of the newest kernel with modules, or None."""
    for vmlinuz in sorted(glob.glob("/boot/vmlinuz-*"), reverse=True):
        version = vmlinuz.removeprefix("/boot/vmlinuz-")
        modules = Path("/lib/modules") / version
        if os.access(vmlinuz, os.R_OK) and (modules / "modules.dep").exists():
            return Path(vmlinuz), modules
    return None


def unusable() -> str:
    """Why guests cannot run here ('' when they can)."""
    missing = []
    if QEMU is None:
        missing.append("qemu-system-x86_64 (qemu-system-x86)")
    if BUSYBOX is None:
        missing.append("a static busybox (busybox-static)")
    if kernel() is None:
        missing.append("a readable /boot/vmlinuz-* with modules (linux-image-amd64)")
    return f"needs {', '.join(missing)}" if missing else ""


# -- initramfs -------------------------------------------------------------------------------
def module_files(modules_dir: Path, names: Iterable[str]) -> list[Path]:
    """The ``.ko`` files of ``names`` and their dependencies, in loading order
    (none for a module built into the kernel)."""
    deps: dict[str, list[str]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        deps[target] = rest.split()
    by_name = {Path(path).name.split(".ko")[0].replace("-", "_"): path for path in deps}
    ordered: list[str] = []

    def add(path: str) -> None:
        if path in ordered:
            return
        for dep in reversed(deps.get(path, [])):
            add(dep)
        ordered.append(path)

    builtin_file = modules_dir / "modules.builtin"
    builtin = {
        Path(line).name.split(".ko")[0].replace("-", "_")
        for line in (builtin_file.read_text().split() if builtin_file.exists() else [])
    }
    for name in names:
        if name in builtin:
            continue
        if name not in by_name:
            raise FileNotFoundError(f"kernel module {name} not in {modules_dir}/modules.dep")
        add(by_name[name])
    return [modules_dir / path for path in ordered]


class _Cpio:
    """A ``newc`` cpio archive (what the kernel unpacks into its initramfs)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.inode = 1

    def _entry(self, name: str, mode: int, body: bytes) -> None:
        header = "070701" + "".join(
            f"{value:08x}"
            for value in (self.inode, mode, 0, 0, 1, 0, len(body), 0, 0, 0, 0, len(name) + 1, 0)
        )
        self.inode += 1
        self.data += header.encode() + name.encode() + b"\0"
        self.data += b"\0" * (-len(self.data) % 4)
        self.data += body
        self.data += b"\0" * (-len(self.data) % 4)

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755, b"")

    def file(self, name: str, body: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, body)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"")
        return bytes(self.data) + b"\0" * (-len(self.data) % 512)


INIT_PROLOGUE = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
{insmods}
for i in $(seq 1 100); do [ -b /dev/vda ] && break; sleep 0.1; done
echo "CSI booted $(cut -d' ' -f1 /proc/uptime)"
"""
INIT_EPILOGUE = """
sync
echo "CSI done $(cut -d' ' -f1 /proc/uptime)"
poweroff -f
"""


def build_initramfs(script: str, destination: Path) -> Path:
    """An initramfs whose ``/init`` loads the modules and runs ``script`` (busybox sh)."""
    found = kernel()
    assert found is not None and BUSYBOX is not None, unusable()
    _, modules_dir = found
    archive = _Cpio()
    for directory in ("bin", "dev", "proc", "sys", "mnt", "lib", "lib/modules"):
        archive.directory(directory)
    archive.file("bin/busybox", Path(BUSYBOX).read_bytes(), 0o755)
    loads = []
    for index, module in enumerate(module_files(modules_dir, MODULES)):
        name = f"lib/modules/{index:02d}-{module.name}"
        archive.file(name, module.read_bytes())
        loads.append(f"insmod /{name}")
    init = INIT_PROLOGUE.format(insmods="\n".join(loads)) + script + INIT_EPILOGUE
    archive.file("init", init.encode(), 0o755)
    destination.write_bytes(archive.finish())
    return destination


# -- running -----------------------------------------------------------------------------------
@dataclass
class GuestRun:
    """What one boot printed, and how long it took."""

    console: str
    seconds: float
    returncode: int | None
    results: dict[str, list[str]] = field(default_factory=dict)

    def result(self, key: str) -> str:
        if key not in self.results:
            raise AssertionError(f"the guest reported no {key!r}; console:\n{self.console[-4000:]}")
        return self.results[key][-1]

    @property
    def boot_seconds(self) -> float:
        """Guest uptime when the script started (kernel + module loading)."""
        return float(self.result("booted"))


_RESULT = re.compile(r"CSI (\S+) ?(.*?)\r?$", re.MULTILINE)  # firmware noise may precede


def boot(
    drives: Sequence[str],
    script: str,
    workdir: Path,
    *,
    timeout: float = 180.0,
    memory_mib: int = 256,
) -> GuestRun:
    """Boot a guest with ``drives`` (``-drive`` values) running ``script``; wait for it."""
    found = kernel()
    assert QEMU is not None and found is not None, unusable()
    vmlinuz, _ = found
    workdir.mkdir(parents=True, exist_ok=True)
    initrd = build_initramfs(script, workdir / "initramfs.cpio")
    console = workdir / "console.log"
    console.unlink(missing_ok=True)
    argv = [
        QEMU,
        "-accel", "tcg",
        "-machine", "q35",  # boots faster than pc under TCG here
        "-m", str(memory_mib),
        "-smp", "1",
        "-nographic",
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-monitor", "none",
        "-serial", f"file:{console}",
        "-kernel", str(vmlinuz),
        "-initrd", str(initrd),
        "-append", "console=ttyS0 panic=-1 loglevel=4 rdinit=/init",
    ]  # fmt: skip
    for drive in drives:
        argv += ["-drive", drive]
    started = time.monotonic()
    with open(workdir / "qemu.log", "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            returncode: int | None = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            returncode = None
    seconds = time.monotonic() - started
    text = console.read_text(errors="replace") if console.exists() else ""
    run = GuestRun(text, seconds, returncode)
    for match in _RESULT.finditer(text):
        run.results.setdefault(match.group(1), []).append(match.group(2))
    if returncode != 0 or "done" not in run.results:
        qemu_log = (workdir / "qemu.log").read_text(errors="replace")
        raise AssertionError(
            f"guest failed (exit {returncode}, {seconds:.1f}s); qemu: {qemu_log[-2000:]}\n"
            f"console:\n{text[-6000:]}"
        )
    return run


def query_drive(drive: str, timeout: float = 60.0) -> dict[str, Any]:
    """Open ``drive`` (a -drive value) in a QEMU without a machine; QMP's view of it.

    Returns the ``query-block`` entry of the drive: QEMU parsed the value,
    opened the disk, and says which cache flags it applied.
    """
    assert QEMU is not None, unusable()
    commands = [{"execute": "qmp_capabilities"}, {"execute": "query-block"}, {"execute": "quit"}]
    answer = subprocess.run(
        [QEMU, "-machine", "none", "-nodefaults", "-no-user-config", "-display", "none",
         "-qmp", "stdio", "-drive", f"{drive},if=none,id=disk0"],
        input="".join(json.dumps(c) + "\n" for c in commands),
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    for line in answer.stdout.splitlines():
        reply = json.loads(line)
        if isinstance(reply.get("return"), list):
            for device in reply["return"]:
                if device.get("device") == "disk0":
                    found: dict[str, Any] = device
                    return found
    raise AssertionError(f"QEMU did not open {drive}: {answer.stderr}{answer.stdout}")
