"""What the attach daemon and its starter agree on: module name and exit codes.

Kept apart from :mod:`.attach_daemon` and :mod:`.fuse_image` so that importing
``csi_rbd.node`` neither imports the module that ``python -m`` runs nor loads
libfuse (only the daemon process does).
"""

from __future__ import annotations

MODULE = "csi_rbd.node.attach_daemon"
DISCARD_MODES = ("unmap", "ignore")
EXIT_OK = 0
EXIT_FAILED = 1  # anything else; the last line of stderr says what
EXIT_USAGE = 2  # argparse
EXIT_BUSY = 3  # another handle holds the image's exclusive write lock
EXIT_NOT_FOUND = 4  # no such pool or image
