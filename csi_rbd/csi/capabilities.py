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

# Every engine serves one node at a time in these modes.
SINGLE_NODE_MODES = frozenset(
    {
        AccessMode.SINGLE_NODE_WRITER,
        AccessMode.SINGLE_NODE_READER_ONLY,
        AccessMode.SINGLE_NODE_SINGLE_WRITER,
        AccessMode.SINGLE_NODE_MULTI_WRITER,
    }
)
# Ceph volumes are reachable from every node: any may read them, and a block
# volume may be open for writing on several (a VM disk during live migration;
# librbd hands the image's exclusive lock from writer to writer). A native
# volume lives on one node; a filesystem is never mounted writable on two.
MULTI_NODE_MODES = frozenset(
    {
        AccessMode.MULTI_NODE_READER_ONLY,
        AccessMode.MULTI_NODE_SINGLE_WRITER,
        AccessMode.MULTI_NODE_MULTI_WRITER,
    }
)
SHARED_WRITER_MODES = frozenset(
    {AccessMode.MULTI_NODE_SINGLE_WRITER, AccessMode.MULTI_NODE_MULTI_WRITER}
)
MULTI_NODE_ENGINES = ("ceph",)
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


def unsupported_mode(capability: csi.VolumeCapability, engine: str) -> str | None:
    """Why the access mode cannot be served by ``engine`` (its kind), or None when it can."""
    mode = capability.access_mode.mode
    name = AccessMode.Name(mode) if mode in AccessMode.values() else str(mode)
    if mode in SINGLE_NODE_MODES:
        return None
    if mode not in MULTI_NODE_MODES:
        return f"access mode {name} is not supported"
    if engine not in MULTI_NODE_ENGINES:
        return f"access mode {name} needs the ceph engine ({engine} volumes live on one node)"
    if mode in SHARED_WRITER_MODES and capability.WhichOneof("access_type") != "block":
        return f"access mode {name} is for block volumes only (a filesystem has one writer node)"
    return None


def unsupported(capability: csi.VolumeCapability, engine: str) -> str | None:
    """Why ``engine`` (its kind) cannot serve a volume capability, or None when it can."""
    access = capability.WhichOneof("access_type")
    if access is None:
        return "volume capability has no access type (block or mount)"
    mode = unsupported_mode(capability, engine)
    if mode:
        return mode
    if access == "mount":
        fs_type = capability.mount.fs_type
        if fs_type and fs_type not in FILESYSTEMS:
            return f"filesystem {fs_type!r} is not supported (supported: {', '.join(FILESYSTEMS)})"
    return None
