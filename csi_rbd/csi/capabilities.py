"""Every capability the driver declares, in one place."""

from __future__ import annotations

from csi_rbd._proto import csi_pb2 as csi

ControllerRPC = csi.ControllerServiceCapability.RPC.Type
NodeRPC = csi.NodeServiceCapability.RPC.Type
AccessMode = csi.VolumeCapability.AccessMode.Mode

CONTROLLER = (
    ControllerRPC.CREATE_DELETE_VOLUME,
    ControllerRPC.CREATE_DELETE_SNAPSHOT,
    ControllerRPC.LIST_SNAPSHOTS,
    ControllerRPC.GET_SNAPSHOT,
    ControllerRPC.LIST_VOLUMES,
    ControllerRPC.GET_CAPACITY,
    ControllerRPC.CLONE_VOLUME,
    ControllerRPC.EXPAND_VOLUME,
    ControllerRPC.GET_VOLUME,
    ControllerRPC.VOLUME_CONDITION,
    ControllerRPC.MODIFY_VOLUME,
    ControllerRPC.SINGLE_NODE_MULTI_WRITER,
)

NODE = (
    NodeRPC.STAGE_UNSTAGE_VOLUME,
    NodeRPC.GET_VOLUME_STATS,
    NodeRPC.EXPAND_VOLUME,
    NodeRPC.VOLUME_CONDITION,
    NodeRPC.SINGLE_NODE_MULTI_WRITER,
)

# Volumes of the native engine live on one node; no multi-node access modes.
ACCESS_MODES = frozenset(
    {
        AccessMode.SINGLE_NODE_WRITER,
        AccessMode.SINGLE_NODE_READER_ONLY,
        AccessMode.SINGLE_NODE_SINGLE_WRITER,
        AccessMode.SINGLE_NODE_MULTI_WRITER,
    }
)
READ_ONLY_MODES = frozenset({AccessMode.SINGLE_NODE_READER_ONLY, AccessMode.MULTI_NODE_READER_ONLY})
FILESYSTEMS = ("ext4", "xfs")


def plugin_capabilities() -> list[csi.PluginCapability]:
    """The same for every instance, whatever services it runs (the spec asks so)."""
    service = csi.PluginCapability.Service.Type
    caps = [
        csi.PluginCapability(service=csi.PluginCapability.Service(type=service.CONTROLLER_SERVICE))
    ]
    caps.append(
        csi.PluginCapability(
            service=csi.PluginCapability.Service(type=service.VOLUME_ACCESSIBILITY_CONSTRAINTS)
        )
    )
    caps.append(
        csi.PluginCapability(
            volume_expansion=csi.PluginCapability.VolumeExpansion(
                type=csi.PluginCapability.VolumeExpansion.ONLINE
            )
        )
    )
    return caps


def controller_capabilities() -> list[csi.ControllerServiceCapability]:
    return [
        csi.ControllerServiceCapability(rpc=csi.ControllerServiceCapability.RPC(type=t))
        for t in CONTROLLER
    ]


def node_capabilities() -> list[csi.NodeServiceCapability]:
    return [csi.NodeServiceCapability(rpc=csi.NodeServiceCapability.RPC(type=t)) for t in NODE]


def unsupported_mode(capability: csi.VolumeCapability) -> str | None:
    """Why the capability's access mode cannot be served, or None when it can."""
    if capability.access_mode.mode not in ACCESS_MODES:
        name = AccessMode.Name(capability.access_mode.mode)
        return f"access mode {name} is not supported (volumes live on a single node)"
    return None


def unsupported(capability: csi.VolumeCapability) -> str | None:
    """Why a volume capability cannot be served, or None when it can."""
    access = capability.WhichOneof("access_type")
    if access is None:
        return "volume capability has no access type (block or mount)"
    mode = unsupported_mode(capability)
    if mode:
        return mode
    if access == "mount":
        fs_type = capability.mount.fs_type
        if fs_type and fs_type not in FILESYSTEMS:
            return f"filesystem {fs_type!r} is not supported (supported: {', '.join(FILESYSTEMS)})"
    return None
