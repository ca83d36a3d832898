"""Golden image workflow (Ceph's "QEMU and block devices" page, through the CSI driver).

1. A qcow2 golden image is made with qemu-img (an ext4 filesystem holding a
   file) and qemu-io (pattern writes).
2. It is imported into a block volume: ``qemu-img convert -O raw`` into the
   device NodePublishVolume exposed.
3. CreateSnapshot snapshots the volume; CreateVolume makes 20 clones from the
   snapshot (copy-on-write, so each should take about as long as an empty
   volume: the timings are printed, never asserted).
4. Every clone reads like the golden image; each is then written
   differently (one by a booted guest that mounts its filesystem), and all
   of them, the snapshot and the golden volume stay independent.
"""

from __future__ import annotations

import hashlib
import statistics
import subprocess
import time
from pathlib import Path

from csi_rbd._proto import csi_pb2 as csi
from csi_rbd.engine.native import RBD, Image, IoCtx, Rados
from csi_rbd.ids import ResourceId
from tests.csi.conftest import block_capability
from tests.csi.driver import Driver
from tests.vm import disk_checks, guest
from tests.vm.conftest import QEMU_IMG, QEMU_IO, needs_data_path, needs_guest, needs_qemu_tools

pytestmark = [needs_data_path, needs_qemu_tools, needs_guest]
MiB = 1 << 20
SIZE = 64 * MiB
CLONES = 20
HELLO = b"hello from the golden image\n"
CLONE_WRITE_AT = 56 * MiB  # outside the filesystem and the golden patterns
GOLDEN_PATTERNS = ((0x5A, 40 * MiB, MiB), (0xA5, 48 * MiB, 512 << 10))


def sh(*argv: str | Path) -> str:
    answer = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=120, check=False
    )
    assert answer.returncode == 0, f"{argv}: {answer.stdout}{answer.stderr}"
    return answer.stdout


