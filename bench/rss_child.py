"""Child process of engine_bench.py: one engine operation, measured from outside.

engine_bench.py starts this script in a fresh interpreter and takes the
child's peak resident memory from ``wait4``; this script only does the work
and prints one JSON line with its own timing (and VmHWM, as a cross-check).

    python bench/rss_child.py baseline --data-dir DIR
    python bench/rss_child.py flatten --data-dir DIR --image NAME
    python bench/rss_child.py baseline --cluster ENTRY_JSON
    python bench/rss_child.py flatten --cluster ENTRY_JSON --image NAME

``--data-dir``: the native engine on that data directory. ``--cluster``: the
engine of one driver config-file entry (JSON; the ceph engine in practice),
with the CSI secrets (``userID``, ``userKey``) as JSON in the environment
variable ``CSI_RBD_BENCH_SECRETS`` (not on the command line). Both engines are
built by ``csi_rbd.engine.factory.build_engine``; ``baseline`` builds the
engine and connects (for ceph: loads librados/librbd), the memory every engine
child pays.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

SECRETS_ENV = "CSI_RBD_BENCH_SECRETS"


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


def _engine(args: argparse.Namespace) -> Any:
    from pathlib import Path

    from csi_rbd.config import ClusterConfig, cluster_from_mapping
    from csi_rbd.engine.factory import build_engine

    if args.cluster:
        return build_engine(cluster_from_mapping(json.loads(args.cluster), "--cluster"))
    return build_engine(ClusterConfig("native", "native", data_dir=Path(args.data_dir)))


def _run(args: argparse.Namespace) -> dict[str, object]:
    engine = _engine(args)
    secrets = json.loads(os.environ.get(SECRETS_ENV) or "null")
    progress = {"done": 0, "total": 0}

    def on_progress(done: int, total: int) -> None:
        progress["done"], progress["total"] = done, total

    try:
        with engine.session(secrets) as cluster:
            ioctx = cluster.open_ioctx(args.pool or engine.default_pool)
            try:
                if args.op == "baseline":
                    return {"seconds": 0.0}
                with engine.open_image(ioctx, args.image) as img:
                    start = time.perf_counter()
                    img.flatten(on_progress=on_progress)
                    seconds = time.perf_counter() - start
            finally:
                ioctx.close()
    finally:
        engine.close()
    return {"seconds": seconds, "objects": progress["total"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("op", choices=["baseline", "flatten"])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--data-dir", help="a native engine's data directory")
    where.add_argument("--cluster", help="a driver config-file cluster entry, as JSON")
    parser.add_argument("--pool", default=None, help="default: the engine's default pool")
    parser.add_argument("--image")
    args = parser.parse_args(argv)
    if args.op == "flatten" and not args.image:
        parser.error("flatten needs --image")
    result = _run(args)
    result["vm_hwm_kib"] = _vm_hwm_kib()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
