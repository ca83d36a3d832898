"""csi-rbd: a Kubernetes CSI driver for RBD block volumes."""

__version__ = "0.1.0"