def make_golden(workdir: Path) -> tuple[Path, bytes]:
    """golden.qcow2 and what it reads as (raw bytes)."""
    tree = workdir / "tree"
    tree.mkdir(parents=True)
    (tree / "hello.txt").write_bytes(HELLO)
    filesystem = workdir / "fs.raw"
    sh("mkfs.ext4", "-q", "-F", "-d", tree, "-L", "golden", filesystem, "32M")
    golden = workdir / "golden.qcow2"
    sh(QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", filesystem, golden)
    sh(QEMU_IMG, "resize", "-f", "qcow2", golden, str(SIZE))
    for byte, offset, length in GOLDEN_PATTERNS:
        sh(QEMU_IO, "-f", "qcow2", "-c", f"write -P {byte:#x} {offset} {length}", golden)
    reference = workdir / "golden.raw"
    sh(QEMU_IMG, "convert", "-f", "qcow2", "-O", "raw", golden, reference)
    return golden, reference.read_bytes()


def image_bytes(ioctx: IoCtx, name: str) -> bytes:
    with Image(ioctx, name, read_only=True) as image:
        return b"".join(image.read(at, 8 * MiB) for at in range(0, image.size(), 8 * MiB))


def volume_image(volume: csi.Volume) -> str:
    return ResourceId.decode(volume.volume_id).volume_image()


def test_golden_image_clones(driver: Driver) -> None:
    golden_qcow2, reference = make_golden(driver.root / "golden")
    capability = block_capability()

    # import: qemu-img convert into the published block device
    golden = driver.create("golden", SIZE, capability)
    device = driver.stage_and_publish(golden, capability, "golden")
    started = time.monotonic()
    sh(QEMU_IMG, "convert", "-n", "--target-is-zero", "-f", "qcow2", "-O", "raw",
       "-t", "none", golden_qcow2, device)  # fmt: skip
    print(f"\nimport: {time.monotonic() - started:.2f}s")
    driver.unpublish_and_unstage(golden, "golden", device)

    snapshot = driver.controller.CreateSnapshot(
        csi.CreateSnapshotRequest(name="golden-snap", source_volume_id=golden.volume_id)
    ).snapshot
    source = csi.VolumeContentSource(
        snapshot=csi.VolumeContentSource.SnapshotSource(snapshot_id=snapshot.snapshot_id)
    )
    clones, timings = [], []
    for index in range(CLONES):
        started = time.perf_counter()
        clones.append(driver.create(f"vm-{index}", SIZE, capability, volume_content_source=source))
        timings.append(time.perf_counter() - started)
    empty_started = time.perf_counter()
    empty = driver.create("empty", SIZE, capability)
    empty_time = time.perf_counter() - empty_started
    print(
        f"{CLONES} clones: median {statistics.median(timings) * 1000:.0f} ms, "
        f"max {max(timings) * 1000:.0f} ms, total {sum(timings):.2f}s "
        f"(an empty volume: {empty_time * 1000:.0f} ms)"
    )

    with Rados(data_dir=driver.data_dir) as cluster:
        ioctx = cluster.open_ioctx("rbd")
        for clone in clones:  # every clone reads as the golden image
            assert image_bytes(ioctx, volume_image(clone)) == reference
        for index, clone in enumerate(clones[1:], start=1):  # and is written differently
            with Image(ioctx, volume_image(clone)) as image:
                image.write(disk_checks.pattern(f"clone-{index}"), CLONE_WRITE_AT)
                image.flush()

    # clone 0 boots: its filesystem is the golden one; the guest writes its own things
    device = driver.stage_and_publish(clones[0], capability, "vm-0")
    script = """
mount -t ext4 /dev/vda /mnt || echo "CSI error mount"
echo "CSI hello $(cat /mnt/hello.txt)"
echo "written by the guest" > /mnt/guest.txt
umount /mnt
yes clone-0 | head -c 1048576 | dd of=/dev/vda bs=65536 seek=896 conv=fsync 2>/dev/null
echo "CSI pattern $(dd if=/dev/vda bs=65536 skip=640 count=16 2>/dev/null | md5sum | cut -d' ' -f1)"
"""
    assert CLONE_WRITE_AT == 896 * 65536
    run = guest.boot(
        [f"file={device},format=raw,if=virtio,cache=none,discard=unmap,aio=native"],
        script,
        driver.root / "guest",
    )
    print(f"guest on clone 0: {run.seconds:.1f}s wall")
    assert "error" not in run.results, run.results["error"]
    assert run.result("hello") == HELLO.decode().strip()
    assert run.result("pattern") == hashlib.md5(bytes([0x5A]) * MiB).hexdigest()
    driver.unpublish_and_unstage(clones[0], "vm-0", device)

    with Rados(data_dir=driver.data_dir) as cluster:
        ioctx = cluster.open_ioctx("rbd")
        for index, clone in enumerate(clones):
            data = image_bytes(ioctx, volume_image(clone))
            mine = disk_checks.pattern(f"clone-{index}")
            assert data[CLONE_WRITE_AT : CLONE_WRITE_AT + MiB] == mine, index
            assert data[32 * MiB : CLONE_WRITE_AT] == reference[32 * MiB : CLONE_WRITE_AT]
            assert data[CLONE_WRITE_AT + MiB :] == reference[CLONE_WRITE_AT + MiB :]
            guest_file = disk_checks.read_file_from_filesystem(
                data[: 32 * MiB], "/guest.txt", driver.root / "check"
            )
            if index == 0:
                assert guest_file == b"written by the guest\n"
            else:
                assert guest_file is None
                assert data[: 32 * MiB] == reference[: 32 * MiB]
        assert image_bytes(ioctx, volume_image(golden)) == reference
        snap_image = ResourceId.decode(snapshot.snapshot_id).snapshot_image()
        assert image_bytes(ioctx, snap_image) == reference

    for volume in [*clones, empty, golden]:
        driver.controller.DeleteVolume(csi.DeleteVolumeRequest(volume_id=volume.volume_id))
    driver.controller.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id))
    with Rados(data_dir=driver.data_dir) as cluster:
        ioctx = cluster.open_ioctx("rbd")
        assert RBD().list(ioctx) == []
        assert RBD().trash_list(ioctx) == []
