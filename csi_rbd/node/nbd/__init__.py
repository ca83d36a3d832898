"""An NBD server for one engine image, through the node cache (see :mod:`.protocol`).

``csi-rbd nbd serve`` runs it; :class:`NbdServer` embeds it::

    cache = open_cached(image, "writeback")
    with NbdServer(Export(cache, "rbd/disk"), Address(socket_path="/run/disk.sock")):
        ...  # qemu: nbd+unix:///?socket=/run/disk.sock
    cache.close()
"""

from csi_rbd.node.nbd.export import DISCARD_MODES, Export
from csi_rbd.node.nbd.server import Address, NbdServer

__all__ = ["DISCARD_MODES", "Address", "Export", "NbdServer"]
