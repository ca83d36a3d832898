"""``csi-rbd qemu drive``: the ``-drive`` value that gives a volume to QEMU.

::

    csi-rbd [--data-dir D] qemu drive POOL/IMAGE[@SNAP] [--socket PATH]
        [--cache none|writethrough|writeback] [--discard unmap|ignore]
        [--config clusters.yaml --cluster ID] [--id USER] [--keyring PATH]

The cache and discard modes are found as the node plugin finds them: the
image's ``csi.cache`` and ``csi.discard`` metadata (set by
ControllerModifyVolume), else the volume's CSI context (what the StorageClass
said), else ``none`` and ``unmap``; flags override them. A native-engine
image is reached through the NBD socket of ``csi-rbd nbd serve POOL/IMAGE
--socket PATH``; an image of a Ceph cluster from ``--config`` through QEMU's
``rbd:`` driver. Usage::

    qemu-system-x86_64 ... -drive "$(csi-rbd qemu drive rbd/vm-1 --socket /run/vm-1.sock),if=virtio"

With ``--format json`` it also prints the settings and the same disk as
``--image-opts`` for qemu-img and qemu-io.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from csi_rbd.admin import errors as cli_errors
from csi_rbd.admin.command import add_command
from csi_rbd.admin.context import Context
from csi_rbd.admin.specs import ImageSpec, parse_image_spec
from csi_rbd.config import ClusterConfig, ConfigError, DriverConfig, load_clusters
from csi_rbd.control.errors import ControlError
from csi_rbd.engine import errors
from csi_rbd.ids import VOLUME_PREFIX, BadId, ResourceId
from csi_rbd.vm.drive import (
    CACHE_MODES,
    DISCARD_MODES,
    DiskSettings,
    Drive,
    ceph_spec,
    nbd_drive,
    rbd_drive,
)

if TYPE_CHECKING:
    from csi_rbd.admin.command import Subparsers


def register(subparsers: Subparsers) -> None:
    """Add ``drive`` to the ``qemu`` group."""
    parser = add_command(subparsers, "drive", drive, "print the QEMU -drive value of a volume")
    parser.add_argument("spec", metavar="POOL/IMAGE[@SNAP]")
    parser.add_argument("--socket", type=Path, help="NBD socket of `csi-rbd nbd serve` (native)")
    parser.add_argument("--cache", choices=CACHE_MODES, help="override csi.cache")
    parser.add_argument("--discard", choices=DISCARD_MODES, help="override csi.discard")
    parser.add_argument("--config", type=Path, help="clusters file (YAML), as for serve")
    parser.add_argument("--cluster", help="cluster id in --config (default: the first)")
    parser.add_argument("--id", dest="user", help="Ceph user QEMU connects as")
    parser.add_argument("--keyring", type=Path, help="Ceph keyring QEMU reads")


def _cluster(ctx: Context, args: argparse.Namespace) -> ClusterConfig:
    try:
        clusters = load_clusters(args.config, ctx.data_dir)
    except ConfigError as exc:
        raise cli_errors.invalid(str(exc)) from None
    if args.cluster is None:
        return clusters[0]
    for cluster in clusters:
        if cluster.id == args.cluster:
            return cluster
    known = ", ".join(c.id for c in clusters)
    raise cli_errors.not_found(f"cluster {args.cluster} is not configured (known: {known})")


@contextlib.contextmanager
def _native_context(ctx: Context, cluster: ClusterConfig) -> Iterator[Context]:
    if cluster.data_dir is None or Path(cluster.data_dir) == ctx.data_dir:
        yield ctx
        return
    other = Context(str(cluster.data_dir), ctx.output, ctx.progress_enabled)
    try:
        yield other
    finally:
        other.close()


def volume_context(cluster: ClusterConfig, spec: ImageSpec) -> dict[str, str]:
    """The CSI volume context of a driver-made volume (``csi-vol-<uuid>``), else ``{}``.

    It holds the ``cache`` and ``discard`` the volume was created with, which
    the node plugin uses when no ControllerModifyVolume changed them.
    """
    if not spec.image.startswith(VOLUME_PREFIX):
        return {}
    from csi_rbd.control.volumes import VolumeService
    from csi_rbd.engine.factory import build_engine
    from csi_rbd.locks import OperationLocks

    config = DriverConfig(endpoint="", node_id="", clusters=(cluster,))
    try:
        volume_id = ResourceId(cluster.id, spec.pool, spec.image[len(VOLUME_PREFIX) :]).encode()
        engine = build_engine(cluster)
    except (BadId, ConfigError, ImportError):
        return {}
    try:
        service = VolumeService(config, {cluster.id: engine}, OperationLocks())
        return dict(service.get(volume_id).context)
    except (ControlError, errors.Error):
        return {}
    finally:
        engine.close()


def _native_metadata(ctx: Context, spec: ImageSpec) -> dict[str, str]:
    ctx.require(spec)  # a clear message for a missing pool, image or snapshot
    with ctx.open_image(spec.at(None), read_only=True) as image:
        return dict(image.metadata_list())


def _ceph_metadata(cluster: ClusterConfig, spec: ImageSpec) -> dict[str, str]:
    """The image's metadata through the Ceph engine, if this installation has one."""
    from csi_rbd.engine.factory import build_engine

    try:
        engine = build_engine(cluster)
        try:
            with engine.session(None) as handle, handle.open_ioctx(spec.pool) as ioctx:
                with engine.open_image(ioctx, spec.image, read_only=True) as image:
                    return dict(image.metadata_list())
        finally:
            engine.close()
    except (ConfigError, errors.Error, ImportError) as exc:
        raise cli_errors.CliError(
            f"cannot read csi.cache and csi.discard of {spec} in cluster {cluster.id} ({exc}); "
            f"pass --cache and --discard"
        ) from None


