"""Identity service over a real gRPC server (pytest-grpc) on a unix socket."""

from __future__ import annotations

from typing import Any

import pytest

from csi_rbd import __version__
from csi_rbd._proto import csi_pb2 as csi
from csi_rbd._proto import csi_pb2_grpc
from csi_rbd.config import DriverConfig
from csi_rbd.csi.identity import IdentityService
from csi_rbd.csi.server import LoggingInterceptor


@pytest.fixture(scope="module")
def grpc_add_to_server() -> Any:
    return csi_pb2_grpc.add_IdentityServicer_to_server


@pytest.fixture(scope="module")
def grpc_servicer(driver_config: DriverConfig, engines: dict[str, Any]) -> IdentityService:
    return IdentityService(driver_config, engines)


@pytest.fixture(scope="module")
def grpc_interceptors() -> list[Any]:
    return [LoggingInterceptor()]


@pytest.fixture(scope="module")
def grpc_stub_cls() -> Any:
    return csi_pb2_grpc.IdentityStub


def test_plugin_info(grpc_stub: Any) -> None:
    info = grpc_stub.GetPluginInfo(csi.GetPluginInfoRequest())
    assert info.name == "rbd.csi-rbd.io"
    assert info.vendor_version == __version__


def test_plugin_capabilities(grpc_stub: Any) -> None:
    caps = grpc_stub.GetPluginCapabilities(csi.GetPluginCapabilitiesRequest()).capabilities
    service = csi.PluginCapability.Service.Type
    services = {c.service.type for c in caps if c.HasField("service")}
    assert services == {service.CONTROLLER_SERVICE, service.VOLUME_ACCESSIBILITY_CONSTRAINTS}
    expansion = [c.volume_expansion.type for c in caps if c.HasField("volume_expansion")]
    assert expansion == [csi.PluginCapability.VolumeExpansion.ONLINE]


def test_probe_ready(grpc_stub: Any) -> None:
    assert grpc_stub.Probe(csi.ProbeRequest()).ready.value is True


def test_probe_not_ready_when_engine_fails(
    grpc_stub: Any, engines: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from csi_rbd.engine import errors

    def broken() -> None:
        raise errors.ConnectionShutdown("data directory unreachable")

    monkeypatch.setattr(engines["local"], "probe", broken)
    assert grpc_stub.Probe(csi.ProbeRequest()).ready.value is False
