"""A QEMU guest on block volumes published by the real driver, as KubeVirt attaches them.

Three block PVCs, one per cache mode of the volume (``cache`` StorageClass
parameter; one of them changed by ControllerModifyVolume before staging),
go through NodeStageVolume + NodePublishVolume of ``csi-rbd serve``. One
guest gets the three published devices the way KubeVirt's domain XML does
(virtio-blk, ``cache=none``, ``discard=unmap``, ``io=native``), writes,
makes a filesystem, trims and discards on each (:mod:`tests.vm.disk_checks`)
and powers off. The host then reads every volume through the engine while it
is still staged: whatever the guest flushed must be there in every cache
mode of the attach daemon, and the trims must have freed engine space.
"""

from __future__ import annotations

import time

from csi_rbd._proto import csi_pb2 as csi
from csi_rbd.engine.native import Rados
from csi_rbd.ids import ResourceId
from csi_rbd.node.stash import load_stash
from tests.csi.conftest import block_capability
from tests.csi.driver import Driver
from tests.vm import disk_checks, guest
from tests.vm.conftest import needs_data_path, needs_guest

pytestmark = [needs_data_path, needs_guest]
MODES = ("none", "writethrough", "writeback")


def test_guest_on_published_block_volumes(driver: Driver) -> None:
    capability = block_capability()
    volumes, targets, drives = [], [], []
    for mode in MODES:
        # the writeback volume starts as `none` and is changed like a VolumeAttributesClass would
        created_as = "none" if mode == "writeback" else mode
        volume = driver.create(
            f"pvc-{mode}", disk_checks.DISK_SIZE, capability, parameters={"cache": created_as}
        )
        if mode != created_as:
            driver.controller.ControllerModifyVolume(
                csi.ControllerModifyVolumeRequest(
                    volume_id=volume.volume_id, mutable_parameters={"cache": mode}
                )
            )
        target = driver.stage_and_publish(volume, capability, mode)
        record = load_stash(driver.root / "staging" / mode)
        assert record is not None and (record.cache, record.discard) == (mode, "unmap")
        volumes.append(volume)
        targets.append(target)
        drives.append(f"file={target},format=raw,if=virtio,cache=none,discard=unmap,aio=native")

    devices = [f"vd{'abc'[i]}" for i in range(len(MODES))]
    script = "".join(disk_checks.guest_script(device) for device in devices)
    started = time.monotonic()
    run = guest.boot(drives, script, driver.root / "guest")
    print(
        f"\nguest: {run.seconds:.1f}s wall, kernel+modules {run.boot_seconds:.1f}s "
        f"(guest clock), script done at {run.result('done')}s"
    )
    assert "error" not in run.results, run.results["error"]

    with Rados(data_dir=driver.data_dir) as cluster:
        ioctx = cluster.open_ioctx("rbd")
        for mode, device, volume in zip(MODES, devices, volumes, strict=True):
            assert run.result(f"disk-{device}") == "ok"
            assert "trimmed" in run.result(f"fstrim-{device}")
            name = ResourceId.decode(volume.volume_id).volume_image()
            used = disk_checks.check_disk(ioctx, name, device, driver.root / "check")
            print(f"cache={mode}: {device} ok, engine used {used / (1 << 20):.1f} MiB")
    print(f"checks done {time.monotonic() - started:.1f}s after the boot started")

    for mode, volume, target in zip(MODES, volumes, targets, strict=True):
        driver.unpublish_and_unstage(volume, mode, target)
        driver.controller.DeleteVolume(csi.DeleteVolumeRequest(volume_id=volume.volume_id))
