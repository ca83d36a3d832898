"""Child process of engine_bench.py: one engine operation, measured from outside.

engine_bench.py starts this script in a fresh interpreter and takes the
child's peak resident memory from ``wait4``; this script only does the work
and prints one JSON line with its own timing (and VmHWM, as a cross-check).

    python bench/rss_child.py baseline
    python bench/rss_child.py flatten --data-dir DIR --image NAME
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _vm_hwm_kib() -> int:
    """Peak resident set of this process so far, from /proc (KiB; 0 if unknown)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _flatten(data_dir: str, pool: str, image: str) -> dict[str, object]:
    from csi_rbd.engine.native import Image, Rados

    progress = {"done": 0, "total": 0}

    def on_progress(done: int, total: int) -> None:
        progress["done"], progress["total"] = done, total

    with Rados(data_dir=data_dir) as cluster:
        ioctx = cluster.open_ioctx(pool)
        with Image(ioctx, image) as img:
            start = time.perf_counter()
            img.flatten(on_progress=on_progress)
            seconds = time.perf_counter() - start
    return {"seconds": seconds, "objects": progress["total"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("op", choices=["baseline", "flatten"])
    parser.add_argument("--data-dir")
    parser.add_argument("--pool", default="rbd")
    parser.add_argument("--image")
    args = parser.parse_args(argv)
    if args.op == "baseline":
        import csi_rbd.engine.native  # noqa: F401  (what every engine child pays)

        result: dict[str, object] = {"seconds": 0.0}
    else:
        if not args.data_dir or not args.image:
            parser.error("flatten needs --data-dir and --image")
        result = _flatten(args.data_dir, args.pool, args.image)
    result["vm_hwm_kib"] = _vm_hwm_kib()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
