"""`csi-rbd serve`: flags to a frozen config, engines, the server; nothing else."""

from __future__ import annotations

import argparse
import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from csi_rbd.admin.command import add_command
from csi_rbd.config import DEFAULT_DRIVER_NAME, DriverConfig, load_clusters
from csi_rbd.engine.base import Engine

if TYPE_CHECKING:
    from csi_rbd.admin.command import Subparsers


def register(top: Subparsers) -> None:
    """Add ``csi-rbd serve`` to the top-level commands."""
    parser = add_command(top, "serve", lambda ctx, args: run(args), "run the CSI driver")
    add_arguments(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", default="unix:///csi/csi.sock", help="unix:///path/csi.sock")
    parser.add_argument("--node-id", default=os.environ.get("NODE_ID") or socket.gethostname())
    parser.add_argument("--mode", choices=("all", "controller", "node"), default="all")
    parser.add_argument("--config", type=Path, help="clusters file (YAML)")
    parser.add_argument("--driver-name", default=DEFAULT_DRIVER_NAME)
    parser.add_argument("--state-dir", type=Path, help="node state (default: <data-dir>/node)")
    parser.add_argument(
        "--allowed-root",
        type=Path,
        action="append",
        help="directories staging and publish paths must be under (repeatable; "
        "default /var/lib/kubelet)",
    )
    parser.add_argument("--max-volumes-per-node", type=int, default=0)
    parser.add_argument(
        "--metrics-address", help="host:port (e.g. :8080) serving /metrics and /healthz"
    )
    parser.add_argument("--log-level", default="INFO")


def build_config(args: argparse.Namespace) -> DriverConfig:
    data_dir = Path(args.data_dir)
    return DriverConfig(
        endpoint=args.endpoint,
        node_id=args.node_id,
        clusters=load_clusters(args.config, data_dir),
        mode=args.mode,
        driver_name=args.driver_name,
        state_dir=args.state_dir or data_dir / "node",
        allowed_roots=tuple(args.allowed_root or [Path("/var/lib/kubelet")]),
        max_volumes_per_node=args.max_volumes_per_node,
        metrics_address=args.metrics_address,
    )


def build_engines(config: DriverConfig) -> Mapping[str, Engine]:
    from csi_rbd.engine.factory import build_engine

    return {cluster.id: build_engine(cluster) for cluster in config.clusters}


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config = build_config(args)
    engines = build_engines(config)
    node_service = None
    if config.runs_node:
        from csi_rbd.csi.node import NodeService

        node_service = NodeService(config, engines)
        node_service.recover()
    from csi_rbd.csi.server import DriverServer

    server = DriverServer(config, engines, node_service)
    http = _start_metrics(config, engines) if config.metrics_address else None
    try:
        server.serve_until_signal()
    finally:
        if http is not None:
            http.stop()
    return 0


def _start_metrics(config: DriverConfig, engines: Mapping[str, Engine]) -> Any:
    """/metrics and /healthz (ready when every engine answers)."""
    from csi_rbd.engine.figures import engine_figures
    from csi_rbd.metrics import Metrics, set_default_metrics

    metrics = Metrics(
        driver_name=config.driver_name,
        version=config.version,
        mode=config.mode,
        node_id=config.node_id,
    )
    set_default_metrics(metrics)
    metrics.set_engine_figures(lambda: engine_figures(engines))

    def ready() -> bool:
        for engine in engines.values():
            engine.probe()
        return True

    assert config.metrics_address is not None
    return metrics.start_http(config.metrics_address, ready)
