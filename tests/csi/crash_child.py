"""Run one CreateVolume/CreateSnapshot and kill -9 ourselves after the Nth engine step.

Usage: python -m tests.csi.crash_child DATA_DIR KILL_AT OPERATION ARGS_JSON
Prints the number of steps it went through when it survives (KILL_AT = 0).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from csi_rbd.config import ClusterConfig, DriverConfig
from csi_rbd.control.journal import NameJournal
from csi_rbd.control.snapshots import SnapshotService
from csi_rbd.control.volumes import CreateVolumeRequest, VolumeService
from csi_rbd.engine.native import RBD, Image
from csi_rbd.engine.native.engine import NativeEngine
from csi_rbd.locks import OperationLocks

STEPS = [
    (NameJournal, "reserve"),
    (RBD, "create"),
    (RBD, "clone"),
    (Image, "create_snap"),
    (Image, "remove_snap"),
    (Image, "resize"),
    (Image, "metadata_set"),
]


def instrument(kill_at: int) -> list[str]:
    seen: list[str] = []
    for owner, name in STEPS:
        original = getattr(owner, name)

        def step(*args: Any, __original: Any = original, __name: str = name, **kwargs: Any) -> Any:
            result = __original(*args, **kwargs)
            seen.append(__name)
            if len(seen) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        setattr(owner, name, step)
    return seen


def main() -> None:
    data_dir, kill_at, operation, raw = (
        Path(sys.argv[1]),
        int(sys.argv[2]),
        sys.argv[3],
        sys.argv[4],
    )
    args = json.loads(raw)
    config = DriverConfig(
        endpoint="unix:///unused",
        node_id="node-a",
        clusters=(ClusterConfig("local", "native", data_dir=data_dir),),
    )
    engines = {"local": NativeEngine("local", data_dir)}
    volumes = VolumeService(config, engines, OperationLocks())
    seen = instrument(kill_at)
    if operation == "volume":
        result: Any = volumes.create(CreateVolumeRequest(**args))
        print(json.dumps({"id": result.volume_id, "steps": seen}))
    else:
        result = SnapshotService(volumes).create(args["name"], args["source"], {}, None)
        print(json.dumps({"id": result.snapshot_id, "steps": seen}))


if __name__ == "__main__":
    main()
