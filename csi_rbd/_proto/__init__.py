"""Python stubs for the CSI v1.12.0 wire definition in ``protos/csi.proto``.

``csi_pb2`` (messages), ``csi_pb2.pyi`` (typing) and ``csi_pb2_grpc`` (stubs and
servicers) are generated and committed; never edit them by hand. Regenerate
them with ``python -m csi_rbd._proto.generate`` and verify them with
``python -m csi_rbd._proto.generate --check``.
"""
