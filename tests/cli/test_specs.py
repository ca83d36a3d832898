"""Parsing of image specs, sizes and features, and rbd-style size formatting."""

from __future__ import annotations

import pytest

from csi_rbd.admin.errors import CliError
from csi_rbd.admin.output import Column, human_size, table
from csi_rbd.admin.specs import (
    ImageSpec,
    Snap,
    feature_names,
    order_of,
    parse_features,
    parse_image_spec,
    parse_size,
)

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize(
    ("text", "snap", "expected"),
    [
        ("img", Snap.PERMITTED, ImageSpec("rbd", "img")),
        ("pool/img", Snap.PERMITTED, ImageSpec("pool", "img")),
        ("pool/img@s", Snap.PERMITTED, ImageSpec("pool", "img", "s")),
        ("img@s", Snap.REQUIRED, ImageSpec("rbd", "img", "s")),
        ("p/with space", Snap.FORBIDDEN, ImageSpec("p", "with space")),
        ("p/ünï", Snap.FORBIDDEN, ImageSpec("p", "ünï")),
        ("p/" + "x" * 250, Snap.FORBIDDEN, ImageSpec("p", "x" * 250)),
    ],
)
def test_parse_image_spec(text: str, snap: Snap, expected: ImageSpec) -> None:
    assert parse_image_spec(text, snap) == expected


@pytest.mark.parametrize(
    ("text", "snap", "message"),
    [
        ("", Snap.PERMITTED, "image name is empty"),
        ("rbd/", Snap.PERMITTED, "image name is empty"),
        ("/img", Snap.PERMITTED, "pool name is empty"),
        ("img@", Snap.PERMITTED, "snapshot name is empty"),
        ("a/b/c", Snap.PERMITTED, "invalid image spec 'a/b/c': namespaces are not supported"),
        ("a@b@c", Snap.PERMITTED, "invalid snapshot name 'b@c': it contains '@'"),
        ("a@b/c", Snap.PERMITTED, "invalid image spec 'a@b/c': expected [pool/]image[@snapshot]"),
        ("..", Snap.PERMITTED, "invalid image name '..': it is reserved"),
        ("x" * 251, Snap.PERMITTED, "invalid image name: longer than 250 bytes"),
        ("img@s", Snap.FORBIDDEN, "a snapshot is not allowed here: 'img@s'"),
        ("img", Snap.REQUIRED, "snapshot name was not specified in 'img' (use image@snapshot)"),
    ],
)
def test_parse_image_spec_rejects(text: str, snap: Snap, message: str) -> None:
    with pytest.raises(CliError) as caught:
        parse_image_spec(text, snap)
    assert caught.value.message == message
    assert caught.value.code == 22


def test_default_pool_override() -> None:
    assert parse_image_spec("b", default_pool="p2") == ImageSpec("p2", "b")
    assert str(ImageSpec("p", "i", "s")) == "p/i@s"
    assert ImageSpec("p", "i", "s").image_spec == "p/i"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10G", 10 * GiB),
        ("10g", 10 * GiB),
        ("10GiB", 10 * GiB),
        ("10Gi", 10 * GiB),
        ("10GB", 10 * GiB),
        ("512M", 512 * MiB),
        ("4K", 4 * KiB),
        ("1T", TiB),
        ("2P", 2 << 50),
        ("4096B", 4096),
        ("100", 100 * MiB),  # rbd: a bare --size is in MiB
        ("0", 0),
        (" 1M ", MiB),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["10Q", "-1", "1.5G", "", "G", "10 G B", "0x10", "8E", "1e3"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(CliError) as caught:
        parse_size(text)
    assert caught.value.message.startswith(f"invalid size {text!r}")


def test_parse_size_default_unit() -> None:
    assert parse_size("4096", 1) == 4096


@pytest.mark.parametrize(
    ("size", "order"), [(4 * KiB, 12), (4 * MiB, 22), (32 * MiB, 25), (8 * MiB, 23)]
)
def test_order_of(size: int, order: int) -> None:
    assert order_of(size) == order


@pytest.mark.parametrize("size", [0, 2 * KiB, 3 * MiB, 64 * MiB])
def test_order_of_rejects(size: int) -> None:
    with pytest.raises(CliError):
        order_of(size)


@pytest.mark.parametrize(
    ("values", "mask"),
    [
        (["layering"], 1),
        (["layering,exclusive-lock", "object-map"], 1 | 4 | 8),
        (["Layering", " deep-flatten "], 1 | 32),
        (["61"], 61),
        ([], 0),
    ],
)
def test_parse_features(values: list[str], mask: int) -> None:
    assert parse_features(values) == mask


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["bogus"], "unknown image feature 'bogus'"),
        (["fast-diff"], "image feature fast-diff needs object-map"),
        (["object-map"], "image feature object-map needs exclusive-lock"),
    ],
)
def test_parse_features_rejects(values: list[str], message: str) -> None:
    with pytest.raises(CliError) as caught:
        parse_features(values)
    assert caught.value.message.startswith(message)


def test_feature_names() -> None:
    assert feature_names(61) == [
        "layering",
        "exclusive-lock",
        "object-map",
        "fast-diff",
        "deep-flatten",
    ]
    assert feature_names(1 | 1024) == ["layering", "0x400"]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (4 * MiB, "4 MiB"),
        (10 * GiB, "10 GiB"),
        (3 * GiB // 2, "1.5 GiB"),
        (110592, "108 KiB"),
        (100 * MiB + 1, "100 MiB"),
        (12 * MiB + MiB // 4, "12.2 MiB"),
        (TiB, "1 TiB"),
    ],
)
def test_human_size(value: int, text: str) -> None:
    assert human_size(value) == text


def test_table_alignment() -> None:
    text = table([Column("NAME"), Column("SIZE", True)], [["a", "1 MiB"], ["long-name", "10 GiB"]])
    assert text.splitlines() == [
        "NAME       SIZE",
        "a           1 MiB",
        "long-name  10 GiB",
    ]
