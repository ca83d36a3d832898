"""The gRPC server: services by mode, a logging interceptor, a clean stop.

Every call is logged once when it ends, with a request id, the method, the
duration and the status code; requests are logged at debug level with every
csi_secret field stripped.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from typing import Any

import grpc

from csi_rbd import metrics
from csi_rbd._proto import csi_pb2_grpc
from csi_rbd.config import DriverConfig
from csi_rbd.control.snapshots import SnapshotService
from csi_rbd.control.volumes import VolumeService
from csi_rbd.csi.controller import ControllerService
from csi_rbd.csi.identity import IdentityService
from csi_rbd.csi.sanitize import sanitized
from csi_rbd.engine.base import Engine
from csi_rbd.locks import OperationLocks

log = logging.getLogger("csi_rbd.grpc")
_request_ids = itertools.count(1)


class LoggingInterceptor(grpc.ServerInterceptor):
    def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary

        def logged(request: Any, context: grpc.ServicerContext) -> Any:
            request_id = next(_request_ids)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("[%d] %s request: %s", request_id, method, sanitized(request))
            started = time.monotonic()
            code = "OK"
            try:
                return inner(request, context)
            except Exception:
                code = context.code().name if context.code() else "UNKNOWN"
                raise
            finally:
                elapsed = time.monotonic() - started
                log.info("[%d] %s %s in %.1f ms", request_id, method, code, elapsed * 1000)
                metrics.observe_rpc(method, code, elapsed)

        return grpc.unary_unary_rpc_method_handler(
            logged,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def socket_path(endpoint: str) -> str:
    if endpoint.startswith("unix://"):
        return endpoint[len("unix://") :]
    if endpoint.startswith("unix:"):
        return endpoint[len("unix:") :]
    raise ValueError(f"endpoint {endpoint!r} must be unix:///path/to/csi.sock")


class DriverServer:
    """The running driver: build with a config and engines, then start/stop."""

    def __init__(
        self,
        config: DriverConfig,
        engines: Mapping[str, Engine],
        node_service: csi_pb2_grpc.NodeServicer | None = None,
        max_workers: int = 16,
    ) -> None:
        self.config = config
        self.engines = engines
        self.locks = OperationLocks()
        self.socket = socket_path(config.endpoint)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="csi"),
            interceptors=[LoggingInterceptor()],
        )
        csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService(config, engines), self.server)
        if config.runs_controller:
            volumes = VolumeService(config, engines, self.locks)
            csi_pb2_grpc.add_ControllerServicer_to_server(
                ControllerService(volumes, SnapshotService(volumes)), self.server
            )
        if config.runs_node and node_service is not None:
            csi_pb2_grpc.add_NodeServicer_to_server(node_service, self.server)
        self._stopped = threading.Event()

    def start(self) -> None:
        directory = os.path.dirname(self.socket)
        if directory:
            os.makedirs(directory, exist_ok=True)
        if os.path.exists(self.socket):
            os.unlink(self.socket)  # left by a previous run that did not stop cleanly
        self.server.add_insecure_port(f"unix://{self.socket}")
        self.server.start()
        log.info(
            "%s %s serving %s (mode %s, node %s)",
            self.config.driver_name,
            self.config.version,
            self.config.endpoint,
            self.config.mode,
            self.config.node_id,
        )

    def stop(self, grace: float = 30.0) -> None:
        """Refuse new calls, let in-flight ones finish, remove the socket."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.server.stop(grace).wait()
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        for engine in self.engines.values():
            close = getattr(engine, "close", None)
            if close is not None:
                close()
        log.info("stopped")

    def serve_until_signal(self) -> None:
        done = threading.Event()

        def on_signal(signum: int, frame: object) -> None:
            log.info("received %s, stopping", signal.Signals(signum).name)
            done.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        done.wait()
        self.stop()
