"""The control plane: volumes and snapshots on an engine, with no gRPC in it."""
