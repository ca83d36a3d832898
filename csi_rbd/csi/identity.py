"""The CSI Identity service."""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.protobuf import wrappers_pb2

from csi_rbd._proto import csi_pb2 as csi
from csi_rbd._proto import csi_pb2_grpc
from csi_rbd.config import DriverConfig
from csi_rbd.csi import capabilities
from csi_rbd.csi.status import rpc
from csi_rbd.engine import errors
from csi_rbd.engine.base import Engine


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(self, config: DriverConfig, engines: Mapping[str, Engine]) -> None:
        self.config = config
        self.engines = engines

    @rpc
    def GetPluginInfo(
        self, request: csi.GetPluginInfoRequest, context: grpc.ServicerContext
    ) -> csi.GetPluginInfoResponse:
        return csi.GetPluginInfoResponse(
            name=self.config.driver_name, vendor_version=self.config.version
        )

    @rpc
    def GetPluginCapabilities(
        self, request: csi.GetPluginCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi.GetPluginCapabilitiesResponse:
        return csi.GetPluginCapabilitiesResponse(capabilities=capabilities.plugin_capabilities())

    @rpc
    def Probe(self, request: csi.ProbeRequest, context: grpc.ServicerContext) -> csi.ProbeResponse:
        """Ready only when every configured engine answers."""
        for engine in self.engines.values():
            try:
                engine.probe()
            except (errors.Error, OSError):
                return csi.ProbeResponse(ready=wrappers_pb2.BoolValue(value=False))
        return csi.ProbeResponse(ready=wrappers_pb2.BoolValue(value=True))
