"""Copies of requests with every field marked csi_secret blanked, for logs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf import message as pb_message
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.text_format import MessageToString

from csi_rbd._proto import csi_pb2 as csi

_SECRET: Any = csi.csi_secret


def _is_secret(field: FieldDescriptor) -> bool:
    options = field.GetOptions()
    return bool(options.HasExtension(_SECRET) and options.Extensions[_SECRET])


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _strip(message: pb_message.Message) -> None:
    for field, value in message.ListFields():
        if _is_secret(field):
            message.ClearField(field.name)
            if _is_map(field):
                for key in value:
                    getattr(message, field.name)[key] = "***stripped***"
        elif field.type == FieldDescriptor.TYPE_MESSAGE and not _is_map(field):
            if isinstance(value, Iterable) and not isinstance(value, pb_message.Message):
                for item in value:
                    _strip(item)
            else:
                _strip(value)


def sanitized(message: pb_message.Message) -> str:
    """A one-line text form of ``message`` with secrets replaced."""
    copy = type(message)()
    copy.CopyFrom(message)
    _strip(copy)
    return MessageToString(copy, as_one_line=True)
