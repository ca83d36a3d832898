"""Look at (or hold) a driver's image from a child process.

Tests never open extra librados clients in the pytest process: librbd 16.2
rarely aborts a process that has had several (see tests/ceph/test_ceph_model.py),
and an abort would end the whole test run. So a test asks this module, in a
child, with one JSON request on stdin::

    {"cluster": <config file entry>, "secrets": {...}, "op": "used" | "contents" | "read"
     | "hold", "pool": ..., "image": ..., "offset": ..., "length": ...}

and gets one JSON answer on stdout. ``hold`` takes the image's exclusive lock,
prints ``{"held": true}``, keeps it until its stdin closes, then says whether
it still holds it (nobody broke it meanwhile).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from csi_rbd.config import cluster_from_mapping
from csi_rbd.engine.factory import build_engine
from csi_rbd.engine.usage import used_size


def ask(request: Mapping[str, Any]) -> Any:
    """Run one request in a child process; its answer."""
    done = subprocess.run(
        [sys.executable, "-m", __name__],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"engine probe failed: {done.stderr[-2000:]}"
    return json.loads(done.stdout)


@contextmanager
def holding_lock(request: Mapping[str, Any]) -> Iterator[None]:
    """The image's exclusive lock held by a child process while the block runs."""
    child = subprocess.Popen(
        [sys.executable, "-m", __name__],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(json.dumps({**request, "op": "hold"}) + "\n")
    child.stdin.flush()
    try:
        assert json.loads(child.stdout.readline()) == {"held": True}
        yield
    finally:
        child.stdin.close()
        last = child.stdout.readline()
        child.wait(60)
    assert json.loads(last) == {"still_owner": True}, "the holder lost its lock"


def _answer(request: dict[str, Any]) -> Any:
    engine = build_engine(cluster_from_mapping(request["cluster"], "probe"))
    try:
        with engine.session(request.get("secrets") or None) as cluster:
            ioctx = cluster.open_ioctx(request["pool"])
            try:
                return _run(engine, ioctx, request)
            finally:
                ioctx.close()
    finally:
        engine.close()


def _run(engine: Any, ioctx: Any, request: dict[str, Any]) -> Any:
    op = request["op"]
    if op == "contents":
        images = sorted(engine.rbd.list(ioctx))
        trash = sorted(entry["id"] for entry in engine.rbd.trash_list(ioctx))
        return {"images": images, "trash": trash}
    read_only = op != "hold"
    with engine.open_image(ioctx, request["image"], read_only=read_only) as image:
        if op == "used":
            for _ in range(20):
                try:
                    return {"used": used_size(image, image.size())}
                except FileNotFoundError:  # native: a version replaced meanwhile
                    time.sleep(0.05)
            raise RuntimeError("could not measure usage")
        if op == "read":
            data = image.read(request["offset"], request["length"])
            return {"data": base64.b64encode(bytes(data)).decode()}
        if op == "hold":
            image.lock_acquire()
            print(json.dumps({"held": True}), flush=True)
            sys.stdin.read()  # until the parent closes it
            return {"still_owner": bool(image.is_exclusive_lock_owner())}
    raise ValueError(f"unknown op {op!r}")


def main() -> None:
    request = json.loads(sys.stdin.readline())
    print(json.dumps(_answer(request)), flush=True)


if __name__ == "__main__":
    main()
