"""tracker.history.decoded: decoded chunks kept by content, within a byte budget."""

from __future__ import annotations

import numpy as np
import pytest

from tracker.history import codec
from tracker.history.codec import Positions
from tracker.history.decoded import DecodedChunks

BYTES_PER_POSITION = 56
"""Seven 8-byte columns."""


def blob(vehicle: int, count: int = 100) -> bytes:
    """A chunk of ``count`` positions of ``vehicle``."""
    ts = 1_764_000_000.0 + np.arange(count, dtype=np.float64)
    positions = Positions.from_columns(
        np.full(count, vehicle), ts, 52.5 + ts % 7 * 1e-4, np.full(count, 13.4), ts % 30, ts % 360
    )
    return codec.encode(positions.with_cells(7))


def size(chunk: bytes, count: int = 100) -> int:
    return len(chunk) + count * BYTES_PER_POSITION


def assert_same(got: list[Positions], want: list[Positions]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        for column_a, column_b in zip(a, b, strict=True):
            np.testing.assert_array_equal(column_a, column_b)


def test_without_a_budget_nothing_is_kept() -> None:
    decoded = DecodedChunks()
    chunks = [blob(1), blob(2)]
    assert_same(decoded.decode_many(chunks), codec.decode_many(chunks))
    assert len(decoded) == 0 and decoded.kept_bytes == 0


def test_kept_chunks_come_back_the_same_read_only_and_in_the_order_asked() -> None:
    decoded = DecodedChunks(10 * size(blob(1)))
    first, second, third = blob(1), blob(2), blob(3)
    assert_same(decoded.decode_many([first, second]), codec.decode_many([first, second]))
    again = decoded.decode_many([second, third, first, first])  # kept, new, kept, twice
    assert_same(again, codec.decode_many([second, third, first, first]))
    assert again[2] is again[3] is decoded.decode_many([first])[0]
    assert len(decoded) == 3
    assert decoded.kept_bytes == size(first) + size(second) + size(third)
    with pytest.raises(ValueError, match="read-only"):
        again[0].lat[0] = 0.0


def test_the_least_recently_used_leave_beyond_the_budget() -> None:
    chunks = [blob(n) for n in range(4)]
    decoded = DecodedChunks(3 * size(chunks[0]) + 10)
    decoded.decode_many(chunks[:3])
    decoded.decode_many([chunks[0]])  # used: 1 is now the oldest
    decoded.decode_many([chunks[3]])
    assert len(decoded) == 3 and decoded.kept_bytes <= decoded.max_bytes
    kept = decoded._kept
    assert chunks[1] not in kept and all(chunks[n] in kept for n in (0, 2, 3))


def test_a_chunk_larger_than_the_budget_is_decoded_but_not_kept() -> None:
    large = blob(1, count=1000)
    decoded = DecodedChunks(size(large) - 1)
    assert_same(decoded.decode_many([large]), codec.decode_many([large]))
    assert len(decoded) == 0 and decoded.kept_bytes == 0


def test_a_damaged_chunk_is_refused_and_nothing_of_its_call_is_kept() -> None:
    decoded = DecodedChunks(10**6)
    with pytest.raises(ValueError):
        decoded.decode_many([blob(1), b"TH" + b"\x00" * 40])
    assert len(decoded) == 0
