"""Prometheus metrics and the driver's HTTP endpoint: ``/metrics`` and ``/healthz``.

What is measured:

- **RPCs**: the gRPC server calls :meth:`Metrics.observe_rpc` once per
  finished call with the method, the status code name and the duration;
  that feeds ``csi_rbd_rpc_requests_total{method,code}``,
  ``csi_rbd_rpc_errors_total{method,code}`` (every code but ``OK``) and the
  histogram ``csi_rbd_rpc_duration_seconds{method}``.
- **Engine figures** (images, snapshots, used and provisioned bytes per
  cluster and pool): read at scrape time from a callable the driver hands
  over (:meth:`Metrics.set_engine_figures`), cached for ``figures_ttl``
  seconds because counting may walk every image. A callable that raises is
  logged and shows as ``csi_rbd_engine_figures_up 0``; the scrape still works.
- **Node cache figures** (dirty bytes, flushes): the same way, from
  :meth:`Metrics.set_cache_figures`.
- ``csi_rbd_build_info{version,driver,mode,node}`` is always 1.

The HTTP server (:func:`start_http`) serves ``/metrics`` (text or
OpenMetrics, as the scraper asks) and ``/healthz``: 200 ``ok`` when the
``ready`` callable says so, else 503 with the reason. Kubernetes probes the
latter; the CSI socket itself is probed by the livenessprobe sidecar.

Wiring (the gRPC interceptor and ``serve``)::

    metrics = Metrics(driver_name=..., version=..., mode=..., node_id=...)
    metrics.observe_rpc("CreateVolume", "OK", 0.012)
    server = metrics.start_http("0.0.0.0:8080", ready=lambda: True)
    ...
    server.stop()
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("csi_rbd.metrics")

PREFIX = "csi_rbd"
# CSI calls range from sub-millisecond (Probe, NodeGetInfo) to minutes (a
# flatten, a large mkfs): buckets from 1 ms to 5 min.
RPC_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
GRPC_CODES = frozenset(
    {
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    }
)


@dataclass(frozen=True)
class EngineFigures:
    """One pool of one cluster, as the engine sees it now."""

    cluster: str
    pool: str
    images: int
    snapshots: int
    used_bytes: int
    provisioned_bytes: int


@dataclass(frozen=True)
class CacheFigures:
    """The node's data-path cache, summed over the volumes attached here."""

    dirty_bytes: int
    flushes: int  # since the node plugin started (a counter: never goes down)


EngineFiguresSource = Callable[[], Iterable[EngineFigures]]
CacheFiguresSource = Callable[[], CacheFigures]


def _method_name(method: str) -> str:
    """``/csi.v1.Controller/CreateVolume`` or ``CreateVolume`` -> ``CreateVolume``."""
    return method.rsplit("/", 1)[-1] or "unknown"


def _code_name(code: object) -> str:
    """A status code name from ``"OK"``, ``"ok"``, ``grpc.StatusCode.OK`` or ``"StatusCode.OK"``."""
    name = getattr(code, "name", None)
    text = name if isinstance(name, str) else str(code)
    text = text.rsplit(".", 1)[-1].upper()
    return text if text in GRPC_CODES else "UNKNOWN"


