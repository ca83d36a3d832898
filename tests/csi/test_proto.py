"""The CSI v1.12.0 wire definition (protos/csi.proto) and its committed Python stubs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2

from csi_rbd._proto import csi_pb2, csi_pb2_grpc, generate

FILE = csi_pb2.DESCRIPTOR


def _canonical(proto: descriptor_pb2.FileDescriptorProto) -> bytes:
    """Serialized descriptor without json_name / source info, options in canonical order."""
    proto = descriptor_pb2.FileDescriptorProto.FromString(proto.SerializeToString())
    proto.ClearField("source_code_info")

    def strip(message: descriptor_pb2.DescriptorProto) -> None:
        for field in message.field:
            field.ClearField("json_name")
        for nested in message.nested_type:
            strip(nested)

    for message in proto.message_type:
        strip(message)
    for extension in proto.extension:
        extension.ClearField("json_name")
    # Re-parsing moves extension options (unknown to descriptor_pb2) after known ones.
    return descriptor_pb2.FileDescriptorProto.FromString(
        proto.SerializeToString()
    ).SerializeToString()


def _raw_version_lines(text: str) -> list[str]:
    return [
        line
        for line in text.splitlines()
        if line.startswith(("# Protobuf Python Version:", "GRPC_GENERATED_VERSION ="))
    ]


# --- stubs vs proto -------------------------------------------------------------------------


def test_committed_stub_descriptor_matches_fresh_protoc_run() -> None:
    fresh = generate.compile_descriptor()
    committed = descriptor_pb2.FileDescriptorProto.FromString(FILE.serialized_pb)
    assert committed.name == fresh.name == "csi.proto"
    if _canonical(committed) != _canonical(fresh):
        fresh_names = {m.name for m in fresh.message_type} | {s.name for s in fresh.service}
        old_names = {m.name for m in committed.message_type} | {s.name for s in committed.service}
        pytest.fail(
            "csi_pb2.py was not generated from protos/csi.proto; run "
            "`python -m csi_rbd._proto.generate` "
            f"(only in proto: {sorted(fresh_names - old_names)}, "
            f"only in stubs: {sorted(old_names - fresh_names)})"
        )


def test_committed_stubs_match_generator_output(tmp_path: Path) -> None:
    fresh = generate.generate_into(tmp_path)
    for name, text in fresh.items():
        committed = (generate.PACKAGE_DIR / name).read_text()
        if generate.normalize(committed) == generate.normalize(text):
            continue
        if _raw_version_lines(committed) != _raw_version_lines(text):
            pytest.skip(
                f"{name}: the installed grpcio-tools generates differently from the one that "
                "produced the committed stubs; the descriptor test still guards the wire format"
            )
        pytest.fail(f"{name} is stale; run `python -m csi_rbd._proto.generate`")


def test_check_mode_cli_passes_on_committed_stubs(tmp_path: Path) -> None:
    fresh = generate.generate_into(tmp_path)
    for name, text in fresh.items():
        committed = (generate.PACKAGE_DIR / name).read_text()
        if _raw_version_lines(committed) != _raw_version_lines(text):
            pytest.skip("generator version differs from the one used for the committed stubs")
    proc = subprocess.run(
        [sys.executable, "-m", "csi_rbd._proto.generate", "--check"],
        capture_output=True,
        text=True,
        check=False,
        cwd=generate.REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr


def test_check_mode_reports_stale_and_missing_stubs(tmp_path: Path) -> None:
    for name in generate.GENERATED_FILES:
        shutil.copy(generate.PACKAGE_DIR / name, tmp_path / name)
    assert generate.stale_files(tmp_path) == {}
    grpc_file = tmp_path / "csi_pb2_grpc.py"
    grpc_file.write_text(grpc_file.read_text().replace("/csi.v1.Node/NodeGetInfo", "/x/y"))
    (tmp_path / "csi_pb2.pyi").unlink()
    assert set(generate.stale_files(tmp_path)) == {"csi_pb2_grpc.py", "csi_pb2.pyi"}


def test_grpc_module_imports_csi_pb2_package_relative() -> None:
    text = (generate.PACKAGE_DIR / "csi_pb2_grpc.py").read_text()
    assert "from . import csi_pb2 as csi__pb2" in text
    assert "\nimport csi_pb2" not in text
    assert csi_pb2_grpc.csi__pb2 is csi_pb2


# --- wire facts ---------------------------------------------------------------------------


def test_file_level_facts() -> None:
    proto = descriptor_pb2.FileDescriptorProto.FromString(FILE.serialized_pb)
    assert FILE.package == "csi.v1"
    assert proto.syntax == "proto3"
    assert list(proto.dependency) == [
        "google/protobuf/descriptor.proto",
        "google/protobuf/timestamp.proto",
        "google/protobuf/wrappers.proto",
    ]
    assert proto.options.go_package == "github.com/container-storage-interface/spec/lib/go/csi"


@pytest.mark.parametrize(
    ("name", "number", "extendee"),
    [
        ("alpha_enum", 1060, "google.protobuf.EnumOptions"),
        ("alpha_enum_value", 1060, "google.protobuf.EnumValueOptions"),
        ("csi_secret", 1059, "google.protobuf.FieldOptions"),
        ("alpha_field", 1060, "google.protobuf.FieldOptions"),
        ("alpha_message", 1060, "google.protobuf.MessageOptions"),
        ("alpha_method", 1060, "google.protobuf.MethodOptions"),
        ("alpha_service", 1060, "google.protobuf.ServiceOptions"),
    ],
)
def test_custom_option_extensions(name: str, number: int, extendee: str) -> None:
    ext = FILE.extensions_by_name[name]
    assert ext.number == number
    assert ext.containing_type.full_name == extendee
    assert ext.type == ext.TYPE_BOOL


def test_create_volume_request_field_numbers() -> None:
    fields = csi_pb2.CreateVolumeRequest.DESCRIPTOR.fields_by_name
    assert {name: f.number for name, f in fields.items()} == {
        "name": 1,
        "capacity_range": 2,
        "volume_capabilities": 3,
        "parameters": 4,
        "secrets": 5,
        "volume_content_source": 6,
        "accessibility_requirements": 7,
        "mutable_parameters": 8,
    }
    assert fields["volume_capabilities"].message_type.full_name == "csi.v1.VolumeCapability"
    assert fields["accessibility_requirements"].message_type.full_name == (
        "csi.v1.TopologyRequirement"
    )
    # Wire bytes: field 1 (name) then field 8 (mutable_parameters map entry).
    request = csi_pb2.CreateVolumeRequest(name="v", mutable_parameters={"k": "x"})
    assert request.SerializeToString() == b"\n\x01v" + b"B\x06\n\x01k\x12\x01x"


@pytest.mark.parametrize(
    ("message", "numbers"),
    [
        (csi_pb2.VolumeCapability, {"block": 1, "mount": 2, "access_mode": 3}),
        (
            csi_pb2.NodeStageVolumeRequest,
            {
                "volume_id": 1,
                "publish_context": 2,
                "staging_target_path": 3,
                "volume_capability": 4,
                "secrets": 5,
                "volume_context": 6,
            },
        ),
        (
            csi_pb2.NodePublishVolumeRequest,
            {
                "volume_id": 1,
                "publish_context": 2,
                "staging_target_path": 3,
                "target_path": 4,
                "volume_capability": 5,
                "readonly": 6,
                "secrets": 7,
                "volume_context": 8,
            },
        ),
        (
            csi_pb2.Snapshot,
            {
                "size_bytes": 1,
                "snapshot_id": 2,
                "source_volume_id": 3,
                "creation_time": 4,
                "ready_to_use": 5,
                "group_snapshot_id": 6,
            },
        ),
        (
            csi_pb2.ControllerModifyVolumeRequest,
            {"volume_id": 1, "secrets": 2, "mutable_parameters": 3},
        ),
        (csi_pb2.GetSnapshotRequest, {"snapshot_id": 1, "secrets": 2}),
    ],
)
def test_field_numbers(message: Any, numbers: dict[str, int]) -> None:
    fields = message.DESCRIPTOR.fields_by_name
    assert {name: f.number for name, f in fields.items()} == numbers


SERVICES = {
    "Identity": ["GetPluginInfo", "GetPluginCapabilities", "Probe"],
    "Controller": [
        "CreateVolume",
        "DeleteVolume",
        "ControllerPublishVolume",
        "ControllerUnpublishVolume",
        "ValidateVolumeCapabilities",
        "ListVolumes",
        "GetCapacity",
        "ControllerGetCapabilities",
        "CreateSnapshot",
        "DeleteSnapshot",
        "ListSnapshots",
        "GetSnapshot",
        "ControllerExpandVolume",
        "ControllerGetVolume",
        "ControllerModifyVolume",
    ],
    "GroupController": [
        "GroupControllerGetCapabilities",
        "CreateVolumeGroupSnapshot",
        "DeleteVolumeGroupSnapshot",
        "GetVolumeGroupSnapshot",
    ],
    "SnapshotMetadata": ["GetMetadataAllocated", "GetMetadataDelta"],
    "Node": [
        "NodeStageVolume",
        "NodeUnstageVolume",
        "NodePublishVolume",
        "NodeUnpublishVolume",
        "NodeGetVolumeStats",
        "NodeExpandVolume",
        "NodeGetCapabilities",
        "NodeGetInfo",
    ],
}


def test_services_and_methods() -> None:
    assert list(FILE.services_by_name) == list(SERVICES)
    for service, methods in SERVICES.items():
        descriptor = FILE.services_by_name[service]
        assert [m.name for m in descriptor.methods] == methods
        for method in descriptor.methods:
            streaming = service == "SnapshotMetadata"
            assert method.server_streaming is streaming
            assert method.client_streaming is False
            assert method.input_type.full_name == f"csi.v1.{method.name}Request"
            assert method.output_type.full_name == f"csi.v1.{method.name}Response"
        servicer = getattr(csi_pb2_grpc, f"{service}Servicer")
        assert all(callable(getattr(servicer, m)) for m in methods)
        assert callable(getattr(csi_pb2_grpc, f"add_{service}Servicer_to_server"))
        assert callable(getattr(csi_pb2_grpc, f"{service}Stub"))


def _all_fields(messages: Iterable[Any]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for message in messages:
        out.extend((f.full_name, f) for f in message.fields)
        out.extend(_all_fields(message.nested_types))
    return out


def test_csi_secret_marks_exactly_the_secrets_fields() -> None:
    fields = _all_fields(FILE.message_types_by_name.values())
    secret = sorted(name for name, f in fields if f.GetOptions().Extensions[csi_pb2.csi_secret])
    named_secrets = sorted(name for name, f in fields if f.name == "secrets")
    assert secret == named_secrets
    assert "csi.v1.CreateVolumeRequest.secrets" in secret
    assert "csi.v1.GetSnapshotRequest.secrets" in secret
    assert "csi.v1.GetMetadataDeltaRequest.secrets" in secret
    # 22 on the later master snapshot; the three volume-health requests came after v1.12.0.
    assert len(secret) == 19


def _alpha(options: Any, extension: Any) -> bool:
    return bool(options.Extensions[extension])


def test_v1_12_alpha_and_ga_markers() -> None:
    controller = FILE.services_by_name["Controller"].methods_by_name
    # New and alpha in v1.12.0.
    assert _alpha(controller["GetSnapshot"].GetOptions(), csi_pb2.alpha_method)
    assert _alpha(csi_pb2.GetSnapshotRequest.DESCRIPTOR.GetOptions(), csi_pb2.alpha_message)
    # ControllerModifyVolume is GA in v1.12.0.
    assert not _alpha(controller["ControllerModifyVolume"].GetOptions(), csi_pb2.alpha_method)
    for message in (csi_pb2.ControllerModifyVolumeRequest, csi_pb2.ControllerModifyVolumeResponse):
        assert not _alpha(message.DESCRIPTOR.GetOptions(), csi_pb2.alpha_message)
    for message in (
        csi_pb2.CreateVolumeRequest,
        csi_pb2.ValidateVolumeCapabilitiesRequest,
        csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed,
    ):
        field = message.DESCRIPTOR.fields_by_name["mutable_parameters"]
        assert not _alpha(field.GetOptions(), csi_pb2.alpha_field)
    assert _alpha(controller["ControllerGetVolume"].GetOptions(), csi_pb2.alpha_method)
    assert _alpha(FILE.services_by_name["SnapshotMetadata"].GetOptions(), csi_pb2.alpha_service)
    assert not _alpha(FILE.services_by_name["GroupController"].GetOptions(), csi_pb2.alpha_service)

    rpc_type = csi_pb2.ControllerServiceCapability.RPC.Type
    assert rpc_type.Value("MODIFY_VOLUME") == 14
    assert rpc_type.Value("GET_SNAPSHOT") == 15
    assert max(rpc_type.values()) == 15
    values = rpc_type.DESCRIPTOR.values_by_name
    assert not _alpha(values["MODIFY_VOLUME"].GetOptions(), csi_pb2.alpha_enum_value)
    assert _alpha(values["GET_SNAPSHOT"].GetOptions(), csi_pb2.alpha_enum_value)
    assert csi_pb2.PluginCapability.Service.Type.Value("SNAPSHOT_METADATA_SERVICE") == 4
    assert csi_pb2.NodeServiceCapability.RPC.Type.Value("VOLUME_MOUNT_GROUP") == 6
    assert max(csi_pb2.NodeServiceCapability.RPC.Type.values()) == 6


def test_identity_round_trip_over_grpc(tmp_path: Path) -> None:
    class Identity(csi_pb2_grpc.IdentityServicer):
        def GetPluginInfo(self, request: Any, context: Any) -> Any:
            return csi_pb2.GetPluginInfoResponse(name="rbd.csi.example", vendor_version="0")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    csi_pb2_grpc.add_IdentityServicer_to_server(Identity(), server)
    address = f"unix:{tmp_path / 'csi.sock'}"
    server.add_insecure_port(address)
    server.start()
    try:
        with grpc.insecure_channel(address) as channel:
            stub = csi_pb2_grpc.IdentityStub(channel)
            reply = stub.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10)
            assert reply.name == "rbd.csi.example"
            with pytest.raises(grpc.RpcError) as err:
                stub.Probe(csi_pb2.ProbeRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(grace=None)
