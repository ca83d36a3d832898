"""The native engine's ``write_pieces``: many scattered writes as one I/O.

The cache writes back through it (one call per object of dirty pages); the
model test (:mod:`tests.engine.test_model`) checks it against a bytearray
among snapshots, clones and resizes. Here: what the model does not draw.
"""

from __future__ import annotations

from typing import Any

import pytest

from csi_rbd.engine.native import RBD, Image, InvalidArgument, ReadOnlyImage
from csi_rbd.engine.native.objects import WRITE_PIECE
from tests.engine.conformance import pattern

ORDER = 16  # 64 KiB objects
OBJ = 1 << ORDER


def _image(local: Any, objects: int = 8) -> Image:
    RBD().create(local, "img", objects * OBJ, order=ORDER)
    return Image(local, "img")


def test_pieces_land_in_order_across_objects(local: Any) -> None:
    with _image(local) as image:
        pieces = [
            (OBJ - 100, pattern(300, 1)),  # spans objects 0 and 1
            (5 * OBJ, pattern(4096, 2)),
            (OBJ - 50, pattern(100, 3)),  # overlaps the first piece: the later one wins
            (0, b""),
        ]
        assert image.write_pieces(pieces) == 4496
        expected = bytearray(8 * OBJ)
        for offset, data in pieces:
            expected[offset : offset + len(data)] = data
        assert image.read(0, 8 * OBJ) == bytes(expected)


def test_one_bad_piece_writes_nothing(local: Any) -> None:
    with _image(local) as image:
        with pytest.raises(InvalidArgument, match="past the end"):
            image.write_pieces([(0, pattern(512, 1)), (8 * OBJ - 10, pattern(20, 2))])
        with pytest.raises(InvalidArgument):
            image.write_pieces([(0, pattern(512, 1)), (-1, b"x")])
        assert image.read(0, 8 * OBJ) == bytes(8 * OBJ)


def test_snapshot_handle_refuses(local: Any) -> None:
    with _image(local) as image:
        image.create_snap("s")
    with Image(local, "img", snapshot="s") as snap, pytest.raises(ReadOnlyImage):
        snap.write_pieces([(0, b"x")])


def test_pieces_after_a_snapshot_copy_up(local: Any) -> None:
    """The first write after a snapshot copies the object up; the snapshot keeps the old bytes."""
    with _image(local) as image:
        image.write(pattern(8 * OBJ, 1), 0)
        image.create_snap("s")
        image.write_pieces([(10, pattern(10, 2)), (OBJ + 10, pattern(10, 3))])
        head = image.read(0, 2 * OBJ)
    old = pattern(8 * OBJ, 1)
    assert head[10:20] == pattern(10, 2) and head[OBJ + 10 : OBJ + 20] == pattern(10, 3)
    assert head[:10] == old[:10] and head[20:OBJ] == old[20:OBJ]
    with Image(local, "img", snapshot="s") as snap:
        assert snap.read(0, 8 * OBJ) == old


def test_large_writes_reach_the_file_whole(local: Any) -> None:
    """Writes larger than WRITE_PIECE go to the file in pieces; every byte arrives."""
    RBD().create(local, "big", 4 << 20, order=22)
    with Image(local, "big") as image:
        data = pattern(3 * WRITE_PIECE + 123, 7)
        image.write(data, 1000)
        image.write_pieces([(2 << 20, data)])
        assert image.read(1000, len(data)) == data
        assert image.read(2 << 20, len(data)) == data