class _Cached:
    """The last value of an expensive callable, refreshed at most every ``ttl`` seconds."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._at = -float("inf")
        self._value: Any = None
        self._ok = False
        self._seconds = 0.0

    def get(self, source: Callable[[], Any], what: str) -> tuple[Any, bool, float]:
        with self._lock:  # one scrape computes, concurrent ones wait for its result
            now = time.monotonic()
            if now - self._at >= self.ttl:
                started = time.monotonic()
                try:
                    self._value, self._ok = source(), True
                except Exception:  # a scrape must not fail because a figure did
                    log.exception("collecting %s figures failed", what)
                    self._value, self._ok = None, False
                self._seconds = time.monotonic() - started
                self._at = time.monotonic()
            return self._value, self._ok, self._seconds


class _FiguresCollector(Collector):
    """Engine and node-cache figures, computed when Prometheus scrapes."""

    def __init__(self, owner: Metrics) -> None:
        self._owner = owner
        self._engine = _Cached(owner.figures_ttl)
        self._cache = _Cached(owner.figures_ttl)

    def describe(self) -> Iterable[Metric]:
        # Names only: registering must not call the (possibly slow) sources.
        yield from self._engine_families()
        yield from self._cache_families()

    @staticmethod
    def _engine_families() -> tuple[GaugeMetricFamily, ...]:
        labels = ["cluster", "pool"]
        return (
            GaugeMetricFamily(f"{PREFIX}_engine_images", "Images in the pool.", labels=labels),
            GaugeMetricFamily(
                f"{PREFIX}_engine_snapshots", "Snapshots in the pool.", labels=labels
            ),
            GaugeMetricFamily(
                f"{PREFIX}_engine_used_bytes",
                "Bytes allocated to the pool's images and snapshots.",
                labels=labels,
            ),
            GaugeMetricFamily(
                f"{PREFIX}_engine_provisioned_bytes",
                "Sum of the pool's image sizes (what was promised).",
                labels=labels,
            ),
            GaugeMetricFamily(
                f"{PREFIX}_engine_figures_up",
                "1 if the last collection of engine figures worked, else 0.",
            ),
            GaugeMetricFamily(
                f"{PREFIX}_engine_figures_collect_seconds",
                "How long the last collection of engine figures took.",
            ),
        )

    @staticmethod
    def _cache_families() -> tuple[GaugeMetricFamily | CounterMetricFamily, ...]:
        return (
            GaugeMetricFamily(
                f"{PREFIX}_node_cache_dirty_bytes",
                "Bytes written to the node's cache and not yet flushed to the engine.",
            ),
            CounterMetricFamily(
                f"{PREFIX}_node_cache_flushes",
                "Cache flushes to the engine since the node plugin started.",
            ),
            GaugeMetricFamily(
                f"{PREFIX}_node_cache_figures_up",
                "1 if the last collection of node cache figures worked, else 0.",
            ),
        )

    def collect(self) -> Iterator[Metric]:
        engine_source = self._owner.engine_figures_source
        if engine_source is not None:
            yield from self._collect_engine(engine_source)
        cache_source = self._owner.cache_figures_source
        if cache_source is not None:
            yield from self._collect_cache(cache_source)

    def _collect_engine(self, source: EngineFiguresSource) -> Iterator[Metric]:
        images, snapshots, used, provisioned, up, seconds = self._engine_families()
        value, ok, took = self._engine.get(lambda: list(source()), "engine")
        for figures in value or ():
            labels = [figures.cluster, figures.pool]
            images.add_metric(labels, figures.images)
            snapshots.add_metric(labels, figures.snapshots)
            used.add_metric(labels, figures.used_bytes)
            provisioned.add_metric(labels, figures.provisioned_bytes)
        up.add_metric([], 1 if ok else 0)
        seconds.add_metric([], took)
        yield from (images, snapshots, used, provisioned, up, seconds)

    def _collect_cache(self, source: CacheFiguresSource) -> Iterator[Metric]:
        dirty, flushes, up = self._cache_families()
        value, ok, _ = self._cache.get(source, "node cache")
        if ok and value is not None:
            dirty.add_metric([], value.dirty_bytes)
            flushes.add_metric([], value.flushes)
            yield from (dirty, flushes)
        up.add_metric([], 1 if ok else 0)
        yield up


class Metrics:
    """The driver's metrics, in a registry of their own (tests make as many as they like)."""

    def __init__(
        self,
        *,
        driver_name: str = "",
        version: str = "",
        mode: str = "",
        node_id: str = "",
        registry: CollectorRegistry | None = None,
        engine_figures: EngineFiguresSource | None = None,
        cache_figures: CacheFiguresSource | None = None,
        figures_ttl: float = 10.0,
        process_metrics: bool = True,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.figures_ttl = figures_ttl
        self.engine_figures_source = engine_figures
        self.cache_figures_source = cache_figures
        self.requests = Counter(
            "rpc_requests",
            "Finished CSI calls by method and gRPC status code.",
            ["method", "code"],
            namespace=PREFIX,
            registry=self.registry,
        )
        self.errors = Counter(
            "rpc_errors",
            "Finished CSI calls that did not return OK, by method and gRPC status code.",
            ["method", "code"],
            namespace=PREFIX,
            registry=self.registry,
        )
        self.duration = Histogram(
            "rpc_duration_seconds",
            "How long CSI calls took, by method.",
            ["method"],
            namespace=PREFIX,
            buckets=RPC_BUCKETS,
            registry=self.registry,
        )
        build = Gauge(
            "build_info",
            "The driver's version, name, mode and node (always 1).",
            ["version", "driver", "mode", "node"],
            namespace=PREFIX,
            registry=self.registry,
        )
        build.labels(version, driver_name, mode, node_id).set(1)
        self.registry.register(_FiguresCollector(self))
        if process_metrics and registry is None:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        """Count one finished call: ``method`` short or full, ``code`` a gRPC code name."""
        name = _method_name(method)
        code_name = _code_name(code)
        self.requests.labels(name, code_name).inc()
        if code_name != "OK":
            self.errors.labels(name, code_name).inc()
        self.duration.labels(name).observe(max(0.0, seconds))

    def set_engine_figures(self, source: EngineFiguresSource | None) -> None:
        self.engine_figures_source = source

    def set_cache_figures(self, source: CacheFiguresSource | None) -> None:
        self.cache_figures_source = source

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition (text, or OpenMetrics if ``accept`` asks) and its content type."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def start_http(self, address: str, ready: Callable[[], bool]) -> MetricsServer:
        return start_http(address, ready, self)


# --- the HTTP endpoint ---------------------------------------------------------------------


def parse_address(address: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` (every interface) -> (host, port)."""
    text = address.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"metrics address {address!r}: expected [ipv6]:port")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"metrics address {address!r}: expected host:port or :port")
        if ":" in host:
            raise ValueError(f"metrics address {address!r}: write an IPv6 host as [host]:port")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"metrics address {address!r}: port must be a number from 0 to 65535")
    return host, int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        metrics: Metrics,
        ready: Callable[[], bool],
        family: socket.AddressFamily,
        dual_stack: bool = False,
    ) -> None:
        self.address_family = family
        self.dual_stack = dual_stack
        self.metrics = metrics
        self.ready = ready
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        if self.dual_stack:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "csi-rbd"
    _head = False

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _serve(self, head: bool) -> None:
        self._head = head
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            try:
                body, content_type = self.server.metrics.render(self.headers.get("Accept", ""))
            except Exception as exc:  # never leave a scraper hanging
                log.exception("rendering metrics failed")
                self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, f"metrics failed: {exc}\n")
                return
            self._reply(HTTPStatus.OK, body, content_type)
        elif path in ("/healthz", "/livez", "/readyz"):
            try:
                ok, reason = bool(self.server.ready()), "not ready"
            except Exception as exc:
                ok, reason = False, f"not ready: {type(exc).__name__}: {exc}"
            if ok:
                self._reply(HTTPStatus.OK, "ok\n")
            else:
                self._reply(HTTPStatus.SERVICE_UNAVAILABLE, reason + "\n")
        elif path == "/":
            self._reply(HTTPStatus.OK, "csi-rbd: /metrics /healthz\n")
        else:
            self._reply(HTTPStatus.NOT_FOUND, f"{path}: not found (try /metrics or /healthz)\n")

    def _reply(
        self, status: HTTPStatus, body: bytes | str, content_type: str = "text/plain; charset=utf-8"
    ) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not self._head:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class MetricsServer:
    """A running endpoint; ``stop()`` closes it (also as a context manager)."""

    def __init__(self, server: _Server) -> None:
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="metrics-http",
            daemon=True,
        )
        self._thread.start()

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = self.host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_default: Metrics | None = None
_default_lock = threading.Lock()


def default_metrics() -> Metrics:
    """The process-wide metrics (created on first use) that the module functions use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Metrics()
        return _default


def set_default_metrics(metrics: Metrics) -> None:
    """Make ``metrics`` the process-wide one (``serve`` does this with its labels)."""
    global _default
    with _default_lock:
        _default = metrics


def observe_rpc(method: str, code: str, seconds: float) -> None:
    """Count one finished call in the process-wide metrics."""
    default_metrics().observe_rpc(method, code, seconds)


def start_http(
    address: str, ready: Callable[[], bool], metrics: Metrics | None = None
) -> MetricsServer:
    """Serve /metrics and /healthz on ``address`` (``host:port``) in a daemon thread.

    ``:port`` listens on every interface (IPv6 and IPv4 where the host has
    both). Port 0 picks a free port: read it back from ``.port``.
    """
    host, port = parse_address(address)
    metrics = metrics if metrics is not None else default_metrics()
    try:
        if not host:
            try:
                server = _Server(("::", port), metrics, ready, socket.AF_INET6, dual_stack=True)
            except OSError:
                server = _Server(("0.0.0.0", port), metrics, ready, socket.AF_INET)
        else:
            try:
                family = (
                    socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
                )
            except ValueError:  # a name such as localhost
                family = socket.AF_INET
            server = _Server((host, port), metrics, ready, family)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on metrics address {address!r}: {exc}") from exc
    running = MetricsServer(server)
    log.info("metrics and health on %s (/metrics, /healthz)", running.url)
    return running