def _settings(
    ctx: Context, args: argparse.Namespace, cluster: ClusterConfig, spec: ImageSpec
) -> DiskSettings:
    """The volume's modes, found as the node plugin finds them (flags first)."""
    metadata: dict[str, str] = {}
    context: dict[str, str] = {}
    if not (args.cache and args.discard):
        if cluster.engine == "native":
            with _native_context(ctx, cluster) as native:
                metadata = _native_metadata(native, spec)
        else:
            metadata = _ceph_metadata(cluster, spec)
        context = volume_context(cluster, spec)
    return DiskSettings.from_metadata(
        metadata, context=context, cache=args.cache, discard=args.discard
    )


def build_drive(ctx: Context, args: argparse.Namespace) -> Drive:
    cluster = _cluster(ctx, args)
    spec = parse_image_spec(args.spec, default_pool=cluster.pool)
    if cluster.engine == "native":
        if args.socket is None:
            raise cli_errors.invalid(
                "a native-engine volume reaches QEMU over NBD: pass --socket, the socket of "
                f"`csi-rbd nbd serve {spec} --socket PATH`"
            )
        settings = _settings(ctx, args, cluster, spec)
        return nbd_drive(
            args.socket.absolute(), str(spec), settings, read_only=spec.snap is not None
        )
    settings = _settings(ctx, args, cluster, spec)
    rbd = ceph_spec(
        spec.pool,
        spec.image,
        spec.snap,
        namespace=cluster.rados_namespace,
        user=args.user,
        conf=cluster.conf,
        keyring=args.keyring,
        monitors=cluster.monitors if cluster.conf is None else (),
    )
    return rbd_drive(rbd, settings)


def drive(ctx: Context, args: argparse.Namespace) -> None:
    value = build_drive(ctx, args)
    ctx.output.show(
        {
            "drive": value.value(),
            "image_opts": value.image_opts(),
            "filename": value.filename,
            "cache": value.settings.cache,
            "discard": value.settings.discard,
            "read_only": value.read_only,
        },
        value.value(),
    )
