"""The gRPC layer: validate, lock, call the control plane or node data path, answer."""
