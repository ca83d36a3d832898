"""The metrics endpoint over real HTTP on 127.0.0.1: counters move, health follows ready()."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from csi_rbd import metrics as metrics_module
from csi_rbd.metrics import CacheFigures, EngineFigures, Metrics, parse_address, start_http


def get(url: str, accept: str = "") -> tuple[int, str, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


class Figures:
    """Engine and cache figures a test can change and count calls of."""

    def __init__(self) -> None:
        self.images = 2
        self.flushes = 5
        self.engine_calls = 0
        self.fail = False

    def engine(self) -> list[EngineFigures]:
        self.engine_calls += 1
        if self.fail:
            raise RuntimeError("pool is gone")
        return [
            EngineFigures("local", "rbd", self.images, 3, 4096 * self.images, 1 << 30),
            EngineFigures("local", "vm", 0, 0, 0, 0),
        ]

    def cache(self) -> CacheFigures:
        return CacheFigures(dirty_bytes=8192, flushes=self.flushes)


@pytest.fixture
def figures() -> Figures:
    return Figures()


@pytest.fixture
def metrics(figures: Figures) -> Metrics:
    return Metrics(
        driver_name="rbd.csi-rbd.io",
        version="0.1.0",
        mode="all",
        node_id="node-a",
        engine_figures=figures.engine,
        cache_figures=figures.cache,
        figures_ttl=0,
    )


class Ready:
    def __init__(self) -> None:
        self.ready = False

    def __call__(self) -> bool:
        return self.ready


@pytest.fixture
def ready() -> Ready:
    return Ready()


@pytest.fixture
def server(metrics: Metrics, ready: Ready) -> Iterator[metrics_module.MetricsServer]:
    with metrics.start_http("127.0.0.1:0", ready) as running:
        yield running


def test_rpc_counters_errors_and_latency_move(
    metrics: Metrics, server: metrics_module.MetricsServer
) -> None:
    _, _, before = get(server.url + "/metrics")
    assert value(before, "csi_rbd_rpc_requests_total", method="CreateVolume", code="OK") is None

    metrics.observe_rpc("CreateVolume", "OK", 0.004)
    metrics.observe_rpc("/csi.v1.Controller/CreateVolume", "OK", 0.2)
    metrics.observe_rpc("CreateVolume", "ABORTED", 0.001)
    metrics.observe_rpc("NodeStageVolume", "INTERNAL", 3.0)

    status, content_type, text = get(server.url + "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    assert value(text, "csi_rbd_rpc_requests_total", method="CreateVolume", code="OK") == 2
    assert value(text, "csi_rbd_rpc_requests_total", method="CreateVolume", code="ABORTED") == 1
    assert value(text, "csi_rbd_rpc_errors_total", method="CreateVolume", code="ABORTED") == 1
    assert value(text, "csi_rbd_rpc_errors_total", method="CreateVolume", code="OK") is None
    assert value(text, "csi_rbd_rpc_errors_total", method="NodeStageVolume", code="INTERNAL") == 1
    assert value(text, "csi_rbd_rpc_duration_seconds_count", method="CreateVolume") == 3
    assert value(text, "csi_rbd_rpc_duration_seconds_sum", method="CreateVolume") == pytest.approx(
        0.205
    )
    # the 1 ms and 4 ms calls fall in the 5 ms bucket, the 200 ms one does not
    assert (
        value(text, "csi_rbd_rpc_duration_seconds_bucket", method="CreateVolume", le="0.005") == 2
    )
    assert value(text, "csi_rbd_rpc_duration_seconds_bucket", method="CreateVolume", le="+Inf") == 3
    assert (
        value(
            text,
            "csi_rbd_build_info",
            version="0.1.0",
            driver="rbd.csi-rbd.io",
            mode="all",
            node="node-a",
        )
        == 1
    )


def test_engine_and_cache_figures_are_read_at_scrape_time(
    figures: Figures, server: metrics_module.MetricsServer
) -> None:
    _, _, text = get(server.url + "/metrics")
    assert value(text, "csi_rbd_engine_images", cluster="local", pool="rbd") == 2
    assert value(text, "csi_rbd_engine_snapshots", cluster="local", pool="rbd") == 3
    assert value(text, "csi_rbd_engine_used_bytes", cluster="local", pool="rbd") == 8192
    assert value(text, "csi_rbd_engine_provisioned_bytes", cluster="local", pool="rbd") == 1 << 30
    assert value(text, "csi_rbd_engine_images", cluster="local", pool="vm") == 0
    assert value(text, "csi_rbd_engine_figures_up") == 1
    assert value(text, "csi_rbd_node_cache_dirty_bytes") == 8192
    assert value(text, "csi_rbd_node_cache_flushes_total") == 5

    figures.images, figures.flushes = 7, 9
    _, _, text = get(server.url + "/metrics")
    assert value(text, "csi_rbd_engine_images", cluster="local", pool="rbd") == 7
    assert value(text, "csi_rbd_node_cache_flushes_total") == 9


def test_a_failing_figure_source_does_not_break_the_scrape(
    metrics: Metrics, figures: Figures, server: metrics_module.MetricsServer
) -> None:
    figures.fail = True
    metrics.observe_rpc("Probe", "OK", 0.0001)
    status, _, text = get(server.url + "/metrics")
    assert status == 200
    assert value(text, "csi_rbd_engine_figures_up") == 0
    assert value(text, "csi_rbd_engine_images", cluster="local", pool="rbd") is None
    assert value(text, "csi_rbd_rpc_requests_total", method="Probe", code="OK") == 1
    assert value(text, "csi_rbd_node_cache_figures_up") == 1


def test_figures_are_cached_for_their_ttl(figures: Figures, ready: Ready) -> None:
    cached = Metrics(engine_figures=figures.engine, figures_ttl=3600)
    with cached.start_http("127.0.0.1:0", ready) as running:
        for _ in range(3):
            assert get(running.url + "/metrics")[0] == 200
    assert figures.engine_calls == 1


def test_healthz_follows_ready(ready: Ready, server: metrics_module.MetricsServer) -> None:
    status, _, body = get(server.url + "/healthz")
    assert (status, body) == (503, "not ready\n")
    ready.ready = True
    assert get(server.url + "/healthz")[:3:2] == (200, "ok\n")


def test_healthz_is_503_with_the_reason_when_ready_raises(metrics: Metrics) -> None:
    def broken() -> bool:
        raise ConnectionError("engine local does not answer")

    with metrics.start_http("127.0.0.1:0", broken) as running:
        status, _, body = get(running.url + "/healthz")
    assert status == 503
    assert "engine local does not answer" in body


def test_openmetrics_unknown_paths_and_head(server: metrics_module.MetricsServer) -> None:
    status, content_type, text = get(
        server.url + "/metrics", accept="application/openmetrics-text; version=1.0.0"
    )
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")
    assert get(server.url + "/nope")[0] == 404
    request = urllib.request.Request(server.url + "/metrics", method="HEAD")
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200 and response.read() == b""
        assert int(response.headers["Content-Length"]) > 0


def test_concurrent_observations_are_all_counted(
    metrics: Metrics, server: metrics_module.MetricsServer
) -> None:
    def worker() -> None:
        for _ in range(500):
            metrics.observe_rpc("NodeGetInfo", "OK", 0.0002)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    _, _, text = get(server.url + "/metrics")
    assert value(text, "csi_rbd_rpc_requests_total", method="NodeGetInfo", code="OK") == 4000


def test_codes_are_normalized(metrics: Metrics) -> None:
    class StatusCode:  # what grpc.StatusCode members look like
        name = "NOT_FOUND"

    metrics.observe_rpc("DeleteVolume", "not_found", 0.1)
    metrics.observe_rpc("DeleteVolume", StatusCode(), 0.1)  # type: ignore[arg-type]
    metrics.observe_rpc("DeleteVolume", "StatusCode.NOT_FOUND", 0.1)
    metrics.observe_rpc("DeleteVolume", "weird", 0.1)
    text, _ = metrics.render()
    assert (
        value(text.decode(), "csi_rbd_rpc_errors_total", method="DeleteVolume", code="NOT_FOUND")
        == 3
    )
    assert (
        value(text.decode(), "csi_rbd_rpc_errors_total", method="DeleteVolume", code="UNKNOWN") == 1
    )


def test_module_level_default_metrics(ready: Ready) -> None:
    fresh = Metrics(process_metrics=False)
    metrics_module.set_default_metrics(fresh)
    metrics_module.observe_rpc("GetPluginInfo", "OK", 0.001)
    ready.ready = True
    with start_http("127.0.0.1:0", ready) as running:
        assert running.host == "127.0.0.1" and running.port > 0
        _, _, text = get(running.url + "/metrics")
        assert get(running.url + "/healthz")[0] == 200
    assert value(text, "csi_rbd_rpc_requests_total", method="GetPluginInfo", code="OK") == 1
    # process metrics come with a registry of the Metrics' own
    assert value(Metrics().render()[0].decode(), "process_max_fds") is not None


def test_stop_closes_the_port(metrics: Metrics, ready: Ready) -> None:
    running = metrics.start_http("127.0.0.1:0", ready)
    url = running.url
    running.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/healthz", timeout=2)


def test_address_parsing_and_a_busy_port(metrics: Metrics, ready: Ready) -> None:
    assert parse_address("127.0.0.1:9090") == ("127.0.0.1", 9090)
    assert parse_address(":8080") == ("", 8080)
    assert parse_address("[::1]:8080") == ("::1", 8080)
    assert parse_address("localhost:0") == ("localhost", 0)
    for bad in ("8080", "host:port", "127.0.0.1:70000", "::1:8080", "[::1]8080"):
        with pytest.raises(ValueError, match="metrics address"):
            parse_address(bad)
    with (
        metrics.start_http("127.0.0.1:0", ready) as running,
        pytest.raises(OSError, match="cannot listen on metrics address"),
    ):
        metrics.start_http(f"127.0.0.1:{running.port}", ready)
