"""The cluster engine's queue of bytes to write, taken a slice at a time."""

from __future__ import annotations

import random

from dbservice.engine.cluster.pieces import Pieces


def test_everything_that_fits_leaves_in_one_piece() -> None:
    pieces = Pieces()
    pieces.extend([b"ab", b"cd", b"e"])
    assert pieces.queued == 5
    assert pieces.take(5) == b"abcde"
    assert not pieces and pieces.queued == 0


def test_slices_cut_anywhere_give_back_the_bytes_in_order() -> None:
    rng = random.Random(7)
    for _ in range(200):
        data = [
            bytes([rng.randrange(256)]) * rng.randrange(1, 50) for _ in range(rng.randrange(1, 8))
        ]
        pieces = Pieces()
        pieces.extend(data)
        out = b""
        while pieces:
            limit = rng.randrange(1, 40)
            before = pieces.queued
            taken = bytes(pieces.take(limit))
            assert 0 < len(taken) <= limit and pieces.queued == before - len(taken)
            out += taken
        assert out == b"".join(data) and pieces.queued == 0
